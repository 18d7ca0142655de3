"""Release metadata: what a publisher says about a build besides its files (manifest format 2).

Four optional fields, signed with the rest of the manifest:

* ``update_type``: ``critical``, ``major``, ``minor``, ``hotfix`` or ``beta``. The client service
  queues a critical update ahead of the rest and outside update windows; absent (every format-1
  manifest) means an ordinary update.
* ``notes``: release notes, UTF-8 text of at most ``MAX_NOTES_BYTES``, shown by the tracker's
  feed and dashboard.
* ``min_client``: the oldest p2pnode (a PEP 440 version) that may install the build; an older
  node says so and fetches nothing (:mod:`p2pnode.release.compat`).
* ``platforms``: the ``os/arch`` pairs the build is for (``linux/x86_64``, ``macos/arm64``,
  ``any``); absent means any. A node on another platform refuses it before fetching.

On the wire each field is present only when set, and in exactly one spelling (platforms
normalised, sorted and unique; ``min_client`` in PEP 440 normal form), so that a manifest has one
canonical encoding (bencode leniency: decoding is checked to be canonical, and a second spelling
of the same value would give one release two ids). A publisher's loose spellings (``amd64``,
``Linux/AARCH64``, ``1.0``) are normalised by :func:`normalise_platform` and
:func:`normalise_version` before signing; the parser refuses anything not already normal.
"""

from __future__ import annotations

import enum
import platform as _platform
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from packaging.version import InvalidVersion, Version

from ..errors import ManifestError

__all__ = [
    "ANY_PLATFORM",
    "ARCHES",
    "MAX_NOTES_BYTES",
    "MAX_PLATFORMS",
    "OSES",
    "ReleaseInfo",
    "UpdateType",
    "normalise_platform",
    "normalise_platforms",
    "normalise_version",
    "this_platform",
]

#: Release notes are read by people in a feed and a dashboard: 16 KiB is several screens of
#: text, and bounds what every feed answer and every stored head may carry.
MAX_NOTES_BYTES = 16 * 1024
#: Every (os, arch) pair below is 4 x 4 = 16.
MAX_PLATFORMS = 16
#: PEP 440 allows long versions; ours are short, and the bound keeps a hostile one cheap.
MAX_VERSION_BYTES = 64

ANY_PLATFORM = "any"
OSES = ("freebsd", "linux", "macos", "windows")
ARCHES = ("arm64", "armv7", "x86", "x86_64")
#: Names that platform.machine(), sys.platform, Go, Rust and Debian use for the same thing.
_OS_ALIASES = {
    "darwin": "macos",
    "mac": "macos",
    "macosx": "macos",
    "osx": "macos",
    "win": "windows",
    "win32": "windows",
    "win64": "windows",
    "cygwin": "windows",
    "linux2": "linux",
    "freebsd13": "freebsd",
    "freebsd14": "freebsd",
}
_ARCH_ALIASES = {
    "amd64": "x86_64",
    "x64": "x86_64",
    "x86-64": "x86_64",
    "aarch64": "arm64",
    "arm64e": "arm64",
    "armv8": "arm64",
    "i386": "x86",
    "i486": "x86",
    "i586": "x86",
    "i686": "x86",
    "386": "x86",
    "armv7l": "armv7",
    "armhf": "armv7",
}

#: Control characters (but tab, line feed, carriage return) and lone surrogates.
_BAD_NOTES = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")

#: Wire keys of the fields this module owns inside the manifest's top-level dictionary.
KEYS = frozenset({b"update_type", b"notes", b"min_client", b"platforms"})


class UpdateType(enum.StrEnum):
    """How the publisher ranks a build; only ``critical`` changes what a node does."""

    CRITICAL = "critical"
    MAJOR = "major"
    MINOR = "minor"
    HOTFIX = "hotfix"
    BETA = "beta"


def normalise_platform(text: str) -> str:
    """``os/arch`` in its one spelling (``Linux/AMD64`` -> ``linux/x86_64``), or ``any``.

    Raises:
        ValueError: not ``any`` and not a known os and arch joined by ``/``.
    """
    low = text.strip().lower()
    if low == ANY_PLATFORM:
        return ANY_PLATFORM
    os_name, sep, arch = low.partition("/")
    os_name = _OS_ALIASES.get(os_name, os_name)
    arch = _ARCH_ALIASES.get(arch, arch)
    if not sep or os_name not in OSES or arch not in ARCHES:
        raise ValueError(
            f"platform {text!r} is not 'any' or OS/ARCH with OS one of {', '.join(OSES)} "
            f"and ARCH one of {', '.join(ARCHES)}"
        )
    return f"{os_name}/{arch}"


def normalise_platforms(texts: Iterable[str]) -> tuple[str, ...]:
    """Each of ``texts`` (commas also separate) normalised, sorted and unique; ``any`` among
    them makes the build for any platform: ``("any",)``."""
    found = {normalise_platform(t) for text in texts for t in text.split(",") if t.strip()}
    return (ANY_PLATFORM,) if ANY_PLATFORM in found else tuple(sorted(found))


def normalise_version(text: str) -> str:
    """A PEP 440 version in normal form (``v1.0`` -> ``1.0``).

    Raises:
        ValueError: not a PEP 440 version.
    """
    try:
        return str(Version(text))
    except InvalidVersion as exc:
        raise ValueError(f"{text!r} is not a PEP 440 version (like 0.2 or 1.0.3)") from exc


def this_platform() -> str:
    """This machine as ``os/arch`` (``linux/x86_64``); an os or arch we do not list comes out
    as it is named here, so it matches no build's list but ``any``."""
    os_name = sys.platform
    os_name = "linux" if os_name.startswith("linux") else _OS_ALIASES.get(os_name, os_name)
    if os_name.startswith("freebsd"):
        os_name = "freebsd"
    arch = _platform.machine().lower()
    return f"{os_name}/{_ARCH_ALIASES.get(arch, arch)}"


