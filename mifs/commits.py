"""Durable commits of metadata: the one place that decides when written data is safe.

Must not know about files or handles. A commit first fsyncs the cache directories that gained
staged chunks (each staged chunk file was already fsynced when written), then commits the
metadata transaction (one WAL fsync), then tells the uploader, which may then evict uploaded
chunks and delete garbage. Concurrent callers are serialised and share one commit when they
can (group commit). A background task commits every `interval` seconds so metadata-only
changes (mkdir, rename, chmod) reach the disk within that bound even without fsync.
"""

from __future__ import annotations

import logging

import trio

from mifs.cache import ChunkCache
from mifs.metadb.db import MetaDb
from mifs.uploader import Uploader

log = logging.getLogger(__name__)


class Committer:
    def __init__(self, db: MetaDb, cache: ChunkCache, uploader: Uploader, interval: float = 0.5) -> None:
        self._db = db
        self._cache = cache
        self._uploader = uploader
        self._interval = interval
        self._lock = trio.Lock()
        self._generation = 0  # commits started
        self._done = 0  # commits finished

    async def commit_now(self) -> None:
        """Return once everything written to the metadata so far is durable."""
        if not self._db.dirty and not self._cache.dirs_pending() and not self._lock.locked():
            return  # nothing written since the last commit finished
        wanted = self._generation + 1
        async with self._lock:
            if self._done >= wanted:
                return  # a commit that started after our call covered us
            self._generation += 1
            mine = self._generation
            await trio.to_thread.run_sync(self._cache.sync_dirs_sync)
            # No checkpoint between here and after_commit: see Uploader.after_commit.
            self._db.commit()
            self._uploader.after_commit()
            self._done = mine

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await trio.sleep(self._interval)
            if self._db.dirty:
                try:
                    await self.commit_now()
                except Exception:
                    # Disk full or failing: keep the transaction open and try again; an
                    # fsync/close that needs this commit reports the error to its caller.
                    log.exception("background metadata commit failed; retrying")
                    await trio.sleep(self._interval * 4)
