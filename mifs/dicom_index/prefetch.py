"""Study prefetch: when a study is opened, fetch the rest of it (and optionally the patient's
prior studies) into the local cache, in viewing order, with bounded parallelism.

Must not decrypt into memory beyond one chunk at a time (chunks are authenticated, then kept
as ciphertext in the cache) nor get in the way of readers: foreground fetches go first (new
prefetch GETs wait while a reader waits for the store), and a study a reader opens goes ahead
of priors and admin requests. Runs on the trio thread; all state is in memory and a restart
simply forgets pending prefetches.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import time
from dataclasses import dataclass, field

import trio

from mifs.cache import ChunkCache
from mifs.chunks import DataPath
from mifs.errors import FsError, ObjectNotFound
from mifs.metadb import studies, tables
from mifs.metadb.db import MetaDb
from mifs.types import InodeId, ObjectKey

log = logging.getLogger(__name__)

PRIORITY_OPEN = 0  # a reader opened a file of this study
PRIORITY_PRIOR = 1  # an earlier study of the same patient
PRIORITY_ADMIN = 2  # mifs cache prefetch / pin
RECHECK_SECONDS = 10.0
FOREGROUND_GRACE = 0.05
READER_WAIT = 1.0
"""How long the prefetch of a study a reader opened waits for the reader to take the
plaintext kept ahead for it (DataPath.room_ahead) before it goes on caching only."""


@dataclass
class PrefetchJob:
    study_id: int
    priority: int
    objects: int = 0
    done: int = 0
    already_cached: int = 0
    fetched: int = 0
    fetched_bytes: int = 0
    failed: int = 0
    finished: trio.Event = field(default_factory=trio.Event)
    reader_behind: bool = False
    """The reader did not take the plaintext kept ahead for it in time: fetch on, cache only."""

    def progress(self) -> dict[str, int]:
        return {
            "objects": self.objects, "done": self.done, "already_cached": self.already_cached,
            "fetched": self.fetched, "fetched_bytes": self.fetched_bytes, "failed": self.failed,
        }


@dataclass(frozen=True)
class PrefetchStatistics:
    queued_studies: int
    fetched_objects: int
    fetched_bytes: int
    failed_objects: int


class Prefetcher:
    def __init__(
        self, db: MetaDb, data: DataPath, cache: ChunkCache, opened: trio.MemoryReceiveChannel[InodeId], *,
        on_open: bool = True, priors: int = 0, parallel: int = 8,
    ) -> None:
        self._db = db
        self._data = data
        self._cache = cache
        self._opened = opened
        self.on_open = on_open
        self.priors = priors
        self._parallel = max(1, parallel)
        self._jobs: dict[int, PrefetchJob] = {}  # by study id, while queued or running
        self._heap: list[tuple[int, int, int, PrefetchJob, list[studies.ChunkRef]]] = []
        """(priority, order, 0, job, chunks fetched together: one, or those of one pack)"""
        self._order = itertools.count()
        self._wakeup = trio.Event()
        self._checked: dict[int, float] = {}  # study id -> when a reader's open last looked at it
        self.fetched_objects = self.fetched_bytes = self.failed_objects = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(self._parallel):
                nursery.start_soon(self._worker)
            nursery.start_soon(self._watch_opens)
            task_status.started()

    # --- requests ---------------------------------------------------------------------------

    def study_fits(self, stored_bytes: int) -> bool:
        """Whether prefetching this many bytes can leave them in the cache (half of it at most,
        so one study never flushes everything else)."""
        return stored_bytes <= self._cache.limit_now() // 2

    def cache_capacity(self) -> int:
        """Bytes an explicit prefetch may fill: the cache minus what pins hold."""
        stats = self._cache.statistics()
        return stats.bytes_limit_now - stats.pinned_bytes

    def request(self, study_id: int, priority: int) -> PrefetchJob:
        """Queue the study's missing chunks (or join the job already queued for it)."""
        job = self._jobs.get(study_id)
        if job is not None:
            if priority < job.priority:
                job.priority = priority
                self._requeue(job)
            return job
        job = PrefetchJob(study_id, priority)
        refs = studies.study_chunk_refs(self._db, study_id)
        job.objects = len(refs)
        missing = []
        for ref in refs:
            if ref.state != tables.STATE_STORED or self._data.store_is_local or self._cache.contains(ref.object_key):
                job.already_cached += 1
                job.done += 1
            else:
                missing.append(ref)
        if not missing:
            job.finished.set()
            return job
        self._jobs[study_id] = job
        for unit in _fetch_units(missing):
            heapq.heappush(self._heap, (job.priority, next(self._order), 0, job, unit))
        self._cache.touch_group(study_id)
        self._wakeup.set()
        return job

    def _requeue(self, job: PrefetchJob) -> None:
        self._heap = [(job.priority if j is job else p, o, d, j, r) for p, o, d, j, r in self._heap]
        heapq.heapify(self._heap)

    # --- opens ------------------------------------------------------------------------------

    async def _watch_opens(self) -> None:
        async for inode in self._opened:
            if self.on_open and not self._data.store_is_local:
                self._on_open(inode)

    def _on_open(self, inode: InodeId) -> None:
        sid = studies.study_of_inode(self._db, inode)
        if sid is None:
            return
        self._cache.touch_group(sid)
        now = time.monotonic()
        if sid in self._jobs or now - self._checked.get(sid, -RECHECK_SECONDS) < RECHECK_SECONDS:
            return
        self._checked[sid] = now
        wanted = [sid]
        if self.priors:
            patient = studies.patient_of_study(self._db, sid)
            if patient:
                wanted += [s for s in studies.studies_of_patient(self._db, patient) if s != sid][: self.priors]
        sizes = studies.study_chunks(self._db, wanted)
        for position, study in enumerate(wanted):
            chunks = sizes.get(study)
            if chunks is None or self._cache.group_bytes(study) >= chunks.stored_bytes:
                continue  # fully cached already
            if not self.study_fits(chunks.stored_bytes):
                log.info("study %d (%d bytes) is too large to prefetch into this cache", study, chunks.stored_bytes)
                continue
            self.request(study, PRIORITY_OPEN if position == 0 else PRIORITY_PRIOR)

    # --- fetching ---------------------------------------------------------------------------

    async def _next(self) -> tuple[PrefetchJob, list[studies.ChunkRef]]:
        while not self._heap:
            if self._wakeup.is_set():  # all idle workers share one event (see Uploader._next_key)
                self._wakeup = trio.Event()
            await self._wakeup.wait()
        _, _, _, job, unit = heapq.heappop(self._heap)
        return job, unit

    async def _worker(self) -> None:
        while True:
            job, unit = await self._next()
            # Readers first: while one waits for the store, hold GETs for priors and admin
            # requests back a little. The study a reader opened is fetched for that reader:
            # holding it back would only make the reader fetch it chunk by chunk itself.
            if job.priority != PRIORITY_OPEN:
                deadline = trio.current_time() + FOREGROUND_GRACE
                while self._data.foreground_fetches and trio.current_time() < deadline:
                    await trio.sleep(0.002)
            try:
                count, fetched = await self._fetch(job, unit)
                job.fetched += count
                job.fetched_bytes += fetched
                self.fetched_objects += count
                self.fetched_bytes += fetched
                job.already_cached += len(unit) - count
            except (FsError, ObjectNotFound) as exc:
                job.failed += len(unit)
                self.failed_objects += len(unit)
                log.warning("prefetch of object %s failed: %s", unit[0].pack_key or unit[0].object_key, exc)
            job.done += len(unit)
            if job.done >= job.objects:
                self._jobs.pop(job.study_id, None)
                job.finished.set()

    async def _fetch(self, job: PrefetchJob, unit: list[studies.ChunkRef]) -> tuple[int, int]:
        """Fetch one unit; (chunks fetched, their stored bytes)."""
        # The rows as they were when the job was queued: a chunk rewritten since is fetched for
        # nothing (its old object is still there until the commit that replaced it is done)
        # or not found, which only ends this one fetch.
        members = [self._data.member(ref) for ref in unit]
        keep = job.priority == PRIORITY_OPEN and not job.reader_behind
        if keep and not await self._data.room_ahead(sum(ref.stored_len for ref in unit), READER_WAIT):
            job.reader_behind = keep = False
        try:
            pack = unit[0].pack_key
            if pack is not None:
                return await self._data.warm_pack(pack, members, group=job.study_id, keep_plaintext=keep)
            fetched = await self._data.warm(*members[0], group=job.study_id, keep_plaintext=keep)
            return int(fetched > 0), fetched
        except ObjectNotFound:
            return 0, 0

    def statistics(self) -> PrefetchStatistics:
        return PrefetchStatistics(len(self._jobs), self.fetched_objects, self.fetched_bytes, self.failed_objects)


def _fetch_units(refs: list[studies.ChunkRef]) -> list[list[studies.ChunkRef]]:
    """The chunks to fetch, in viewing order of each unit's first chunk: a chunk of its own
    alone, the chunks of one pack together (one ranged GET)."""
    units: list[list[studies.ChunkRef]] = []
    by_pack: dict[ObjectKey, list[studies.ChunkRef]] = {}
    for ref in refs:
        if ref.pack_key is None:
            units.append([ref])
            continue
        unit = by_pack.get(ref.pack_key)
        if unit is None:
            unit = by_pack[ref.pack_key] = []
            units.append(unit)
        unit.append(ref)
    return units
