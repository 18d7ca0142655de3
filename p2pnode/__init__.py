"""p2pnode: peer-to-peer content distribution for game and software updates.

The subpackages follow a chunk's path, each importing only those before it:
``release`` (manifest, chunker, keys, publish) -> ``cdn`` (range plan and fetcher) and
``disk`` (store, stage, state, switch) -> ``swarm`` (wire, sessions, scheduler, node) and
``discovery`` (DHT, LAN, tracker) -> ``node`` (install, verify, watch, cli). ``errors``,
``identity``, ``progress``, ``ratelimit`` and ``units`` are shared by all. See
``docs/architecture.md``.
"""

from .errors import P2PNodeError

__all__ = ["P2PNodeError", "__version__"]
__version__ = "0.1.0"
