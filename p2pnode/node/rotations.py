"""Learning an app's publisher key rotations (release/rotation.py).

A node learns of them two ways:

* a build arrives signed by a key it does not trust yet (an install or update, or a peer's
  pushed manifest: swarm/offers.py asks here through ``Shell.learn_keys``): :func:`key_ring`
  fetches the chain from the build's sources and follows it from the pinned keys;
* its tracker's feed names the app's chain (``key_chain``, the digest of the rotations
  document) and it is not the one this node read last: :func:`learn_chain` (``watch``, the
  daemon's followers, ``update``) fetches and follows it, so a node that never meets a build
  of the new key still refuses the old key's builds once ``old_until`` has passed (the point
  of rotating a key that may have leaked).

The statements come from the node's tracker (``GET /v1/apps/APP/rotations``) and from an
``APP/rotations`` file on the mirrors; each source may be missing or broken, none is trusted:
:func:`p2pnode.release.rotation.follow` keeps only the chain the pinned keys sign. Fetches are
bounded (:data:`FETCH_TIMEOUT` each, the document's size cap).

What was learnt is kept beside the install: state.json's ``rotations`` (what installs learnt,
under the install lock) and ``keychain.json`` (what polls learnt, with the digest it was read
against). The second is written without the install lock, which a serving watcher holds for
good: it only grows, and its digest and statements are written together, so a write lost to a
concurrent one is simply read again at the next poll. Every later manifest of the install
(install, update, watch, the daemon, the swarm's pushes) is checked against both.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection, Sequence
from pathlib import Path

import trio

from ..cdn.manifest import read_document
from ..disk.fsutil import write_atomic
from ..disk.state import InstallState, StateDir
from ..errors import P2PNodeError
from ..release import layout
from ..release import rotation as R
from ..release.layout import mirror_root_of
from ..release.trust import trusted_keys

__all__ = [
    "FETCH_TIMEOUT",
    "KEYCHAIN_FILE",
    "InstallKeys",
    "chain_read",
    "held_rotations",
    "install_sources",
    "key_ring",
    "learn_chain",
    "rotation_sources",
]

log = logging.getLogger(__name__)

#: Where an install keeps the chain its polls learnt, in its state directory.
KEYCHAIN_FILE = "keychain.json"
#: One source's answer, at most (seconds): a slow mirror costs a late rotation, not a stall.
FETCH_TIMEOUT = 10.0
_MAX_KEYCHAIN_BYTES = 4 * R.MAX_ROTATIONS_BYTES


def rotation_sources(app: str, tracker: str | None, mirrors: Sequence[str] = ()) -> list[str]:
    """Where rotations of ``app`` may be found: the tracker, then the app's folder on each
    mirror root (release/layout.py)."""
    found = [f"{tracker.rstrip('/')}/v1/apps/{app}/rotations"] if tracker else []
    for root in mirrors:
        url = root.rstrip("/") + "/" + layout.rotations_path(app)
        if url not in found:
            found.append(url)
    return found


def install_sources(location: str, tracker: str | None, app: str) -> list[str]:
    """A manifest's sources: the tracker, and the mirror it came from (a tracker's manifest
    URL has none: the tracker answers)."""
    roots: list[str] = []
    if "/v1/manifests/" not in location:
        try:
            roots.append(mirror_root_of(location))
        except P2PNodeError:
            pass  # not in the CDN layout: nothing is beside it
    return rotation_sources(app, tracker, roots)


def _parse_kept(texts: Sequence[object], where: str) -> list[R.SignedRotation]:
    held = []
    for text in texts:
        try:
            if not isinstance(text, str):
                raise ValueError("not hex text")
            held.append(R.parse_rotation(bytes.fromhex(text), source="a kept key rotation"))
        except (ValueError, P2PNodeError) as exc:
            log.warning("ignoring a damaged key rotation in %s: %s", where, exc)
    return held


def _read_keychain(sd: StateDir) -> tuple[str | None, list[str]]:
    """The poll-learnt chain: the digest it was read against, and its statements (hex)."""
    path = sd.root / KEYCHAIN_FILE
    try:
        with open(path, "rb") as f:
            obj = json.loads(f.read(_MAX_KEYCHAIN_BYTES + 1))
        chain, texts = obj.get("key_chain"), obj.get("rotations")
        if not isinstance(texts, list) or not (chain is None or isinstance(chain, str)):
            raise ValueError("not a key chain")
        return chain, texts[: R.MAX_ROTATIONS]
    except FileNotFoundError:
        return None, []
    except (OSError, ValueError, AttributeError) as exc:
        log.warning("ignoring a damaged %s: %s", path, exc)
        return None, []


def chain_read(sd: StateDir) -> str | None:
    """The digest of the chain this install's polls read last (blocking: a small read)."""
    return _read_keychain(sd)[0]


