"""End-to-end: online master-key rotation (`mifs key rotate`, `mifs key status`) on real mounts.

Rotation while a writer and a reader are busy on SeaweedFS; afterwards every file is
byte-exact, a mount with only the new key opens everything (also from the store alone) and
one with only the old key is refused; a rotation killed with SIGKILL resumes and completes.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from mifs_e2e import Archive, assert_cli_error, assert_bytes_equal, describe, pattern, read_file, wait_until, write_file

EXIT_KEY = 4
EXIT_KEY_RETIRED = 11


def key_status(arc: Archive, target: object | None = None, *flags: object) -> dict[str, Any]:
    result = arc.run_cli("key", "status", target or arc.mountpoint, "--json", *flags)
    assert result.returncode == 0, describe(result)
    value: dict[str, Any] = json.loads(result.stdout)
    return value


def counts_by_role(status: dict[str, Any]) -> dict[str, int]:
    """Files' data keys each KEK wraps (the registered objects, i.e. the audit key, apart)."""
    return {k["role"]: k["files"] for k in status["keys"]}


def objects_by_role(status: dict[str, Any]) -> dict[str, int]:
    return {k["role"]: k["objects"] for k in status["keys"]}


def populate(root: Path, count: int, size: int = 3000) -> dict[str, bytes]:
    files = {}
    (root / "base").mkdir()
    for i in range(count):
        data = pattern(("base", i), size + i)
        write_file(root / "base" / f"f{i:04d}", data)
        files[f"base/f{i:04d}"] = data
    return files


@pytest.mark.timeout(280)
def test_rotation_online_under_load_on_s3(s3_archive: Archive) -> None:
    arc = s3_archive
    arc.mount()
    files = populate(arc.mountpoint, 240)
    before = key_status(arc)
    old_id = before["current_kek_id"]
    assert counts_by_role(before) == {"current": 240}
    assert objects_by_role(before) == {"current": 1}, before  # the audit trail's key

    errors: list[str] = []
    written: dict[str, bytes] = {}
    stop = threading.Event()

    def writer() -> None:
        (arc.mountpoint / "new").mkdir()
        for i in range(400):  # bounded
            if stop.is_set() and i > 20:
                return
            data = pattern(("new", i), 2000 + i)
            try:
                write_file(arc.mountpoint / "new" / f"n{i:04d}", data)
                written[f"new/n{i:04d}"] = data
            except OSError as exc:
                errors.append(f"write n{i}: {exc}")

    def reader() -> None:
        names = sorted(files)
        for i in range(4000):  # bounded
            if stop.is_set() and i > 50:
                return
            name = names[(i * 7) % len(names)]
            try:
                if read_file(arc.mountpoint / name) != files[name]:
                    errors.append(f"read {name}: wrong bytes")
            except OSError as exc:
                errors.append(f"read {name}: {exc}")

    threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
    for t in threads:
        t.start()
    try:
        new_key = arc.base / "key2"
        result = arc.run_cli("key", "rotate", arc.mountpoint, "--new-key-file", new_key, "--generate",
                             "--batch-size", "8", "--throttle", "0.02", timeout=240)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    assert result.returncode == 0, describe(result)
    assert "key rotation complete" in result.stdout and "retired" in result.stdout, describe(result)
    assert not errors, errors[:10]
    assert os.stat(new_key).st_mode & 0o777 == 0o600

    after = key_status(arc)
    new_id = after["current_kek_id"]
    assert new_id != old_id and after["descriptor_kek_id"] == new_id and after["rotation"] is None
    total = 240 + len(written)
    assert counts_by_role(after) == {"current": total, "retired": 0}, after
    assert objects_by_role(after) == {"current": 1, "retired": 0}, after
    retired = next(k for k in after["keys"] if k["role"] == "retired")
    assert retired["kek_id"] == old_id and retired["replaced_by"] == new_id

    expected = {**files, **written}
    for name, data in expected.items():
        assert_bytes_equal(read_file(arc.mountpoint / name), data, name)
    arc.umount()

    # Only the old key: refused, with its own exit code and a message naming the new key id.
    refused = arc.try_mount(key_file=arc.key_file)
    assert_cli_error(refused, EXIT_KEY_RETIRED)
    assert new_id in refused.stderr

    # Only the new key, with the original cache dir (re-keyed in place)
    arc.mount(key_file=new_key)
    for name in list(expected)[::17]:
        assert_bytes_equal(read_file(arc.mountpoint / name), expected[name], name)
    arc.umount()
    # and on a fresh cache dir: the metadata is rebuilt from the store alone. (Not in the
    # other order: once another cache dir has written to the archive, the original one is
    # behind the store and a writable mount of it is refused.)
    fresh = arc.base / "cache-fresh"
    fresh.mkdir(mode=0o700)
    arc.mount(key_file=new_key, cache_dir=fresh)
    for name, data in expected.items():
        assert_bytes_equal(read_file(arc.mountpoint / name), data, name)
    assert counts_by_role(key_status(arc)) == {"current": total, "retired": 0}


