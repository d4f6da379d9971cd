"""End-to-end: the orphan sweep deletes store objects no metadata names, and nothing else.

A crash between the upload of a chunk and the commit of the row naming it, or a power loss
that undoes light commits, leaves such objects behind (mifs/sweep.py). Here they are planted
as copies of real chunk objects under fresh names, which is what those crashes leave: sealed
bytes under a random key. The mounts run the sweep every second with a one-second grace.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from mifs_e2e import (
    Archive, KiB, assert_bytes_equal, describe, nonzero_pattern, read_file, store_chunk_objects, wait_until, write_file,
)
from s3server import SeaweedS3
from test_e2e_s3 import data_keys

SWEEP_CONFIG = "[tuning]\norphan_sweep_interval = 1\norphan_grace = 1\n"


def fresh_key() -> str:
    name = os.urandom(16).hex()
    return f"data/{name[:2]}/{name}"


def mount_with_fast_sweep(arc: Archive, tmp_path: Path) -> None:
    config = tmp_path / "sweep.toml"
    config.write_text(SWEEP_CONFIG)
    arc.mount(flags=["--config", config])


def write_study(mp: Path) -> dict[str, bytes]:
    files = {f"P1/S1/IM{i}.dcm": nonzero_pattern(("orphans", i), 300 * KiB + i) for i in range(6)}
    for rel, data in files.items():
        (mp / rel).parent.mkdir(parents=True, exist_ok=True)
        write_file(mp / rel, data)
    return files


def verify(mp: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        assert_bytes_equal(read_file(mp / rel), data, rel)


def test_orphans_in_a_local_store_are_deleted_and_live_chunks_kept(archive: Archive, tmp_path: Path) -> None:
    mount_with_fast_sweep(archive, tmp_path)
    files = write_study(archive.mountpoint)
    archive.wait_status(lambda s: s["pending_uploads"] == 0, 60, "the study to reach the store")
    live = store_chunk_objects(archive.store)
    assert len(live) >= len(files)
    template = next(iter(live.values())).read_bytes()
    orphans = [fresh_key() for _ in range(3)]
    for key in orphans:
        (archive.store / key).parent.mkdir(parents=True, exist_ok=True)
        (archive.store / key).write_bytes(template)

    status = archive.wait_status(lambda s: s["orphans_purged"] >= 3, 60, "the sweep to delete the planted orphans")
    assert status["orphans_purged"] == 3
    assert all(not (archive.store / key).exists() for key in orphans)
    human = archive.run_cli("status", archive.mountpoint)
    assert human.returncode == 0 and "3 unnamed store objects deleted" in human.stdout, describe(human)
    assert set(store_chunk_objects(archive.store)) == set(live), "the sweep touched a chunk that metadata names"
    verify(archive.mountpoint, files)

    # Nothing a later pass would still delete: the study survives a remount with an empty cache.
    archive.umount()
    shutil.rmtree(archive.cache_dir)
    archive.cache_dir.mkdir(mode=0o700)
    archive.mount(flags=archive.mount_flags)
    verify(archive.mountpoint, files)
    assert set(store_chunk_objects(archive.store)) == set(live)


def test_orphans_in_s3_are_deleted_and_live_chunks_kept(s3_archive: Archive, s3_server: SeaweedS3, tmp_path: Path) -> None:
    arc = s3_archive
    assert arc.s3_bucket is not None
    mount_with_fast_sweep(arc, tmp_path)
    files = write_study(arc.mountpoint)
    arc.wait_status(lambda s: s["pending_uploads"] == 0, 60, "the study to reach the store")
    live = data_keys(s3_server, arc)
    assert len(live) >= len(files)
    client = s3_server.client()
    template = client.get_object(Bucket=arc.s3_bucket, Key=f"{arc.s3_prefix}/{next(iter(live))}")["Body"].read()
    orphans = {fresh_key() for _ in range(2)}
    for key in orphans:
        client.put_object(Bucket=arc.s3_bucket, Key=f"{arc.s3_prefix}/{key}", Body=template)
    assert data_keys(s3_server, arc) == live | orphans

    status = arc.wait_status(lambda s: s["orphans_purged"] >= 2, 60, "the sweep to delete the planted orphans")
    assert status["orphans_purged"] == 2
    assert data_keys(s3_server, arc) == live
    verify(arc.mountpoint, files)


def writers(arc: Archive) -> set[str]:
    return {p.name for p in (arc.store / "writers").glob("*")}


@pytest.mark.expect_log(
    r"WARNING .*orphan sweep skipped: the store registers other writable mounts",
    r"WARNING .*orphan sweep skipped: the store holds metadata up to commit \d+, the local database only \d+",
)
def test_no_sweep_while_another_host_mounts_the_archive(archive: Archive, tmp_path: Path) -> None:
    """A failover host mounts the archive next to the primary (not supported, but it
    happens): neither sweep may delete what only the other's database names, the primary
    stays behind the store once the failover host wrote, and only a cache rebuilt from the
    store sweeps again."""
    mount_with_fast_sweep(archive, tmp_path)
    files = write_study(archive.mountpoint)
    archive.wait_status(lambda s: s["pending_uploads"] == 0 and s["metadata_shipped_seq"] >= s["metadata_commit_seq"],
                        60, "the study and its metadata to reach the store")
    assert len(writers(archive)) == 1
    failover_mp, failover_cache = archive.base / "mnt-failover", archive.base / "cache-failover"
    failover_mp.mkdir()
    failover_cache.mkdir(mode=0o700)
    archive.mount(mountpoint=failover_mp, cache_dir=failover_cache, flags=archive.mount_flags)
    verify(failover_mp, files)
    wait_until(lambda: len(writers(archive)) == 2, 30, "the failover mount to register")
    orphan = fresh_key()
    (archive.store / orphan).parent.mkdir(parents=True, exist_ok=True)
    (archive.store / orphan).write_bytes(b"sealed bytes of a lost upload")

    def stood_down(mp: Path, why: str) -> None:
        def standing_down() -> dict[str, object] | None:
            status = archive.status_json(mp)
            return status if why in str(status["last_orphan_sweep"]) else None

        status = wait_until(standing_down, 30, f"the sweep of {mp} to stand down ({why})")
        assert status is not None and status["orphans_purged"] == 0

    for mp in (archive.mountpoint, failover_mp):
        stood_down(mp, "other writable mounts are registered")
    archive.umount(failover_mp)
    assert len(writers(archive)) == 1, "a clean unmount removes its registration"
    stood_down(archive.mountpoint, "the store's metadata is newer than the local database")
    time.sleep(3)  # several more passes
    assert (archive.store / orphan).exists()
    archive.umount()
    assert writers(archive) == set()

    # The primary's cache is behind what the failover host shipped: refused, then rebuilt.
    refused = archive.try_mount(flags=archive.mount_flags)
    assert refused.returncode == 5 and "move the cache dir away" in refused.stderr, describe(refused)
    os.rename(archive.cache_dir, archive.base / "cache-primary-stale")
    archive.cache_dir.mkdir(mode=0o700)
    archive.mount(flags=archive.mount_flags)
    status = archive.wait_status(lambda s: s["orphans_purged"] >= 1, 60, "the rebuilt mount's sweep")
    assert status["orphans_purged"] == 1 and not (archive.store / orphan).exists()
    verify(archive.mountpoint, files)


@pytest.mark.expect_log(r"detached the dead mifs mount")
def test_a_crashed_mount_registration_is_removed_by_the_next_mount(archive: Archive) -> None:
    archive.mount()
    wait_until(lambda: len(writers(archive)) == 1, 30, "the mount to register as a writer")
    crashed = writers(archive)
    archive.kill_daemon()
    archive.mount()
    wait_until(lambda: len(writers(archive)) == 1 and writers(archive) != crashed, 30,
               "the new mount to replace the crashed one's registration")
    archive.umount()
    assert writers(archive) == set()
