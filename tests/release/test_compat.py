"""release.compat: the minimum client and platform rules, as a pure function."""

from __future__ import annotations

import pytest

from p2pnode import __version__
from p2pnode.errors import ClientTooOldError, IncompatibleError, PlatformError
from p2pnode.release import manifest as M
from p2pnode.release.compat import check_compatible
from p2pnode.release.metadata import ReleaseInfo, this_platform
from tests.support.release import small_manifest


def _manifest(info: ReleaseInfo) -> M.Manifest:
    return small_manifest(version="2.0", build=2, info=info)


@pytest.mark.parametrize(
    ("minimum", "client", "ok"),
    [
        (None, "0.0.1", True),
        ("0.1.0", "0.1.0", True),
        ("0.1", "0.1.0", True),  # PEP 440: equal
        ("0.1.1", "0.1.0", False),
        ("1.0", "1.0rc1", False),  # a release candidate is older than the release
        ("1.0rc1", "1.0", True),
        ("0.2", "0.10", True),  # compared as versions, not text
    ],
)
def test_min_client_is_compared_as_a_pep440_version(
    minimum: str | None, client: str, ok: bool
) -> None:
    m = _manifest(ReleaseInfo(min_client=minimum))
    if ok:
        check_compatible(m, client=client, platform="linux/x86_64")
        return
    with pytest.raises(ClientTooOldError) as info:
        check_compatible(m, client=client, platform="linux/x86_64")
    err = info.value
    assert isinstance(err, IncompatibleError)
    assert (
        f"p2pnode {minimum} or newer" in err.message and f"this is p2pnode {client}" in err.message
    )
    assert "upgrade p2pnode" in err.fix


def test_the_running_client_is_the_default() -> None:
    check_compatible(_manifest(ReleaseInfo(min_client=__version__)))
    with pytest.raises(ClientTooOldError, match=f"this is p2pnode {__version__}"):
        check_compatible(_manifest(ReleaseInfo(min_client="999.0")))


def test_a_build_for_other_platforms_is_refused_naming_both() -> None:
    m = _manifest(ReleaseInfo(platforms=("macos/arm64", "windows/x86_64")))
    check_compatible(m, platform="macos/arm64")
    with pytest.raises(PlatformError) as info:
        check_compatible(m, platform="linux/x86_64")
    assert info.value.message == (
        "game 2.0 (build 2) is built for macos/arm64, windows/x86_64; this machine is linux/x86_64"
    )
    for anywhere in ((), ("any",)):
        check_compatible(_manifest(ReleaseInfo(platforms=anywhere)), platform="freebsd/x86")
    check_compatible(_manifest(ReleaseInfo(platforms=(this_platform(),))))
