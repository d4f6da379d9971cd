"""Crypto-shredding, the retention purge and undelete: destroying data keys for good.

Must not know pyfuse3 or the control channel: the kernel caches are dropped through the
`invalidate` callback and admin actions reported through `audit`, both wired by mount.

Shredding a set of files (docs/FORMAT.md section 11), in this order, crash-safe at every step:

1. One metadata transaction deletes, for every file, all its names, its index and retention
   rows, its chunk rows (their objects go to the `garbage` table) and its inode row with the
   wrapped data key, raises meta 'keys_destroyed', and is committed (fsync). From here the file
   is gone from the namespace; nothing can decrypt it through mifs. SQLite's secure_delete
   overwrites the deleted rows; the WAL is then checkpointed and truncated.
2. The uploader deletes every garbage object from the store with all its versions, and from
   the cache (a crash leaves the garbage rows: the next mount resumes). A pack (docs/FORMAT.md
   section 5b) that also holds other files' chunks is first repacked: those chunks move to new
   objects, then the pack goes like any garbage (the repack mark is durable with step 1).
3. metasync stores a fresh snapshot and deletes every older snapshot and journal segment with
   all versions: no metadata copy in the store holds the key any more (a crash leaves
   keys_destroyed > keys_purged: the next mount does it before anything else).

Copies of the store taken outside mifs (backups, replication) still hold the wrapped key; they
become undecryptable only when the KEK that wrapped it is rotated away and destroyed.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterable

import trio

from mifs.cache import ChunkCache
from mifs.chunks import DataPath
from mifs.commits import Committer
from mifs.errors import LocalIOError, StorePermissionDenied, StoreUnavailable
from mifs.metadb import retention, studies, tables
from mifs.metadb.db import MetaDb
from mifs.metasync import MetadataReplicator
from mifs.types import ROOT_INODE, InodeId, ObjectKey
from mifs.vfs.files import FileData
from mifs.vfs.namespace import Namespace

log = logging.getLogger(__name__)

Invalidate = Callable[[InodeId, list[tuple[InodeId, bytes]]], Awaitable[None]]
"""Drop the kernel's cached entries (parent, name) and, for an inode other than 0, its cached
attributes and pages (a destroyed file); inode 0 for a name that was restored."""
Audit = Callable[[str, dict[str, Any]], None]
"""Record an admin action (kind, counts; never names) in the audit trail."""
Progress = Callable[[dict[str, Any]], Awaitable[None]]

MIN_PURGE_INTERVAL = 0.5
MAX_PURGE_INTERVAL = 60.0
RETRY_DELAY = 2.0


class ShredRefused(Exception):
    """A shred or undelete the admin asked for cannot be done; the message says why (ids and
    counts only) and `kind` selects the CLI exit code."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


KIND_NOT_FOUND = "not-found"
KIND_USAGE = "usage"
KIND_REFUSED = "refused"


@dataclass(frozen=True)
class ShredResult:
    files: int
    bytes: int
    objects: int
    retained: int


@dataclass(frozen=True)
class _Victim:
    inode: InodeId
    size: int
    names: list[tuple[InodeId, bytes]]
    keys: list[ObjectKey]


