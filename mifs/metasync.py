"""Keeps an encrypted copy of the metadata in the store, so the bucket alone (with the key)
can rebuild a gateway: periodic snapshots plus small journal segments in between.

Must not touch file contents, FUSE or the cache's chunks. Layout (docs/FORMAT.md, section 9):

- ``meta/snapshot/<commit seq, 16 hex>``: an SQLCipher copy of the database (VACUUM INTO,
  same key), sealed as a metadata blob of kind 1.
- ``meta/journal/<first seq, 16 hex>-<last seq, 16 hex>``: the committed SQL statements with
  their parameters (JSON, zlib), sealed as a metadata blob of kind 2.

Every statement mifs runs on the database is deterministic, so replaying the journal
segments newer than a snapshot, in commit order, reproduces the database. A segment is
shipped every `journal_interval` seconds when anything was committed: that interval plus the
upload time bounds what a host loss can cost (the recovery point). Snapshots are taken at
mount when the store's chain does not reach the local database, every `snapshot_interval`
or `segments_per_snapshot` segments, at unmount, and whenever the in-memory journal
overflowed; older snapshots and the segments they cover are then deleted.

Crypto-shredding: metadata copies hold wrapped data keys. When a key was destroyed (meta
'keys_destroyed' > 'keys_purged', see metadb/retention.py) the next snapshot is a purging
one: after it is stored, every other snapshot and every segment it covers is deleted with all
its object versions (not just the current ones), and only then is 'keys_purged' raised. Such
a snapshot is taken at once when asked (`mifs shred`, `purge_now`), at mount, and otherwise at
the latest KEY_PURGE_DELAY after a key was destroyed by an unlink or the retention purge.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets
import zlib
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence

import trio

from mifs.crypto import envelope
from mifs.errors import ArchiveCorrupt, IntegrityError, LocalIOError, StorePermissionDenied, StoreUnavailable
from mifs.metadb import retention
from mifs.metadb.db import JournalGroup, MetaDb, Statement
from mifs.store.base import ObjectStore
from mifs.types import ObjectKey

log = logging.getLogger(__name__)

SNAPSHOT_PREFIX = "meta/snapshot/"
JOURNAL_PREFIX = "meta/journal/"
KIND_SNAPSHOT = 1
KIND_JOURNAL = 2
KEEP_SNAPSHOTS = 2
MAX_PENDING_GROUPS = 100_000
KEY_PURGE_DELAY = 600.0
"""Longest time after an unlink or retention purge destroyed a data key before the metadata
copies in the store that still hold it are replaced (a purging snapshot)."""


def _encode_value(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"b": base64.b64encode(bytes(value)).decode("ascii")}
    return value


def _decode_value(value: Any) -> Any:
    if isinstance(value, dict):
        return base64.b64decode(value["b"])
    return value


def encode_journal(groups: list[JournalGroup]) -> bytes:
    doc = [[seq, [[sql, [_encode_value(v) for v in values]] for sql, values in statements]] for seq, statements in groups]
    return zlib.compress(json.dumps(doc, separators=(",", ":")).encode("utf-8"), 1)


def decode_journal(raw: bytes) -> list[JournalGroup]:
    doc = json.loads(zlib.decompress(raw).decode("utf-8"))
    groups: list[JournalGroup] = []
    for seq, statements in doc:
        decoded: list[Statement] = [(str(sql), tuple(_decode_value(v) for v in values)) for sql, values in statements]
        groups.append((int(seq), decoded))
    return groups


def _seq_of_snapshot(key: str) -> int:
    return int(key[len(SNAPSHOT_PREFIX):], 16)


def _range_of_segment(key: str) -> tuple[int, int]:
    first, last = key[len(JOURNAL_PREFIX):].split("-")
    return int(first, 16), int(last, 16)


class MetadataReplicator:
    def __init__(
        self, db: MetaDb, store: ObjectStore, key: bytes, work_dir: Path,
        journal_interval: float = 1.0, snapshot_interval: float = 3600.0, segments_per_snapshot: int = 600,
        make_durable: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """make_durable: makes every commit so far survive power loss (Committer.commit_now);
        a snapshot that caught a light commit is stored only after it. None: the database
        has no light commits (offline tools)."""
        self._db = db
        self._make_durable = make_durable
        self._store = store
        self._key = key
        self._work_dir = work_dir
        self._journal_interval = journal_interval
        self._snapshot_interval = snapshot_interval
        self._segments_per_snapshot = segments_per_snapshot
        self._segments_since_snapshot = 0
        self._pending: list[JournalGroup] = []  # taken from the db, not yet in the store
        self._need_snapshot = True
        self._last_snapshot = 0.0
        self._lock = trio.Lock()
        self._purge_wanted_since: float | None = None
        self.shipped_seq = 0
        self.last_error = ""
        self.purges = 0
        self._listed_newest: int | None = None

    def purge_pending(self) -> bool:
        """Whether a destroyed key may still be in a metadata copy in the store."""
        return retention.keys_destroyed(self._db) > retention.keys_purged(self._db)

    async def purge_now(self) -> int:
        """Store a snapshot and delete every older metadata object (all versions), so no copy
        of the metadata in the store holds a key destroyed before this call. Returns the
        'keys_destroyed' value now covered. Raises StoreUnavailable/StorePermissionDenied."""
        await self.ship(snapshot=True)
        return retention.keys_purged(self._db)

    def store_listed(self, newest: int) -> None:
        """The newest commit the store's metadata reached when the mount listed it just
        before (opening.check_cache_not_behind_store): run() need not list it again."""
        self._listed_newest = newest

    async def _store_is_current(self) -> bool:
        """Whether the store's snapshots and segments already reach our last commit (then the
        mount needs no snapshot of its own: the next segment continues the chain)."""
        newest, self._listed_newest = self._listed_newest, None
        if newest is None:
            newest = await newest_store_seq(self._store)
        # What the store already holds counts as shipped (status, `mifs sync`), not 0 until
        # this mount ships something of its own.
        self.shipped_seq = max(self.shipped_seq, newest)
        return newest >= 0 and newest >= self._db.first_unshipped_seq() - 1

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            if await self._store_is_current() and not self.purge_pending():
                self._need_snapshot = False
                self._last_snapshot = trio.current_time()
        except (StoreUnavailable, StorePermissionDenied) as exc:
            log.warning("cannot list the metadata in the store: %s", exc)
        task_status.started()
        while True:
            await trio.sleep(self._journal_interval)
            try:
                await self.ship()
            except (StoreUnavailable, StorePermissionDenied, LocalIOError) as exc:
                self.last_error = str(exc)
                log.warning("shipping metadata to the store failed, will retry: %s", exc)

    async def ship(self, *, snapshot: bool = False) -> None:
        """Send what was committed since the last call: a journal segment, or a snapshot."""
        async with self._lock:
            groups, overflow = self._db.take_journal()
            self._pending.extend(groups)
            if overflow or len(self._pending) > MAX_PENDING_GROUPS:
                self._pending = []  # a snapshot will carry all of it
                self._need_snapshot = True
            now = trio.current_time()
            if not self.purge_pending():
                self._purge_wanted_since = None
            elif self._purge_wanted_since is None:
                self._purge_wanted_since = now
            due = (
                now - self._last_snapshot >= self._snapshot_interval
                or self._segments_since_snapshot >= self._segments_per_snapshot
                or (self._purge_wanted_since is not None and now - self._purge_wanted_since >= KEY_PURGE_DELAY)
            )
            if snapshot or self._need_snapshot or due:
                try:
                    await self._snapshot()
                except LocalIOError:
                    # No local copy could be made (cache disk full or gone): the journal still
                    # reaches the store, and the snapshot is tried again at the next call.
                    self._need_snapshot = True
                    if self._pending:
                        await self._segment()
                    raise
            elif self._pending:
                await self._segment()

    async def rekey(self, db_key: bytes, replica_key: bytes, commit: Callable[[], Awaitable[None]]) -> int:
        """Key rotation: re-encrypt the local database under db_key, then store a snapshot
        sealed under replica_key and delete every older snapshot and journal segment (sealed
        under the old key). Returns the new snapshot's commit seq.

        Runs under the replication lock (no snapshot reads the database meanwhile); `commit`
        makes the open transaction durable, and nothing checkpoints between the last check
        that nothing is uncommitted and the rekey. Cancelled or killed part-way, the database
        is under one key or the other and the store may hold blobs under both: a later call
        finishes the job (restore tries every key it is given)."""
        async with self._lock:
            while True:
                await commit()
                if not self._db.dirty:
                    break
            groups, _overflow = self._db.take_journal()  # the snapshot below covers them all
            self._pending.extend(groups)
            if not self._db.keyed_with(db_key):
                self._db.rekey(db_key)
            self._key = replica_key
            seq = await self._snapshot(keep=1)
            return seq

    async def _segment(self) -> None:
        groups = self._pending
        first, last = groups[0][0], groups[-1][0]
        key = ObjectKey(f"{JOURNAL_PREFIX}{first:016x}-{last:016x}")
        blob = await trio.to_thread.run_sync(self._seal, KIND_JOURNAL, key, encode_journal(groups))
        await self._store.put(key, blob)
        self._pending = []
        self.shipped_seq = last
        self._segments_since_snapshot += 1

    async def _snapshot(self, keep: int = KEEP_SNAPSHOTS) -> int:
        tmp = self._work_dir / f"snapshot-{secrets.token_hex(8)}.db"
        purging = self.purge_pending()
        if purging:
            self._db.checkpoint_truncate()  # old page images (destroyed keys) leave the local WAL
        try:
            seq, destroyed = await trio.to_thread.run_sync(
                self._db.snapshot_with_meta_sync, tmp, retention.KEYS_DESTROYED
            )
            raw = await trio.to_thread.run_sync(tmp.read_bytes)
        except OSError as exc:
            raise LocalIOError(f"cannot read the metadata snapshot copy: {exc.strerror}") from None
        finally:
            tmp.unlink(missing_ok=True)
        if seq > self._db.durable_seq and self._make_durable is not None:
            await self._make_durable()  # the copy must not be ahead of what a power loss leaves
        key = ObjectKey(f"{SNAPSHOT_PREFIX}{seq:016x}")
        blob = await trio.to_thread.run_sync(self._seal, KIND_SNAPSHOT, key, raw)

        await self._store.put(key, blob)
        self._pending = [g for g in self._pending if g[0] > seq]
        self._need_snapshot = False
        self._last_snapshot = trio.current_time()
        self._segments_since_snapshot = 0
        self.shipped_seq = seq
        if self._pending:
            await self._segment()
        keys_to_purge = purging or destroyed > retention.keys_purged(self._db)
        if keys_to_purge or keep == 1:
            # Destroyed data keys (shred, unlink) or a replaced KEK (key rotation, keep=1): no
            # older metadata copy, nor any version of one, may stay in the store.
            await self._purge_older(key, seq)
            if keys_to_purge:
                retention.set_keys_purged(self._db, destroyed)  # committed by the next commit
                self.purges += 1
                log.info("metadata copies in the store replaced by snapshot %016x (destroyed keys purged)", seq)
        else:
            await self._prune(seq, keep)
        return seq

    async def _purge_older(self, keep: ObjectKey, seq: int) -> None:
        """Delete, with all their versions, every snapshot but `keep` and every segment that
        ends at or before `seq` (the ones after it were shipped after this snapshot)."""
        for name in await self._store.list_all(SNAPSHOT_PREFIX):
            if name != keep:
                await self._store.purge(name)
        for name in await self._store.list_all(JOURNAL_PREFIX):
            try:
                last = _range_of_segment(name)[1]
            except ValueError:
                continue
            if last <= seq:
                await self._store.purge(name)

    async def _prune(self, newest: int, count: int = KEEP_SNAPSHOTS) -> None:
        snapshots = sorted(_seq_of_snapshot(k) for k in await self._store.list(SNAPSHOT_PREFIX))
        keep = set(snapshots[-count:]) | {newest}
        oldest_kept = min(keep)
        for seq in snapshots:
            if seq not in keep:
                await self._store.delete(ObjectKey(f"{SNAPSHOT_PREFIX}{seq:016x}"))
        for key in await self._store.list(JOURNAL_PREFIX):
            if _range_of_segment(key)[1] <= oldest_kept:
                await self._store.delete(key)

    def _seal(self, kind: int, key: ObjectKey, payload: bytes) -> bytes:
        return envelope.seal_blob(self._key, kind, key.encode("ascii"), payload)


def _open(key: bytes, kind: int, name: ObjectKey, blob: bytes) -> bytes:
    return envelope.open_blob(key, kind, name.encode("ascii"), blob)


def _open_any(keys: Sequence[tuple[bytes, bytes]], kind: int, name: ObjectKey, blob: bytes) -> tuple[bytes, bytes]:
    """Open a blob sealed under any of the (replica key, database key) pairs (during a key
    rotation the store holds blobs under both KEKs); the payload and its database key."""
    for key, db_key in keys:
        try:
            return _open(key, kind, name, blob), db_key
        except IntegrityError:
            continue
    raise IntegrityError("metadata blob failed authentication")


async def newest_store_seq(store: ObjectStore) -> int:
    """The newest commit the store's snapshots and journal segments reach (-1: none)."""
    seqs = [_seq_of_snapshot(k) for k in await store.list(SNAPSHOT_PREFIX)]
    seqs += [_range_of_segment(k)[1] for k in await store.list(JOURNAL_PREFIX)]
    return max(seqs, default=-1)


