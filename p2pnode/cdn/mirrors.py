"""Which CDN mirrors an install asks, in which order.

A mirror given on the command line is the user's choice and stands alone. Otherwise the root
the manifest was fetched from comes first (it demonstrably holds this release), then the
mirrors the signed manifest lists, then the ones that served the previous install (state.json
keeps them for repair and rollback, when no manifest URL is at hand).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import P2PNodeError
from ..release import layout
from ..release import manifest as M

__all__ = ["normalise_mirror", "resolve_mirrors"]


def normalise_mirror(root: str) -> str:
    """A URL root ends in ``/`` so that release paths join under it; a directory stays as is."""
    return root if root.endswith("/") or "://" not in root else root + "/"


def resolve_mirrors(
    explicit: Sequence[str],
    location: str | None,
    manifest: M.Manifest,
    previous: Sequence[str] = (),
) -> list[str]:
    """Mirror roots in order of preference, each once: ``explicit`` ones alone, or the root
    ``location`` (the manifest's URL or path) was served from, the mirrors the signed manifest
    lists, and ``previous`` (the ones used last)."""
    if explicit:
        found = [normalise_mirror(m) for m in explicit]
    else:
        found = []
        if location is not None:
            try:
                found.append(layout.mirror_root_of(location))
            except P2PNodeError:
                pass  # not a release's manifest path: the other sources still apply
        found += [*manifest.mirrors, *previous]
    return list(dict.fromkeys(found))
