"""p2pnode: peer-to-peer content distribution for game and software updates.

The package is layered like httpx over httpcore: pure, sans-IO logic (``manifest``,
``chunker``, ``plan``, the fetch scheduler) underneath a thin trio shell (``cdn``, ``install``,
``cli``). See ``docs/architecture.md`` for the data flow and which module holds each step.
"""

from .errors import P2PNodeError

__all__ = ["P2PNodeError", "__version__"]
__version__ = "0.1.0"
