"""The write-back upload queue: moves staged chunks from the local cache into the store, and
deletes objects that no committed metadata refers to any more (with every stored version).

Must not see plaintext or keys. The durable state of the queue is the metadata database
(chunks with state 0, the garbage table), so a restart resumes where a crash stopped; the
in-memory deque is only the work list. Transient store errors are retried here with
exponential backoff and jitter; nothing is ever dropped.

Uploads yield to writers (`delay`): while the mount keeps staging new chunks, a staged chunk
waits until no chunk was staged for QUIET_SECONDS, or until it has waited `delay` seconds,
whichever comes first, so a study being ingested does not compete with its own uploads for
the CPUs (the data is durable on local disk meanwhile; rclone's VFS cache does the same with
its 5 s write-back delay). Draining (unmount), chunks staged before this mount, and a cache
filling up with staged data (STAGED_SHARE_NO_DELAY of its limit) upload at once.

Packs (`pack_size`): a worker that takes a due small chunk also takes the small chunks queued
behind it, up to pack_size bytes, and uploads them as one object, their sealed bytes one after the other (docs/FORMAT.md "Pack
object"): against S3 the cost of a PUT, and later of a GET, is mostly per request, so a study
of 400 small files moves as ~50 objects instead of 400. A chunk of half pack_size or more, or
one alone in the queue, or any while staged data takes more than STAGED_SHARE_NO_DELAY of
the cache (each then frees its room as soon as it is stored), is uploaded as an object of
its own. The pack is named in the
database (tables.add_pack) before its upload starts, and its chunks point into it once it is
stored; a crash in between leaves a pack no chunk names, dropped at the next mount.

Repacking: when a chunk inside a pack is dropped (its file deleted, shredded, truncated or
rewritten) while other chunks of the pack live on, the pack is marked (packs.repack). The
repack task copies the live chunks' sealed bytes (one ranged GET of the pack) into
staged copies under new keys, points their rows there in one synchronous step, and the old
pack, named by nothing, becomes garbage: deleted with every stored version once that commit is
durable. So a deleted file leaves no ciphertext in the store (docs/FORMAT.md section 11), at
the cost of re-uploading its pack neighbours. The staged copies are uploaded like any other.

Concurrency: everything runs on the trio thread except cache file I/O (worker threads). A key
is in `_in_flight` from the moment a worker takes it until its upload is recorded, and the
garbage collector never deletes a key in flight, so a deleted object is never resurrected.
"""

from __future__ import annotations

import collections
import logging
import math
from typing import Awaitable, Callable
import random
import time
from dataclasses import dataclass, field

import trio

from mifs.cache import ChunkCache
from mifs.errors import ObjectNotFound, StorePermissionDenied, StoreUnavailable
from mifs.metadb import tables
from mifs.metadb.db import MetaDb
from mifs.store.base import ObjectStore, new_object_key
from mifs.types import ObjectKey

log = logging.getLogger(__name__)

MAX_BACKOFF = 30.0
QUIET_SECONDS = 0.25
"""The mount counts as idle once no chunk was staged for this long."""
STAGED_SHARE_NO_DELAY = 0.25
"""Above this share of the cache limit taken by staged chunks, uploads no longer wait."""
PACK_MAX_CHUNKS = 256
"""At most this many chunks in one pack (bounds one upload's bookkeeping)."""


@dataclass(frozen=True)
class CommitPoint:
    """What one commit recorded that may be acted on only once it is durable."""

    garbage: list[ObjectKey]
    packed: list[ObjectKey] = field(default_factory=list)
    """Chunks recorded as inside a pack: their local copies may go only now (see
    Uploader.after_commit)."""


@dataclass(frozen=True)
class UploaderStatistics:
    pending_uploads: int
    pending_bytes: int
    oldest_pending_age: float
    uploaded_objects: int
    """Chunks uploaded, on their own or inside a pack."""
    uploaded_packs: int
    uploaded_bytes: int
    deleted_objects: int
    last_error: str
    store_reachable: bool


