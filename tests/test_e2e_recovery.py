"""End-to-end: the store alone (with the key) rebuilds a gateway: a new, empty cache dir
gets the whole tree back, also after kill -9 and loss of the old cache dir, and a tampered
newest metadata snapshot is skipped, never trusted.

Talks to mifs only through the CLI, the mounted filesystem and the store directory
(docs/FORMAT.md section 9).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from mifs_e2e import Archive, assert_cli_error, describe, link_groups, pattern, snapshot, wait_until, write_file

pytestmark = pytest.mark.chunk_size("64KiB")


def build_tree(mp: Path, tag: str) -> None:
    """Files of several sizes, nested dirs, a hard link, symlinks, xattrs, modes and times."""
    c = 64 * 1024
    (mp / tag / "sub" / "deeper").mkdir(parents=True)
    for i, size in enumerate([0, 1, c - 1, c, 3 * c + 5]):
        write_file(mp / tag / "sub" / f"f{i}", pattern((tag, i), size))
    write_file(mp / tag / "sub" / "deeper" / "big", pattern((tag, "big"), 10 * c + 7))
    os.link(mp / tag / "sub" / "f4", mp / tag / "hardlink")
    os.symlink("sub/f1", mp / tag / "symlink")
    os.setxattr(mp / tag / "sub" / "f2", "user.note", tag.encode())
    os.chmod(mp / tag / "sub" / "f3", 0o600)
    os.utime(mp / tag / "sub" / "f0", ns=(1_700_000_000_000_000_001, 1_600_000_000_000_000_002))


def attributes(root: Path) -> dict[str, tuple[object, ...]]:
    """Mode, owner, mtime (files) and xattrs of every entry."""
    result: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            xattrs = () if stat.S_ISLNK(st.st_mode) else tuple(
                sorted((k, os.getxattr(path, k)) for k in os.listxattr(path)))
            mtime = st.st_mtime_ns if stat.S_ISREG(st.st_mode) else 0
            result[os.path.relpath(path, root)] = (oct(st.st_mode), st.st_uid, st.st_gid, mtime, xattrs)
    return result


def state(root: Path) -> tuple[object, ...]:
    return snapshot(root), link_groups(root), attributes(root)


def assert_same_state(actual: tuple[object, ...], expected: tuple[object, ...], when: str) -> None:
    for what, a, e in zip(("tree", "hard links", "attributes"), actual, expected):
        assert a == e, f"{when}: {what} differ"


def new_cache_dir(archive: Archive, name: str) -> Path:
    """Point the archive at a new, empty cache dir (a new host)."""
    path = archive.base / name
    path.mkdir(mode=0o700)
    archive.cache_dir = path
    archive.cache_dirs.append(path)
    return path


def test_fresh_cache_dir_rebuilds_the_tree(archive: Archive) -> None:
    archive.mount(flags=["--xattrs"])
    build_tree(archive.mountpoint, "first")
    archive.remount()
    build_tree(archive.mountpoint, "second")
    os.rename(archive.mountpoint / "first" / "sub" / "f1", archive.mountpoint / "second" / "moved")
    expected = state(archive.mountpoint)
    archive.umount()
    new_cache_dir(archive, "cache-new-host")
    archive.mount()
    assert_same_state(state(archive.mountpoint), expected, "after rebuilding from the store")
    write_file(archive.mountpoint / "after", b"new host writes")
    archive.remount()
    assert (archive.mountpoint / "after").read_bytes() == b"new host writes"


@pytest.mark.expect_log(r"\bWARNING\b")
def test_host_loss_after_kill_9(archive: Archive) -> None:
    """Once uploads are done and the metadata journal is shipped, kill -9 plus losing the
    whole cache dir loses nothing."""
    archive.mount(flags=["--xattrs"])
    build_tree(archive.mountpoint, "data")
    expected = state(archive.mountpoint)

    def caught_up() -> bool:
        result = archive.status()
        assert result.returncode == 0, describe(result)
        doc = json.loads(result.stdout)
        return bool(doc["pending_uploads"] == 0
                    and doc["metadata_shipped_seq"] >= doc["metadata_commit_seq"] > 0)

    wait_until(caught_up, 60, "uploads and metadata shipping to catch up")
    archive.kill_daemon()
    shutil.rmtree(archive.cache_dir)
    new_cache_dir(archive, "cache-after-loss")
    archive.mount()
    assert_same_state(state(archive.mountpoint), expected, "after host loss")


@pytest.mark.expect_log(
    r"ERROR .*metadata snapshot \S+ failed authentication; trying an older one",
    r"ERROR .*newest metadata snapshot in the store \(\S+\) failed authentication .*refusing to mount an older state",
)
def test_tampered_newest_snapshot_is_not_trusted(archive: Archive) -> None:
    for round_ in range(3):  # every clean unmount stores a snapshot; two are kept
        archive.mount(flags=["--xattrs"])
        build_tree(archive.mountpoint, f"round{round_}")
        expected = state(archive.mountpoint)
        archive.umount()
    snapshots = sorted((archive.store / "meta" / "snapshot").iterdir())
    assert len(snapshots) == 2, [p.name for p in snapshots]
    blob = bytearray(snapshots[-1].read_bytes())
    blob[len(blob) // 2] ^= 0x40
    snapshots[-1].write_bytes(bytes(blob))
    new_cache_dir(archive, "cache-new-host")
    result = archive.try_mount()
    if result.returncode != 0:
        # Refusing is safe: the snapshot names show that newer metadata existed.
        assert_cli_error(result, 5)
        return
    # Mounting is only right if the older snapshot plus the journal reproduce the newest
    # state: a silently older tree would be a rollback an attacker can force.
    assert_same_state(state(archive.mountpoint), expected, "rebuilt past a tampered snapshot")


@pytest.mark.expect_log(r"WARNING .*the store holds metadata up to commit \d+, but the cache dir .* only up to commit \d+")
def test_a_cache_dir_older_than_the_store_is_refused(archive: Archive) -> None:
    """A failover host with its own stale cache, or a cache disk restored from an old copy,
    must not fork the archive's metadata: the writable mount is refused with one clear line,
    a read-only one shows what the cache knows, and moving the cache away rebuilds it all."""
    mp = archive.mountpoint
    archive.mount()
    write_file(mp / "before", b"written before the copy")
    archive.umount()
    old_copy = archive.base / "cache-copy"
    shutil.copytree(archive.cache_dir, old_copy)
    archive.mount()
    write_file(mp / "after", b"written after the copy")
    archive.umount()
    shutil.rmtree(archive.cache_dir)
    shutil.copytree(old_copy, archive.cache_dir)

    result = archive.try_mount()
    assert_cli_error(result, 5)
    assert "only up to commit" in result.stderr and "move the cache dir away" in result.stderr, describe(result)
    assert not os.path.ismount(mp)

    archive.mount(options=["ro"])
    assert (mp / "before").read_bytes() == b"written before the copy"
    assert not (mp / "after").exists()
    archive.umount()

    os.rename(archive.cache_dir, archive.base / "cache-stale")
    new_cache_dir(archive, "cache")
    archive.mount()
    assert (mp / "before").read_bytes() == b"written before the copy"
    assert (mp / "after").read_bytes() == b"written after the copy"
