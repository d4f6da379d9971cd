"""The local chunk cache: sealed chunk objects on local disk, staged before upload and kept after.

Must not see plaintext or keys: it stores exactly the bytes that go to the store, so a stolen
cache disk is as unreadable as the bucket. Staged chunks (not yet in the store) are "dirty"
and never evicted; uploaded ones are "clean" and evicted once the cache is over its size limit.
The size limit is also bounded by the disk: the cache never lets the free space of the disk it
is on drop below a reserve (FREE_SPACE_RESERVE), which the metadata database, its WAL and
snapshot copies and the audit spool need; a commit that finds the disk full would switch the
mount to read-only. Clean chunks are evicted to keep the reserve; staged ones count against
it, and writers wait (then get ENOSPC) when only staged data is left.

Eviction works on units: the chunks of one study (a group, by the study index's numeric id,
never a UID) leave together, least recently used study first; a chunk outside any study is a
unit of its own. Pinned groups are never evicted. All methods are synchronous and thread-safe:
callers run them in worker threads.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Hashable, Iterable

from mifs.localfs import fdatasync_path, fsync_dir
from mifs.types import ObjectKey

log = logging.getLogger(__name__)

CHUNK_DIR = "chunks"
FILL_BEHIND_BYTES = 64 * 1024 * 1024
"""Fetched chunks waiting in memory for the low-priority writer (see fill_behind)."""
FILL_BEHIND_NICE = 10
_TMP_DIR = "tmp"
FREE_SPACE_RESERVE = 128 * 1024 * 1024
"""Free space kept on the cache's disk for everything else mifs writes there..."""
FREE_SPACE_RESERVE_SHARE = 0.10
"""...or this share of the disk, if that is less (a small dedicated cache partition)."""



@dataclass(frozen=True)
class SyncBatch:
    """Staged chunk files and cache directories written but not yet synced."""

    files: set[str]
    dirs: set[Path]


@dataclass(frozen=True)
class CacheStatistics:
    bytes_used: int
    bytes_limit: int
    bytes_limit_now: int  # bytes_limit, or less when the disk has less free space
    dirty_bytes: int
    clean_objects: int
    dirty_objects: int
    hits: int
    misses: int
    evictions: int
    pinned_bytes: int


GroupId = int
Unit = Hashable
"""An eviction unit: a GroupId for the chunks of one study, the ObjectKey itself otherwise."""


@dataclass
class _Entry:
    size: int
    dirty: bool
    group: GroupId | None

    def unit(self, key: ObjectKey) -> Unit:
        return self.group if self.group is not None else key


