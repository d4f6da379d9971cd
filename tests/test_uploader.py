"""The uploader's write-back delay: uploads yield to a mount that keeps staging chunks.

Real parts throughout (metadata database, chunk cache, local directory store); trio's MockClock
drives the delay, so what is asserted never depends on how busy the machine is. While the
clock stands still (rate 0) no delay can expire; the phases that wait for uploads (worker
threads) let it run at real speed.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import AsyncIterator, Callable

import pytest
import trio
import trio.testing

from mifs.cache import ChunkCache
from mifs.metadb.db import MetaDb
from mifs.store.localdir import LocalDirStore
from mifs.types import ObjectKey
from mifs.uploader import QUIET_SECONDS, Uploader

KEY = bytes(range(32))
MiB = 1024 * 1024


class Rig:
    def __init__(self, tmp_path: Path, delay: float, cache_limit: int = 1024 * MiB) -> None:
        tmp_path.mkdir()
        self.db = MetaDb(tmp_path / "meta.db", KEY)
        self.cache = ChunkCache(tmp_path / "cache", cache_limit)
        self.store_root = tmp_path / "store"
        self.store = LocalDirStore(self.store_root, create=True)
        self.uploader = Uploader(self.store, self.cache, self.db, workers=2, delay=delay)
        self.staged: list[ObjectKey] = []

    def stage(self, size: int = 1000) -> None:
        key = ObjectKey(f"data/{len(self.staged):02x}/{os.urandom(16).hex()}")
        self.cache.stage_sync(key, os.urandom(size))
        self.uploader.enqueue(key, size)
        self.staged.append(key)

    def uploaded(self) -> int:
        return self.uploader.statistics().uploaded_objects

    def in_store(self) -> set[ObjectKey]:
        return {k for k in self.staged if (self.store_root / k).is_file()}


@pytest.fixture
async def rig_factory(tmp_path: Path) -> AsyncIterator[Callable[..., trio.Nursery]]:
    rigs: list[Rig] = []
    async with trio.open_nursery() as nursery:

        def make(delay: float, **kw: int) -> Rig:
            rig = Rig(tmp_path / str(len(rigs)), delay, **kw)
            rigs.append(rig)
            return rig

        yield make  # type: ignore[misc]
        nursery.cancel_scope.cancel()
    for rig in rigs:
        rig.db.close()


async def wait_uploaded(rig: Rig, count: int) -> None:
    """Until `count` uploads are done, bounded in real time (the mock clock may stand still:
    then only uploads whose wait is over can happen meanwhile)."""
    deadline = time.monotonic() + 30
    while rig.uploaded() < count:
        assert time.monotonic() < deadline, f"{rig.uploaded()} of {count} uploads after 30 s"
        await trio.to_thread.run_sync(time.sleep, 0.005)


async def settle() -> None:
    """Let the workers reach their next wait (the clock stands still meanwhile)."""
    for _ in range(3):
        await trio.testing.wait_all_tasks_blocked()


async def test_uploads_wait_while_chunks_keep_coming(rig_factory: Callable[..., Rig], mock_clock: trio.testing.MockClock) -> None:
    rig = rig_factory(5.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(rig.uploader.run)
        for _ in range(20):  # 2 s of a chunk every 0.1 s: never quiet, never past the 5 s delay
            rig.stage()
            mock_clock.jump(0.1)
            await settle()
        assert rig.uploaded() == 0 and rig.in_store() == set()
        assert rig.uploader.statistics().pending_uploads == 20
        mock_clock.jump(QUIET_SECONDS)  # writing paused: everything goes
        await wait_uploaded(rig, 20)
        assert rig.in_store() == set(rig.staged)
        nursery.cancel_scope.cancel()


async def test_the_delay_bounds_the_wait_of_a_steady_writer(rig_factory: Callable[..., Rig], mock_clock: trio.testing.MockClock) -> None:
    rig = rig_factory(1.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(rig.uploader.run)
        for _ in range(9):  # 0.9 s: the first chunk's delay is not over yet
            rig.stage()
            mock_clock.jump(0.1)
            await settle()
        assert rig.uploaded() == 0
        rig.stage()
        mock_clock.jump(0.15)  # the first chunk staged 1.05 s ago: it goes although writing goes on
        rig.stage()
        await wait_uploaded(rig, 1)  # the clock stands still: only the expired delay can upload
        await settle()
        assert rig.in_store() == {rig.staged[0]}
        mock_clock.jump(1.0)
        await wait_uploaded(rig, 11)
        nursery.cancel_scope.cancel()


async def test_draining_and_older_work_do_not_wait(rig_factory: Callable[..., Rig], mock_clock: trio.testing.MockClock) -> None:
    rig = rig_factory(600.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(rig.uploader.run)
        rig.stage()
        rig.stage()
        key = ObjectKey("data/ff/" + os.urandom(16).hex())  # staged before this mount
        rig.cache.stage_sync(key, b"old")
        rig.staged.append(key)
        rig.uploader.enqueue(key, 3, fresh=False)
        await settle()
        assert rig.uploaded() == 0  # the fresh chunks at the head of the queue wait
        mock_clock.rate = 1.0  # wait_idle polls the queue on the clock
        with trio.fail_after(30):
            await rig.uploader.wait_idle()  # unmount: no more waiting, far inside the 600 s
        assert rig.in_store() == set(rig.staged)
        nursery.cancel_scope.cancel()


async def test_a_cache_filling_with_staged_data_uploads_at_once(rig_factory: Callable[..., Rig], mock_clock: trio.testing.MockClock) -> None:
    rig = rig_factory(600.0, cache_limit=10_000)
    async with trio.open_nursery() as nursery:
        await nursery.start(rig.uploader.run)
        rig.stage(size=1000)  # 10 % of the cache: waits
        await settle()
        assert rig.uploaded() == 0
        rig.stage(size=2000)  # 30 %: over STAGED_SHARE_NO_DELAY, the clock still stands still
        await wait_uploaded(rig, 2)
        nursery.cancel_scope.cancel()


async def test_expedited_chunks_skip_the_delay_while_writing_goes_on(
    rig_factory: Callable[..., Rig], mock_clock: trio.testing.MockClock
) -> None:
    """`mifs sync`: the chunks queued when it starts go at once, although the mount keeps
    writing; what is staged after them still yields to the writer."""
    rig = rig_factory(600.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(rig.uploader.run)
        for _ in range(3):
            rig.stage()
            mock_clock.jump(0.1)
            await settle()
        assert rig.uploaded() == 0
        wanted = rig.uploader.pending_keys()
        assert wanted == set(rig.staged) and rig.uploader.still_pending(wanted) == (3, 3000)
        rig.uploader.expedite(wanted)
        rig.stage()  # writing goes on: a fresh chunk behind them, the clock standing still
        await wait_uploaded(rig, 3)
        await settle()
        assert rig.in_store() == wanted and rig.uploader.still_pending(wanted) == (0, 0)
        assert rig.uploader.pending_keys() == {rig.staged[-1]}, "the chunk staged after the sync must still wait"
        nursery.cancel_scope.cancel()


async def test_a_chunk_staged_behind_others_does_not_wake_every_worker(
    rig_factory: Callable[..., Rig], mock_clock: trio.testing.MockClock
) -> None:
    """During an ingest every closed file stages a chunk: the waiting workers must not all
    wake up to find that the quiet deadline only moved later (the trio thread's time)."""
    rig = rig_factory(600.0)
    looks = 0
    real = rig.uploader._wait_before_upload

    def counted() -> float:
        nonlocal looks
        looks += 1
        return real()

    rig.uploader._wait_before_upload = counted  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        await nursery.start(rig.uploader.run)
        for _ in range(50):
            rig.stage()
            await settle()
        assert rig.uploaded() == 0 and rig.uploader.statistics().pending_uploads == 50
        # One look per enqueue plus each worker's first; every worker looking again on every
        # chunk would be 50 x 2 more.
        assert looks <= 50 + 2 * 2, looks
        mock_clock.jump(QUIET_SECONDS)  # writing paused: the workers' timers fire, all go
        await wait_uploaded(rig, 50)
        assert rig.in_store() == set(rig.staged)
        nursery.cancel_scope.cancel()