class Shredder:
    def __init__(
        self, db: MetaDb, ns: Namespace, files: FileData, data: DataPath, cache: ChunkCache, committer: Committer,
        replicator: MetadataReplicator, invalidate: Invalidate, audit: Audit,
    ) -> None:
        self._db = db
        self._ns = ns
        self._files = files
        self._data = data
        self._cache = cache
        self._committer = committer
        self._replicator = replicator
        self._invalidate = invalidate
        self._audit = audit
        self._lock = trio.Lock()
        self.shredded_files = 0
        self.purged_files = 0

    # --- finding the files ----------------------------------------------------------------------

    def resolve(self, path: str) -> tuple[InodeId, bytes]:
        """(parent inode, last name) of a path relative to the mount root."""
        parts = [os.fsencode(p) for p in path.split("/") if p not in ("", ".")]
        if not parts:
            raise ShredRefused("the mount's root directory cannot be shredded or restored", KIND_USAGE)
        parent = ROOT_INODE
        for depth, name in enumerate(parts[:-1]):
            inode = tables.lookup(self._db, parent, name)
            row = tables.get_inode(self._db, inode) if inode is not None else None
            if row is None or not stat.S_ISDIR(row.mode):
                raise ShredRefused(f"directory at depth {depth + 1} of the path does not exist", KIND_NOT_FOUND)
            parent = row.id
        return parent, parts[-1]

    def file_at(self, path: str) -> InodeId:
        parent, name = self.resolve(path)
        inode = tables.lookup(self._db, parent, name)
        row = tables.get_inode(self._db, inode) if inode is not None else None
        if row is None:
            raise ShredRefused("no such file in the mount", KIND_NOT_FOUND)
        if not stat.S_ISREG(row.mode):
            raise ShredRefused(f"inode {row.id} is not a regular file (shred files, a --study or a --patient)", KIND_USAGE)
        return row.id

    def files_of_study(self, study_uid: str) -> list[InodeId]:
        live = [InodeId(r[0]) for r in self._db.all(
            "SELECT i.inode FROM dicom_instances i JOIN dicom_studies s ON s.id = i.study_id WHERE s.study_uid = ?",
            (study_uid,),
        )]
        found = sorted(set(live) | set(retention.retained_of_study(self._db, study_uid)))
        if not found:
            raise ShredRefused("no indexed file belongs to that study", KIND_NOT_FOUND)
        return found

    def files_of_patient(self, patient_id: str) -> list[InodeId]:
        live = [InodeId(r[0]) for r in self._db.all("SELECT inode FROM dicom_instances WHERE patient_id = ?", (patient_id,))]
        found = sorted(set(live) | set(retention.retained_of_patient(self._db, patient_id)))
        if not found:
            raise ShredRefused("no indexed file belongs to that patient", KIND_NOT_FOUND)
        return found

    # --- shredding ------------------------------------------------------------------------------

    def _check(self, inodes: Iterable[InodeId], override_worm: bool) -> list[tables.InodeRow]:
        rows: list[tables.InodeRow] = []
        open_count = protected = 0
        for inode in inodes:
            row = tables.get_inode(self._db, inode)
            if row is None or not stat.S_ISREG(row.mode):
                continue  # gone meanwhile
            if inode in self._files.open:
                open_count += 1
            if row.nlink > 0 and self._ns.policy.is_protected(self._db, row):
                protected += 1
            rows.append(row)
        if open_count:
            raise ShredRefused(f"{open_count} of the files are open; close them and try again (nothing was shredded)", KIND_REFUSED)
        if protected and not override_worm:
            raise ShredRefused(
                f"{protected} of the files are WORM-protected; --override-worm shreds them anyway (nothing was shredded)",
                KIND_REFUSED,
            )
        return rows

    def _destroy(self, rows: list[tables.InodeRow]) -> list[_Victim]:
        """Step 1 in the open transaction; no checkpoint, so it commits as one."""
        victims: list[_Victim] = []
        for row in rows:
            keys = [k for k, _ in retention.chunk_keys(self._db, row.id)]
            victims.append(_Victim(row.id, row.size, retention.names_of(self._db, row.id), keys))
            retention.destroy(self._db, row.id)
        if retention.drop_empty_studies(self._db):
            self._cache.set_pinned(studies.pinned_ids(self._db))
        return victims

    async def _after_destroy(self, victims: list[_Victim]) -> None:
        for v in victims:
            self._data.forget_destroyed(v.inode, v.keys)
            self._files.forget_header(v.inode)
        for v in victims:
            await self._invalidate(v.inode, v.names)
        if not self._db.checkpoint_truncate():
            log.info("the metadata WAL could not be truncated now; the next checkpoint does it")

    def preview(self, inodes: list[InodeId], *, override_worm: bool) -> ShredResult:
        """What shred would destroy (it refuses the same way), destroying nothing."""
        rows = self._check(inodes, override_worm)
        objects = sum(len(retention.chunk_keys(self._db, r.id)) for r in rows)
        return ShredResult(len(rows), sum(r.size for r in rows), objects, sum(1 for r in rows if r.nlink == 0))

    async def shred(self, inodes: list[InodeId], *, override_worm: bool, progress: Progress) -> ShredResult:
        """Destroy the files' keys, then their chunks and the metadata copies holding the keys;
        returns once all of it is done (store outages make it wait, with progress reports).
        Cancellation after step 1 leaves the rest to the background (and the next mount)."""
        async with self._lock:
            await self._committer.commit_now()  # what was written so far is in the garbage accounting
            rows = self._check(inodes, override_worm)
            if not rows:
                raise ShredRefused("none of the files exists any more", KIND_NOT_FOUND)
            retained = sum(1 for r in rows if r.nlink == 0)
            packs = tables.packs_of_inodes(self._db, [r.id for r in rows])
            victims = self._destroy(rows)
            await self._committer.commit_now()
            self.shredded_files += len(victims)
            log.info("shred: destroyed the keys of %d files; deleting %d objects", len(victims), sum(len(v.keys) for v in victims))
            await self._after_destroy(victims)
            keys = [k for v in victims for k in v.keys]
            await self._wait_objects_gone(keys, packs, progress)
            await self._purge_metadata(progress)
            result = ShredResult(len(victims), sum(v.size for v in victims), len(keys), retained)
            # AUDIT HOOK (shred): the audit trail records who shredded what (counts, inode ids).
            self._audit("shred", {"files": result.files, "bytes": result.bytes, "objects": result.objects,
                                  "inodes": [int(v.inode) for v in victims], "override_worm": override_worm})
            return result

    async def _wait_objects_gone(self, keys: list[ObjectKey], packs: list[ObjectKey], progress: Progress) -> None:
        """Until the chunks' objects and the packs that held them are deleted from the store.
        A repacked pack becomes garbage in a transaction of the uploader's; its deletion waits
        for a durable commit, which this makes at once instead of at the next interval."""
        last_report = last_commit = trio.current_time()
        while True:
            left = retention.garbage_left(self._db, keys) + tables.packs_left(self._db, packs)
            if left == 0:
                return
            if self._db.dirty and trio.current_time() - last_commit >= 0.2:
                await self._committer.commit_now()
                last_commit = trio.current_time()
            if trio.current_time() - last_report >= 1.0:
                await progress({"objects": len(keys) + len(packs), "left": left, "step": "deleting chunk objects"})
                last_report = trio.current_time()
            await trio.sleep(0.05)

    async def _purge_metadata(self, progress: Progress) -> None:
        wanted = retention.keys_destroyed(self._db)
        while True:
            try:
                if await self._replicator.purge_now() >= wanted:
                    await self._committer.commit_now()  # keys_purged
                    return
            except (StoreUnavailable, StorePermissionDenied, LocalIOError) as exc:
                log.warning("shred: replacing the metadata copies in the store failed, retrying: %s", exc)
                await progress({"step": "replacing metadata copies in the store", "error": str(exc)})
                await trio.sleep(RETRY_DELAY)

    # --- undelete ---------------------------------------------------------------------------------

    def list_retained(self, retention_ns: int) -> list[dict[str, Any]]:
        items = []
        for r in retention.list_retained(self._db):
            items.append({
                "id": int(r.inode), "path": self._path_of(r.parent, r.name), "bytes": r.size,
                "deleted": _iso(r.deleted_ns), "expires": _iso(r.deleted_ns + retention_ns),
                "parent_exists": self._is_dir(r.parent),
            })
        return items

    def _is_dir(self, inode: InodeId) -> bool:
        row = tables.get_inode(self._db, inode)
        return row is not None and stat.S_ISDIR(row.mode) and (inode == ROOT_INODE or row.nlink > 0)

    def _path_of(self, parent: InodeId, name: bytes) -> str | None:
        parts = [name]
        current = parent
        for _ in range(4096):
            if current == ROOT_INODE:
                return "/".join(os.fsdecode(p) for p in reversed(parts))
            found = self._db.one("SELECT parent, name FROM dentries WHERE inode = ? LIMIT 1", (current,))
            if found is None:
                return None
            parts.append(bytes(found[1]))
            current = InodeId(int(found[0]))
        return None

    async def undelete(self, *, path: str | None, inode: int | None, to: str | None) -> dict[str, Any]:
        async with self._lock:
            if inode is not None:
                entry = next((r for r in retention.list_retained(self._db) if r.inode == inode), None)
                if entry is None:
                    raise ShredRefused(f"no deleted file with id {inode} is retained", KIND_NOT_FOUND)
            else:
                assert path is not None
                parent, name = self.resolve(path)
                entry = retention.retained_at(self._db, parent, name)
                if entry is None:
                    raise ShredRefused("no deleted file is retained at that path (see mifs undelete --list)", KIND_NOT_FOUND)
            if to is not None:
                target_parent, target_name = self.resolve(to)
            else:
                target_parent, target_name = entry.parent, entry.name
                if not self._is_dir(target_parent):
                    raise ShredRefused("the directory the file was in is gone; restore it with --to NEWPATH", KIND_REFUSED)
            if not self._is_dir(target_parent):
                raise ShredRefused("the target directory does not exist", KIND_NOT_FOUND)
            if len(target_name) > 255:
                raise ShredRefused("the target name is longer than 255 bytes", KIND_USAGE)
            if tables.lookup(self._db, target_parent, target_name) is not None:
                raise ShredRefused("the name is taken now; restore it elsewhere with --to NEWPATH", KIND_REFUSED)
            now = time.time_ns()
            retention.restore(self._db, entry.inode, target_parent, target_name, now)
            parent_row = tables.get_inode(self._db, target_parent)
            if parent_row is not None:
                parent_row.mtime_ns = parent_row.ctime_ns = now
                tables.save_inode_attrs(self._db, parent_row)
            await self._committer.commit_now()
            await self._invalidate(InodeId(0), [(target_parent, target_name)])
            # AUDIT HOOK (undelete): the audit trail records who restored which inode.
            self._audit("undelete", {"inode": int(entry.inode), "bytes": entry.size})
            return {"id": int(entry.inode), "bytes": entry.size}

    # --- the retention purge ------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Destroy retained files past the window, now (mount) and then periodically."""
        retention_ns = self._ns.policy.retention_ns
        interval = min(MAX_PURGE_INTERVAL, max(MIN_PURGE_INTERVAL, retention_ns / 1e9 / 10)) if retention_ns > 0 else MAX_PURGE_INTERVAL
        task_status.started()
        while True:
            try:
                await self.purge_expired()
            except Exception:
                log.exception("the retention purge failed; trying again later")
            await trio.sleep(interval)

    async def purge_expired(self) -> int:
        """Destroy (like a shred, without waiting for the store) retained files older than the
        window; with no window configured, every retained file (the window was removed)."""
        async with self._lock:
            cutoff = time.time_ns() - self._ns.policy.retention_ns
            expired = [i for i in retention.retained_before(self._db, cutoff) if i not in self._files.open]
            if not expired:
                return 0
            rows = [r for r in (tables.get_inode(self._db, i) for i in expired) if r is not None]
            victims = self._destroy(rows)
            await self._committer.commit_now()
            self.purged_files += len(victims)
            log.info("retention purge: destroyed the keys of %d files past the window", len(victims))
            await self._after_destroy(victims)
            return len(victims)

    def statistics(self) -> dict[str, Any]:
        return {
            "retained_files": int(self._db.scalar("SELECT count(*) FROM retained") or 0),
            "shredded_files": self.shredded_files, "purged_files": self.purged_files,
            "key_purge_pending": self._replicator.purge_pending(),
            "retention_days": self._ns.policy.retention_ns / 86_400e9,
            "worm_days": self._ns.policy.worm_ns / 86_400e9,
        }


def _iso(ns: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ns / 1e9))
