"""The data path: reading and writing one chunk of one file through cache, store and envelope.

Must not know POSIX semantics (sizes, handles, directories; vfs does) and never writes
plaintext anywhere but memory. Sealing (with optional zstd compression first, see
compression.py) and opening (with bounded decompression) run in worker threads under one limiter;
store fetches are single-flight (two readers of one chunk, or a reader and the study
prefetcher, cause one GET), authenticated before they enter the cache, and bounded in time.
Every chunk entering the cache is tagged with its study (the index's numeric id) so the cache
can evict and pin by study.

Cancellation: a cancelled write_chunk may leave a staged object that no row refers to (it is
harmless and never uploaded); a cancelled read leaves nothing behind.
"""

from __future__ import annotations

import collections
import errno
import logging
from dataclasses import dataclass, field
from typing import Callable, Iterable, TypeVar

import trio

from mifs import compression
from mifs.cache import ChunkCache
from mifs.compression import ChunkCompressor
from mifs.plaintext_cache import PlaintextCache
from mifs.crypto import envelope
from mifs.crypto.keyring import KeyRing
from mifs.errors import (
    DataUnavailable,
    IntegrityError,
    LocalIOError,
    NoSpace,
    NotCached,
    ObjectNotFound,
    StorePermissionDenied,
    StoreUnavailable,
    WrongKey,
)
from mifs.metadb import studies, tables
from mifs.metadb.db import MetaDb
from mifs.store.base import ObjectStore, new_object_key
from mifs.types import ArchiveId, FileId, InodeId, ObjectKey
from mifs.uploader import Uploader

log = logging.getLogger(__name__)

T = TypeVar("T")

READAHEAD_CHUNKS = 4
FILE_KEYS_KEPT = 1024


@dataclass(frozen=True)
class FileKey:
    """What the data path needs to seal and open one file's chunks."""

    inode: InodeId
    file_id: FileId
    dek: bytes = field(repr=False)


@dataclass
class _StoreFetch:
    """One GET in flight; waiters take its plaintext, or try themselves if it failed."""

    done: trio.Event
    plaintext: bytes | None = None


