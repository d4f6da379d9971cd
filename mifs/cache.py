"""The local chunk cache: sealed chunk objects on local disk, staged before upload and kept after.

Must not see plaintext or keys: it stores exactly the bytes that go to the store, so a stolen
cache disk is as unreadable as the bucket. Staged chunks (not yet in the store) are "dirty"
and never evicted; uploaded ones are "clean" and evicted least recently used first once the
cache is over its size limit. All methods are synchronous and thread-safe: callers run them in
worker threads.
"""

from __future__ import annotations

import os
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from mifs.localfs import fsync_dir
from mifs.types import ObjectKey

CHUNK_DIR = "chunks"
_TMP_DIR = "tmp"



@dataclass(frozen=True)
class CacheStatistics:
    bytes_used: int
    bytes_limit: int
    dirty_bytes: int
    clean_objects: int
    dirty_objects: int
    hits: int
    misses: int
    evictions: int


class ChunkCache:
    def __init__(self, root: Path, limit_bytes: int, *, keep_uploaded: bool = True) -> None:
        """keep_uploaded=False: drop a chunk's copy as soon as it is in the store (for a store
        on local disk, where a second copy only costs space)."""
        self.root = root / CHUNK_DIR
        self.tmp = root / _TMP_DIR
        self.limit = limit_bytes
        self.keep_uploaded = keep_uploaded
        self._lock = threading.Lock()
        self._clean: OrderedDict[ObjectKey, int] = OrderedDict()
        self._dirty: dict[ObjectKey, int] = {}
        self._clean_bytes = 0
        self._dirty_bytes = 0
        self._dirs_to_sync: set[Path] = set()
        self._known_dirs: set[Path] = set()
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.tmp.mkdir(mode=0o700, exist_ok=True)

    def _path(self, key: ObjectKey) -> Path:
        # Keys look like "data/ab/<32 hex>"; the cache keeps the part after "data/".
        return self.root / key.split("/", 1)[1]

    def file_path(self, key: ObjectKey) -> Path | None:
        """Where a cached chunk lives on disk (for stores that can adopt local files)."""
        with self._lock:
            known = key in self._clean or key in self._dirty
        return self._path(key) if known else None

    def scan_sync(self, dirty_keys: set[ObjectKey]) -> None:
        """Rebuild the index from disk at mount; `dirty_keys` are the staged ones (from metadb)."""
        for entry in os.scandir(self.tmp):
            os.unlink(entry.path)
        found: list[tuple[float, ObjectKey, int]] = []
        for sub in os.scandir(self.root):
            if not sub.is_dir():
                continue
            for entry in os.scandir(sub.path):
                st = entry.stat()
                found.append((st.st_atime, ObjectKey(f"data/{sub.name}/{entry.name}"), st.st_size))
        found.sort()
        with self._lock:
            for _, key, size in found:
                if key in dirty_keys:
                    self._add_dirty(key, size)
                else:
                    self._add_clean(key, size)
        self.evict_sync()  # the limit (or keep_uploaded) may have changed since the last mount

    # The four helpers below run with self._lock held.
    def _add_clean(self, key: ObjectKey, size: int) -> None:
        self._pop(key)
        self._clean[key] = size
        self._clean_bytes += size

    def _add_dirty(self, key: ObjectKey, size: int) -> None:
        self._pop(key)
        self._dirty[key] = size
        self._dirty_bytes += size

    def _pop(self, key: ObjectKey) -> None:
        size = self._clean.pop(key, None)
        if size is not None:
            self._clean_bytes -= size
        size = self._dirty.pop(key, None)
        if size is not None:
            self._dirty_bytes -= size

    def _write(self, key: ObjectKey, blob: bytes, durable: bool) -> None:
        path = self._path(key)
        parent = path.parent
        new_dir = False
        if parent not in self._known_dirs:
            try:
                parent.mkdir(mode=0o700)
                new_dir = True
            except FileExistsError:
                pass
            self._known_dirs.add(parent)
        tmp = self.tmp / secrets.token_hex(8)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(blob)
            while view:
                view = view[os.write(fd, view):]
            if durable:
                os.fdatasync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
        if durable:
            with self._lock:
                self._dirs_to_sync.add(parent)
                if new_dir:
                    self._dirs_to_sync.add(self.root)
        elif new_dir:
            with self._lock:
                self._dirs_to_sync.add(self.root)

    def stage_sync(self, key: ObjectKey, blob: bytes) -> None:
        """Keep a sealed chunk that is not yet in the store; durable once sync_dirs_sync ran."""
        self._write(key, blob, durable=True)
        with self._lock:
            self._add_dirty(key, len(blob))
        self.evict_sync()  # uploaded chunks make room for staged ones

    def fill_sync(self, key: ObjectKey, blob: bytes) -> None:
        """Keep a copy of a chunk fetched from the store (not durable: the store has it)."""
        if not self.keep_uploaded:
            return
        self._write(key, blob, durable=False)
        with self._lock:
            self._add_clean(key, len(blob))
        self.evict_sync()

    def has_room_for_dirty(self, size: int) -> bool:
        """Whether `size` more bytes of staged (not yet uploaded) data fit under the limit;
        clean chunks do not count, they are evicted to make room."""
        with self._lock:
            return self._dirty_bytes + size <= self.limit or self._dirty_bytes == 0

    def dirs_pending(self) -> bool:
        """Whether staged chunks were written whose directory entries are not yet fsynced."""
        with self._lock:
            return bool(self._dirs_to_sync)

    def sync_dirs_sync(self) -> None:
        """fsync the directories that gained staged chunks, so their names survive power loss."""
        with self._lock:
            dirs, self._dirs_to_sync = self._dirs_to_sync, set()
        # Leaf directories first, then the root that names any new ones.
        for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
            fsync_dir(d)

    def read_sync(self, key: ObjectKey) -> bytes | None:
        try:
            with open(self._path(key), "rb") as fh:
                blob = fh.read()
        except FileNotFoundError:
            with self._lock:
                self.misses += 1
                if key in self._clean:
                    self._pop(key)
            return None
        with self._lock:
            self.hits += 1
            if key in self._clean:
                self._clean.move_to_end(key)
        return blob

    def contains(self, key: ObjectKey) -> bool:
        with self._lock:
            return key in self._clean or key in self._dirty

    def mark_clean_sync(self, key: ObjectKey) -> None:
        """The chunk is safely in the store: it may now be evicted."""
        with self._lock:
            size = self._dirty.get(key)
            if size is not None:
                self._add_clean(key, size)
        self.evict_sync()

    def discard_sync(self, key: ObjectKey) -> None:
        with self._lock:
            self._pop(key)
        try:
            os.unlink(self._path(key))
        except FileNotFoundError:
            pass

    def evict_sync(self) -> None:
        while True:
            with self._lock:
                over = self._clean_bytes + self._dirty_bytes > self.limit or not self.keep_uploaded
                if not over or not self._clean:
                    return
                key, size = self._clean.popitem(last=False)
                self._clean_bytes -= size
                self.evictions += 1
            try:
                os.unlink(self._path(key))
            except FileNotFoundError:
                pass

    def statistics(self) -> CacheStatistics:
        with self._lock:
            clean, dirty = self._clean_bytes, self._dirty_bytes
            return CacheStatistics(
                clean + dirty, self.limit, dirty, len(self._clean), len(self._dirty), self.hits, self.misses, self.evictions
            )