class ChunkCache:
    def __init__(self, root: Path, limit_bytes: int, *, keep_uploaded: bool = True) -> None:
        """keep_uploaded=False: drop a chunk's copy as soon as it is in the store (for a store
        on local disk, where a second copy only costs space)."""
        self.root = root / CHUNK_DIR
        self.tmp = root / _TMP_DIR
        self.limit = limit_bytes
        self.keep_uploaded = keep_uploaded
        self._lock = threading.Lock()
        self._entries: dict[ObjectKey, _Entry] = {}
        self._lru: OrderedDict[Unit, set[ObjectKey]] = OrderedDict()  # clean members, oldest unit first
        self._group_bytes: dict[GroupId, int] = {}  # clean and dirty bytes per group
        self._pinned: set[GroupId] = set()
        self._clean_bytes = 0
        self._dirty_bytes = 0
        self._pinned_clean_bytes = 0
        self._dirs_to_sync: set[Path] = set()
        self._files_to_sync: set[str] = set()
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.tmp.mkdir(mode=0o700, exist_ok=True)
        # Plain strings on the hot paths: pathlib costs more than the I/O of a small chunk.
        self._root_str = str(self.root) + "/"
        self._tmp_names = itertools.count()
        self._tmp_prefix = f"{self.tmp}/{os.getpid()}-{secrets.token_hex(4)}-"
        self._known_dirs_str: set[str] = set()
        self._behind: dict[ObjectKey, tuple[bytes, GroupId | None]] = {}
        self._behind_bytes = 0
        self._behind_queue: queue.SimpleQueue[ObjectKey | None] = queue.SimpleQueue()
        self._behind_thread: threading.Thread | None = None

    def _path(self, key: ObjectKey) -> str:
        # Keys look like "data/ab/<32 hex>"; the cache keeps the part after "data/".
        return self._root_str + key[5:] if key.startswith("data/") else self._root_str + key.split("/", 1)[1]

    def file_path(self, key: ObjectKey) -> Path | None:
        """Where a cached chunk lives on disk (for stores that can adopt local files)."""
        with self._lock:
            known = key in self._entries
        return Path(self._path(key)) if known else None

    def scan_sync(self, dirty_keys: set[ObjectKey], group_of: Callable[[ObjectKey], GroupId | None] = lambda _: None) -> None:
        """Rebuild the index from disk at mount; `dirty_keys` are the staged ones (from metadb),
        `group_of` tells which study a chunk belongs to. Access times order the units."""
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
        groups = {key: group_of(key) for _, key, _ in found}
        with self._lock:
            for _, key, size in found:
                self._add(key, size, key in dirty_keys, groups[key])
        self.evict_sync()  # the limit (or keep_uploaded) may have changed since the last mount

    # The helpers below run with self._lock held.
    def _add(self, key: ObjectKey, size: int, dirty: bool, group: GroupId | None) -> None:
        self._pop(key)
        entry = self._entries[key] = _Entry(size, dirty, group)
        if group is not None:
            self._group_bytes[group] = self._group_bytes.get(group, 0) + size
        if dirty:
            self._dirty_bytes += size
        else:
            self._link_clean(key, entry)

    def _link_clean(self, key: ObjectKey, entry: _Entry) -> None:
        unit = entry.unit(key)
        members = self._lru.get(unit)
        if members is None:
            members = self._lru[unit] = set()
        members.add(key)
        self._lru.move_to_end(unit)
        self._clean_bytes += entry.size
        if entry.group in self._pinned:
            self._pinned_clean_bytes += entry.size

    def _unlink_clean(self, key: ObjectKey, entry: _Entry) -> None:
        unit = entry.unit(key)
        members = self._lru.get(unit)
        if members is not None:
            members.discard(key)
            if not members:
                del self._lru[unit]
        self._clean_bytes -= entry.size
        if entry.group in self._pinned:
            self._pinned_clean_bytes -= entry.size

    def _pop(self, key: ObjectKey) -> _Entry | None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return None
        if entry.group is not None:
            left = self._group_bytes[entry.group] - entry.size
            if left:
                self._group_bytes[entry.group] = left
            else:
                del self._group_bytes[entry.group]
        if entry.dirty:
            self._dirty_bytes -= entry.size
        else:
            self._unlink_clean(key, entry)
        return entry

    def _touch(self, key: ObjectKey) -> None:
        entry = self._entries.get(key)
        if entry is not None and not entry.dirty:
            self._lru.move_to_end(entry.unit(key))

    def _write(self, key: ObjectKey, blob: bytes | memoryview, durable: bool) -> None:
        path = self._path(key)
        parent_str = path.rsplit("/", 1)[0]
        new_dir = False
        if parent_str not in self._known_dirs_str:
            try:
                os.mkdir(parent_str, 0o700)
                new_dir = True
            except FileExistsError:
                pass
            self._known_dirs_str.add(parent_str)
        tmp = f"{self._tmp_prefix}{next(self._tmp_names)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(blob)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.rename(tmp, path)
        if durable:
            # Not synced here: the next durable commit syncs it with the others it covers
            # (sync_batch_sync), before the metadata naming it.
            with self._lock:
                self._files_to_sync.add(path)
                self._dirs_to_sync.add(Path(parent_str))
                if new_dir:
                    self._dirs_to_sync.add(self.root)
        elif new_dir:
            with self._lock:
                self._dirs_to_sync.add(self.root)

    def stage_sync(self, key: ObjectKey, blob: bytes | memoryview, group: GroupId | None = None) -> None:
        """Keep a sealed chunk that is not yet in the store. It survives a crash of the process
        on return, and power loss once a durable commit synced it (sync_batch_sync)."""
        self._write(key, blob, durable=True)
        with self._lock:
            self._add(key, len(blob), True, group)
        self.evict_sync()  # uploaded chunks make room for staged ones

    def _room_to_fill(self, size: int) -> bool:
        """Whether a fetched chunk may be kept: never into the disk's reserve (the copy is
        optional; the reader has the bytes anyway)."""
        if self._disk_room() >= size:
            return True
        self.evict_sync()
        return self._disk_room() >= size

    def fill_sync(self, key: ObjectKey, blob: bytes, group: GroupId | None = None) -> None:
        """Keep a copy of a chunk fetched from the store (not durable: the store has it)."""
        if not self.keep_uploaded or not self._room_to_fill(len(blob)):
            return
        self._write(key, blob, durable=False)
        with self._lock:
            self._add(key, len(blob), False, group)
        self.evict_sync()

    def fill_behind(self, key: ObjectKey, blob: bytes, group: GroupId | None = None) -> None:
        """Like fill_sync, but the file is written by a low-priority thread: a reader waiting
        for the next chunks of a study gets the CPU first (on a small host the page-cache
        writes of a study being fetched cost as much as the fetching). Until written, reads
        are served from memory; at most FILL_BEHIND_BYTES wait, beyond that this writes now."""
        if not self.keep_uploaded:
            return
        with self._lock:
            room = self._behind_bytes + len(blob) <= FILL_BEHIND_BYTES
            if room and key not in self._behind:
                self._behind[key] = (blob, group)
                self._behind_bytes += len(blob)
        if not room:
            self.fill_sync(key, blob, group)
            return
        if self._behind_thread is None:
            self._behind_thread = threading.Thread(target=self._write_behind, name="mifs-cache-fill", daemon=True)
            self._behind_thread.start()
        self._behind_queue.put(key)

    def _write_behind(self) -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), FILL_BEHIND_NICE)
        except OSError:
            pass
        while True:
            key = self._behind_queue.get()
            if key is None:
                return
            with self._lock:
                item = self._behind.get(key)
            if item is None:
                continue  # discarded meanwhile
            blob, group = item
            written = False
            if self._room_to_fill(len(blob)):  # else not kept: the disk's reserve comes first
                try:
                    self._write(key, blob, durable=False)
                    written = True
                except OSError as exc:
                    log.warning("cannot cache object %s: %s", key, exc.strerror)
            with self._lock:
                wanted = self._behind.pop(key, None) is not None
                if wanted:
                    self._behind_bytes -= len(blob)
                    if written:
                        self._add(key, len(blob), False, group)
            if written and not wanted:
                self._unlink(key)  # discarded while being written
            self.evict_sync()

    def stop_behind(self) -> None:
        """Write what waits and stop the writer (unmount)."""
        thread, self._behind_thread = self._behind_thread, None
        if thread is not None:
            self._behind_queue.put(None)
            thread.join(timeout=30)

    def _unlink(self, key: ObjectKey) -> None:
        try:
            os.unlink(self._path(key))
        except FileNotFoundError:
            pass

    def _disk_room(self) -> int:
        """Bytes the disk can still take beyond the reserve (negative: into it)."""
        try:
            st = os.statvfs(self._root_str)
        except OSError:
            return self.limit  # the directory is gone: staging fails with a clear error anyway
        reserve = min(FREE_SPACE_RESERVE, int(st.f_blocks * st.f_frsize * FREE_SPACE_RESERVE_SHARE))
        return st.f_bavail * st.f_frsize - reserve

    def _limit_now(self, disk_room: int) -> int:
        """The size limit as the disk allows it now (lock held): below what the cache holds
        when the disk's free space is into the reserve."""
        return max(0, min(self.limit, self._clean_bytes + self._dirty_bytes + disk_room))

    def limit_now(self) -> int:
        """The size limit, or less when the disk the cache is on has less room."""
        room = self._disk_room()
        with self._lock:
            return self._limit_now(room)

    def has_room_for_dirty(self, size: int) -> bool:
        """Whether `size` more bytes of staged (not yet uploaded) data fit under the limit and
        on the disk; clean unpinned chunks do not count, they are evicted to make room."""
        room = self._disk_room()
        with self._lock:
            evictable = self._clean_bytes - self._pinned_clean_bytes
            if size > room + evictable:
                return False
            return self._dirty_bytes + self._pinned_clean_bytes + size <= self.limit or self._dirty_bytes == 0

    def has_staged(self) -> bool:
        """Whether staged (not yet uploaded) chunks take room that their upload will free."""
        with self._lock:
            return self._dirty_bytes > 0

    def staged_share(self) -> float:
        """How much of the size limit (as the disk allows it now) staged (not yet uploaded)
        chunks take, 0.0 .. 1.0+."""
        room = self._disk_room()
        with self._lock:
            limit = self._limit_now(room)
            return self._dirty_bytes / limit if limit > 0 else 1.0

    def sync_pending(self) -> bool:
        """Whether staged chunks were written that would not survive power loss yet."""
        with self._lock:
            return bool(self._dirs_to_sync or self._files_to_sync)

    def take_sync_pending(self) -> SyncBatch:
        """The staged chunks (and directories) written since the last call, to be synced by
        sync_batch_sync; until then the batch is this caller's to sync."""
        with self._lock:
            batch = SyncBatch(self._files_to_sync, self._dirs_to_sync)
            self._files_to_sync, self._dirs_to_sync = set(), set()
        return batch

    def sync_batch_sync(self, batch: SyncBatch) -> None:
        """fdatasync the staged chunks of `batch`, then fsync the directories that gained
        them, so that they and their names survive power loss. On failure the batch is
        handed back for the next attempt."""
        files, dirs = batch.files, batch.dirs
        try:
            for path in files:
                fdatasync_path(path)  # gone: garbage-collected meanwhile, nothing names it any more
            # Leaf directories first, then the root that names any new ones.
            for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
                fsync_dir(d)
        except BaseException:
            with self._lock:  # the next durable commit tries again
                self._files_to_sync |= files
                self._dirs_to_sync |= dirs
            raise

    def read_sync(self, key: ObjectKey, *, touch: bool = True) -> bytes | None:
        """A cached chunk's bytes, or None. touch=False for internal reads (uploads) that must
        not count as use."""
        with self._lock:
            waiting = self._behind.get(key)
            if waiting is not None:
                if touch:
                    self.hits += 1
                return waiting[0]
        try:
            with open(self._path(key), "rb") as fh:
                blob = fh.read()
        except FileNotFoundError:
            with self._lock:
                if touch:
                    self.misses += 1
                entry = self._entries.get(key)
                if entry is not None and not entry.dirty:
                    self._pop(key)
            return None
        if touch:
            with self._lock:
                self.hits += 1
                self._touch(key)
        return blob

    def contains(self, key: ObjectKey) -> bool:
        with self._lock:
            return key in self._entries or key in self._behind

    def mark_clean_sync(self, key: ObjectKey) -> None:
        """The chunk is safely in the store: it may now be evicted."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.dirty:
                entry.dirty = False
                self._dirty_bytes -= entry.size
                self._link_clean(key, entry)
        self.evict_sync()

    def discard_sync(self, key: ObjectKey) -> None:
        with self._lock:
            self._pop(key)
            waiting = self._behind.pop(key, None)
            if waiting is not None:
                self._behind_bytes -= len(waiting[0])
        self._unlink(key)

    # --- study groups ---------------------------------------------------------------------------

    def assign_group(self, keys: Iterable[ObjectKey], group: GroupId | None) -> None:
        """These chunks belong to study `group` now (or to none): they are evicted with it."""
        with self._lock:
            for key in keys:
                entry = self._entries.get(key)
                if entry is None or entry.group == group:
                    continue
                self._pop(key)
                self._add(key, entry.size, entry.dirty, group)

    def set_pinned(self, groups: Iterable[GroupId]) -> None:
        """The groups that must never be evicted (replaces the previous set)."""
        with self._lock:
            self._pinned = set(groups)
            self._pinned_clean_bytes = sum(
                e.size for e in self._entries.values() if not e.dirty and e.group in self._pinned
            )
        self.evict_sync()

    def group_bytes(self, group: GroupId) -> int:
        """Bytes of the group's chunks in the cache (staged and uploaded)."""
        with self._lock:
            waiting = sum(len(blob) for blob, g in self._behind.values() if g == group)
            return self._group_bytes.get(group, 0) + waiting

    def touch_group(self, group: GroupId) -> None:
        """The study is in use: evict it last."""
        with self._lock:
            if group in self._lru:
                self._lru.move_to_end(group)

    # --- eviction ---------------------------------------------------------------------------

    def _victims(self, disk_room: int) -> list[ObjectKey]:
        """Clean chunks to drop next (lock held): every clean chunk when uploaded copies are not
        kept; otherwise the least recently used unpinned unit as a whole, and only when nothing
        else is left, single chunks of the most recently used unit (a study larger than the
        cache must not evict itself wholesale while it is being read)."""
        if not self._lru:
            return []
        if not self.keep_uploaded:
            return [k for members in self._lru.values() for k in members]
        if self._clean_bytes + self._dirty_bytes <= self._limit_now(disk_room):
            return []
        newest = next(reversed(self._lru))
        for unit, members in self._lru.items():
            if unit in self._pinned or unit == newest:
                continue
            return list(members)
        if newest not in self._pinned:
            return [next(iter(self._lru[newest]))]
        return []

    def evict_sync(self) -> None:
        # The disk's free space is read once: a file system may show freed blocks only later
        # (a journal commit), and counting them here keeps one call from evicting everything.
        room = self._disk_room()
        while True:
            with self._lock:
                victims = self._victims(room)
                for key in victims:
                    entry = self._pop(key)
                    if entry is not None:
                        room += entry.size
                self.evictions += len(victims)
            if not victims:
                return
            for key in victims:
                try:
                    os.unlink(self._path(key))
                except FileNotFoundError:
                    pass

    def statistics(self) -> CacheStatistics:
        room = self._disk_room()
        with self._lock:
            clean, dirty = self._clean_bytes, self._dirty_bytes
            return CacheStatistics(
                clean + dirty, self.limit, self._limit_now(room), dirty, sum(len(m) for m in self._lru.values()),
                sum(1 for e in self._entries.values() if e.dirty), self.hits, self.misses, self.evictions,
                self._pinned_clean_bytes,
            )
