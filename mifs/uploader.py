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
from dataclasses import dataclass

import trio

from mifs.cache import ChunkCache
from mifs.errors import StorePermissionDenied, StoreUnavailable
from mifs.metadb import tables
from mifs.metadb.db import MetaDb
from mifs.store.base import ObjectStore
from mifs.types import ObjectKey

log = logging.getLogger(__name__)

MAX_BACKOFF = 30.0
QUIET_SECONDS = 0.25
"""The mount counts as idle once no chunk was staged for this long."""
STAGED_SHARE_NO_DELAY = 0.25
"""Above this share of the cache limit taken by staged chunks, uploads no longer wait."""


@dataclass(frozen=True)
class CommitPoint:
    """What one commit recorded that may be acted on only once it is durable."""

    garbage: list[ObjectKey]


@dataclass(frozen=True)
class UploaderStatistics:
    pending_uploads: int
    pending_bytes: int
    oldest_pending_age: float
    uploaded_objects: int
    uploaded_bytes: int
    deleted_objects: int
    last_error: str
    store_reachable: bool


class Uploader:
    def __init__(self, store: ObjectStore, cache: ChunkCache, db: MetaDb, workers: int = 4, delay: float = 0.0) -> None:
        """delay: how long at most a freshly staged chunk waits for the mount to stop writing
        before it is uploaded (0: at once)."""
        self._delay = delay
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
        self._wakeup = trio.Event()
        self._gc_wakeup = trio.Event()
        self._gc_ready: set[ObjectKey] = set()
        self._uploaded_objects = 0
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
        """At mount: queue every chunk the database says is not yet in the store."""
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
        return CommitPoint(tables.garbage_keys(self._db))

    def after_commit(self, point: CommitPoint) -> None:
        """Called once the commit of `point` survives power loss: its garbage may now be
        deleted from the store (a power loss that undid the commit would otherwise leave
        metadata naming deleted objects)."""
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
        key = self._queue.popleft()
        self._ready_at.pop(key, None)
        self._in_flight[key] = self._queued.get(key, (0, time.monotonic()))
        return key

    async def _worker(self) -> None:
        while True:
            key = await self._next_key()
            try:
                await self._upload(key)
            except Exception as exc:
                # Never let one bad object stop the queue; try it again later.
                log.exception("upload of object %s failed unexpectedly; retrying later", key)
                self._last_error = f"upload of {key}: {exc.__class__.__name__}"
                await trio.sleep(5)
                self._in_flight.pop(key, None)
                self.enqueue(key, 0, fresh=False)
            finally:
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
                self._deleted_objects += 1
            await trio.sleep(0.05)
