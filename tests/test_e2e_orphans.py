"""End-to-end: the orphan sweep deletes store objects no metadata names, and nothing else.

A crash between the upload of a chunk and the commit of the row naming it, or a power loss
that undoes light commits, leaves such objects behind (mifs/sweep/service.py). Here they are planted
as copies of real chunk objects under fresh names, which is what those crashes leave: sealed
bytes under a random key. The mounts run the sweep every second with a one-second grace.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from mifs_e2e import (
    Archive, KiB, assert_bytes_equal, assert_cli_error, describe, nonzero_pattern, read_file, store_chunk_objects,
    wait_until, write_file,
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
    # Small files go up in packs on S3 (docs/FORMAT.md section 5b): the sweep must keep them.
    assert len(live) == arc.status_json()["objects"] >= 1 and arc.status_json()["packs"] >= 1
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


def plant_orphan(arc: Archive) -> str:
    key = fresh_key()
    (arc.store / key).parent.mkdir(parents=True, exist_ok=True)
    (arc.store / key).write_bytes(b"sealed bytes of a lost upload")
    return key


@pytest.mark.expect_log(r"WARNING .*orphan sweep skipped: the store registers other writable mounts")
def test_admin_runs_the_sweep_and_manages_writer_registrations(archive: Archive, tmp_path: Path) -> None:
    """`mifs sweep` runs a pass now (scheduled passes off here), still honouring the grace
    period and the registry; `mifs writers ls|rm` shows and removes registrations."""
    config = tmp_path / "manual.toml"
    config.write_text("[tuning]\norphan_sweep_interval = 0\norphan_grace = 1\n")
    archive.mount(flags=["--config", config])
    files = write_study(archive.mountpoint)
    archive.wait_status(lambda s: s["pending_uploads"] == 0, 60, "the study to reach the store")
    live = set(store_chunk_objects(archive.store))
    orphan = plant_orphan(archive)

    first = archive.run_cli("sweep", archive.mountpoint, "--json")
    assert first.returncode == 0, describe(first)
    assert json.loads(first.stdout) == {"purged": 0, "candidates": 1, "grace_seconds": 1.0}
    assert (archive.store / orphan).exists(), "a first pass must only note an unnamed object"
    time.sleep(1.2)
    second = archive.run_cli("sweep", "-m", archive.mountpoint)
    assert second.returncode == 0 and "orphan sweep: 1 unnamed store objects deleted" in second.stdout, describe(second)
    assert not (archive.store / orphan).exists()
    assert set(store_chunk_objects(archive.store)) == live
    assert archive.status_json()["orphans_purged"] == 1

    # The registry: this mount's registration, then a dead host's, planted.
    listing = archive.run_cli("writers", "ls", archive.mountpoint, "--json")
    assert listing.returncode == 0, describe(listing)
    (own,) = json.loads(listing.stdout)
    assert own["this_mount"] is True and writers(archive) == {own["session"]}
    assert time.strptime(own["registered"], "%Y-%m-%dT%H:%M:%SZ")
    assert json.loads((archive.store / "writers" / own["session"]).read_bytes())["mifs_writer"] == 1
    dead = os.urandom(16).hex()
    (archive.store / "writers" / dead).write_bytes(b'{"mifs_writer":1}')  # as an older mifs wrote it
    human = archive.run_cli("writers", "ls", archive.mountpoint)
    assert human.returncode == 0, describe(human)
    rows = {line.split()[0]: line for line in human.stdout.splitlines()[1:]}
    assert set(rows) == {own["session"], dead}
    assert "this mount" in rows[own["session"]] and "(unknown)" in rows[dead] and "another" in rows[dead]

    orphan = plant_orphan(archive)
    refused = archive.run_cli("sweep", archive.mountpoint)
    assert_cli_error(refused, 14)
    assert f"other writable mounts are registered ({dead})" in refused.stderr and "mifs writers rm" in refused.stderr

    assert_cli_error(archive.run_cli("writers", "rm", dead, "-m", archive.mountpoint), 2)  # stdin is not a terminal: --yes needed
    assert dead in writers(archive)
    unknown = os.urandom(16).hex()
    for session, code in ((own["session"], 2), ("../keys/x", 2), (unknown, 9)):
        assert_cli_error(archive.run_cli("writers", "rm", session, "-m", archive.mountpoint, "--yes"), code)
    removed = archive.run_cli("writers", "rm", dead, "-m", archive.mountpoint, "--yes")
    assert removed.returncode == 0 and dead in removed.stdout, describe(removed)
    assert writers(archive) == {own["session"]}

    for expected in ({"purged": 0, "candidates": 1, "grace_seconds": 1.0}, {"purged": 1, "candidates": 0, "grace_seconds": 1.0}):
        time.sleep(1.2)
        result = archive.run_cli("sweep", archive.mountpoint, "--json")
        assert result.returncode == 0 and json.loads(result.stdout) == expected, describe(result)
    assert set(store_chunk_objects(archive.store)) == live
    verify(archive.mountpoint, files)
    archive.umount()
    assert writers(archive) == set()
    trail = archive.run_cli("audit", "query", "--store", archive.store_url, "--key-file", archive.key_file, "--json")
    assert trail.returncode == 0, describe(trail)
    admin = [(r["action"], r.get("request")) for r in json.loads(trail.stdout) if r["ev"] == "admin"]
    assert [a for a, _ in admin].count("sweep") == 5, admin  # refused requests are recorded too
    assert [req for a, req in admin if a == "writers rm"] == [
        {"session": s} for s in (own["session"], "../keys/x", unknown, dead)
    ], admin


def test_a_manual_pass_brings_the_scheduled_confirmation_forward(archive: Archive, tmp_path: Path) -> None:
    """With daily passes, candidates a manual pass found are confirmed one grace period later
    by the scheduled loop, not a day later."""
    config = tmp_path / "daily.toml"
    config.write_text("[tuning]\norphan_sweep_interval = 86400\norphan_grace = 1\n")
    archive.mount(flags=["--config", config])
    files = write_study(archive.mountpoint)
    archive.wait_status(lambda s: s["pending_uploads"] == 0, 60, "the study to reach the store")
    orphan = plant_orphan(archive)
    first = archive.run_cli("sweep", archive.mountpoint)
    assert first.returncode == 0 and "1 unnamed objects found" in first.stdout, describe(first)
    # orphans_purged counts during a pass, orphan_sweeps at its end: wait for the end.
    status = archive.wait_status(lambda s: s["orphan_sweeps"] >= 2, 30, "the scheduled pass to confirm the candidate")
    assert status["orphans_purged"] == 1 and status["orphan_sweeps"] == 2
    assert not (archive.store / orphan).exists()
    verify(archive.mountpoint, files)


def test_a_read_only_mount_refuses_sweep_and_writers_rm(archive: Archive) -> None:
    archive.mount()
    write_study(archive.mountpoint)
    archive.umount()
    archive.mount(flags=["--read-only"])
    orphan = plant_orphan(archive)
    for args in (("sweep",), ("writers", "rm", os.urandom(16).hex(), "--yes")):
        result = archive.run_cli(*args, "-m", archive.mountpoint)
        assert_cli_error(result, 14)
        assert "read-only" in result.stderr
    assert (archive.store / orphan).exists()
    listing = archive.run_cli("writers", "ls", archive.mountpoint, "--json")
    assert listing.returncode == 0 and json.loads(listing.stdout) == [], describe(listing)
