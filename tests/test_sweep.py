"""The orphan sweep (mifs/sweep/service.py) against a real metadata database and local directory store.

What a pass may delete is decided by the database alone, so these tests build the database
rows and store objects directly and run passes one at a time (sweep_once); the end-to-end
tests in test_e2e_orphans.py run the sweep inside a mount.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest
import trio

from mifs.metadb import tables
from mifs.metadb.db import MetaDb
from mifs.store.localdir import LocalDirStore
from mifs.sweep.service import WRITER_SESSIONS_FILE, OrphanSweeper
from mifs.types import InodeId, ObjectKey

KEY = bytes(range(32))


def new_key() -> ObjectKey:
    name = os.urandom(16).hex()
    return ObjectKey(f"data/{name[:2]}/{name}")


class Rig:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.db = MetaDb(tmp_path / "meta.db", KEY)
        self.root = tmp_path / "store"
        self.store = LocalDirStore(self.root, create=True)
        self.read_only = False

    def put_object(self, key: str, data: bytes = b"sealed bytes") -> None:
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def named_chunk(self, inode: int, idx: int = 0) -> ObjectKey:
        """An object in the store that a chunk row names."""
        key = new_key()
        tables.put_chunk(self.db, tables.ChunkRow(InodeId(inode), idx, key, 12, 12, 1, tables.STATE_STORED))
        self.put_object(key)
        return key

    def objects(self) -> set[str]:
        return {str(p.relative_to(self.root)) for p in self.root.rglob("*") if p.is_file()}

    def sweeper(self, grace: float, *, cache_dir: str = "cache", register: bool = True) -> OrphanSweeper:
        """A sweeper of a mount whose cache dir is tmp_path/cache_dir, registered as a writer."""
        (self.tmp / cache_dir).mkdir(exist_ok=True)
        sweeper = OrphanSweeper(
            self.db, self.store, interval=3600, grace=grace, read_only=lambda: self.read_only,
            sessions_file=self.tmp / cache_dir / WRITER_SESSIONS_FILE,
        )
        if register:
            trio.run(sweeper.register)
        return sweeper

    def writers(self) -> set[str]:
        return {p.name for p in (self.root / "writers").glob("*")}


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    r.db.close()


def test_only_objects_unnamed_in_two_passes_are_deleted(rig: Rig) -> None:
    live = [rig.named_chunk(1, i) for i in range(3)]
    # A chunk replaced by a newer one: its object waits in `garbage` for the uploader.
    replaced = live[0]
    rig.named_chunk(1, 0)
    assert tables.named_object_keys(rig.db, [replaced]) == {replaced}
    orphans = [new_key() for _ in range(5)]
    for key in orphans:
        rig.put_object(key)
    others = ["mifs-archive.json", "meta/snapshot/0000000000000001", "audit/seg/0000000000000001"]
    for key in others:
        rig.put_object(key)
    rig.db.commit()
    sweeper = rig.sweeper(grace=0)
    before = rig.objects()
    assert f"writers/{sweeper.session}" in before

    assert trio.run(sweeper.sweep_once) == 0, "the first pass only notes candidates"
    assert rig.objects() == before
    assert sweeper.statistics()["orphan_candidates"] == 5

    assert trio.run(sweeper.sweep_once) == 5
    assert rig.objects() == before - set(orphans)
    stats = sweeper.statistics()
    assert stats["orphans_purged"] == 5 and stats["orphan_candidates"] == 0 and stats["orphan_sweeps"] == 2


def test_nothing_is_deleted_before_the_grace_period(rig: Rig) -> None:
    orphan = new_key()
    rig.put_object(orphan)
    sweeper = rig.sweeper(grace=3600)
    assert trio.run(sweeper.sweep_once) == 0
    assert trio.run(sweeper.sweep_once) == 0
    assert orphan in rig.objects()
    assert sweeper.statistics()["orphan_candidates"] == 1


def test_an_uncommitted_row_protects_its_object(rig: Rig) -> None:
    """The daemon uploads chunks whose rows are still in the open transaction: the sweep reads
    through the same connection and must see them."""
    key = rig.named_chunk(7)  # not committed
    sweeper = rig.sweeper(grace=0)
    for _ in range(2):
        assert trio.run(sweeper.sweep_once) == 0
    assert key in rig.objects()


def test_a_candidate_gone_from_the_store_is_forgotten(rig: Rig) -> None:
    orphan = new_key()
    rig.put_object(orphan)
    sweeper = rig.sweeper(grace=0)
    trio.run(sweeper.sweep_once)
    assert sweeper.statistics()["orphan_candidates"] == 1
    (rig.root / orphan).unlink()
    assert trio.run(sweeper.sweep_once) == 0
    assert sweeper.statistics()["orphan_candidates"] == 0


def test_no_pass_when_the_store_metadata_is_newer_than_the_database(rig: Rig) -> None:
    """A cache disk restored from an old copy does not know the chunks newer metadata names:
    deleting them would destroy files a restore from the store could bring back."""
    rig.db.commit()  # commit_seq 1
    unknown_to_this_db = new_key()
    rig.put_object(unknown_to_this_db)
    rig.put_object(f"meta/journal/{2:016x}-{9:016x}")
    sweeper = rig.sweeper(grace=0)
    for _ in range(2):
        assert trio.run(sweeper.sweep_once) == 0
    assert unknown_to_this_db in rig.objects()
    stats = sweeper.statistics()
    assert stats["orphan_candidates"] == 0 and stats["orphan_sweeps"] == 0
    assert "newer than the local database" in str(stats["last_orphan_sweep"])


def test_no_pass_on_a_read_only_mount(rig: Rig) -> None:
    orphan = new_key()
    rig.put_object(orphan)
    rig.read_only = True
    sweeper = rig.sweeper(grace=0)
    for _ in range(2):
        assert trio.run(sweeper.sweep_once) == 0
    assert orphan in rig.objects()
    assert "read-only" in str(sweeper.statistics()["last_orphan_sweep"])


def test_writers_register_and_a_crashed_registration_of_the_same_cache_dir_is_removed(rig: Rig) -> None:
    crashed = rig.sweeper(grace=0)  # registered, never unregistered: a kill -9
    assert rig.writers() == {crashed.session}
    again = rig.sweeper(grace=0)  # the next mount on the same cache dir
    assert rig.writers() == {again.session}
    trio.run(again.unregister)  # clean unmount
    assert rig.writers() == set()


def test_no_pass_while_another_writable_mount_is_registered(rig: Rig) -> None:
    """A failover host next to a returning primary (or a host that crashed and never came
    back): neither may delete chunks that only the other's database names."""
    orphan = new_key()
    rig.put_object(orphan)
    primary = rig.sweeper(grace=0, cache_dir="primary")
    failover = rig.sweeper(grace=0, cache_dir="failover")
    for sweeper in (primary, failover, primary, failover):
        assert trio.run(sweeper.sweep_once) == 0
        assert "other writable mounts are registered" in str(sweeper.statistics()["last_orphan_sweep"])
    assert orphan in rig.objects()
    trio.run(failover.unregister)
    assert trio.run(primary.sweep_once) == 0
    assert trio.run(primary.sweep_once) == 1
    assert orphan not in rig.objects()


def test_no_pass_before_the_mount_is_registered(rig: Rig) -> None:
    orphan = new_key()
    rig.put_object(orphan)
    sweeper = rig.sweeper(grace=0, register=False)
    for _ in range(2):
        assert trio.run(sweeper.sweep_once) == 0
    assert orphan in rig.objects()


def test_an_interrupted_registration_is_completed_without_removing_itself(rig: Rig) -> None:
    """A registration cut off after recording the session (the 10 s bound at mount) is tried
    again: the retry must not take the session it recorded for a crashed one."""
    sweeper = rig.sweeper(grace=0, register=False)
    sweeper._save_own_sessions([sweeper.session])  # what the first try had recorded
    trio.run(sweeper.register)
    assert rig.writers() == {sweeper.session}
