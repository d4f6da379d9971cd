"""Pack objects: small staged chunks uploaded together as one store object.

Real parts throughout (metadata database, chunk cache, local directory store, uploader); the
chunk rows are written as the data path writes them (tables.put_chunk), without a mount. What
is asserted is the storage format and the garbage accounting: which objects the store holds,
what bytes sit at which offset, and when a pack may go.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import AsyncIterator

import pytest
import trio

from mifs.cache import ChunkCache
from mifs.metadb import tables
from mifs.metadb.db import MetaDb
from mifs.store.base import new_object_key
from mifs.store.localdir import LocalDirStore
from mifs.types import InodeId, ObjectKey
from mifs.uploader import Uploader

KEY = bytes(range(32))
KiB = 1024
MiB = 1024 * KiB


class GatedStore(LocalDirStore):
    """A local store whose PUTs wait for `gate` (an upload held in flight)."""

    gate: trio.Event | None = None
    puts_started = 0

    async def put(self, key: ObjectKey, data: bytes) -> None:
        self.puts_started += 1
        if self.gate is not None:
            await self.gate.wait()
        await super().put(key, data)


class Rig:
    def __init__(self, root: Path, pack_size: int) -> None:
        self.db = MetaDb(root / "meta.db", KEY)
        self.cache = ChunkCache(root / "cache", 1024 * MiB)
        self.store_root = root / "store"
        self.store = GatedStore(self.store_root, create=True)
        self.uploader = Uploader(self.store, self.cache, self.db, workers=2, delay=0.0, pack_size=pack_size)
        self.blobs: dict[ObjectKey, bytes] = {}

    def stage(self, inode: int, idx: int, size: int) -> ObjectKey:
        """A sealed chunk as the data path leaves it: staged in the cache, its row written."""
        key = new_object_key()
        blob = os.urandom(size)
        self.cache.stage_sync(key, blob)
        tables.put_chunk(self.db, tables.ChunkRow(InodeId(inode), idx, key, size, size, 1, tables.STATE_STAGED))
        self.blobs[key] = blob
        return key

    def enqueue_all(self) -> None:
        for key, blob in self.blobs.items():
            self.uploader.enqueue(key, len(blob), fresh=False)

    def stored_objects(self) -> set[str]:
        return {str(p.relative_to(self.store_root)) for p in (self.store_root / "data").rglob("*") if p.is_file()}

    def row(self, key: ObjectKey) -> tables.ChunkRow:
        row = self.db.one(f"SELECT {tables._CHUNK_COLS} FROM chunks WHERE object_key = ?", (key,))
        assert row is not None
        return tables.chunk_from_row(row)

    def commit(self) -> None:
        """A durable commit, as the committer makes it (commits.py)."""
        self.db.commit()
        self.uploader.after_light_commit()
        self.uploader.after_commit(self.uploader.commit_point())

    async def commit_and_collect(self) -> None:
        """Durable commits until the uploader has nothing left to do: no garbage, no pack
        marked for repacking, no upload pending."""
        deadline = time.monotonic() + 20
        while True:
            self.commit()
            await trio.sleep(0.05)
            if not (
                self.db.scalar("SELECT count(*) FROM garbage") or tables.packs_to_repack(self.db)
                or self.uploader.busy() or tables.pending_uploads(self.db)
            ):
                return
            assert time.monotonic() < deadline, "the uploader did not settle within 20 s"


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    rig = Rig(tmp_path, pack_size=1 * MiB)
    async with trio.open_nursery() as nursery:
        await nursery.start(rig.uploader.run)
        yield rig
        nursery.cancel_scope.cancel()
    rig.db.close()


async def test_small_chunks_go_up_as_one_pack_holding_their_exact_bytes(rig: Rig) -> None:
    small = [rig.stage(1, i, 100 * KiB) for i in range(8)]
    large = rig.stage(2, 0, 600 * KiB)  # half the pack size or more: an object of its own
    rig.enqueue_all()
    with trio.fail_after(20):
        await rig.uploader.wait_idle()
    rows = [rig.row(k) for k in small]
    packs = {r.pack_key for r in rows}
    assert len(packs) == 1 and None not in packs
    pack = rows[0].pack_key
    assert pack is not None
    assert rig.stored_objects() == {pack, large}  # 9 chunks, 2 objects; no chunk key in the store
    body = (rig.store_root / pack).read_bytes()
    assert len(body) == 8 * 100 * KiB
    for key, row in zip(small, rows):
        assert row.state == tables.STATE_STORED
        assert body[row.pack_offset:row.pack_offset + row.stored_len] == rig.blobs[key]
    assert sorted(r.pack_offset for r in rows) == [i * 100 * KiB for i in range(8)]
    assert rig.row(large).pack_key is None and rig.row(large).state == tables.STATE_STORED
    assert rig.db.all("SELECT pack_key, size FROM packs") == [(pack, 8 * 100 * KiB)]
    stats = rig.uploader.statistics()
    assert (stats.uploaded_objects, stats.uploaded_packs) == (9, 1)
    # A ranged read of the store gives back one chunk exactly.
    third = rows[2]
    got = await rig.store.get_range_then(pack, third.pack_offset, third.stored_len, bytes)
    assert got == rig.blobs[small[2]]


async def test_a_pack_goes_with_its_last_chunk(rig: Rig) -> None:
    keys = [rig.stage(1, i, 50 * KiB) for i in range(3)]
    rig.enqueue_all()
    with trio.fail_after(20):
        await rig.uploader.wait_idle()
    pack = rig.row(keys[0]).pack_key
    assert pack is not None and rig.stored_objects() == {pack}
    rig.db.commit()
    assert all(rig.cache.contains(k) for k in keys)  # the cached copies, kept after upload

    tables.delete_inode(rig.db, InodeId(1))
    assert sorted(rig.db.all("SELECT object_key, cache_only FROM garbage")) == sorted([(k, 1) for k in keys] + [(pack, 0)])
    assert rig.db.all("SELECT * FROM packs") == []
    await rig.commit_and_collect()
    assert rig.stored_objects() == set()
    assert not any(rig.cache.contains(k) for k in keys)
    assert rig.uploader.statistics().deleted_objects == 1  # the pack; the chunks had no object
    assert rig.uploader.repacked_packs == 0


async def test_deleting_one_file_repacks_its_neighbours_and_leaves_none_of_its_bytes(rig: Rig) -> None:
    gone = [rig.stage(1, i, 50 * KiB) for i in range(3)]
    kept = [rig.stage(2, i, 50 * KiB) for i in range(2)]
    rig.enqueue_all()
    with trio.fail_after(20):
        await rig.uploader.wait_idle()
    old_pack = rig.row(gone[0]).pack_key
    assert old_pack is not None and rig.stored_objects() == {old_pack}
    rig.db.commit()

    assert tables.drop_chunks_from(rig.db, InodeId(1), 0) == 3
    assert sorted(rig.db.all("SELECT object_key, cache_only FROM garbage")) == sorted((k, 1) for k in gone)
    assert rig.db.all("SELECT pack_key, repack FROM packs") == [(old_pack, 1)]
    assert tables.counts(rig.db).pack_dead_bytes == 3 * 50 * KiB
    # The durable commit wakes the repack: the kept file's chunks move to new staged copies,
    # the old pack becomes garbage (deleted after the next durable commit), the copies go up.
    await rig.commit_and_collect()
    assert rig.uploader.repacked_packs == 1
    rows = [rig.db.one(f"SELECT {tables._CHUNK_COLS} FROM chunks WHERE inode = 2 AND idx = ?", (i,)) for i in range(2)]
    moved = [tables.chunk_from_row(r) for r in rows if r is not None]
    assert len(moved) == 2 and all(m.state == tables.STATE_STORED for m in moved)
    new_pack = moved[0].pack_key
    assert new_pack is not None and new_pack != old_pack and moved[1].pack_key == new_pack
    assert rig.stored_objects() == {new_pack}, "the old pack (with the deleted file's bytes) must be gone"
    body = (rig.store_root / new_pack).read_bytes()
    for m, key in zip(moved, kept):
        assert body[m.pack_offset:m.pack_offset + m.stored_len] == rig.blobs[key]  # the same sealed bytes
    assert not any(rig.blobs[k] in body for k in gone)
    assert rig.db.all("SELECT pack_key FROM packs") == [(new_pack,)]
    assert tables.counts(rig.db).pack_dead_bytes == 0


async def test_rewriting_a_packed_chunk_marks_its_pack_for_repacking(rig: Rig) -> None:
    keys = [rig.stage(1, i, 10 * KiB) for i in range(4)]
    rig.enqueue_all()
    with trio.fail_after(20):
        await rig.uploader.wait_idle()
    pack = rig.row(keys[0]).pack_key
    new = new_object_key()
    old = tables.put_chunk(rig.db, tables.ChunkRow(InodeId(1), 1, new, 10, 10, 2, tables.STATE_STAGED))
    assert old == keys[1]
    assert rig.db.all("SELECT object_key, cache_only FROM garbage") == [(keys[1], 1)]
    assert rig.db.all("SELECT pack_key, repack FROM packs") == [(pack, 1)]  # its old bytes must leave the store


async def test_chunks_dropped_while_their_pack_uploads_leave_the_pack_to_the_garbage(rig: Rig) -> None:
    rig.store.gate = trio.Event()
    keys = [rig.stage(1, i, 10 * KiB) for i in range(5)]
    rig.enqueue_all()
    with trio.fail_after(20):
        while rig.store.puts_started == 0:
            await trio.sleep(0.01)
    (pack,) = [r[0] for r in rig.db.all("SELECT pack_key FROM packs")]  # named before the PUT
    assert tables.named_object_keys(rig.db, [ObjectKey(pack)]) == {pack}  # the orphan sweep keeps it
    assert tables.drop_chunks_from(rig.db, InodeId(1), 0) == 5
    rig.store.gate.set()
    with trio.fail_after(20):
        await rig.uploader.wait_idle()
    assert all(rig.db.one("SELECT 1 FROM chunks WHERE object_key = ?", (k,)) is None for k in keys)
    assert rig.db.all("SELECT * FROM packs") == []
    assert (pack, 0) in rig.db.all("SELECT object_key, cache_only FROM garbage")
    await rig.commit_and_collect()
    assert rig.stored_objects() == set()


async def test_a_pack_no_chunk_names_is_dropped_at_the_next_mount(rig: Rig) -> None:
    # A crash after the pack was named (and that committed) but before its chunks were
    # recorded: the chunks are still staged and go up again; the old pack is garbage.
    staged = rig.stage(1, 0, 10 * KiB)
    lost = new_object_key()
    tables.add_pack(rig.db, lost, 10 * KiB)
    await rig.store.put(lost, b"x" * 10 * KiB)
    rig.db.commit()
    rig.uploader.load_pending()
    assert rig.db.all("SELECT * FROM packs") == []
    assert rig.db.all("SELECT object_key, cache_only FROM garbage") == [(lost, 0)]
    with trio.fail_after(20):
        await rig.uploader.wait_idle()
    assert rig.row(staged).state == tables.STATE_STORED
    await rig.commit_and_collect()
    assert rig.stored_objects() == {staged}


async def test_without_a_pack_size_every_chunk_is_its_own_object(tmp_path: Path) -> None:
    rig = Rig(tmp_path, pack_size=0)
    try:
        keys = [rig.stage(1, i, 10 * KiB) for i in range(4)]
        async with trio.open_nursery() as nursery:
            await nursery.start(rig.uploader.run)
            rig.enqueue_all()
            with trio.fail_after(20):
                await rig.uploader.wait_idle()
            nursery.cancel_scope.cancel()
        assert rig.stored_objects() == set(keys)
        assert all(rig.row(k).pack_key is None for k in keys)
        assert rig.uploader.statistics().uploaded_packs == 0
    finally:
        rig.db.close()


async def test_repacking_copies_from_the_store_never_from_the_cache(rig: Rig) -> None:
    # The uploader cannot authenticate chunks (it holds no keys): a cached copy damaged on
    # the cache disk must not become the only copy once the old pack is deleted.
    gone = rig.stage(1, 0, 30 * KiB)
    kept = rig.stage(2, 0, 30 * KiB)
    rig.enqueue_all()
    with trio.fail_after(20):
        await rig.uploader.wait_idle()
    rig.db.commit()
    cached = rig.cache.file_path(kept)
    assert cached is not None and cached.read_bytes() == rig.blobs[kept]
    cached.write_bytes(b"\0" * len(rig.blobs[kept]))  # bit rot on the cache disk
    tables.drop_chunks_from(rig.db, InodeId(1), 0)
    await rig.commit_and_collect()
    assert rig.uploader.repacked_packs == 1
    moved = rig.db.one(f"SELECT {tables._CHUNK_COLS} FROM chunks WHERE inode = 2 AND idx = 0")
    assert moved is not None
    row = tables.chunk_from_row(moved)
    assert row.pack_key is None and row.state == tables.STATE_STORED  # alone now: an object of its own
    assert rig.stored_objects() == {row.object_key}
    assert (rig.store_root / row.object_key).read_bytes() == rig.blobs[kept]
    assert rig.blobs[gone] not in (rig.store_root / row.object_key).read_bytes()


async def test_a_pack_missing_from_the_store_is_left_alone_and_does_not_hold_up_a_shred(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    gone = rig.stage(1, 0, 20 * KiB)
    kept = rig.stage(2, 0, 20 * KiB)
    rig.enqueue_all()
    with trio.fail_after(20):
        await rig.uploader.wait_idle()
    pack = rig.row(kept).pack_key
    assert pack is not None
    rig.db.commit()
    (rig.store_root / pack).unlink()  # lost by the store
    tables.drop_chunks_from(rig.db, InodeId(1), 0)
    assert tables.packs_left(rig.db, [pack]) == 1  # marked for repacking
    await rig.commit_and_collect()
    assert rig.uploader.repacked_packs == 0
    assert rig.db.all("SELECT pack_key, repack FROM packs") == [(pack, 0)]  # gave up, kept for an admin
    assert tables.packs_left(rig.db, [pack]) == 0  # a shred waiting for it goes on
    assert rig.row(kept).pack_key == pack  # nothing moved: no copy of bytes that are not there
    assert rig.db.scalar("SELECT count(*) FROM chunks WHERE inode = 2") == 1
    assert any("is missing or shorter than its chunks" in r.getMessage() for r in caplog.records)
    assert gone not in {r[0] for r in rig.db.all("SELECT object_key FROM chunks")}


async def test_a_packed_chunk_keeps_its_local_copy_until_a_durable_commit(rig: Rig) -> None:
    # The store holds a packed chunk under no name of its own: if a power loss undid the
    # light commit that recorded the pack, only the local copy could upload it again.
    keys = [rig.stage(1, i, 10 * KiB) for i in range(3)]
    rig.enqueue_all()
    with trio.fail_after(20):
        await rig.uploader.wait_idle()
    assert rig.row(keys[0]).pack_key is not None
    rig.db.commit(durable=False)
    rig.uploader.after_light_commit()
    assert rig.cache.has_staged(), "evictable after a light commit"
    rig.db.commit()
    point = rig.uploader.commit_point()
    assert sorted(point.packed) == sorted(keys)
    assert rig.cache.has_staged(), "evictable before the commit is durable"
    rig.uploader.after_commit(point)
    assert not rig.cache.has_staged()
    assert rig.uploader.commit_point().packed == []


async def test_a_cache_filling_with_staged_data_uploads_chunks_one_by_one(tmp_path: Path) -> None:
    # Under pressure each chunk must free its room as soon as it is stored: a packed chunk
    # waits for its whole pack and then for a durable commit.
    rig = Rig(tmp_path, pack_size=1 * MiB)
    rig.cache = ChunkCache(tmp_path / "small-cache", 1 * MiB)
    rig.uploader = Uploader(rig.store, rig.cache, rig.db, workers=2, delay=0.0, pack_size=1 * MiB)
    try:
        keys = [rig.stage(1, i, 100 * KiB) for i in range(4)]  # 400 KiB staged: 39 % of the cache
        assert rig.cache.staged_share() > 0.25
        async with trio.open_nursery() as nursery:
            await nursery.start(rig.uploader.run)
            rig.enqueue_all()
            with trio.fail_after(20):
                await rig.uploader.wait_idle()
            nursery.cancel_scope.cancel()
        assert rig.uploader.statistics().uploaded_packs == 0
        assert rig.stored_objects() == set(keys)
    finally:
        rig.db.close()
