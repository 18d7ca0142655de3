"""Learning an app's publisher key rotations (release/rotation.py) when a build arrives
signed by a key this node does not trust yet.

The statements come from the node's tracker (``GET /v1/apps/APP/rotations``) and from a
``APP/rotations`` file on the mirror (a CDN install with no tracker); each source may be
missing or broken, and none is trusted: :func:`p2pnode.release.rotation.follow` keeps only the
chain the pinned keys sign. What was learnt is kept in state.json (``rotations``), so a
restarted node still refuses the retired key's builds after its date.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence

from ..cdn.manifest import read_document
from ..errors import P2PNodeError
from ..release import layout
from ..release import manifest as M
from ..release import rotation as R
from ..release.layout import mirror_root_of

__all__ = ["key_ring", "rotation_sources"]

log = logging.getLogger(__name__)


def rotation_sources(location: str, tracker: str | None, app: str) -> list[str]:
    """Where rotations of ``app`` may be found: the tracker, then the app's folder on the
    mirror the manifest came from (release/layout.py)."""
    found = []
    if tracker:
        found.append(f"{tracker.rstrip('/')}/v1/apps/{app}/rotations")
    if "/v1/manifests/" not in location:  # a tracker's manifest URL: the tracker answers
        try:
            found.append(mirror_root_of(location) + layout.rotations_path(app))
        except P2PNodeError:
            pass  # not in the CDN layout: nothing is beside it
    return found


async def key_ring(
    signed: M.SignedManifest,
    trusted: Collection[bytes],
    kept: Sequence[str],
    location: str,
    tracker: str | None,
) -> R.KeyRing:
    """The keys ``signed`` is checked against: ``trusted`` and the rotations ``kept`` (hex,
    from state.json); if its key is not among them, rotations fetched from its sources too."""
    app = signed.manifest.app
    held = []
    for text in kept:
        try:
            held.append(R.parse_rotation(bytes.fromhex(text), source="a kept key rotation"))
        except (ValueError, P2PNodeError) as exc:
            log.warning("ignoring a damaged key rotation in the install's state: %s", exc)
    ring = R.follow(trusted, app, held)
    if signed.manifest.key in ring:
        return ring
    fetched: list[R.SignedRotation] = []
    for source in rotation_sources(location, tracker, app):
        try:
            data = await read_document(source, R.MAX_ROTATIONS_BYTES, "key rotations")
            fetched += R.parse_list(data, source=source)
        except P2PNodeError as exc:  # no such file, or not one: the manifest's key decides
            log.debug("no key rotations from %s: %s", source, exc)
    return R.follow(trusted, app, [*held, *fetched]) if fetched else ring
