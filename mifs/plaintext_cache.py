"""The in-memory LRU of decrypted chunks, and its account of what study prefetch keeps ahead
of a reader.

Must not touch disk or the store: it holds plaintext only in memory, bounded in bytes.
"""

from __future__ import annotations

import collections
from typing import Callable

from mifs.types import ObjectKey


class PlaintextCache:
    """A small LRU of decrypted chunks, by object key (so a new generation never hits an old one).

    Chunks put `ahead` (study prefetch, for a reader expected any moment) are counted in
    `ahead_bytes` until a reader gets them or they are evicted; `on_consumed` is told then. The
    prefetcher keeps what it puts ahead within `ahead_limit`: run further ahead and the LRU
    evicts the plaintext before the reader arrives, who then reads and decrypts the cached
    copy a second time (~0.5 ms per chunk on the reader's path)."""

    def __init__(self, limit_bytes: int) -> None:
        self._limit = limit_bytes
        self._items: collections.OrderedDict[ObjectKey, bytes] = collections.OrderedDict()
        self._bytes = 0
        self._ahead: dict[ObjectKey, int] = {}
        self.ahead_bytes = 0
        self.ahead_limit = limit_bytes // 2
        self.on_consumed: Callable[[], None] = lambda: None

    def get(self, key: ObjectKey) -> bytes | None:
        data = self._items.get(key)
        if data is not None:
            self._items.move_to_end(key)
            self._consume(key)
        return data

    def contains(self, key: ObjectKey) -> bool:
        return key in self._items

    def put(self, key: ObjectKey, data: bytes, *, ahead: bool = False) -> None:
        if len(data) > self._limit:
            return
        self.drop(key)
        self._items[key] = data
        self._bytes += len(data)
        if ahead:
            self._ahead[key] = len(data)
            self.ahead_bytes += len(data)
        while self._bytes > self._limit:
            evicted_key, evicted = self._items.popitem(last=False)
            self._bytes -= len(evicted)
            self._consume(evicted_key)

    def drop(self, key: ObjectKey) -> None:
        old = self._items.pop(key, None)
        if old is not None:
            self._bytes -= len(old)
            self._consume(key)

    def _consume(self, key: ObjectKey) -> None:
        size = self._ahead.pop(key, None)
        if size is not None:
            self.ahead_bytes -= size
            self.on_consumed()
