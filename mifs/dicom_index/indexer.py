"""The indexer: reads the header of every file whose content changed and keeps the study index.

Must not block FUSE requests or log values from headers (patient names, ids and UIDs are PHI:
logs carry inode numbers only). Runs on the trio thread; header parsing runs in one worker
thread. Its work list is the index_queue table, written in the same commit as the change it
records, so a crash or unmount never loses an indexing job; the channel from vfs only wakes
it up. A file still open for writing is left queued until its last writer closes it.

Reads are local-only for files just written (their chunks are staged in the cache): indexing
never causes a store GET except for jobs queued by `mifs reindex` or a schema upgrade.
"""

from __future__ import annotations

import logging
import stat
from dataclasses import dataclass

import trio

from mifs.cache import ChunkCache
from mifs.dicom_index.header import ParseResult, Verdict, is_part10, parse_header
from mifs.errors import FsError, NotCached
from mifs.metadb import studies, tables
from mifs.metadb.db import MetaDb
from mifs.types import InodeId
from mifs.vfs.files import HEADER_BYTES, FileData

log = logging.getLogger(__name__)

FIRST_READ = HEADER_BYTES
MAX_HEADER = 64 * 1024 * 1024
MAX_BARE_HEADER = 1024 * 1024
"""How far to read for a header: a Part 10 file may carry large sequences before group 0020;
a file without the magic that is not parsed by then is not taken for DICOM."""
BATCH = 64
QUIET_SECONDS = 0.25
MAX_DEFER_SECONDS = 5.0
FIRST_BACKOFF_SECONDS = 5.0
MAX_BACKOFF_SECONDS = 300.0
"""After an unexpected failure (the metadata disk full), indexing pauses, longer each time."""
"""The indexer yields to writers, as the uploads do: while files keep being written it waits
until none was closed for QUIET_SECONDS, at most MAX_DEFER_SECONDS after it found work. Its
header parsing holds the GIL (pydicom), so on a small host it would otherwise slow the ingest
it indexes."""


@dataclass(frozen=True)
class IndexerStatistics:
    indexed: int
    malformed: int
    other: int
    deferred: int
    failed: int


class Indexer:
    def __init__(
        self, db: MetaDb, files: FileData, cache: ChunkCache, changed: trio.MemoryReceiveChannel[InodeId],
        wake_send: trio.MemorySendChannel[InodeId],
    ) -> None:
        """changed: inodes whose last writer closed them (from vfs); wake_send: the sending end
        of the same channel, for wake()."""
        self._wake_send = wake_send
        self._db = db
        self._files = files
        self._cache = cache
        self._changed = changed
        self._parse_limiter = trio.CapacityLimiter(1)
        self.indexed = self.malformed = self.other = self.deferred = self.failed = 0

    def wake(self) -> None:
        """Look at the queue now (after `mifs reindex` filled it)."""
        try:
            self._wake_send.send_nowait(InodeId(0))
        except trio.WouldBlock:
            pass

    async def catch_up(self, timeout: float) -> None:
        """At unmount: wait (at most `timeout` s) until no file waits to be indexed, so that the
        final metadata snapshot carries the whole study index. A backlog left behind is worked
        through by the next mount, from the cache if its chunks are still there, else only by
        `mifs reindex`."""
        self.wake()
        with trio.move_on_after(timeout):
            while studies.backlog(self._db)[0]:
                await trio.sleep(0.05)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        backoff = FIRST_BACKOFF_SECONDS
        while True:
            try:
                await self._work_through_queue()
                backoff = FIRST_BACKOFF_SECONDS
            except Exception as exc:  # noqa: BLE001 - the index must never take the mount down
                # The metadata disk full or failing: the queue is durable, so nothing is lost
                # by stopping here; try again later instead of ending the daemon.
                log.error("indexing stopped, trying again in %.0f s: %s", backoff, exc.__class__.__name__)
                await trio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)

    async def _work_through_queue(self) -> None:
        while True:
            jobs = [j for j in studies.next_queued(self._db, BATCH) if not self._files.is_being_written(j.inode)]
            if not jobs:
                with trio.move_on_after(5.0):  # also picks up jobs skipped while being written
                    await self._changed.receive()
                while True:  # one wake-up is enough for any number of closes
                    try:
                        self._changed.receive_nowait()
                    except trio.WouldBlock:
                        break
                continue
            await self._yield_to_writers()
            for job in jobs:
                await self._index_one(job)

    async def _yield_to_writers(self) -> None:
        deadline = trio.current_time() + MAX_DEFER_SECONDS
        while True:
            quiet_at = self._files.last_written_close + QUIET_SECONDS
            now = trio.current_time()
            if now >= quiet_at or now >= deadline:
                return
            await trio.sleep(min(quiet_at, deadline) - now)

    async def _read_and_parse(self, row: tables.InodeRow, fetch: bool) -> ParseResult:
        length = min(row.size, FIRST_READ)
        kept = self._files.take_header(row.id)
        while True:
            if kept is not None and len(kept) == length:
                prefix, kept = kept, None  # the header as written, still in memory
            else:
                prefix = await self._files.read_prefix(row, length, local_only=not fetch)
            complete = len(prefix) >= row.size
            result = await trio.to_thread.run_sync(parse_header, prefix, complete, limiter=self._parse_limiter)
            limit = min(row.size, MAX_HEADER if is_part10(prefix) else MAX_BARE_HEADER)
            if result.verdict is not Verdict.NEED_MORE:
                return result
            if length >= limit:
                return result if is_part10(prefix) else ParseResult(Verdict.NOT_DICOM)
            length = min(limit, length * 4)

    async def _index_one(self, job: studies.QueuedFile) -> None:
        row = tables.get_inode(self._db, job.inode)
        if row is None or not stat.S_ISREG(row.mode) or row.file_id is None:
            studies.finish_queued(self._db, job)
            return
        try:
            result = await self._read_and_parse(row, job.fetch)
        except NotCached:
            # Its chunks left the cache before we came to it; `mifs reindex` fetches them.
            studies.defer_queued(self._db, job)
            self.deferred += 1
            log.info("inode %d: header not in the local cache; indexing deferred to the next reindex", job.inode)
            return
        except FsError as exc:
            studies.defer_queued(self._db, job)
            self.failed += 1
            log.warning("inode %d: cannot read the file to index it: %s", job.inode, exc)
            return
        # No checkpoint from here on: the job is taken off the queue and its result recorded
        # in one step, unless the file changed (new seq) or went away meanwhile.
        if self._files.is_being_written(job.inode) or not studies.finish_queued(self._db, job):
            return
        self._record(job.inode, result)

    def _record(self, inode: InodeId, result: ParseResult) -> None:
        keys = studies.chunk_keys(self._db, inode)
        if result.verdict is Verdict.DICOM and result.header is not None:
            sid = studies.put_instance(self._db, inode, result.header)
            self._cache.assign_group(keys, sid)
            self.indexed += 1
        elif result.verdict in (Verdict.MALFORMED, Verdict.NEED_MORE):
            error = result.error or f"no complete header in the first {MAX_HEADER // (1024 * 1024)} MiB"
            studies.put_malformed(self._db, inode, error)
            self._cache.assign_group(keys, None)
            self.malformed += 1
            log.info("inode %d looks like DICOM but cannot be indexed: %s", inode, error)
        else:
            studies.drop_instance(self._db, inode)
            self._cache.assign_group(keys, None)
            self.other += 1

    def statistics(self) -> IndexerStatistics:
        return IndexerStatistics(self.indexed, self.malformed, self.other, self.deferred, self.failed)
