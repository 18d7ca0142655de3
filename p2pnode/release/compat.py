"""Whether this node can install a genuine build: its minimum client and its platforms.

:mod:`p2pnode.release.trust` says whether a verified manifest is *welcome* (same app, no
downgrade); this says whether this node is *able* to install it. Both run before anything is
fetched or touched, on every path that installs (``install``, ``update``, ``watch``, and the
client service): a node too old for a build, or on a platform the build is not for, learns it
from the manifest alone instead of after downloading gigabytes it cannot use.

Pure: the client's version and the machine's platform are arguments (defaulting to this
process's), so the rules are tested without faking the interpreter.
"""

from __future__ import annotations

from packaging.version import InvalidVersion, Version

from .. import __version__
from ..errors import ClientTooOldError, PlatformError
from . import manifest as M
from .metadata import this_platform

__all__ = ["check_compatible"]


def check_compatible(
    manifest: M.Manifest, *, client: str = __version__, platform: str | None = None
) -> None:
    """Raise unless a p2pnode of version ``client`` on ``platform`` (``os/arch``; default this
    machine) may install ``manifest``.

    Raises:
        ClientTooOldError: the manifest's ``min_client`` is newer than ``client``.
        PlatformError: the manifest names its platforms and ``platform`` is not among them.
    """
    info = manifest.info
    what = f"{manifest.app} {manifest.version} (build {manifest.build})"
    if info.min_client is not None and _older(client, info.min_client):
        raise ClientTooOldError(
            f"{what} needs p2pnode {info.min_client} or newer; this is p2pnode {client}",
            fix=f"upgrade p2pnode to {info.min_client} or newer, then run the same command again",
        )
    here = this_platform() if platform is None else platform
    if not info.runs_on(here):
        raise PlatformError(
            f"{what} is built for {', '.join(info.platforms)}; this machine is {here}",
        )


def _older(client: str, minimum: str) -> bool:
    try:
        return Version(client) < Version(minimum)
    except InvalidVersion:  # a development build with a local name: let it through
        return False