@dataclass(frozen=True, slots=True)
class ReleaseInfo:
    """The metadata fields of one manifest, checked at construction (so a publisher cannot sign
    what nodes would refuse, and a parsed manifest holds only valid values)."""

    update_type: UpdateType | None = None
    notes: str = ""
    min_client: str | None = None
    #: empty: any platform (as is ``("any",)``, which a publisher may state explicitly)
    platforms: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.update_type is not None and not isinstance(self.update_type, UpdateType):
            raise ManifestError(f"update type {self.update_type!r} is not an UpdateType")
        if len(self.notes.encode("utf-8", "surrogatepass")) > MAX_NOTES_BYTES:
            raise ManifestError(
                f"release notes are {len(self.notes.encode('utf-8', 'surrogatepass'))} bytes; "
                f"at most {MAX_NOTES_BYTES} bytes of UTF-8 are allowed",
                fix="shorten the notes and link to the full changelog",
            )
        if _BAD_NOTES.search(self.notes):
            raise ManifestError(
                "release notes hold control characters or lone surrogates",
                fix="write the notes as plain UTF-8 text",
            )
        if self.min_client is not None:
            if len(self.min_client) > MAX_VERSION_BYTES:
                raise ManifestError(f"min_client {self.min_client[:80]!r} is too long")
            try:
                normal = normalise_version(self.min_client)
            except ValueError as exc:
                raise ManifestError(f"min_client: {exc}") from exc
            if normal != self.min_client:
                raise ManifestError(
                    f"min_client {self.min_client!r} is not in PEP 440 normal form ({normal!r})"
                )
        if len(self.platforms) > MAX_PLATFORMS:
            raise ManifestError(f"a manifest names at most {MAX_PLATFORMS} platforms")
        for p in self.platforms:
            try:
                normal = normalise_platform(p)
            except ValueError as exc:
                raise ManifestError(str(exc)) from exc
            if normal != p:
                raise ManifestError(f"platform {p!r} is not in normal form ({normal!r})")
        if list(self.platforms) != sorted(set(self.platforms)):
            raise ManifestError("platforms must be sorted and unique")
        if ANY_PLATFORM in self.platforms and len(self.platforms) > 1:
            raise ManifestError("platform 'any' cannot be listed beside others")

    @property
    def critical(self) -> bool:
        """Whether the publisher marked the build critical (the service's fast lane)."""
        return self.update_type is UpdateType.CRITICAL

    @property
    def empty(self) -> bool:
        """No field is set: the manifest needs nothing of format 2 for its metadata."""
        return self == ReleaseInfo()

    def runs_on(self, platform: str) -> bool:
        """Whether a machine that is ``platform`` (``this_platform()``) may install the build."""
        return not self.platforms or self.platforms == (ANY_PLATFORM,) or platform in self.platforms

    def to_obj(self) -> dict[bytes, Any]:
        """The fields that are set, as manifest entries (absent ones are omitted, so a
        manifest without metadata encodes exactly as before the fields existed)."""
        obj: dict[bytes, Any] = {}
        if self.update_type is not None:
            obj[b"update_type"] = self.update_type.value.encode()
        if self.notes:
            obj[b"notes"] = self.notes.encode("utf-8")
        if self.min_client is not None:
            obj[b"min_client"] = self.min_client.encode()
        if self.platforms:
            obj[b"platforms"] = [p.encode() for p in self.platforms]
        return obj

    @classmethod
    def from_obj(cls, d: dict[bytes, Any]) -> ReleaseInfo:
        """Read this module's fields out of a decoded manifest dictionary (other keys are the
        manifest's business). Present means set: an empty value is refused, for one encoding."""
        kind = d.get(b"update_type")
        update_type = None
        if kind is not None:
            text = _text(kind, "update_type", 16)
            try:
                update_type = UpdateType(text)
            except ValueError as exc:
                names = ", ".join(t.value for t in UpdateType)
                raise ManifestError(f"update_type {text!r} is not one of {names}") from exc
        notes_raw = d.get(b"notes")
        notes = "" if notes_raw is None else _text(notes_raw, "notes", MAX_NOTES_BYTES)
        if notes_raw is not None and not notes:
            raise ManifestError("manifest 'notes' is present but empty")
        min_raw = d.get(b"min_client")
        min_client = None if min_raw is None else _text(min_raw, "min_client", MAX_VERSION_BYTES)
        plats_raw = d.get(b"platforms")
        if plats_raw is not None and (
            not isinstance(plats_raw, list) or not 0 < len(plats_raw) <= MAX_PLATFORMS
        ):
            raise ManifestError(f"manifest 'platforms' must be a list of 1..{MAX_PLATFORMS}")
        platforms = tuple(_text(p, "platform", 32) for p in plats_raw or ())
        return cls(update_type, notes, min_client, platforms)

    def as_json(self) -> dict[str, Any]:
        """For ``--json`` outputs and the tracker's feed: every field, ``null`` when unset."""
        return {
            "update_type": None if self.update_type is None else self.update_type.value,
            "notes": self.notes,
            "min_client": self.min_client,
            "platforms": list(self.platforms),
        }


def _text(value: Any, what: str, limit: int) -> str:
    if not isinstance(value, bytes):
        raise ManifestError(f"manifest '{what}' is not a string")
    if len(value) > limit:
        raise ManifestError(
            f"manifest '{what}' is {len(value)} bytes; at most {limit} are allowed",
            fix="the manifest is hostile or broken; do not install it",
        )
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"manifest '{what}' is not UTF-8") from exc
