"""Background duties that fail say so once on the log, and once when they work again."""

from __future__ import annotations

import logging

__all__ = ["Troubles"]

log = logging.getLogger("tracker")


class Troubles:
    """The failing background duties of one tracker (the gc, the write-behind ...): a duty
    that fails every second must not write a line every second, yet its recovery is news."""

    def __init__(self) -> None:
        self._failing: dict[str, str] = {}

    def report(self, what: str, error: str | None) -> None:
        """``what`` just failed with ``error``, or worked (``None``)."""
        if error is not None and what not in self._failing:
            log.warning("tracker: %s failing: %s", what, error)
        elif error is None and what in self._failing:
            log.warning("tracker: %s works again", what)
        if error is None:
            self._failing.pop(what, None)
        else:
            self._failing[what] = error
