"""Where verified chunks land: the chunk store, the stage and its journal, the install state,
the atomic switch with its recovery and harvest, and scanning an install in place."""
