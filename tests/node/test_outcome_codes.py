"""An install's error becomes a stable failure code the tracker accepts."""

from __future__ import annotations

import errno

import trio

from p2pnode.discovery.tracker_api import OUTCOME_CODES
from p2pnode.errors import (
    CDNError,
    ChunkHashError,
    ClientTooOldError,
    DiskSpaceError,
    DowngradeError,
    InstallError,
    NoRollbackError,
    PlatformError,
    SignatureError,
    TrackerError,
    UnsafePathError,
)
from p2pnode.node.tracking import outcome_code


def caused(outer: BaseException, inner: BaseException) -> BaseException:
    try:
        try:
            raise inner
        except BaseException as exc:
            raise outer from exc
    except BaseException as exc:
        return exc


def test_errors_map_to_stable_codes_the_root_cause_first() -> None:
    cases = [
        ("download_failed", CDNError("every mirror failed")),
        ("corrupted_download", ChunkHashError("bad chunk")),
        ("signature_invalid", SignatureError("bad signature")),
        ("integrity_check_failed", UnsafePathError("../etc")),
        ("downgrade_refused", DowngradeError("older")),
        ("client_too_old", ClientTooOldError("needs 9.0")),
        ("platform_unsupported", PlatformError("for windows/x86_64")),
        ("insufficient_storage", DiskSpaceError("full")),
        ("rollback_failed", NoRollbackError("nothing kept")),
        ("tracker_unreachable", TrackerError("down")),
        ("install_failed", InstallError("state")),
        ("network_timeout", trio.TooSlowError()),
        ("permission_denied", caused(InstallError("cannot write"), PermissionError(13, "no"))),
        (
            "insufficient_storage",
            caused(InstallError("staging failed"), OSError(errno.ENOSPC, "No space left")),
        ),
        ("other", ValueError("a bug")),
    ]
    for code, exc in cases:
        assert outcome_code(exc) == code, (code, exc)
        assert code in OUTCOME_CODES
