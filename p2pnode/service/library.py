"""The library: every game this machine's node holds, where, and whom it trusts for it.

An entry is what ``p2pnode add`` records: a source (an app name followed through a tracker's
channel, or a manifest URL), the DEST it is installed into, the publisher key(s) trusted for
it, and whether updates install on their own. The library is the daemon's answer to "what do I
serve, follow and keep up to date"; the queue (``queue.py``) is its answer to "what do I fetch
now".

One entry per DEST, and no DEST inside another's: an install owns its directory (the switch
exchanges it whole, verify treats unknown files as the user's), so two entries on one tree, or
one tree nested in another, would have each update destroy or "repair" the other's files.
DESTs are compared as absolute, normalised paths; the daemon resolves symlinks before calling
:meth:`Library.add` (this module touches no file but its own).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..release.keys import format_public_key, parse_public_key
from ..release.manifest import is_name
from .statedir import DamagedStateError, read_json, write_json

__all__ = ["MAX_ENTRIES", "MAX_TRUST_KEYS", "Entry", "Library"]

FORMAT = 1
# Far more games than anyone installs; the bound keeps a hostile API client from growing the
# library file (and every announce round) without limit.
MAX_ENTRIES = 10_000
# A publisher rotating keys needs two; more is a mistake.
MAX_TRUST_KEYS = 4

_URL = re.compile(r"^https?://[^\s/]+(/\S*)?$")
MAX_URL = 2048


@dataclass(frozen=True, slots=True)
class Entry:
    """One game in the library.

    ``source`` is an app name when ``tracker`` is set (the channel's current build is found
    through the tracker's feed), else the URL of a manifest. Trust keys are stored in their
    printed form (``ed25519:<hex>``) so the file reads like the command line that made it.
    """

    id: str
    source: str
    dest: str
    trust: tuple[str, ...]
    channel: str = "stable"
    tracker: str | None = None
    auto_update: bool = True
    added: float = 0.0

    @property
    def follows_channel(self) -> bool:
        return self.tracker is not None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "source": self.source,
            "dest": self.dest,
            "trust": list(self.trust),
            "channel": self.channel,
            "tracker": self.tracker,
            "auto_update": self.auto_update,
            "added": self.added,
        }

    @classmethod
    def from_json(cls, doc: Any) -> Entry:
        """Read an entry back, re-checking it as if it were added now (the file may be edited
        by hand, or damaged)."""
        if not isinstance(doc, dict):
            raise ValueError("an entry is not an object")
        ident, added, auto = doc.get("id"), doc.get("added"), doc.get("auto_update")
        if not isinstance(ident, str) or not ident:
            raise ValueError("an entry has no id")
        if isinstance(added, bool) or not isinstance(added, (int, float)):
            raise ValueError(f"entry {ident}: added is not a number")
        if not isinstance(auto, bool):
            raise ValueError(f"entry {ident}: auto_update is not true or false")
        trust = doc.get("trust")
        if not isinstance(trust, list) or not all(isinstance(k, str) for k in trust):
            raise ValueError(f"entry {ident}: trust is not a list of keys")
        try:
            return _checked(
                ident,
                doc.get("source"),
                doc.get("dest"),
                trust,
                channel=doc.get("channel"),
                tracker=doc.get("tracker"),
                auto_update=auto,
                added=float(added),
            )
        except UsageError as exc:
            raise ValueError(f"entry {ident}: {exc.message}") from exc


def _checked(
    ident: str,
    source: object,
    dest: object,
    trust: list[str] | tuple[str, ...],
    *,
    channel: object,
    tracker: object,
    auto_update: bool,
    added: float,
) -> Entry:
    if tracker is not None:
        if not isinstance(tracker, str) or len(tracker) > MAX_URL or not _URL.match(tracker):
            raise UsageError(
                f"tracker {tracker!r} is not an http(s) URL",
                fix="pass --tracker http://HOST:PORT",
            )
        if not isinstance(source, str) or not is_name(source):
            raise UsageError(
                f"{source!r} is not an app name",
                fix="with --tracker, name the app as published (letters, digits, . _ -)",
            )
    elif not isinstance(source, str) or len(source) > MAX_URL or not _URL.match(source):
        raise UsageError(
            f"{source!r} is neither a manifest URL nor an app name with a tracker",
            fix="pass the manifest's http(s) URL, or the app name with --tracker URL",
        )
    if not isinstance(channel, str) or not is_name(channel):
        raise UsageError(
            f"channel {channel!r} is not a channel name",
            fix="pass --channel NAME (letters, digits, . _ -), like stable",
        )
    if not isinstance(dest, str) or not os.path.isabs(dest):
        raise UsageError(f"DEST {dest!r} is not an absolute path", fix="pass --dest as a full path")
    norm = os.path.normpath(dest)
    if norm == os.path.dirname(norm):
        raise UsageError(f"DEST {dest!r} is a filesystem root", fix="pass a directory of its own")
    if not trust:
        raise UsageError(
            "no trust key given", fix="pass the publisher's key with --trust ed25519:<hex>"
        )
    if len(trust) > MAX_TRUST_KEYS:
        raise UsageError(
            f"more than {MAX_TRUST_KEYS} trust keys", fix="pass the publisher's keys only"
        )
    keys = tuple(dict.fromkeys(format_public_key(parse_public_key(k)) for k in trust))
    return Entry(ident, source, norm, keys, channel, tracker, auto_update, added)


def _overlap(a: str, b: str) -> bool:
    """True if one of two normalised absolute paths is the other or lies inside it."""
    return (
        a == b or a.startswith(b.rstrip(os.sep) + os.sep) or b.startswith(a.rstrip(os.sep) + os.sep)
    )


class Library:
    """The entries, in the order they were added, with a counter for stable ids.

    Ids are ``g1``, ``g2``, ... and never reused, so a job or an API client holding the id of a
    removed entry never lands on a newer one.
    """

    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}
        self._next = 1

    @property
    def entries(self) -> list[Entry]:
        return list(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, ident: object) -> bool:
        return ident in self._entries

    def get(self, ident: str) -> Entry:
        try:
            return self._entries[ident]
        except KeyError:
            raise UsageError(
                f"no library entry {ident!r}", fix="list the library with `p2pnode jobs`"
            ) from None

    def at_dest(self, dest: str) -> Entry | None:
        """The entry that owns ``dest`` or a directory containing it, if any: the standalone
        verbs ask this to refuse a DEST the daemon manages."""
        norm = os.path.normpath(dest)
        for e in self._entries.values():
            if norm == e.dest or norm.startswith(e.dest.rstrip(os.sep) + os.sep):
                return e
        return None

    def add(
        self,
        source: str,
        dest: str | Path,
        trust: list[str] | tuple[str, ...],
        *,
        now: float,
        channel: str = "stable",
        tracker: str | None = None,
        auto_update: bool = True,
    ) -> Entry:
        """Check and add an entry; nothing changes if it is refused.

        Raises:
            UsageError: a bad field, a full library, or a DEST that is, contains or lies in
                another entry's DEST.
        """
        if len(self._entries) >= MAX_ENTRIES:
            raise UsageError(
                f"the library already holds {MAX_ENTRIES} entries", fix="remove unused entries"
            )
        entry = _checked(
            f"g{self._next}",
            source,
            str(dest),
            trust,
            channel=channel,
            tracker=tracker,
            auto_update=auto_update,
            added=now,
        )
        self._refuse_overlap(entry)
        self._entries[entry.id] = entry
        self._next += 1
        return entry

    def _refuse_overlap(self, entry: Entry) -> None:
        for other in self._entries.values():
            if other.id != entry.id and _overlap(entry.dest, other.dest):
                how = "is already" if other.dest == entry.dest else "overlaps"
                raise UsageError(
                    f"DEST {entry.dest} {how} the DEST of library entry {other.id} "
                    f"({other.source} at {other.dest})",
                    fix="give each game its own directory, not inside another game's",
                )

    def check_dest(self, ident: str, dest: str) -> str:
        """``dest`` normalised, if entry ``ident`` may move there (absolute, not a root, not
        on, in or around another entry's DEST).

        Raises:
            UsageError: naming the other entry.
        """
        entry = self.get(ident)
        moved = _checked(
            entry.id,
            entry.source,
            dest,
            entry.trust,
            channel=entry.channel,
            tracker=entry.tracker,
            auto_update=entry.auto_update,
            added=entry.added,
        )
        self._refuse_overlap(moved)
        return moved.dest

    def set_dest(self, ident: str, dest: str) -> Entry:
        """Point an entry at the place its install was moved to."""
        entry = replace(self.get(ident), dest=self.check_dest(ident, dest))
        self._entries[ident] = entry
        return entry

    def remove(self, ident: str) -> Entry:
        entry = self.get(ident)
        del self._entries[ident]
        return entry

    def set_auto_update(self, ident: str, on: bool) -> Entry:
        entry = replace(self.get(ident), auto_update=on)
        self._entries[ident] = entry
        return entry

    # Persistence -------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "next_id": self._next,
            "entries": [e.to_json() for e in self._entries.values()],
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any], path: Path) -> Library:
        """Rebuild a saved library, re-checking every entry and the one-entry-per-DEST rule.

        Raises:
            DamagedStateError: anything that is not a library this module wrote.
        """
        if doc.get("format") != FORMAT:
            raise DamagedStateError(f"{path}: unknown library format {doc.get('format')!r}")
        lib = cls()
        raw_next, raw = doc.get("next_id"), doc.get("entries")
        if isinstance(raw_next, bool) or not isinstance(raw_next, int) or raw_next < 1:
            raise DamagedStateError(f"{path}: next_id is not a positive integer")
        if not isinstance(raw, list) or len(raw) > MAX_ENTRIES:
            raise DamagedStateError(f"{path}: entries is not a list of at most {MAX_ENTRIES}")
        try:
            for item in raw:
                entry = Entry.from_json(item)
                if entry.id in lib._entries:
                    raise ValueError(f"entry id {entry.id} appears twice")
                if not re.fullmatch(r"g[1-9][0-9]*", entry.id) or int(entry.id[1:]) >= raw_next:
                    raise ValueError(f"entry id {entry.id} is not one this library handed out")
                lib._refuse_overlap(entry)
                lib._entries[entry.id] = entry
        except (ValueError, UsageError) as exc:
            raise DamagedStateError(f"{path}: {exc}") from exc
        lib._next = raw_next
        return lib

    def save(self, path: Path) -> None:
        write_json(path, self.to_json())

    @classmethod
    def load(cls, path: Path) -> Library:
        """The library saved at ``path``; an empty one if there is no file yet."""
        doc = read_json(path)
        return cls() if doc is None else cls.from_json(doc, path)
