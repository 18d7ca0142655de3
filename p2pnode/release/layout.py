"""Where things live on a CDN, as plain files any static HTTP server can host.

::

    CDN_ROOT/<app>/<build>/manifest.p2pm     the signed manifest of that build
    CDN_ROOT/<app>/<build>/files/<path>      the release's files, as-is
    CDN_ROOT/<app>/<build>/patches/pack      the build's delta patches, back to back (format 2
                                             manifests give each one's offset and size)
    CDN_ROOT/<app>/channels/<channel>.p2pm   a copy of the channel's latest signed manifest
    CDN_ROOT/<app>/rotations                 the app's publisher key rotations, if it has any
                                             (release/rotation.py; `tracker app rotate-key --out`)

A *mirror* is a URL (or local directory) where ``CDN_ROOT`` is served. Builds are integers, so
``channels`` never collides with a build directory, and every manifest URL in this layout sits
exactly three path segments below the root: that is how a node derives the default mirror from
the URL it was given.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

from ..errors import UsageError

__all__ = [
    "MANIFEST_NAME",
    "channel_manifest_path",
    "file_path",
    "manifest_path",
    "mirror_root_of",
    "patch_pack_path",
    "release_dir",
    "rotations_path",
]

MANIFEST_NAME = "manifest.p2pm"
#: The patch pack, as a path inside a release's ``patches`` area (``file_path(..., area=)``).
PATCH_PACK = "pack"


def release_dir(app: str, build: int) -> str:
    return f"{app}/{build}"


def manifest_path(app: str, build: int) -> str:
    return f"{release_dir(app, build)}/{MANIFEST_NAME}"


def channel_manifest_path(app: str, channel: str) -> str:
    return f"{app}/channels/{channel}.p2pm"


def rotations_path(app: str) -> str:
    return f"{app}/rotations"


def file_path(app: str, build: int, path: str, area: str = "files") -> str:
    """The URL path of a release file (or, with ``area="patches"``, of a file of the
    release's patches) below the mirror root, percent-encoded."""
    return f"{release_dir(app, build)}/{area}/{quote(path)}"


def patch_pack_path(app: str, build: int) -> str:
    return file_path(app, build, PATCH_PACK, area="patches")


def mirror_root_of(manifest_location: str) -> str:
    """The mirror root (URL or directory) a manifest URL or path was served from."""
    if "://" in manifest_location:
        parts = urlsplit(manifest_location)
        segments = parts.path.split("/")
        if len(segments) < 4:
            raise UsageError(
                f"cannot tell the mirror root from {manifest_location}",
                fix="pass --mirror BASE_URL (the URL where the publish directory is served)",
            )
        root = "/".join(segments[:-3]) + "/"
        return urlunsplit((parts.scheme, parts.netloc, root, "", ""))
    return str(Path(manifest_location).resolve().parents[2]) + "/"