async def store_has_metadata(store: ObjectStore) -> bool:
    return bool(await store.list(SNAPSHOT_PREFIX))


async def restore(store: ObjectStore, keys: Sequence[tuple[bytes, bytes]], db_path: Path) -> tuple[int, int]:
    """Rebuild the metadata database at db_path from the newest snapshot in the store and the
    journal segments after it. keys: (replica key, database key) pairs, one per KEK the mount
    holds. The rebuilt database is under the key of the snapshot it came from. Returns
    (snapshot seq, final commit seq)."""
    snapshots = sorted(await store.list(SNAPSHOT_PREFIX), key=_seq_of_snapshot)
    if not snapshots:
        raise FileNotFoundError("no metadata snapshot in the store")
    newest = _seq_of_snapshot(snapshots[-1])
    for name in reversed(snapshots):  # newest first; an older one only if the journal bridges the gap
        try:
            image, db_key = _open_any(keys, KIND_SNAPSHOT, name, await store.get(name))
            break
        except IntegrityError:
            log.error("metadata snapshot %s failed authentication; trying an older one", name)
    else:
        raise ArchiveCorrupt("no metadata snapshot in the store passes authentication")
    tmp = db_path.with_name(db_path.name + ".restore")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, image)
        os.fsync(fd)
    finally:
        os.close(fd)
    # A WAL left beside a database that is gone (moved away by hand) belongs to no database:
    # SQLite would replay its pages into the rebuilt one.
    for leftover in (db_path.with_name(db_path.name + "-wal"), db_path.with_name(db_path.name + "-shm")):
        leftover.unlink(missing_ok=True)
    os.rename(tmp, db_path)
    db = MetaDb(db_path, db_key)
    rolled_back = False
    try:
        snap_seq = db.commit_seq
        groups: list[JournalGroup] = []
        segments = sorted(await store.list(JOURNAL_PREFIX), key=_range_of_segment)
        for name in segments:
            if _range_of_segment(name)[1] <= snap_seq:
                continue
            groups.extend(decode_journal(_open_any(keys, KIND_JOURNAL, name, await store.get(name))[0]))
        db.replay(groups)
        if db.commit_seq < newest:
            # Never silently roll the archive back to an older state (a damaged or tampered
            # newest snapshot must not make recent studies vanish).
            rolled_back = True
            raise ArchiveCorrupt(
                f"the newest metadata snapshot in the store ({snapshots[-1]}) failed authentication and the "
                f"journal cannot rebuild its state; refusing to mount an older state of the archive"
            )
        # Chunks staged on the lost host are either in the store by now or lost with it.
        db.write("UPDATE chunks SET state = 1 WHERE state = 0")
        db.commit()
        db.take_journal()
        return snap_seq, db.commit_seq
    finally:
        db.close()
        if rolled_back:
            for suffix in ("", "-wal", "-shm"):
                Path(str(db_path) + suffix).unlink(missing_ok=True)