@pytest.mark.expect_log(r"detached the dead mifs mount")
@pytest.mark.timeout(280)
def test_rotation_killed_midway_resumes(archive: Archive) -> None:
    arc = archive
    arc.mount()
    files = populate(arc.mountpoint, 300, size=500)
    old_id = key_status(arc)["current_kek_id"]
    new_key = arc.base / "key2"
    result = arc.run_cli("key", "rotate", arc.mountpoint, "--new-key-file", new_key, "--generate",
                         "--batch-size", "3", "--throttle", "0.05", "--no-wait")
    assert result.returncode == 0, describe(result)

    def midway() -> dict[str, Any] | None:
        status = key_status(arc)
        rotation = status["rotation"]
        done = rotation and rotation.get("files_done", 0)
        return status if rotation and 30 <= done <= 200 else None

    status = wait_until(midway, 60, "the rotation to be part-way", interval=0.05)
    new_id = status["rotation"]["new_kek_id"]
    assert status["current_kek_id"] == new_id
    arc.kill_daemon()

    # Offline: both keys still referenced, the rotation recorded in the store.
    offline = key_status(arc, arc.store, "--key-file", arc.key_file, "--cache-dir", arc.cache_dir)
    roles = counts_by_role(offline)
    assert offline["rotation"]["old_kek_id"] == old_id and offline["rotation"]["new_kek_id"] == new_id
    assert roles["current"] + roles["old (rotation in progress)"] == 300
    assert 0 < roles["old (rotation in progress)"] < 300, offline

    # The next mount (still given the old key: the rotation record says where the new one is)
    # resumes; `mifs key rotate` without a new key waits for it.
    arc.mount()
    result = arc.run_cli("key", "rotate", arc.mountpoint, timeout=200)
    assert result.returncode == 0, describe(result)
    after = key_status(arc)
    assert after["current_kek_id"] == new_id and after["rotation"] is None
    assert counts_by_role(after) == {"current": 300, "retired": 0}
    for name, data in files.items():
        assert_bytes_equal(read_file(arc.mountpoint / name), data, name)
    arc.umount()
    assert_cli_error(arc.try_mount(), EXIT_KEY_RETIRED)
    arc.mount(key_file=new_key)
    assert read_file(arc.mountpoint / "base" / "f0299") == files["base/f0299"]


def test_rotate_usage_errors(mounted: Archive) -> None:
    arc = mounted
    # the current key as the "new" one
    assert_cli_error(arc.run_cli("key", "rotate", arc.mountpoint, "--new-key-file", arc.key_file), 12)
    # nothing in progress, no new key
    assert_cli_error(arc.run_cli("key", "rotate", arc.mountpoint), 12)
    assert_cli_error(arc.run_cli("key", "rotate", arc.mountpoint, "--generate"), 2)
    missing = arc.base / "missing.key"
    assert_cli_error(arc.run_cli("key", "rotate", arc.mountpoint, "--new-key-file", missing), EXIT_KEY)
    assert counts_by_role(key_status(arc)) == {"current": 0}
