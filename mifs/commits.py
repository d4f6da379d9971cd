"""Commits of metadata: the one place that decides when written data is safe.

Must not know about files or handles. Two strengths:

- a *light* commit (`commit_now(durable=False)`, the close(2) of a file by default) commits
  the metadata transaction without any fsync: the staged chunks and the commit are in the
  kernel's page cache, so they survive the death of the daemon (kill -9, a crash) but not yet
  a power loss;
- a *durable* commit (fsync, fsyncdir, `--sync-close`, unmount, and the background task at
  most `sync_interval` seconds after any change) fdatasyncs the staged chunks written since the
  last one, fsyncs the cache directories that gained them, commits, and fdatasyncs the WAL:
  then everything committed so far survives power loss. Only then is the uploader told
  (after_commit): deleting garbage from the store is safe only once the commit that allows it
  can no longer be undone by a power loss. (Evicting the local copy of a chunk uploaded as an
  object of its own is safe after any commit: the store has it under its name; see
  Uploader.after_light_commit. A chunk uploaded inside a pack is found only through the
  commit that recorded it, so its copy waits for a durable one: Uploader.after_commit.)

Concurrent callers are serialised and share one commit when they can (group commit).
"""

from __future__ import annotations

import logging

import trio

from mifs.cache import ChunkCache, SyncBatch
from mifs.metadb.db import MetaDb
from mifs.uploader import Uploader

log = logging.getLogger(__name__)


class Committer:
    def __init__(
        self, db: MetaDb, cache: ChunkCache, uploader: Uploader, interval: float = 0.5, sync_interval: float = 5.0
    ) -> None:
        """interval: metadata-only changes (mkdir, unlink, chmod) are committed lightly within
        this many seconds. sync_interval: everything committed is made durable within this
        many seconds (the power-loss window of a close without fsync; ext4's default commit
        interval is 5 s too)."""
        self._db = db
        self._cache = cache
        self._uploader = uploader
        self._interval = interval
        self._sync_interval = sync_interval
        self._lock = trio.Lock()
        self._generation = 0  # durable commits started
        self._done = 0  # durable commits finished
        self._last_durable = 0.0  # trio clock

    async def commit_now(self, *, durable: bool = True) -> None:
        """Return once everything written to the metadata so far is committed, and with
        durable also safe from power loss (see the module docstring)."""
        if not self._db.dirty and (not durable or not self.pending()):
            return  # nothing to commit, or (durable) everything already survives power loss
        # Commit first, on this thread (the connection is the trio thread's). A light commit
        # needs nothing else: it never waits for a durable one in progress.
        self._commit_light()
        if not durable:
            return
        wanted = self._generation + 1
        async with self._lock:
            if self._done >= wanted:
                return  # a durable commit that started after our call covered us
            self._generation += 1
            mine = self._generation
            # Everything committed up to `seq` becomes durable. No checkpoint since the
            # commit: every chunk those commits name was staged (and queued for syncing by
            # the cache) before its row was written, and commit_point sees exactly what they
            # recorded. Light commits made meanwhile stay light (their chunks may not be
            # synced by this pass; the next durable commit covers them).
            self._commit_light()
            seq = self._db.commit_seq
            point = self._uploader.commit_point()
            files = self._cache.take_sync_pending()
            await trio.to_thread.run_sync(self._sync, files)  # on failure the cache keeps `files`
            self._db.mark_durable(seq)
            self._uploader.after_commit(point)
            self._done = mine
            self._last_durable = trio.current_time()

    def _commit_light(self) -> None:
        self._db.commit(durable=False)
        self._uploader.after_light_commit()  # no checkpoint since the commit

    def _sync(self, files: SyncBatch) -> None:
        """Worker thread: the staged chunks, their directories, then the WAL (~1-3 ms in all)."""
        self._cache.sync_batch_sync(files)
        self._db.sync_wal_sync()

    def pending(self) -> bool:
        """Whether anything committed or written would not survive power loss yet."""
        return self._db.dirty or self._db.undurable or self._cache.sync_pending()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Bound both windows: changes are committed within `interval`, durable within
        `sync_interval`."""
        self._last_durable = trio.current_time()
        task_status.started()
        while True:
            await trio.sleep(self._interval)
            try:
                if trio.current_time() - self._last_durable >= self._sync_interval and self.pending():
                    await self.commit_now()
                elif self._db.dirty:
                    await self.commit_now(durable=False)
            except Exception:
                # Disk full or failing: keep the transaction open and try again; an
                # fsync/close that needs this commit reports the error to its caller.
                log.exception("background metadata commit failed; retrying")
                await trio.sleep(self._interval * 4)
