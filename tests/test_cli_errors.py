"""The CLI's failure contract: the documented exit code, exactly one stderr line starting with
"mifs: error: ", no traceback, nothing written and nothing mounted.

Runs the real `python -m mifs`; uses real stores, keys and mounts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mifs_e2e import (
    Archive,
    assert_cli_error,
    daemon_pids,
    describe,
    file_states,
    is_fuse_mounted,
    read_file,
    run_mifs,
    write_file,
)

# A failed mount may log its one error line to the cache dir's log; that is expected here.
pytestmark = pytest.mark.expect_log(r"\bERROR\b")

EXIT_USAGE, EXIT_STORE, EXIT_KEY, EXIT_ARCHIVE, EXIT_MOUNTPOINT, EXIT_NOT_MIFS = 2, 3, 4, 5, 6, 8


def assert_mount_fails(
    archive: Archive,
    exit_code: int,
    *,
    store: object = None,
    mountpoint: Path | None = None,
    key_file: Path | None = None,
    cache_dir: Path | None = None,
    flags: tuple[object, ...] = (),
) -> str:
    """Asserts one error line and exit_code, and nothing changed or left running; the line."""
    mountpoint = mountpoint or archive.mountpoint
    cache_dir = cache_dir or archive.cache_dir
    before = file_states(archive.store)
    result = run_mifs("mount", store or archive.store, mountpoint, "--key-file", key_file or archive.key_file,
                      "--cache-dir", cache_dir, *flags)
    if result.returncode == 0:  # do not leave an unexpected mount behind
        archive.mounts.append((mountpoint, cache_dir))
    assert_cli_error(result, exit_code)
    assert file_states(archive.store) == before, "the failed mount changed the store"
    if mountpoint.is_dir() and mountpoint != archive.mountpoint or not archive.mounts:
        assert not is_fuse_mounted(mountpoint), f"{mountpoint} is mounted after a failed mount"
    assert not daemon_pids(cache_dir), "a daemon is running after a failed mount"
    return result.stderr.strip()


def other_key(tmp_path: Path) -> Path:
    """A valid key file of another archive."""
    result = run_mifs("init", tmp_path / "other-store", "--key-file", tmp_path / "other.key")
    assert result.returncode == 0, describe(result)
    return tmp_path / "other.key"


def test_wrong_key(archive: Archive, tmp_path: Path) -> None:
    assert_mount_fails(archive, EXIT_KEY, key_file=other_key(tmp_path))


def test_key_file_readable_by_others_is_refused(archive: Archive, tmp_path: Path) -> None:
    loose = tmp_path / "loose.key"
    loose.write_bytes(archive.key_file.read_bytes())
    loose.chmod(0o644)
    assert_mount_fails(archive, EXIT_KEY, key_file=loose)
    result = run_mifs("init", tmp_path / "new-store", "--key-file", loose)
    assert_cli_error(result, EXIT_KEY)
    assert not (tmp_path / "new-store").exists()


def test_missing_or_malformed_key_file(archive: Archive, tmp_path: Path) -> None:
    assert_mount_fails(archive, EXIT_KEY, key_file=tmp_path / "no-such.key")
    bad = tmp_path / "bad.key"
    bad.write_text("MIFS-KEK-1:not-base64!!\n")
    bad.chmod(0o600)
    assert_mount_fails(archive, EXIT_KEY, key_file=bad)


@pytest.mark.parametrize("how", ["edited-field", "garbage", "empty"])
def test_corrupted_descriptor(archive: Archive, how: str) -> None:
    descriptor = archive.store / "mifs-archive.json"
    if how == "edited-field":
        doc = json.loads(descriptor.read_text())
        field = "chunk_size" if "chunk_size" in doc else next(
            k for k, v in doc.items() if isinstance(v, (int, str)) and k not in ("mac", "hmac"))
        doc[field] = doc[field] + 1 if isinstance(doc[field], int) else doc[field] + "0"
        descriptor.write_text(json.dumps(doc))
    elif how == "garbage":
        descriptor.write_bytes(b"\x00\xffnot json at all")
    else:
        descriptor.write_bytes(b"")
    assert_mount_fails(archive, EXIT_ARCHIVE)
    result = run_mifs("status", archive.store, "--json", "--key-file", archive.key_file)
    assert_cli_error(result, EXIT_ARCHIVE)


def test_missing_mountpoint(archive: Archive) -> None:
    assert_mount_fails(archive, EXIT_MOUNTPOINT, mountpoint=archive.base / "no-such-dir")


def test_mountpoint_is_a_file(archive: Archive) -> None:
    path = archive.base / "a-file"
    path.write_bytes(b"x")
    assert_mount_fails(archive, EXIT_MOUNTPOINT, mountpoint=path)
    assert path.read_bytes() == b"x"


def test_mountpoint_not_empty(archive: Archive) -> None:
    write_file(archive.mountpoint / "something", b"x")
    assert_mount_fails(archive, EXIT_MOUNTPOINT)
    assert os.listdir(archive.mountpoint) == ["something"]


def test_mountpoint_already_mounted(mounted: Archive, tmp_path: Path) -> None:
    write_file(mounted.mountpoint / "f", b"live")
    other_cache = tmp_path / "other-cache"
    other_cache.mkdir(mode=0o700)
    result = run_mifs("mount", mounted.store, mounted.mountpoint, "--key-file", mounted.key_file,
                      "--cache-dir", other_cache)
    assert_cli_error(result, EXIT_MOUNTPOINT)
    assert not daemon_pids(other_cache)
    assert read_file(mounted.mountpoint / "f") == b"live"  # the first mount still serves


def test_cache_dir_that_is_a_file_or_an_unwritable_log_file(archive: Archive, tmp_path: Path) -> None:
    not_a_dir = tmp_path / "a-file"
    not_a_dir.write_bytes(b"x")
    line = assert_mount_fails(archive, EXIT_USAGE, cache_dir=not_a_dir)
    assert line == f"mifs: error: cannot use cache dir {not_a_dir}: not a directory", line
    # The daemon could not say why it failed in a log it cannot write: refused before it starts.
    line = assert_mount_fails(archive, EXIT_USAGE, flags=("--log-file", tmp_path / "no-such-dir" / "mifs.log"))
    assert line.startswith("mifs: error: cannot write the log file ") and "No such file or directory" in line, line


def test_same_cache_dir_twice_is_refused(mounted: Archive, tmp_path: Path) -> None:
    second = tmp_path / "second-mp"
    second.mkdir()
    result = run_mifs("mount", mounted.store, second, "--key-file", mounted.key_file,
                      "--cache-dir", mounted.cache_dir)
    if result.returncode == 0:
        mounted.mounts.append((second, mounted.cache_dir))
    assert result.returncode != 0 and "Traceback" not in result.stderr, describe(result)
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("mifs: error: "), describe(result)
    assert not is_fuse_mounted(second)


@pytest.mark.parametrize("url", ["ftp://x", "http://example.invalid/store", "s3:///no-bucket"])
def test_unknown_store_url(archive: Archive, tmp_path: Path, url: str) -> None:
    assert_mount_fails(archive, EXIT_USAGE, store=url)
    result = run_mifs("init", url, "--key-file", tmp_path / "k")
    assert_cli_error(result, EXIT_USAGE)
    assert not (tmp_path / "k").exists(), "a key was generated for a failed init"


def test_missing_store(archive: Archive, tmp_path: Path) -> None:
    assert_mount_fails(archive, EXIT_STORE, store=tmp_path / "no-such-store")
    assert not (tmp_path / "no-such-store").exists()
    empty = tmp_path / "empty-store"
    empty.mkdir()
    assert_mount_fails(archive, EXIT_STORE, store=empty)
    assert os.listdir(empty) == []
    result = run_mifs("init", tmp_path / "no-parent" / "store", "--key-file", tmp_path / "k")
    assert_cli_error(result, EXIT_STORE)
    assert not (tmp_path / "no-parent").exists() and not (tmp_path / "k").exists()


def test_init_over_existing_archive(archive: Archive) -> None:
    before = file_states(archive.store)
    key_before = archive.key_file.read_bytes()
    result = run_mifs("init", archive.store, "--key-file", archive.key_file)
    assert_cli_error(result, EXIT_ARCHIVE)
    result = run_mifs("init", archive.store, "--key-file", archive.base / "fresh.key")
    assert_cli_error(result, EXIT_ARCHIVE)
    assert file_states(archive.store) == before
    assert archive.key_file.read_bytes() == key_before
    assert not (archive.base / "fresh.key").exists(), "a key was generated for a refused init"
    archive.mount()  # the archive is still fine


@pytest.mark.parametrize("size", ["banana", "3", "1TiB", "-4MiB"])
def test_bad_chunk_size(tmp_path: Path, size: str) -> None:
    result = run_mifs("init", tmp_path / "store", "--key-file", tmp_path / "k", "--chunk-size", size)
    assert_cli_error(result, EXIT_USAGE)
    assert not (tmp_path / "store").exists() and not (tmp_path / "k").exists()


@pytest.mark.parametrize(
    "flag, value, message",
    [("--upload-delay", v, "--upload-delay must be a number of seconds") for v in ("-1", "nan", "inf")]
    + [("--pack-size", v, "--pack-size") for v in ("1KiB", "65MiB", "-1", "lots")],
)
def test_bad_tuning_flag(archive: Archive, flag: str, value: str, message: str) -> None:
    result = run_mifs("mount", archive.store, archive.mountpoint, "--key-file", archive.key_file,
                      "--cache-dir", archive.cache_dir, flag, value)
    if result.returncode == 0:
        archive.mounts.append((archive.mountpoint, archive.cache_dir))
    assert_cli_error(result, EXIT_USAGE)
    assert message in result.stderr
    assert not is_fuse_mounted(archive.mountpoint)


def test_umount_of_a_plain_directory(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    result = run_mifs("umount", plain)
    assert_cli_error(result, EXIT_NOT_MIFS)
    result = run_mifs("umount", tmp_path / "missing")
    assert result.returncode != 0 and len(result.stderr.splitlines()) == 1, describe(result)
    assert result.stderr.startswith("mifs: error: ") and "Traceback" not in result.stderr


def test_umount_busy_mount(mounted: Archive) -> None:
    write_file(mounted.mountpoint / "f", b"x")
    fd = os.open(mounted.mountpoint / "f", os.O_RDONLY)
    try:
        result = run_mifs("umount", mounted.mountpoint)
        assert_cli_error(result, EXIT_MOUNTPOINT)
        assert is_fuse_mounted(mounted.mountpoint)
        assert os.read(fd, 10) == b"x"
    finally:
        os.close(fd)


def test_relative_paths_are_resolved_against_the_callers_cwd(archive: Archive) -> None:
    """`cd base && mifs mount store mnt --key-file key --cache-dir cache` works."""
    result = run_mifs("mount", "store", "mnt", "--key-file", "key", "--cache-dir", "cache", cwd=archive.base)
    if is_fuse_mounted(archive.mountpoint):
        archive.mounts.append((archive.mountpoint, archive.cache_dir))
    assert result.returncode == 0, describe(result)
    assert is_fuse_mounted(archive.mountpoint)
    write_file(archive.mountpoint / "f", b"relative")
    result = run_mifs("umount", "mnt", cwd=archive.base)
    assert result.returncode == 0, describe(result)
    archive.mounts.clear()
    assert not is_fuse_mounted(archive.mountpoint)

