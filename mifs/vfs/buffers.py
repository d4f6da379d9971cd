"""Chunk-sized write buffers: a bounded pool, and the dirty chunk that tracks which bytes it holds.

Must not seal, fetch or know about files: it is memory accounting and interval arithmetic.
The pool bounds the daemon's dirty memory; when it is empty, acquire() asks the owner (through
`on_pressure`) to seal something and waits for a buffer to come back.
"""

from __future__ import annotations

import time
from typing import Callable

import trio


class BufferPool:
    def __init__(self, chunk_size: int, max_buffers: int, on_pressure: Callable[[], None]) -> None:
        self.chunk_size = chunk_size
        self.max_buffers = max(2, max_buffers)
        self._free: list[bytearray] = []
        self._allocated = 0
        self._returned = trio.Event()
        self._on_pressure = on_pressure
        self.zeros = memoryview(bytes(chunk_size))

    @property
    def in_use(self) -> int:
        return self._allocated - len(self._free)

    async def acquire(self) -> bytearray:
        """A chunk-sized buffer (contents undefined); waits while the pool is exhausted."""
        while True:
            if self._free:
                return self._free.pop()
            if self._allocated < self.max_buffers:
                self._allocated += 1
                return bytearray(self.chunk_size)
            self._on_pressure()
            await self._returned.wait()

    def release(self, buf: bytearray) -> None:
        self._free.append(buf)
        # Keep at most a quarter of the pool idle; give the rest back to the allocator.
        while len(self._free) > self.max_buffers // 4:
            self._free.pop()
            self._allocated -= 1
        self._returned.set()
        self._returned = trio.Event()


class DirtyChunk:
    """A chunk's plaintext being written, and the byte ranges of it that are valid.

    Ranges not covered hold garbage until `fill_uncovered` merges in the chunk's stored bytes.
    """

    __slots__ = ("buf", "covered", "touched", "dirtied")

    def __init__(self, buf: bytearray) -> None:
        self.buf = buf
        self.covered: list[tuple[int, int]] = []
        self.touched = time.monotonic()  # last write (the pressure sealer takes the oldest)
        self.dirtied = self.touched  # first write since the chunk was last sealed (write-back age)

    def write(self, start: int, data: bytes | memoryview) -> None:
        end = start + len(data)
        self.buf[start:end] = data
        self.cover(start, end)
        self.touched = time.monotonic()

    def cover(self, start: int, end: int) -> None:
        if start >= end:
            return
        merged: list[tuple[int, int]] = []
        placed = False
        for s, e in self.covered:
            if e < start:
                merged.append((s, e))
            elif s > end:
                if not placed:
                    merged.append((start, end))
                    placed = True
                merged.append((s, e))
            else:
                start, end = min(s, start), max(e, end)
        if not placed:
            merged.append((start, end))
        merged.sort()
        self.covered = merged

    def covers(self, start: int, end: int) -> bool:
        if start >= end:
            return True
        return any(s <= start and end <= e for s, e in self.covered)

    def is_full(self, size: int) -> bool:
        return self.covers(0, size)

    def uncovered(self, size: int) -> list[tuple[int, int]]:
        gaps: list[tuple[int, int]] = []
        pos = 0
        for s, e in self.covered:
            if s > pos:
                gaps.append((pos, min(s, size)))
            pos = max(pos, e)
            if pos >= size:
                break
        if pos < size:
            gaps.append((pos, size))
        return [(s, e) for s, e in gaps if s < e]

    def fill_uncovered(self, base: bytes | None, zeros: memoryview, upto: int) -> None:
        """Merge the chunk's stored plaintext (None = hole) into every range below `upto` not
        yet written (bytes beyond the file's end never need it)."""
        size = upto
        for s, e in self.uncovered(size):
            have = 0 if base is None else max(0, min(e, len(base)) - s)
            if have:
                assert base is not None
                self.buf[s : s + have] = memoryview(base)[s : s + have]
            if s + have < e:
                self.buf[s + have : e] = zeros[: e - s - have]
        self.cover(0, size)
