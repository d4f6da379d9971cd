"""End-to-end: the durability contract of docs/CONFIG.md, "Durability".

close() and rename() survive a kill -9 of the daemon at once; fsync(), --sync-close and the
sync interval make commits survive power loss, which `mifs status` reports as
metadata_durable_seq. The metadata copy in the store is never ahead of what a power loss
leaves. (A power loss itself cannot be simulated here: these tests check the bookkeeping
that decides what was synced, and the kill -9 half of the contract.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mifs_e2e import (
    Archive, KiB, assert_bytes_equal, describe, is_fuse_mounted, nonzero_pattern, read_file, wait_until, write_file,
)


def pacs_store(mp: Path, files: dict[str, bytes]) -> None:
    """Write each file under a temporary name and rename it into Patient/Study/Series, no fsync."""
    (mp / ".incoming").mkdir(exist_ok=True)
    for i, (rel, data) in enumerate(files.items()):
        tmp = mp / ".incoming" / f"{i:06d}.tmp"
        write_file(tmp, data)
        (mp / rel).parent.mkdir(parents=True, exist_ok=True)
        os.rename(tmp, mp / rel)


def long_sync_interval(tmp_path: Path) -> Path:
    config = tmp_path / "mifs.toml"
    config.write_text("[tuning]\nsync_interval = 60\n")
    return config


@pytest.mark.expect_log(r"\bWARNING\b")
def test_kill_9_right_after_rename_keeps_the_published_names(archive: Archive) -> None:
    """A PACS publishes a file by renaming it into place: the rename must survive a crash of
    the daemon right after it returned, not only the file's data under its temporary name."""
    mp = archive.mountpoint
    archive.mount()
    files = {f"P1/S1/SE{i % 3}/IM{i:04d}.dcm": nonzero_pattern(("pacs", i), 20 * KiB + i * 999) for i in range(40)}
    pacs_store(mp, files)
    archive.kill_daemon(detach=True)
    archive.mounts.clear()
    archive.mount()
    missing = [rel for rel in files if not (mp / rel).exists()]
    wrong = [rel for rel in files if rel not in missing and read_file(mp / rel) != files[rel]]
    assert not missing and not wrong, f"missing: {missing[:5]}, wrong content: {wrong[:5]}"
    assert os.listdir(mp / ".incoming") == [], "temporary names came back after the crash"


def test_close_commits_lightly_fsync_and_sync_close_make_it_durable(archive: Archive, tmp_path: Path) -> None:
    config = long_sync_interval(tmp_path)
    mp = archive.mountpoint
    archive.mount(flags=["--config", config])
    status = archive.status_json()
    assert status["sync_close"] is False

    def snapshot_taken() -> bool:  # the mount's first metadata snapshot makes everything durable
        doc = archive.status_json()
        return bool(doc["metadata_shipped_seq"] >= doc["metadata_commit_seq"] > 0)

    wait_until(snapshot_taken, 30, "the mount's first metadata snapshot")
    write_file(mp / "light", b"closed, not synced")
    light = archive.status_json()
    assert light["metadata_durable_seq"] < light["metadata_commit_seq"], light
    # the copy in the store never gets ahead of what a power loss would leave
    assert light["metadata_shipped_seq"] <= light["metadata_durable_seq"], light
    fd = os.open(mp / "synced", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, b"fsynced")
        before = archive.status_json()
        os.fdatasync(fd)
        synced = archive.status_json()
        # everything committed before the fsync (and the fsync's own commit) is durable now;
        # the indexer and the uploader may have committed lightly since
        assert synced["metadata_durable_seq"] >= before["metadata_commit_seq"] > before["metadata_durable_seq"], (
            before, synced)
    finally:
        os.close(fd)
    archive.umount()

    archive.mount(flags=["--config", config, "--sync-close"])
    assert archive.status_json()["sync_close"] is True
    for i in range(3):
        before = archive.status_json()
        write_file(mp / f"sync-close-{i}", nonzero_pattern(("sc", i), 70 * KiB))
        doc = archive.status_json()
        assert doc["metadata_durable_seq"] > before["metadata_commit_seq"], (before, doc)
    archive.remount()
    assert read_file(mp / "light") == b"closed, not synced"
    assert read_file(mp / "synced") == b"fsynced"
    assert read_file(mp / "sync-close-2") == nonzero_pattern(("sc", 2), 70 * KiB)