def held_rotations(sd: StateDir, state: InstallState | None) -> list[R.SignedRotation]:
    """The rotations this install learnt: its state's, then its polls' (blocking: small
    reads). A damaged entry is left out (the chain is fetched again when needed)."""
    texts: list[object] = list(state.rotations) if state is not None else []
    texts += [t for t in _read_keychain(sd)[1] if t not in texts]
    return _parse_kept(texts, str(sd.root))


async def _fetch(sources: Sequence[str]) -> list[tuple[bytes, list[R.SignedRotation]]]:
    """Each source's rotations document, raw and parsed; a source that fails is left out."""
    found = []
    for source in sources:
        try:
            with trio.fail_after(FETCH_TIMEOUT):
                data = await read_document(source, R.MAX_ROTATIONS_BYTES, "key rotations")
            found.append((data, R.parse_list(data, source=source)))
        except (P2PNodeError, trio.TooSlowError) as exc:  # none there, or not one
            log.debug("no key rotations from %s: %r", source, exc)
    return found


async def key_ring(
    app: str,
    key: bytes,
    trusted: Collection[bytes],
    held: Sequence[R.SignedRotation],
    sources: Sequence[str],
    *,
    fetch: bool = False,
) -> R.KeyRing:
    """The keys a build of ``app`` signed by ``key`` is checked against: ``trusted`` and the
    rotations ``held``; if ``key`` is not among them (or ``fetch``: the feed named a chain
    not read yet), rotations fetched from ``sources`` too. The one way every path (the
    tracker's and the CDN's manifests, a peer's push) learns."""
    ring = R.follow(trusted, app, held)
    if (key in ring and not fetch) or not sources:
        return ring
    fetched = [s for _, doc in await _fetch(sources) for s in doc]
    return R.follow(trusted, app, [*held, *fetched]) if fetched else ring


class InstallKeys:
    """One install's keys for its app, as its swarm checks the manifests peers push
    (swarm/offers.py's ``AppKeys``): its pinned keys (or ``trusted``) and the rotations it
    holds, read again at each check so that a chain its feed polls learnt applies at once, and
    those fetched for a push signed by a key it did not know (:func:`key_ring`, as installs)."""

    def __init__(
        self, sd: StateDir, app: str, trusted: Collection[bytes] = (), tracker: str | None = None
    ) -> None:
        self.sd, self.app, self.trusted, self.tracker = sd, app, list(trusted), tracker
        self._fetched: list[R.SignedRotation] = []

    def _known(self) -> tuple[set[bytes], list[R.SignedRotation], list[str]]:
        state = self.sd.load() if self.sd.exists else InstallState()
        held = [*held_rotations(self.sd, state), *self._fetched]
        pinned = trusted_keys(self.trusted, state.trusted)
        return pinned, held, rotation_sources(self.app, self.tracker, state.mirrors)

    def ring(self) -> R.KeyRing:
        """Blocking (reads the install's state)."""
        pinned, held, _ = self._known()
        return R.follow(pinned, self.app, held)

    async def learn(self, key: bytes) -> R.KeyRing:
        pinned, held, sources = await trio.to_thread.run_sync(self._known)
        ring = await key_ring(self.app, key, pinned, held, sources)
        new = [s for s in ring.learned if s not in held]
        self._fetched = [*self._fetched, *new][: R.MAX_ROTATIONS]
        return ring


async def learn_chain(
    dest: Path, app: str, chain: str, tracker: str, trusted: Sequence[bytes] = ()
) -> int:
    """The feed named ``chain`` for ``app``: unless it is the chain this install read last,
    fetch the rotations (tracker, then the install's mirrors), follow them from its pinned
    keys (or ``trusted``) and keep what is new. Returns how many statements were new."""
    sd = StateDir(dest)

    def read() -> tuple[InstallState, str | None, list[str], list[R.SignedRotation]]:
        state = sd.load() if sd.exists else InstallState()
        last, texts = _read_keychain(sd)
        return state, last, texts, held_rotations(sd, state)

    state, last, texts, held = await trio.to_thread.run_sync(read)
    if last == chain or state.app != app:
        return 0  # read already; or nothing installed yet (its install reads the chain)
    pinned = trusted_keys(trusted, state.trusted)
    if not pinned:
        return 0  # nothing pinned: nothing to follow from
    docs = await _fetch(rotation_sources(app, tracker, state.mirrors))
    ring = R.follow(pinned, app, [*held, *(s for _, doc in docs for s in doc)])
    new = [s for s in ring.learned if s not in held]
    read_all = any(R.chain_digest(raw) == chain for raw, _ in docs)
    if new or read_all:
        texts = [*texts, *(s.encode().hex() for s in new)][: R.MAX_ROTATIONS]
        body = {"key_chain": chain if read_all else last, "rotations": texts}
        data = json.dumps(body, indent=2).encode() + b"\n"
        await trio.to_thread.run_sync(_write, sd, data)
    return len(new)


def _write(sd: StateDir, data: bytes) -> None:
    if sd.root.is_dir():  # (a poll never creates an install's state directory)
        write_atomic(sd.root / KEYCHAIN_FILE, data, 0o600)