class Uploader:
    def __init__(
        self, store: ObjectStore, cache: ChunkCache, db: MetaDb, workers: int = 4, delay: float = 0.0, pack_size: int = 0
    ) -> None:
        """delay: how long at most a freshly staged chunk waits for the mount to stop writing
        before it is uploaded (0: at once). pack_size: bytes of small chunks uploaded as one
        pack object (0: every chunk is an object of its own)."""
        self._delay = delay
        self._pack_size = pack_size
        self._last_staged = -math.inf  # trio clock, as every time of the delay logic
        self._ready_at: dict[ObjectKey, float] = {}  # queued key -> when its delay is over
        self._draining = False
        self._store = store
        self._cache = cache
        self._db = db
        self._workers = workers
        self._queue: collections.deque[ObjectKey] = collections.deque()
        self._queued: dict[ObjectKey, tuple[int, float]] = {}  # key -> (size, enqueue time)
        self._in_flight: dict[ObjectKey, tuple[int, float]] = {}  # key -> (size, enqueue time)
        self._awaiting_commit: list[ObjectKey] = []
        self._awaiting_durable: set[ObjectKey] = set()  # packed chunks, see after_commit
        self._wakeup = trio.Event()
        self._gc_wakeup = trio.Event()
        self._gc_ready: set[ObjectKey] = set()
        self._repack_wakeup = trio.Event()
        self.repacked_packs = 0
        self._uploaded_objects = 0
        self._uploaded_packs = 0
        self._uploaded_bytes = 0
        self._deleted_objects = 0
        self._last_error = ""
        self._reachable = True

    # --- feeding ----------------------------------------------------------------------------

    def enqueue(self, key: ObjectKey, size: int, *, fresh: bool = True) -> None:
        """Schedule a staged chunk for upload (its row may not be committed yet). fresh: it was
        just written (uploads yield to writers, see `delay`); False: it is older work."""
        if key in self._queued or key in self._in_flight:
            return
        if fresh:
            self._last_staged = trio.current_time()
        self._ready_at[key] = self._last_staged + self._delay if fresh else -math.inf
        self._queued[key] = (size, time.monotonic())
        was_empty = not self._queue
        self._queue.append(key)
        # Wake the workers only when this changes what they wait for: work where there was
        # none, or work due now. A fresh chunk behind others only moves the quiet deadline
        # later; the workers' timers (the earlier deadline) look again then. Waking every
        # worker on every staged chunk cost the trio thread ~0.8 ms per file of an ingest.
        if was_empty or not fresh or self._wait_before_upload() <= 0:
            self._wakeup.set()

    def load_pending(self) -> None:
        """At mount: queue every chunk the database says is not yet in the store, and hand
        packs that no chunk names to the garbage collector (nothing is in flight yet)."""
        dropped = tables.drop_unused_packs(self._db)
        if dropped:
            log.info("%d pack objects no chunk refers to (an upload cut short) will be deleted", dropped)
        for key, size in tables.pending_uploads(self._db):
            self.enqueue(key, size, fresh=False)

    def after_light_commit(self) -> None:
        """Called right after any metadata commit (no checkpoint between): the uploads it
        recorded may now be evicted from the cache. Safe before the commit is durable: a
        power loss that undoes the "stored" mark leaves the object in the store, and the
        upload of a chunk that has no local copy any more finds it there (_upload)."""
        done, self._awaiting_commit = self._awaiting_commit, []
        for key in done:
            self._cache.mark_clean_sync(key)

    def commit_point(self) -> CommitPoint:
        """Called right after a metadata commit that is about to be made durable: the garbage
        it recorded. No checkpoint may separate the commit from this call: then every garbage
        row visible is in that commit."""
        if tables.packs_to_repack(self._db, 1):
            self._repack_wakeup.set()
        return CommitPoint(tables.garbage_keys(self._db), list(self._awaiting_durable))

    def after_commit(self, point: CommitPoint) -> None:
        """Called once the commit of `point` survives power loss: its garbage may now be
        deleted from the store (a power loss that undid the commit would otherwise leave
        metadata naming deleted objects). The local copies of the chunks it recorded as
        inside a pack may be evicted now, not after a light commit as a chunk of its own: a
        power loss that undid the record would leave the chunk staged with no local copy,
        and the store holds it under no name of its own (the pack is found through the
        record only). Until a durable commit covers them they stay in the list."""
        for key in point.packed:
            self._cache.mark_clean_sync(key)
        self._awaiting_durable.difference_update(point.packed)
        self._gc_ready.update(point.garbage)
        if self._gc_ready:
            self._gc_wakeup.set()

    # --- waiting ----------------------------------------------------------------------------

    def busy(self) -> bool:
        return bool(self._queued or self._in_flight or self._gc_ready)

    async def wait_idle(self) -> None:
        """Return once every queued upload is in the store (or raise Cancelled). From now on
        uploads no longer wait for the writers (unmount)."""
        self._draining = True
        self._wakeup.set()
        while self.busy():
            await trio.sleep(0.02)

    def pending_keys(self) -> set[ObjectKey]:
        """The chunks waiting for or in upload now."""
        return {*self._queued, *self._in_flight}

    def still_pending(self, keys: set[ObjectKey]) -> tuple[int, int]:
        """How many of `keys` are still waiting for or in upload, and their bytes."""
        count = size = 0
        for key in keys:
            entry = self._queued.get(key) or self._in_flight.get(key)
            if entry is not None:
                count += 1
                size += entry[0]
        return count, size

    def expedite(self, keys: set[ObjectKey]) -> None:
        """Let these queued chunks skip the upload delay (`mifs sync` waits for them)."""
        for key in keys:
            if key in self._ready_at:
                self._ready_at[key] = -math.inf
        self._wakeup.set()

    async def wait_uploaded(self, keys: set[ObjectKey]) -> None:
        """Return once none of `keys` is waiting for or in upload (--sync-uploads)."""
        while any(k in self._queued or k in self._in_flight for k in keys):
            await trio.sleep(0.01)

    def statistics(self) -> UploaderStatistics:
        now = time.monotonic()
        pending = {**self._queued, **self._in_flight}
        oldest = min((t for _, t in pending.values()), default=now)
        return UploaderStatistics(
            pending_uploads=len(pending),
            pending_bytes=sum(size for size, _ in pending.values()),
            oldest_pending_age=now - oldest,
            uploaded_objects=self._uploaded_objects,
            uploaded_packs=self._uploaded_packs,
            uploaded_bytes=self._uploaded_bytes,
            deleted_objects=self._deleted_objects,
            last_error=self._last_error,
            store_reachable=self._reachable,
        )

    # --- running ----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(self._workers):
                nursery.start_soon(self._worker)
            nursery.start_soon(self._collect_garbage)
            nursery.start_soon(self._repack_marked)
            task_status.started()

    def _wait_before_upload(self) -> float:
        """Seconds the oldest queued chunk should still yield to writers (0: upload it now)."""
        if self._delay <= 0 or self._draining or not self._queue:
            return 0.0
        ready = self._ready_at.get(self._queue[0], -math.inf)
        wait = min(self._last_staged + QUIET_SECONDS, ready) - trio.current_time()
        if wait <= 0 or self._cache.staged_share() > STAGED_SHARE_NO_DELAY:
            return 0.0
        return wait

    def _take(self) -> ObjectKey:
        key = self._queue.popleft()
        self._ready_at.pop(key, None)
        self._in_flight[key] = self._queued.get(key, (0, time.monotonic()))
        return key

    def _packable(self, size: int) -> bool:
        return 0 < size and 2 * size < self._pack_size

    async def _next_key(self) -> ObjectKey:
        while True:
            while not self._queue:
                # Every idle worker waits on the same event; only a set one is replaced (a worker
                # that replaced it under the others' feet would leave them waiting forever).
                if self._wakeup.is_set():
                    self._wakeup = trio.Event()
                await self._wakeup.wait()
            wait = self._wait_before_upload()
            if wait <= 0:
                break
            # enqueue (work due now: cache pressure, older work, expedited chunks) and
            # wait_idle (draining) set the event; a later quiet deadline needs no wake-up:
            # this timer, set for the earlier one, looks again.
            if self._wakeup.is_set():
                self._wakeup = trio.Event()
            with trio.move_on_after(wait):
                await self._wakeup.wait()
        return self._take()

    def _more_for_pack(self, first: ObjectKey) -> list[ObjectKey]:
        """The small chunks queued right behind `first` that fit in its pack (taken). They go
        up with it even if their own delay is not over: `first` is due, so this PUT competes
        with the writers anyway, and the same PUT carrying more bytes costs little more."""
        size = self._in_flight[first][0]
        if not self._packable(size) or self._cache.staged_share() > STAGED_SHARE_NO_DELAY:
            # A cache filling with staged data needs room soon: a chunk of its own may leave
            # the cache after any commit, a packed one only after a durable commit (see
            # after_commit) and only once its whole pack is stored.
            return []
        taken: list[ObjectKey] = []
        while self._queue and len(taken) + 1 < PACK_MAX_CHUNKS:
            more = self._queued.get(self._queue[0], (0, 0.0))[0]
            if not self._packable(more) or size + more > self._pack_size:
                break
            taken.append(self._take())
            size += more
        return taken

    async def _worker(self) -> None:
        while True:
            first = await self._next_key()
            keys = [first, *self._more_for_pack(first)]
            try:
                if len(keys) == 1:
                    await self._upload(first)
                else:
                    await self._upload_pack(keys)
            except Exception as exc:
                # Never let one bad object stop the queue; try it again later.
                log.exception("upload of object %s failed unexpectedly; retrying later", first)
                self._last_error = f"upload of {first}: {exc.__class__.__name__}"
                await trio.sleep(5)
                for key in keys:
                    self._in_flight.pop(key, None)
                    self.enqueue(key, 0, fresh=False)
            finally:
                for key in keys:
                    self._in_flight.pop(key, None)

    async def _adopt(self, key: ObjectKey) -> int | None:
        """Hand the staged file itself to a store on the same disk; its size, or None."""
        adopt = getattr(self._store, "adopt_file", None)
        path = self._cache.file_path(key)
        if adopt is None or path is None:
            return None
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return None
        return size if await adopt(key, path) else None

    async def _upload(self, key: ObjectKey) -> None:
        self._queued.pop(key, None)
        if tables.chunk_state(self._db, key) == tables.STATE_STORED:
            # Requeued after its upload was recorded: it is in the store already (inside a
            # pack, a second copy under its own key would be an object nothing deletes).
            self._awaiting_durable.add(key)
            return
        size = await self._adopt(key)
        if size is None:
            blob = await trio.to_thread.run_sync(lambda: self._cache.read_sync(key, touch=False))
            if blob is not None:
                await self._with_retry("upload", key, lambda: self._store.put(key, blob))
                size = len(blob)
        if size is not None:
            if tables.chunk_state(self._db, key) == tables.STATE_STAGED:
                tables.mark_stored(self._db, key)
            self._awaiting_commit.append(key)
            self._uploaded_objects += 1
            self._uploaded_bytes += size
        elif tables.chunk_state(self._db, key) == tables.STATE_STAGED:
            # Staged, committed, but its local copy is gone. Uploaded and evicted before a
            # power loss undid the "stored" mark: the store has it.
            if await self._store_has(key):
                tables.mark_stored(self._db, key)
                self._awaiting_commit.append(key)
                log.info("staged chunk %s was already in the store", key)
                return
            log.error("staged chunk %s has no local copy and is not in the store; it cannot be uploaded", key)
            self._last_error = f"staged chunk {key} is missing from the cache"

    async def _upload_pack(self, keys: list[ObjectKey]) -> None:
        """Upload the staged chunks `keys` (all in flight) as one pack object, then point
        their rows into it. A chunk without a local copy goes the way of a single upload."""
        for key in keys:
            self._queued.pop(key, None)
        keys = [k for k in keys if tables.chunk_state(self._db, k) != tables.STATE_STORED]  # see _upload
        blobs = await trio.to_thread.run_sync(lambda: [self._cache.read_sync(k, touch=False) for k in keys])
        members: list[tuple[ObjectKey, int, int]] = []  # key, offset in the pack, length
        size = 0
        for key, blob in zip(keys, blobs):
            if blob is not None:
                members.append((key, size, len(blob)))
                size += len(blob)
        for key, blob in zip(keys, blobs):
            if blob is None or len(members) < 2:
                await self._upload(key)
        if len(members) < 2:
            return
        body = b"".join(blob for blob in blobs if blob is not None)
        del blobs
        pack = new_object_key()
        tables.add_pack(self._db, pack, size)  # named from now on: the orphan sweep keeps it
        await self._with_retry("upload", pack, lambda: self._store.put(pack, body))
        del body
        live = 0
        for key, offset, length in members:
            if tables.mark_packed(self._db, key, pack, offset):
                live += 1
            self._awaiting_durable.add(key)
            self._uploaded_objects += 1
            self._uploaded_bytes += length
        if not live:
            tables.drop_pack(self._db, pack)  # every chunk was dropped during the upload
        self._uploaded_packs += 1

    async def _repack_marked(self) -> None:
        self._repack_wakeup.set()  # packs marked before this mount
        while True:
            await self._repack_wakeup.wait()
            self._repack_wakeup = trio.Event()
            for pack in tables.packs_to_repack(self._db):
                try:
                    await self._repack(pack)
                except Exception as exc:  # noqa: BLE001 - e.g. the cache disk full
                    # The mark stays; the next durable commit wakes this task again.
                    log.error("repacking object %s failed, trying again later: %s", pack, exc.__class__.__name__)
                    self._last_error = f"repack of {pack}: {exc.__class__.__name__}"
                    await trio.sleep(5)
                    break

    async def _repack(self, pack: ObjectKey) -> None:
        """Move the live chunks of `pack` into staged copies under new keys; the pack becomes
        garbage. The bytes come from the store, never from the cache: without keys they
        cannot be authenticated here, and a cached copy damaged on the cache disk must not
        become the only copy. The rows are changed only after every copy is staged, without a
        checkpoint in between, and only where a row still points where it did."""
        members = tables.pack_members(self._db, pack)
        if not members:
            tables.drop_pack_if_unused(self._db, pack)
            return
        start = members[0].pack_offset
        end = max(m.pack_offset + m.stored_len for m in members)
        span = b""

        async def fetch() -> None:
            nonlocal span
            span = await self._store.get_range_then(pack, start, end - start, lambda data: data)

        try:
            await self._with_retry("repack read", pack, fetch)
        except ObjectNotFound:
            span = b""
        if len(span) != end - start:
            # Missing or cut short in the store: its chunks fail to read either way; keep the
            # object for an admin to look at rather than delete what is left of it.
            log.error("pack object %s is missing or shorter than its chunks; they cannot be moved out of it", pack)
            tables.give_up_repack(self._db, pack)
            return
        copies = [
            (m, new_object_key(), span[m.pack_offset - start:m.pack_offset - start + m.stored_len]) for m in members
        ]
        del span

        def stage_all() -> None:
            for _, key, blob in copies:
                self._cache.stage_sync(key, blob)

        await trio.to_thread.run_sync(stage_all)
        unused: list[ObjectKey] = []
        for member, key, blob in copies:  # no checkpoint from here to the end
            if tables.unpack_chunk(self._db, member, key):
                self.enqueue(key, len(blob), fresh=False)
            else:
                unused.append(key)
        if tables.drop_pack_if_unused(self._db, pack):
            self.repacked_packs += 1
        for key in unused:
            await trio.to_thread.run_sync(self._cache.discard_sync, key)

    async def _store_has(self, key: ObjectKey) -> bool:
        found = False

        async def check() -> None:
            nonlocal found
            found = await self._store.exists(key)

        await self._with_retry("lookup", key, check)
        return found

    async def _with_retry(self, what: str, key: ObjectKey, fn: Callable[[], Awaitable[object]]) -> None:
        """Keep trying until the store takes it: the store wrapper already retried transient
        errors for a while; here a failure only means "the store is down, wait and requeue"."""
        delay = 1.0
        while True:
            try:
                await fn()
                if not self._reachable:
                    log.info("store reachable again")
                self._reachable = True
                return
            except (StoreUnavailable, StorePermissionDenied) as exc:
                self._reachable = False
                self._last_error = f"{what} of {key}: {exc}"
                log.warning("%s of object %s failed, trying again in %.0fs: %s", what, key, delay, exc)
            await trio.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, MAX_BACKOFF)

    async def _collect_garbage(self) -> None:
        while True:
            await self._gc_wakeup.wait()
            self._gc_wakeup = trio.Event()
            batch, self._gc_ready = list(self._gc_ready), set()
            for n, key in enumerate(batch):
                if key in self._in_flight:
                    self._gc_ready.add(key)  # come back once its upload is recorded
                    self._gc_wakeup.set()
                    continue
                if key in self._queued:
                    del self._queued[key]
                    self._ready_at.pop(key, None)
                    self._queue.remove(key)
                try:
                    # Every version: a chunk of a deleted or shredded file must not survive in
                    # a versioned bucket (its key may be destroyed, but the copy must go too).
                    # A chunk that was inside a pack has no object of its own: the pack goes
                    # with its last chunk (tables._retire_chunks).
                    in_store = tables.garbage_in_store(self._db, key)
                    if in_store:
                        await self._with_retry("delete", key, lambda: self._store.purge(key))
                    await trio.to_thread.run_sync(self._cache.discard_sync, key)
                    tables.forget_garbage(self._db, key)
                except Exception as exc:  # noqa: BLE001 - e.g. the metadata disk full
                    # The garbage row stays, so nothing is forgotten; try it again later
                    # instead of ending the daemon.
                    log.error("deleting object %s failed, trying again later: %s", key, exc.__class__.__name__)
                    self._last_error = f"delete of {key}: {exc.__class__.__name__}"
                    self._gc_ready.update(batch[n:])
                    self._gc_wakeup.set()
                    await trio.sleep(5)
                    break
                self._deleted_objects += int(in_store)
            await trio.sleep(0.05)
