"""The local audit spool in the cache dir: the open segment's frames, sealed segments not yet
shipped, the head and a copy of the wrapped audit key.

Blocking file I/O only (callers run it in worker threads or before the event loop starts);
must not touch the store or decide anything about the chain. Everything here is sealed:
frames and segments under the audit encryption key, the head under the audit MAC key.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from mifs.localfs import fsync_dir

SPOOL_DIR = "audit"
KEY_FILE = "key"
HEAD_FILE = "head"
_OPEN_RE = re.compile(r"^open-([0-9a-f]{16})$")
_SEALED_RE = re.compile(r"^sealed-([0-9a-f]{16})$")


def open_name(segment: int) -> str:
    return f"open-{segment:016x}"


def sealed_name(segment: int) -> str:
    return f"sealed-{segment:016x}"


class Spool:
    def __init__(self, root: Path) -> None:
        self.root = root

    def ensure(self) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _numbers(self, pattern: re.Pattern[str]) -> list[int]:
        if not self.root.is_dir():
            return []
        found = []
        for name in os.listdir(self.root):
            match = pattern.match(name)
            if match:
                found.append(int(match.group(1), 16))
        return sorted(found)

    def open_segments(self) -> list[int]:
        return self._numbers(_OPEN_RE)

    def sealed_segments(self) -> list[int]:
        return self._numbers(_SEALED_RE)

    def read(self, name: str) -> bytes | None:
        try:
            return (self.root / name).read_bytes()
        except FileNotFoundError:
            return None

    def write_atomic(self, name: str, data: bytes) -> None:
        """Replace `name` with data, durably (temp file, fsync, rename, fsync of the dir)."""
        tmp = self.root / f".tmp-{name}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.root / name)
        fsync_dir(self.root)

    def remove(self, name: str) -> None:
        try:
            (self.root / name).unlink()
        except FileNotFoundError:
            return
        fsync_dir(self.root)

    def create_open(self, segment: int, first_frame: bytes) -> int:
        """Create the open segment's file with its first frame; returns its fd (append mode)."""
        path = self.root / open_name(segment)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o600)
        os.write(fd, first_frame)
        os.fdatasync(fd)
        fsync_dir(self.root)
        return fd

    @staticmethod
    def append(fd: int, frame: bytes) -> None:
        """Append one frame and make it durable (group commit: one fdatasync per batch)."""
        view = memoryview(frame)
        while view:
            view = view[os.write(fd, view):]
        os.fdatasync(fd)