class DataPath:
    def __init__(
        self,
        *,
        keyring: KeyRing,
        archive_id: ArchiveId,
        db: MetaDb,
        cache: ChunkCache,
        store: ObjectStore,
        uploader: Uploader,
        chunk_size: int,
        plaintext_cache_bytes: int,
        fetch_timeout: float = 60.0,
        staging_timeout: float = 120.0,
        crypto_threads: int = 4,
        store_is_local: bool = False,
        pack_neighbours: bool = True,
        on_integrity_failure: Callable[[InodeId, int, str], None] | None = None,
        compressor: ChunkCompressor | None = None,
    ) -> None:
        """store_is_local: the store is a directory on this host, so a "store fetch" costs no
        more than a cache read (local-only reads may use it). pack_neighbours: a reader's
        miss inside a pack also keeps the pack's other chunks (see _fetch_from_store). compressor: compress chunks that
        shrink before sealing them (--compress); chunks sealed compressed are read back
        whether or not it is given."""
        self.compressor = compressor
        self._keyring = keyring
        self._archive_id = archive_id
        self._db = db
        self._cache = cache
        self._store = store
        self._uploader = uploader
        self.chunk_size = chunk_size
        self._plain = PlaintextCache(max(plaintext_cache_bytes, (READAHEAD_CHUNKS + 2) * chunk_size))
        self._ahead_consumed = trio.Event()
        self._plain.on_consumed = self._ahead_consumed.set
        self._fetch_timeout = fetch_timeout
        self._staging_timeout = staging_timeout
        self.staging_waits = 0
        self._crypto = trio.CapacityLimiter(crypto_threads)
        self._seal_buffers: list[bytearray] = []
        self._fresh_keys: dict[tuple[FileId, bytes], bytes] = {}  # see new_file_key
        self._fetching: dict[ObjectKey, trio.Event] = {}
        self._file_keys: collections.OrderedDict[tuple[InodeId, FileId, bytes], FileKey] = collections.OrderedDict()
        self._store_fetches: dict[ObjectKey, _StoreFetch] = {}
        self.foreground_fetches = 0
        """Store GETs in flight that a reader waits for (the prefetcher yields to them)."""
        self.store_is_local = store_is_local
        self._last_read: dict[InodeId, int] = {}
        self._nursery: trio.Nursery | None = None
        self.integrity_failures = 0
        self.fetched_chunks = 0
        """Chunks that came from the store (a reader's, their pack neighbours, prefetched)."""
        self._fetch_pack_neighbours = pack_neighbours
        self._on_integrity_failure = on_integrity_failure
        """Told (inode, chunk index, where) of every chunk that fails authentication (audit)."""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Owns the nursery of read-ahead fetches."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    # --- keys ---------------------------------------------------------------------------------

    def new_file_key(self) -> tuple[FileId, bytes]:
        """A fresh file id and its data key, wrapped under the current KEK, for a new file."""
        file_id = envelope.new_file_id()
        dek = envelope.new_data_key()
        wrapped = envelope.wrap_data_key(self._keyring.current, self._archive_id, file_id, dek)
        # The create that asked for it opens the file at once: spare it the unwrap.
        self._fresh_keys[(file_id, wrapped)] = dek
        if len(self._fresh_keys) > FILE_KEYS_KEPT:
            del self._fresh_keys[next(iter(self._fresh_keys))]
        return file_id, wrapped

    def file_key(self, inode: InodeId, file_id: FileId, wrapped_dek: bytes) -> FileKey:
        """The unwrapped key of a file. The last FILE_KEYS_KEPT are remembered (a reader's open
        and the prefetch of its study need the same ones), by wrapped form: a rewrapped or
        destroyed key never matches an old entry."""
        cache_key = (inode, file_id, wrapped_dek)
        fk = self._file_keys.get(cache_key)
        if fk is not None:
            self._file_keys.move_to_end(cache_key)
            return fk
        dek = self._fresh_keys.pop((file_id, wrapped_dek), None)
        if dek is None:
            # Any KEK the mount holds: during a key rotation a file's key may be under either.
            kek = self._keyring.get(envelope.wrapped_key_kek_id(wrapped_dek))
            dek = envelope.unwrap_data_key(kek, self._archive_id, file_id, wrapped_dek)
        fk = self._file_keys[cache_key] = FileKey(inode, file_id, dek)
        if len(self._file_keys) > FILE_KEYS_KEPT:
            self._file_keys.popitem(last=False)
        return fk

    # --- writing ------------------------------------------------------------------------------

    def _seal_and_stage(self, fk: FileKey, idx: int, generation: int, key: ObjectKey, data: bytes | bytearray | memoryview) -> int:
        """Worker thread: compress (if enabled and worth it), seal, stage; the stored length."""
        payload: bytes | bytearray | memoryview = data
        flags = 0
        if self.compressor is not None:
            frame = self.compressor.compress(data, idx)
            if frame is not None:
                payload, flags = frame, envelope.FLAG_ZSTD
        out = self._take_seal_buffer(envelope.CHUNK_OVERHEAD + len(payload))
        try:
            # The flag is in the chunk header, which is authenticated (AAD): it cannot be flipped.
            blob = envelope.seal_chunk_into(out, fk.dek, self._archive_id, fk.file_id, idx, generation, payload, flags)
            try:
                # Staged without a study: staged chunks are never evicted, and the indexer tags
                # the file's chunks with their study once the file is closed and indexed.
                self._cache.stage_sync(key, blob)
            except OSError as exc:
                self._cache.discard_sync(key)
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise NoSpace("the cache disk is full") from None
                raise LocalIOError(f"cannot stage a chunk in the cache: {exc.strerror}") from None
            return len(blob)
        finally:
            self._seal_buffers.append(out)

    def _take_seal_buffer(self, size: int) -> bytearray:
        """A reused output buffer for one seal (worker threads; list pop/append are atomic).
        At most one per crypto thread exists; a larger chunk (compression never grows one
        past chunk_size + overhead, see compression.py) gets a fresh one."""
        try:
            buf = self._seal_buffers.pop()
        except IndexError:
            buf = bytearray(max(size, self.chunk_size + envelope.CHUNK_OVERHEAD))
        if len(buf) < size:
            buf = bytearray(size)
        return buf


    async def write_chunk(self, fk: FileKey, idx: int, data: bytes | bytearray | memoryview) -> ObjectKey:
        """Seal `data` as chunk `idx` (a new generation and object), stage it on local disk
        (synced by the next durable commit, see commits.py), record it in the open metadata
        transaction and queue its upload."""
        await self._wait_for_staging_room(len(data))
        generation = tables.take_generations(self._db, fk.inode)
        key = new_object_key()
        stored_len = await trio.to_thread.run_sync(
            self._seal_and_stage, fk, idx, generation, key, data, limiter=self._crypto
        )
        old = tables.put_chunk(
            self._db,
            tables.ChunkRow(fk.inode, idx, key, len(data), stored_len, generation, tables.STATE_STAGED),
        )
        if old is not None:
            self._plain.drop(old)
        self._uploader.enqueue(key, stored_len)
        return key

    async def _wait_for_staging_room(self, size: int) -> None:
        """Backpressure: while data not yet in the store fills the cache, writers wait for the
        uploader; after staging_timeout they get ENOSPC instead of data being dropped."""
        if self._cache.has_room_for_dirty(size):
            return
        if not self._cache.has_staged():
            # Nothing to wait for: no upload can free room on a disk that others filled.
            raise NoSpace("the disk holding the cache is full")
        self.staging_waits += 1
        log.warning("cache is full of data not yet uploaded; slowing writers down")
        with trio.move_on_after(self._staging_timeout):
            while not self._cache.has_room_for_dirty(size):
                if not self._cache.has_staged():
                    raise NoSpace("the disk holding the cache is full")
                await trio.sleep(0.05)
            return
        raise NoSpace("the cache is full of data that is not yet in the store")

    # --- reading ------------------------------------------------------------------------------

    async def read_chunk(self, fk: FileKey, idx: int, *, readahead: bool = True, local_only: bool = False) -> bytes | None:
        """The plaintext of chunk `idx` (its plain_len bytes), or None where the file has a hole.

        local_only: raise NotCached instead of fetching from a remote store (the indexer reads
        headers of files just written, which are local, and must never cause a GET)."""
        if readahead:
            self._schedule_readahead(fk, idx)
        for _ in range(3):
            row = tables.get_chunk(self._db, fk.inode, idx)
            if row is None:
                return None
            try:
                return await self._plaintext(fk, row, local_only)
            except ObjectNotFound:
                # The chunk may have been rewritten and its old object collected meanwhile.
                if tables.get_chunk(self._db, fk.inode, idx) == row:
                    break
        log.error("chunk object of inode %d index %d is missing from the store", fk.inode, idx)
        raise DataUnavailable("chunk object is missing")

    async def _plaintext(self, fk: FileKey, row: tables.ChunkRow, local_only: bool = False) -> bytes:
        key = row.object_key
        while True:
            data = self._plain.get(key)
            if data is not None:
                return data
            pending = self._fetching.get(key)
            if pending is None:
                break
            await pending.wait()
            data = self._plain.get(key)
            if data is not None:
                return data
        done = self._fetching[key] = trio.Event()
        try:
            # A chunk the prefetcher is fetching right now is not in the cache yet: join that GET.
            in_flight = key in self._store_fetches
            data = None if in_flight else await trio.to_thread.run_sync(self._open_cached, fk, row, limiter=self._crypto)
            if data is None:
                if local_only and not self.store_is_local:
                    raise NotCached("the chunk is not in the local cache")
                data = await self._fetch_from_store(fk, row, foreground=True)
            self._plain.put(key, data)
            return data
        finally:
            del self._fetching[key]
            done.set()

    def _open(self, fk: FileKey, row: tables.ChunkRow, blob: bytes) -> bytes:
        """Worker thread: authenticate, then decompress a compressed chunk (bounded by the
        metadata's plain_len); IntegrityError unless the result is exactly plain_len bytes."""
        payload, flags = envelope.open_chunk(fk.dek, self._archive_id, fk.file_id, row.idx, row.generation, blob)
        if flags & ~envelope.FLAG_ZSTD:
            raise IntegrityError("chunk has flags this version does not know")
        if flags & envelope.FLAG_ZSTD:
            payload = compression.decompress(payload, row.plain_len)
        elif len(payload) != row.plain_len:
            raise IntegrityError("chunk length does not match the metadata")
        return payload

    def _open_cached(self, fk: FileKey, row: tables.ChunkRow) -> bytes | None:
        """Worker thread: the plaintext of the cached copy, or None when there is no usable one.
        A staged copy that fails authentication is final (the store has no other); a cached
        copy of an uploaded chunk is dropped and fetched again."""
        key = row.object_key
        try:
            blob = self._cache.read_sync(key)
        except OSError as exc:
            log.warning("cannot read cached object %s: %s", key, exc.strerror)
            return None
        if blob is None:
            return None
        try:
            return self._open(fk, row, blob)
        except IntegrityError:
            if row.state != tables.STATE_STORED:
                self._integrity_failure(fk, row, "local staged copy")
                raise
        log.warning("cached copy of object %s failed authentication; fetching it again", key)
        self._cache.discard_sync(key)
        return None

    def _open_and_fill(self, fk: FileKey, row: tables.ChunkRow, blob: bytes, group: int | None) -> bytes:
        """Worker thread: authenticate a fetched chunk, then keep its ciphertext in the cache."""
        data = self._open(fk, row, blob)
        try:
            self._cache.fill_behind(row.object_key, blob, group)
        except OSError as exc:
            log.warning("cannot cache object %s: %s", row.object_key, exc.strerror)
        return data

    async def _fetch_from_store(
        self, fk: FileKey, row: tables.ChunkRow, *, foreground: bool, group: int | None = None
    ) -> bytes:
        """One authenticated GET, shared by every reader of the chunk; `group` is the study
        the chunk belongs to (looked up when not given)."""
        key = row.object_key
        while True:
            pending = self._store_fetches.get(key)
            if pending is None:
                break
            await pending.done.wait()
            if pending.plaintext is not None:
                return pending.plaintext
        if group is None:
            group = studies.study_of_inode(self._db, fk.inode)
        if foreground and row.pack_key is not None and self._fetch_pack_neighbours:
            # A reader's miss inside a pack fetches the pack's other chunks too: with the same
            # GET (a store such as SeaweedFS reads the whole object for a range anyway), and
            # the next files of the study are most likely in it. A form of prefetch: off
            # with --no-prefetch, where only what is read is fetched.
            neighbours = self._pack_neighbours(row)
            if neighbours:
                return await self._fetch_with_neighbours(fk, row, group, neighbours)
        fetch = self._store_fetches[key] = _StoreFetch(trio.Event())
        if foreground:
            self.foreground_fetches += 1
        try:
            try:
                # Read, authenticate and cache in one worker-thread hop.
                data = await self._get_from_store(row, lambda blob: self._open_and_fill(fk, row, blob, group))
            except IntegrityError:
                self._integrity_failure(fk, row, "store")
                raise
            fetch.plaintext = data
            self.fetched_chunks += 1
            return data
        finally:
            if foreground:
                self.foreground_fetches -= 1
            del self._store_fetches[key]
            fetch.done.set()

    async def _fetch_with_neighbours(
        self, fk: FileKey, row: tables.ChunkRow, group: int | None,
        neighbours: list[tuple[FileKey, tables.ChunkRow, int | None]],
    ) -> bytes:
        """A reader's chunk and its pack neighbours in one GET; IntegrityError (reported) if
        the reader's chunk fails authentication."""
        assert row.pack_key is not None
        self.foreground_fetches += 1
        try:
            opened = await self._fetch_span(row.pack_key, [(fk, row, group), *neighbours])
        finally:
            self.foreground_fetches -= 1
        data = opened.get(row.object_key)
        if data is None:
            raise IntegrityError("chunk failed authentication")
        return data

    async def room_ahead(self, size: int, timeout: float) -> bool:
        """Wait (at most `timeout` s) until `size` more bytes of plaintext may be kept ahead of
        the reader (PlaintextCache); False if the reader did not make room in time."""
        with trio.move_on_after(timeout):
            while self._plain.ahead_bytes and self._plain.ahead_bytes + size > self._plain.ahead_limit:
                if self._ahead_consumed.is_set():
                    self._ahead_consumed = trio.Event()
                    self._plain.on_consumed = self._ahead_consumed.set
                await self._ahead_consumed.wait()
            return True
        return False

    async def warm(self, fk: FileKey, row: tables.ChunkRow, *, group: int | None, keep_plaintext: bool = False) -> int:
        """Bring one chunk into the local cache (study prefetch); returns the bytes fetched (0
        when it was local already). keep_plaintext: a reader is expected any moment (the study
        it opened), so also offer the plaintext to the bounded in-memory LRU."""
        if self._cache.contains(row.object_key) or self.store_is_local:
            return 0
        data = await self._fetch_from_store(fk, row, foreground=False, group=group)
        if keep_plaintext:
            self._plain.put(row.object_key, data, ahead=True)
        return row.stored_len

    def member(self, ref: studies.ChunkRef) -> tuple[FileKey, tables.ChunkRow]:
        """The file key and chunk row of a chunk the index listed (as it was then)."""
        row = tables.ChunkRow(
            ref.inode, ref.idx, ref.object_key, ref.plain_len, ref.stored_len, ref.generation, ref.state,
            ref.pack_key, ref.pack_offset,
        )
        return self.file_key(ref.inode, FileId(ref.file_id), ref.wrapped_dek), row

    async def warm_pack(
        self, pack: ObjectKey, members: list[tuple[FileKey, tables.ChunkRow]], *, group: int | None,
        keep_plaintext: bool = False,
    ) -> tuple[int, int]:
        """Bring chunks of one pack into the local cache with one ranged GET (study prefetch):
        the span from the first to the last of them that is neither cached nor being fetched.
        Readers of these chunks meanwhile join this fetch. Returns (chunks fetched, their
        stored bytes); a chunk that fails authentication is reported and left out."""
        todo = [(fk, row, group) for fk, row in members if self._wanted_from_store(row.object_key)]
        if not todo or self.store_is_local:
            return 0, 0
        if len(todo) == 1:
            fk, row, _ = todo[0]
            fetched = await self.warm(fk, row, group=group, keep_plaintext=keep_plaintext)
            return int(fetched > 0), fetched
        opened = await self._fetch_span(pack, todo, keep_plaintext=keep_plaintext)
        return len(opened), sum(row.stored_len for _, row, _ in todo if row.object_key in opened)

    def _wanted_from_store(self, key: ObjectKey) -> bool:
        """Neither cached nor being fetched: a pack fetch should bring this chunk."""
        return not self._cache.contains(key) and key not in self._store_fetches

    def _pack_neighbours(self, row: tables.ChunkRow) -> list[tuple[FileKey, tables.ChunkRow, int | None]]:
        """The other chunks of the pack holding `row` that are neither cached nor being fetched."""
        assert row.pack_key is not None
        found = []
        for ref, study in studies.pack_neighbours(self._db, row.pack_key, row.object_key):
            if not self._wanted_from_store(ref.object_key):
                continue
            try:
                fk, neighbour = self.member(ref)
            except (IntegrityError, WrongKey):
                continue  # its key does not open here: its own reader will report that
            found.append((fk, neighbour, study))
        return found

    async def _fetch_span(
        self, pack: ObjectKey, todo: list[tuple[FileKey, tables.ChunkRow, int | None]], *, keep_plaintext: bool = False,
    ) -> dict[ObjectKey, bytes]:
        """One ranged GET of `pack` from the first to the last chunk of `todo` (each with its
        study): every chunk authenticated and kept in the cache; readers of them join this
        fetch meanwhile. Returns the plaintexts by key; a chunk that fails authentication is
        reported and left out."""
        start = min(row.pack_offset for _, row, _ in todo)
        end = max(row.pack_offset + row.stored_len for _, row, _ in todo)
        fetches = {row.object_key: _StoreFetch(trio.Event()) for _, row, _ in todo}
        self._store_fetches.update(fetches)
        failed: list[tuple[FileKey, tables.ChunkRow]] = []

        def open_all(blob: bytes) -> dict[ObjectKey, bytes]:
            """Worker thread: authenticate and cache each chunk of the span."""
            opened: dict[ObjectKey, bytes] = {}
            for fk, row, group in todo:
                at = row.pack_offset - start
                try:
                    opened[row.object_key] = self._open_and_fill(fk, row, blob[at:at + row.stored_len], group)
                except IntegrityError:
                    failed.append((fk, row))
            return opened

        try:
            opened = await self._get_range(pack, (start, end - start), open_all)
            for fk, row in failed:
                self._integrity_failure(fk, row, "store")
            self.fetched_chunks += len(opened)
            for key, data in opened.items():
                fetches[key].plaintext = data
                if keep_plaintext:
                    self._plain.put(key, data, ahead=True)
            return opened
        finally:
            for key, fetch in fetches.items():
                del self._store_fetches[key]
                fetch.done.set()

    async def _get_from_store(self, row: tables.ChunkRow, then: Callable[[bytes], T]) -> T:
        """then(the chunk's stored bytes), from the store, which retries transient failures
        (store.retry); this bounds how long a reader waits. A chunk inside a pack is a ranged read."""
        if row.pack_key is None:
            return await self._get_range(row.object_key, None, then)
        return await self._get_range(row.pack_key, (row.pack_offset, row.stored_len), then)

    async def _get_range(self, key: ObjectKey, span: tuple[int, int] | None, then: Callable[[bytes], T]) -> T:
        """then(the object, or `span` = (offset, length) of it), bounded by fetch_timeout."""
        with trio.move_on_after(self._fetch_timeout):
            try:
                if span is None:
                    return await self._store.get_then(key, then)
                return await self._store.get_range_then(key, span[0], span[1], then)
            except (StoreUnavailable, StorePermissionDenied) as exc:
                log.error("fetching object %s failed: %s", key, exc)
                raise DataUnavailable(f"object {key} could not be fetched") from None
        log.error("fetching object %s did not finish within %.0fs", key, self._fetch_timeout)
        raise DataUnavailable(f"object {key} could not be fetched within {self._fetch_timeout:.0f}s")

    def _integrity_failure(self, fk: FileKey, row: tables.ChunkRow, where: str) -> None:
        self.integrity_failures += 1
        log.error(
            "integrity failure: object %s (inode %d, chunk %d, generation %d) from %s failed authentication",
            row.object_key, fk.inode, row.idx, row.generation, where,
        )
        if self._on_integrity_failure is not None:
            self._on_integrity_failure(fk.inode, row.idx, where)

    def _schedule_readahead(self, fk: FileKey, idx: int) -> None:
        last = self._last_read.get(fk.inode)
        self._last_read[fk.inode] = idx
        if self._nursery is None or last is None or idx != last + 1:
            return
        for ahead in range(idx + 1, idx + 1 + READAHEAD_CHUNKS):
            row = tables.get_chunk(self._db, fk.inode, ahead)
            if row is None:
                break
            if not self._plain.contains(row.object_key) and row.object_key not in self._fetching:
                self._nursery.start_soon(self._prefetch, fk, row)

    async def _prefetch(self, fk: FileKey, row: tables.ChunkRow) -> None:
        try:
            await self._plaintext(fk, row)
        except (IntegrityError, DataUnavailable, ObjectNotFound, NotCached):
            pass  # the foreground read will report it

    def forget_file(self, inode: InodeId) -> None:
        self._last_read.pop(inode, None)

    def forget_destroyed(self, inode: InodeId, keys: Iterable[ObjectKey]) -> None:
        """A file's key was destroyed: drop its unwrapped key and cached plaintext from memory."""
        self.forget_file(inode)
        for cache_key in [k for k in self._file_keys if k[0] == inode]:
            del self._file_keys[cache_key]
        for key in keys:
            self._plain.drop(key)

    def statistics(self) -> dict[str, int]:
        return {"integrity_failures": self.integrity_failures, "fetches_in_flight": len(self._store_fetches)}
