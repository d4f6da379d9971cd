"""Offset arithmetic: which chunks a byte range touches, and where inside each.

Pure functions; must not know about keys, stores or inodes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator


@dataclass(frozen=True)
class ChunkSpan:
    """The part of a byte range that falls into one chunk."""

    index: int
    start: int  # offset inside the chunk
    end: int  # exclusive end inside the chunk
    buf_offset: int  # where this part starts inside the caller's buffer

    @property
    def length(self) -> int:
        return self.end - self.start


def spans(offset: int, length: int, chunk_size: int) -> Iterator[ChunkSpan]:
    """Split [offset, offset+length) into per-chunk spans, in order."""
    if offset < 0 or length < 0 or chunk_size <= 0:
        raise ValueError("negative offset or length, or non-positive chunk size")
    pos = offset
    end = offset + length
    while pos < end:
        index, start = divmod(pos, chunk_size)
        stop = min(chunk_size, start + (end - pos))
        yield ChunkSpan(index, start, stop, pos - offset)
        pos += stop - start


def chunk_count(size: int, chunk_size: int) -> int:
    """How many chunks hold `size` bytes (the last may be partial)."""
    if size < 0 or chunk_size <= 0:
        raise ValueError("negative size or non-positive chunk size")
    return -(-size // chunk_size)


def chunk_plain_len(size: int, index: int, chunk_size: int) -> int:
    """How many bytes of chunk `index` lie below file size `size`."""
    return max(0, min(chunk_size, size - index * chunk_size))
