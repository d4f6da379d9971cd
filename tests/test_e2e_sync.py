"""End-to-end: `mifs sync` returns once every file closed before it is in the store, data and
metadata, so that the store alone (a fresh cache dir, after kill -9) serves them; with the
store down it reports what is missing and exits 3 at its --timeout."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from mifs_e2e import (
    Archive, KiB, assert_bytes_equal, assert_cli_error, describe, nonzero_pattern, read_file, write_file,
)
from s3server import SeaweedS3
from test_e2e_s3 import OUTAGE_LOG, idle

# Without `mifs sync`, nothing written here would be durable (so shipped) for a minute.
SLOW_DURABILITY = "[tuning]\nsync_interval = 60\n"


def write_series(mp: Path, n: int, tag: str) -> dict[str, bytes]:
    files = {f"P1/S1/{tag}/IM{i}.dcm": nonzero_pattern((tag, i), 200 * KiB + 17 * i) for i in range(n)}
    for rel, data in files.items():
        (mp / rel).parent.mkdir(parents=True, exist_ok=True)
        write_file(mp / rel, data)
    return files


@pytest.mark.expect_log(r"detached the dead mifs mount")
def test_after_sync_the_store_alone_holds_every_closed_file(archive: Archive, tmp_path: Path) -> None:
    config = tmp_path / "slow.toml"
    config.write_text(SLOW_DURABILITY)
    archive.mount(flags=["--config", config, "--upload-delay", "60"])
    # The mount's first metadata snapshot makes what it covers durable: let it pass first.
    files = write_series(archive.mountpoint, 1, "SE0")
    archive.wait_status(lambda s: s["metadata_shipped_seq"] >= s["metadata_commit_seq"] > 0, 30, "the first snapshot")
    files |= write_series(archive.mountpoint, 8, "SE1")
    before = archive.status_json()
    assert before["metadata_shipped_seq"] < before["metadata_commit_seq"], before

    result = archive.run_cli("sync", archive.mountpoint, "--json")
    assert result.returncode == 0, describe(result)
    done = json.loads(result.stdout)
    assert set(done) == {"objects", "bytes", "metadata_seq", "seconds"}
    assert 0 <= done["objects"] <= len(files) and done["metadata_seq"] >= before["metadata_commit_seq"]
    after = archive.status_json()
    assert after["pending_uploads"] == 0 and after["metadata_shipped_seq"] == done["metadata_seq"], after

    archive.kill_daemon()  # no unmount: no final snapshot, no last uploads
    fresh = tmp_path / "fresh-cache"
    fresh.mkdir(mode=0o700)
    archive.mount(cache_dir=fresh)
    for rel, data in files.items():
        assert_bytes_equal(read_file(archive.mountpoint / rel), data, f"{rel} from the store alone")
    human = archive.run_cli("sync", archive.mountpoint)
    commit = archive.status_json()["metadata_commit_seq"]
    assert commit >= done["metadata_seq"] > 0
    assert human.returncode == 0 and "in the store: 0 objects" in human.stdout, describe(human)
    assert f"metadata up to commit {commit} " in human.stdout, describe(human)


@pytest.mark.chunk_size("64KiB")
@pytest.mark.expect_log(*OUTAGE_LOG)
def test_sync_during_an_outage_says_what_is_missing(s3_server: SeaweedS3, s3_archive: Archive) -> None:
    arc = s3_archive
    arc.mount()
    files = write_series(arc.mountpoint, 1, "before")
    arc.wait_status(idle, 30, "the first file to be uploaded")
    s3_server.stop(grace=0)
    files |= write_series(arc.mountpoint, 2, "during")  # 4 chunks each, waiting for the store
    begin = time.monotonic()
    result = arc.run_cli("sync", arc.mountpoint, "--timeout", "3", timeout=60)
    assert_cli_error(result, 3)
    assert "of 8 objects were still not in the store after 3 s" in result.stderr, describe(result)
    assert time.monotonic() - begin < 20
    assert arc.status_json()["pending_uploads"] == 8

    s3_server.start()
    result = arc.run_cli("sync", arc.mountpoint, "--json", "--quiet", timeout=300)
    assert result.returncode == 0 and result.stderr == "", describe(result)
    assert 0 <= json.loads(result.stdout)["objects"] <= 8  # uploads resume by themselves too
    assert idle(arc.status_json())
    arc.umount()
    arc.wipe_cache()
    arc.mount()
    for rel, data in files.items():
        assert_bytes_equal(read_file(arc.mountpoint / rel), data, f"{rel} from the store after the outage")


def test_sync_refuses_bad_input(archive: Archive) -> None:
    archive.mount()
    assert_cli_error(archive.run_cli("sync", archive.mountpoint, "--timeout", "0"), 2)
    assert_cli_error(archive.run_cli("sync", archive.mountpoint, "--timeout", "soon"), 2)
    assert_cli_error(archive.run_cli("sync", archive.base / "not-a-mount"), 8)
