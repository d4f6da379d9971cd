"""End-to-end: the cache dir on a small disk of its own (a 24 MiB tmpfs), as on an archive host
with a small cache partition and the default --cache-size of 10 GiB, larger than the disk.

The cache must stay within what the disk can hold, keeping a reserve for the metadata
database (a commit that finds the disk full would switch the mount to read-only), and a disk
filled by another program must give writers ENOSPC at once, not after the staging timeout, and
not break the mount: once there is room again, writes succeed. Nothing closed successfully is
lost. Talks to mifs only through the CLI and the mounted filesystem.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from mifs_e2e import (
    Archive, assert_bytes_equal, daemon_pids, describe, errno_of, is_fuse_mounted, pattern, read_file, wait_until,
    write_file,
)

DISK_BYTES = 24 * 1024 * 1024
RESERVE_BYTES = DISK_BYTES // 10  # mifs.cache: FREE_SPACE_RESERVE_SHARE of a small disk
FILE_BYTES = 512 * 1024


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB tmpfs; requested before the archive, so it is unmounted after the archive's
    own teardown has unmounted mifs."""
    path = tmp_path / "small-disk"
    path.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "tmpfs", str(path)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def test_a_disk_filled_by_another_program_gives_enospc_at_once_and_the_mount_recovers(
    small_disk: Path, archive: Archive, tmp_path: Path,
) -> None:
    archive.mount(cache_dir=small_disk / "cache")
    mnt = archive.mountpoint
    written: dict[str, bytes] = {}
    for i in range(10):
        data = pattern(("before", i), FILE_BYTES)
        write_file(mnt / f"before-{i}.dcm", data)
        written[f"before-{i}.dcm"] = data
    assert archive.run_cli("sync", mnt).returncode == 0  # nothing staged: no upload can free room

    # Another program leaves mifs less room than one file beyond the reserve.
    hog = small_disk / "hog"
    hog.write_bytes(b"\0" * (free_bytes(small_disk) - RESERVE_BYTES - FILE_BYTES // 4))
    started = time.monotonic()
    assert errno_of(write_file, mnt / "refused.dcm", pattern("refused", FILE_BYTES)) == errno.ENOSPC
    # At once: nothing is staged, so waiting for uploads (the 120 s staging timeout) is pointless.
    assert time.monotonic() - started < 30
    status = archive.status_json()
    assert not status["failsafe"] and not status["read_only"], status
    assert status["cache_limit_now"] < status["cache_limit"]

    hog.unlink()
    for i in range(5):
        data = pattern(("after", i), FILE_BYTES)
        write_file(mnt / f"after-{i}.dcm", data)
        written[f"after-{i}.dcm"] = data
    archive.umount()

    # Everything closed successfully is in the store: a fresh cache dir reads it all back.
    archive.mount(cache_dir=tmp_path / "fresh-cache")
    for name, data in written.items():
        assert_bytes_equal(read_file(mnt / name), data, name)
    # The file whose close failed may have been saved at unmount (its buffers were kept), but
    # never in part.
    refused = mnt / "refused.dcm"
    if refused.exists():
        assert read_file(refused) in (b"", pattern("refused", FILE_BYTES))


def test_a_cache_larger_than_its_disk_keeps_the_reserve_free(
    small_disk: Path, s3_archive: Archive,
) -> None:
    """40 MiB through a 24 MiB disk with the default 10 GiB --cache-size: uploaded chunks are
    evicted before the disk's reserve is touched, writes and reads all succeed."""
    s3_archive.mount(cache_dir=small_disk / "cache")
    mnt = s3_archive.mountpoint
    written = {f"im-{i:03d}.dcm": pattern(("big", i), FILE_BYTES) for i in range(80)}
    lowest_free = DISK_BYTES
    for name, data in written.items():
        write_file(mnt / name, data)
        lowest_free = min(lowest_free, free_bytes(small_disk))
    assert s3_archive.run_cli("sync", mnt).returncode == 0
    for name, data in written.items():
        assert_bytes_equal(read_file(mnt / name), data, name)
        lowest_free = min(lowest_free, free_bytes(small_disk))
    status = s3_archive.status_json()
    assert not status["failsafe"] and not status["read_only"], status
    assert status["cache_limit_now"] < status["cache_limit"]
    # Staging a chunk and the metadata may dip into the reserve a little, never through it.
    assert lowest_free > RESERVE_BYTES // 2, lowest_free
    assert status["cache_bytes"] <= DISK_BYTES - RESERVE_BYTES


@pytest.mark.expect_log(
    r"its last writes could not be saved at unmount",
    r"could not store the final metadata snapshot",
    r"audit segment \d+",
)
def test_cache_dir_deleted_under_a_live_mount_fails_writes_and_unmounts_cleanly(archive: Archive, tmp_path: Path) -> None:
    """An admin deletes the cache dir of a live mount. Writes fail with EIO (their data has
    nowhere to go), `mifs umount` still finishes the shutdown and says, in one line, that the
    last writes of the open file could not be saved, and everything closed before is in the
    store."""
    cache = tmp_path / "doomed-cache"
    log = archive.base / "logs" / "daemon.log"
    log.parent.mkdir()
    archive.saved_logs.append(log)
    archive.mount(cache_dir=cache, flags=["--log-file", str(log)])
    mnt = archive.mountpoint
    written = {f"im-{i}.dcm": pattern(("kept", i), FILE_BYTES) for i in range(8)}
    for name, data in written.items():
        write_file(mnt / name, data)
    assert archive.run_cli("sync", mnt).returncode == 0

    shutil.rmtree(cache)
    assert errno_of(write_file, mnt / "lost.dcm", pattern("lost", FILE_BYTES)) == errno.EIO

    result = archive.run_cli("umount", mnt)
    assert result.returncode == 8, describe(result)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "the last writes of 1 file(s) could not be saved" in lines[0], describe(result)
    assert not is_fuse_mounted(mnt)
    wait_until(lambda: not daemon_pids(cache), 10, "the daemon to exit")
    archive.mounts = [(m, c) for m, c in archive.mounts if m != mnt]
    assert "Traceback" not in log.read_text()

    archive.mount(cache_dir=tmp_path / "fresh-cache")
    for name, data in written.items():
        assert_bytes_equal(read_file(mnt / name), data, name)
