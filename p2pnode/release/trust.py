"""Whether an offered, verified manifest may replace the installed one.

The signature and expiry say a manifest is genuine (``manifest.verify``); these rules say it is
*welcome* here. They run before anything on disk is touched, are pure (manifests in, a verdict
or an error out) and are shared by every path that installs: ``install``, ``update``, ``watch``.

* Keys: the ones passed (``--trust``), else the ones pinned by the first install.
* Same app: an install directory holds one app.
* No downgrade: a lower build is a rollback attack unless the owner asks (``p2pnode rollback``).
* No equivocation: a second, different manifest for the installed build means the publisher's
  key signed two contents under one build number; neither can be preferred, so none is taken.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence

from ..errors import DowngradeError, InstallError, NotInstalledError
from . import keys
from . import manifest as M

__all__ = ["Offer", "judge_offer", "trusted_keys"]


class Offer(enum.Enum):
    """What installing an offered manifest would be."""

    FRESH = "fresh"  # nothing is installed yet
    UPDATE = "update"  # a newer build of the installed app
    UNCHANGED = "unchanged"  # exactly the installed build: nothing to do


def trusted_keys(given: Sequence[bytes], pinned: Iterable[str]) -> set[bytes]:
    """The publisher keys to verify against: ``given`` (raw keys), else the ``pinned`` ones
    (as ``format_public_key`` wrote them into state.json)."""
    if given:
        return set(given)
    return {keys.parse_public_key(k) for k in pinned}


def judge_offer(
    offered: M.Manifest,
    current: M.Manifest | None,
    where: object,
    *,
    require_installed: bool = False,
) -> Offer:
    """How ``offered`` relates to ``current`` (the installed build, if any) in ``where`` (an
    install directory, named in errors).

    Raises:
        NotInstalledError: nothing is installed and ``require_installed`` (``update``).
        InstallError: ``where`` holds another app.
        DowngradeError: a lower build, or another manifest for the installed build.
    """
    if current is None:
        if require_installed:
            raise NotInstalledError(f"nothing is installed in {where} to update")
        return Offer.FRESH
    if current.app != offered.app:
        raise InstallError(
            f"{where} holds {current.app}, not {offered.app}",
            fix="install each app into its own directory",
        )
    if offered.id == current.id:
        return Offer.UNCHANGED
    if offered.build < current.build:
        raise DowngradeError(
            f"{where} has build {current.build}; the manifest offers older build {offered.build}"
        )
    if offered.build == current.build:
        raise DowngradeError(
            f"build {offered.build} is installed with different content than this "
            "manifest describes (two manifests claim one build)",
            fix="ask the publisher which manifest is genuine; do not install this one",
        )
    return Offer.UPDATE