def test_sync_interval_bounds_the_power_loss_window(archive: Archive, tmp_path: Path) -> None:
    config = tmp_path / "mifs.toml"
    config.write_text("[tuning]\nsync_interval = 1\n")
    mp = archive.mountpoint
    archive.mount(flags=["--config", config])
    write_file(mp / "f", b"x" * 5000)
    os.mkdir(mp / "d")

    def durable() -> bool:
        doc = archive.status_json()
        return bool(doc["metadata_durable_seq"] == doc["metadata_commit_seq"] and doc["metadata_commit_seq"] > 0)

    wait_until(durable, 10, "the background sync (sync_interval = 1)")


@pytest.mark.parametrize("value", ["0", "61", '"5"', "true"])
def test_bad_sync_interval_is_one_clear_error(archive: Archive, tmp_path: Path, value: str) -> None:
    config = tmp_path / "mifs.toml"
    config.write_text(f"[tuning]\nsync_interval = {value}\n")
    result = archive.try_mount(flags=["--config", config])
    assert result.returncode == 2, describe(result)
    assert result.stderr.count("\n") == 1 and "tuning.sync_interval" in result.stderr, describe(result)
    assert "Traceback" not in result.stderr
    assert not is_fuse_mounted(archive.mountpoint)


KEEP_OPEN_WRITER = r"""
import os, sys, time
path, out = sys.argv[1], sys.argv[2]
pieces = [open(p, "rb").read() for p in sys.argv[3:]]
fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
for n, piece in enumerate(pieces):
    os.write(fd, piece)
    # Hand the pages to the daemon now, without flush or fsync (the kernel's own writeback
    # would do so within its dirty_expire time).
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    open(out, "a").write(f"{n}\n")
    if n + 1 < len(pieces):
        while len(open(out).read().split()) < 2 * (n + 1):  # the test says "go on"
            time.sleep(0.02)
time.sleep(600)  # keeps the file open; killed by the test
"""


def start_keep_open_writer(path: Path, control: Path, pieces: list[bytes]) -> subprocess.Popen[bytes]:
    """A process that writes `pieces` to `path` and keeps it open. Its own process: a file open
    in the test process would be flushed by every `mifs status` the test runs (a fork
    duplicates the descriptor, and closing a duplicate flushes the file)."""
    sources = []
    for n, piece in enumerate(pieces):
        sources.append(control.with_name(f"{control.name}-piece-{n}"))
        sources[-1].write_bytes(piece)
    return subprocess.Popen([sys.executable, "-c", KEEP_OPEN_WRITER, str(path), str(control), *map(str, sources)])


def test_a_file_kept_open_is_written_back_and_survives_kill_9(archive: Archive, tmp_path: Path) -> None:
    """A file written and kept open without fsync (a database, a log) is sealed and committed
    once its unsaved data is sync_interval old, as the kernel writes back a local file: a
    crash of the daemon then loses at most that much, not everything since the open."""
    config = tmp_path / "mifs.toml"
    config.write_text("[tuning]\nsync_interval = 1\n")
    archive.mount(flags=["--config", config])
    path = archive.mountpoint / "kept-open.db"
    data = nonzero_pattern("kept open", 192 * KiB)
    control = tmp_path / "writer-progress"
    writer = start_keep_open_writer(path, control, [data])
    try:
        wait_until(lambda: control.exists() and control.read_text().split() == ["0"], 30, "the writer to write")
        archive.wait_status(lambda s: s["open_file_write_backs"] >= 1, 15, "the open file to be written back")
        archive.kill_daemon()
    finally:
        writer.kill()
        writer.wait()
    archive.mount(flags=["--config", config])
    assert read_file(path) == data


def test_writing_on_after_a_write_back_keeps_every_byte(archive: Archive, tmp_path: Path) -> None:
    """The chunk written back is partial; the writes after it extend the same chunk (its
    stored part read back and sealed again): nothing is lost or doubled, across a kill -9 too."""
    config = tmp_path / "mifs.toml"
    config.write_text("[tuning]\nsync_interval = 1\n")
    archive.mount(flags=["--config", config])
    path = archive.mountpoint / "log"
    pieces = [nonzero_pattern(("piece", i), 100 * KiB + 7 * i) for i in range(3)]
    control = tmp_path / "writer-progress"
    writer = start_keep_open_writer(path, control, pieces)
    try:
        for n in range(len(pieces)):
            wait_until(lambda: control.exists() and str(n) in control.read_text().split(), 30, f"piece {n}")
            archive.wait_status(lambda s: s["open_file_write_backs"] >= n + 1, 15, f"write-back {n + 1}")
            with open(control, "a") as fh:
                fh.write("go\n")
        archive.kill_daemon()
    finally:
        writer.kill()
        writer.wait()
    archive.mount(flags=["--config", config])
    assert_bytes_equal(read_file(path), b"".join(pieces), "the file kept open")
