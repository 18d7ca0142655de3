"""A small thread-safe LRU cache (the Redis registry's caches of rows and manifests)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

__all__ = ["LRU"]


class LRU:
    """A thread-safe LRU bounded in entries and in total size (``len`` of each value)."""

    def __init__(self, max_entries: int, max_bytes: int | None = None) -> None:
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._d: OrderedDict[Any, Any] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any:
        with self._lock:
            value = self._d.get(key)
            if value is not None:
                self._d.move_to_end(key)
            return value

    def put(self, key: Any, value: Any) -> None:
        size = len(value) if self.max_bytes is not None else 0
        if self.max_bytes is not None and size > self.max_bytes:
            return
        with self._lock:
            old = self._d.pop(key, None)
            if old is not None and self.max_bytes is not None:
                self._bytes -= len(old)
            self._d[key] = value
            self._bytes += size
            while len(self._d) > self.max_entries or (
                self.max_bytes is not None and self._bytes > self.max_bytes
            ):
                _, evicted = self._d.popitem(last=False)
                if self.max_bytes is not None:
                    self._bytes -= len(evicted)

    def clear(self) -> None:
        with self._lock:
            self._d.clear()
            self._bytes = 0

    def __len__(self) -> int:
        return len(self._d)
