"""The daemon's settings: the ``[service]`` table of the config file, overlaid by API changes.

Two sources, one answer. The config file (``p2pnode.node.config``'s TOML, table
``[service]``) is where an administrator writes defaults; ``p2pnode settings KEY VALUE`` (the
API) is where a user changes them while the daemon runs, and those changes must survive a
restart without the daemon rewriting the user's hand-written TOML (comments and all). So the
API's changes are kept as *overrides*, key by key, in ``STATE/settings.json``; the settings in
force are the file's table with the overrides laid over it. A key set through the API wins
until it is reset (:meth:`Settings.reset`), after which the file's value shows again.

Every change is checked by parsing the merged table exactly as a fresh start would, so a value
that would make the next start fail is refused now, with the same message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .queue import check_max_active
from .schedule import Schedule
from .statedir import DamagedStateError, read_json, write_json

__all__ = ["KEYS", "ServiceSettings", "Settings"]

KEYS = ("max_active", "max_download_rate", "max_upload_rate", "alt_speed", "update_window")


@dataclass(frozen=True, slots=True)
class ServiceSettings:
    """The settings in force: what the queue and the rate limiters are set from."""

    max_active: int = 1
    schedule: Schedule = field(default_factory=Schedule)

    @classmethod
    def from_config(cls, table: dict[str, Any], where: str) -> ServiceSettings:
        """Read a ``[service]`` table.

        Raises:
            UsageError: an unknown key or a bad value, naming ``where`` and the key.
        """
        unknown = set(table) - set(KEYS)
        if unknown:
            raise UsageError(
                f"{where}: service.{sorted(unknown)[0]} is not a known setting",
                fix=f"use one of {', '.join(KEYS)}",
            )
        max_active = check_max_active(table.get("max_active", 1), f"{where}: max_active")
        return cls(max_active, Schedule.from_config(table, where))

    def to_config(self) -> dict[str, Any]:
        return {"max_active": self.max_active, **self.schedule.to_config()}


class Settings:
    """The config file's ``[service]`` table and the API's overrides.

    Args:
        table: the ``[service]`` table from the config file (empty if there is none).
        where: the config file's name, for messages.
        overrides: keys set through the API, as saved in ``settings.json``.
    """

    def __init__(
        self, table: dict[str, Any], where: str, overrides: dict[str, Any] | None = None
    ) -> None:
        self._table = dict(table)
        self._where = where
        self._overrides = dict(overrides or {})
        self.current = self._merged(self._overrides)

    @property
    def overrides(self) -> dict[str, Any]:
        return dict(self._overrides)

    def _merged(self, overrides: dict[str, Any]) -> ServiceSettings:
        where = self._where if not overrides else f"{self._where} with the API's settings"
        return ServiceSettings.from_config({**self._table, **overrides}, where)

    def set(self, key: str, value: Any) -> ServiceSettings:
        """Change one setting (as the API and ``p2pnode settings KEY VALUE`` do).

        Raises:
            UsageError: an unknown key, or a value the config file would not accept either;
                nothing changes then.
        """
        if key not in KEYS:
            raise UsageError(f"{key!r} is not a setting", fix=f"use one of {', '.join(KEYS)}")
        overrides = {**self._overrides, key: value}
        self.current = self._merged(overrides)
        self._overrides = overrides
        return self.current

    def update(self, changes: dict[str, Any]) -> ServiceSettings:
        """Change several settings at once, all or none (the API's PATCH); a value of None
        resets its key.

        Raises:
            UsageError: an unknown key, or a merged table a fresh start would refuse.
        """
        unknown = sorted(set(changes) - set(KEYS))
        if unknown:
            raise UsageError(
                f"{unknown[0]!r} is not a setting", fix=f"use one of {', '.join(KEYS)}"
            )
        overrides = {**self._overrides, **changes}
        overrides = {k: v for k, v in overrides.items() if v is not None}
        self.current = self._merged(overrides)
        self._overrides = overrides
        return self.current

    def reset(self, key: str) -> ServiceSettings:
        """Forget the API's value for ``key``: the config file's (or the default) applies."""
        overrides = {k: v for k, v in self._overrides.items() if k != key}
        self.current = self._merged(overrides)
        self._overrides = overrides
        return self.current

    def save(self, path: Path) -> None:
        write_json(path, {"format": 1, "overrides": self._overrides})

    @classmethod
    def load(cls, table: dict[str, Any], where: str, path: Path) -> Settings:
        """The file's table with the overrides saved at ``path`` (none if there is no file).

        Raises:
            DamagedStateError: ``path`` is not a settings file we wrote.
            UsageError: the config file's table (with the overrides) is not valid.
        """
        doc = read_json(path)
        if doc is None:
            return cls(table, where)
        overrides = doc.get("overrides")
        if doc.get("format") != 1 or not isinstance(overrides, dict) or set(overrides) - set(KEYS):
            raise DamagedStateError(f"{path} is not a settings file this daemon wrote")
        return cls(table, where, overrides)
