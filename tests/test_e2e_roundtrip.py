"""End-to-end: bytes and POSIX metadata survive a real mount, an unmount and a remount.

Talks to mifs only through the CLI and the mounted filesystem.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import mmap
import os
import random
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from dicom_factory import StudySpec, write_study
from mifs_e2e import (
    TESTS_DIR,
    KiB,
    MiB,
    Archive,
    assert_bytes_equal,
    assert_errno,
    describe,
    first_difference,
    pattern,
    read_file,
    snapshot,
    write_file,
)

SMALL_CHUNK = 64 * KiB


def sizes_around(chunk: int) -> list[int]:
    return [0, 1, 100, 4095, 4096, 4097, chunk - 1, chunk, chunk + 1, 2 * chunk - 1, 2 * chunk,
            2 * chunk + 1, 20 * chunk + 777]


def write_and_verify_sizes(mp: Path, sizes: list[int], pieces: tuple[int, ...]) -> dict[str, bytes]:
    """One file per (size, piece size); returns name -> expected bytes."""
    expected = {}
    for size in sizes:
        for piece in pieces:
            name = f"f_{size}_{piece}"
            data = pattern(name, size)
            write_file(mp / name, data, piece=piece)
            expected[name] = data
    return expected


def verify_files(root: Path, expected: dict[str, bytes], when: str) -> None:
    problems = []
    for name, data in expected.items():
        path = root / name
        size = os.stat(path).st_size
        if size != len(data):
            problems.append(f"{name}: st_size {size}, expected {len(data)}")
            continue
        actual = read_file(path)
        if actual != data:
            problems.append(f"{name}: {first_difference(actual, data)}")
    assert not problems, f"{when}:\n" + "\n".join(problems)


# --- file contents ------------------------------------------------------------------------


@pytest.mark.chunk_size("64KiB")
def test_sizes_around_chunk_boundaries(mounted: Archive) -> None:
    mp = mounted.mountpoint
    expected = write_and_verify_sizes(mp, sizes_around(SMALL_CHUNK), pieces=(0, 4096, 1000))
    verify_files(mp, expected, "read back through the same mount")
    mounted.remount()
    verify_files(mp, expected, "after remount")


def test_sizes_default_chunk_size(mounted: Archive) -> None:
    chunk = 4 * MiB
    mp = mounted.mountpoint
    expected = write_and_verify_sizes(mp, [0, 1, chunk - 1, chunk, chunk + 1, 9 * MiB + 7], pieces=(0, 4096))
    verify_files(mp, expected, "read back through the same mount")
    mounted.remount()
    verify_files(mp, expected, "after remount")


@pytest.mark.chunk_size("64KiB")
def test_sparse_files_read_zeros_in_holes(mounted: Archive) -> None:
    mp = mounted.mountpoint
    c = SMALL_CHUNK
    islands = [(0, b"head"), (3 * c + 10, pattern("mid", 5000)), (10 * c - 2, b"across"), (40 * c + 1, b"tail")]
    model = bytearray()
    fd = os.open(mp / "sparse", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        for offset, data in islands:
            os.lseek(fd, offset, os.SEEK_SET)
            os.write(fd, data)
            model[len(model):offset] = bytes(max(0, offset - len(model)))
            model[offset:offset + len(data)] = data
    finally:
        os.close(fd)
    # a file that is one hole followed by one byte, far past the first chunk
    with open(mp / "far", "wb") as fh:
        fh.seek(100 * MiB)
        fh.write(b"!")
    # a file extended by truncate only: all hole
    with open(mp / "allhole", "wb") as fh:
        fh.truncate(5 * c + 3)

    def check(when: str) -> None:
        assert os.stat(mp / "sparse").st_size == len(model), when
        assert_bytes_equal(read_file(mp / "sparse"), bytes(model), f"sparse file {when}")
        assert os.stat(mp / "far").st_size == 100 * MiB + 1, when
        with open(mp / "far", "rb") as fh:
            fh.seek(100 * MiB - 3 * c)
            assert_bytes_equal(fh.read(), bytes(3 * c) + b"!", f"end of far sparse file {when}")
            fh.seek(7 * c - 5)
            assert_bytes_equal(fh.read(2 * c), bytes(2 * c), f"hole of far sparse file {when}")
        assert_bytes_equal(read_file(mp / "allhole"), bytes(5 * c + 3), f"truncate-extended file {when}")

    check("before remount")
    mounted.remount()
    check("after remount")


@pytest.mark.chunk_size("64KiB")
def test_random_overwrites(mounted: Archive) -> None:
    mp = mounted.mountpoint
    c = SMALL_CHUNK
    rng = random.Random(1234)
    model = bytearray(pattern("initial", 8 * c + 333))
    write_file(mp / "f", bytes(model))
    keep = os.open(mp / "f", os.O_RDWR)  # half of the writes go through one long-lived handle
    try:
        for step in range(200):
            offset = rng.randrange(0, len(model) + c)
            data = pattern(("w", step), rng.choice([1, 17, 4096, c - 1, c, c + 1, rng.randrange(1, 3 * c)]))
            if step % 2:
                os.pwrite(keep, data, offset)
            else:
                fd = os.open(mp / "f", os.O_WRONLY)
                try:
                    os.pwrite(fd, data, offset)
                finally:
                    os.close(fd)
            if offset > len(model):
                model.extend(bytes(offset - len(model)))
            model[offset:offset + len(data)] = data
            if step % 25 == 0:
                assert_bytes_equal(os.pread(keep, len(model) + 10, 0), bytes(model), f"after write {step} (same handle)")
                assert_bytes_equal(read_file(mp / "f"), bytes(model), f"after write {step} (new handle)")
    finally:
        os.close(keep)
    assert_bytes_equal(read_file(mp / "f"), bytes(model), "after all writes")
    mounted.remount()
    assert os.stat(mp / "f").st_size == len(model)
    assert_bytes_equal(read_file(mp / "f"), bytes(model), "after remount")


@pytest.mark.chunk_size("64KiB")
def test_truncate_shrink_then_grow_reads_zeros(mounted: Archive) -> None:
    mp = mounted.mountpoint
    c = SMALL_CHUNK
    path = mp / "t"
    data = pattern("t", 5 * c + 100)
    write_file(path, data)
    model = bytearray(data)

    def truncate(size: int, via_fd: bool) -> None:
        if via_fd:
            fd = os.open(path, os.O_RDWR)
            try:
                os.ftruncate(fd, size)
            finally:
                os.close(fd)
        else:
            os.truncate(path, size)
        del model[size:]
        model.extend(bytes(size - len(model)))
        assert os.stat(path).st_size == size
        assert_bytes_equal(read_file(path), bytes(model), f"after truncate to {size}")

    for i, size in enumerate([2 * c + 17, 7 * c, c, 3 * c - 1, 3 * c + 5, 0, 2 * c + 1]):
        truncate(size, via_fd=bool(i % 2))
    # a write past the end after a shrink must not resurrect old bytes in between
    os.truncate(path, c + 10)
    del model[c + 10:]
    with open(path, "r+b") as fh:
        fh.seek(4 * c)
        fh.write(b"XYZ")
    model.extend(bytes(4 * c - len(model)) + b"XYZ")
    assert_bytes_equal(read_file(path), bytes(model), "after shrink and write past end")
    # O_TRUNC
    write_file(mp / "o_trunc", pattern("big", 3 * c))
    write_file(mp / "o_trunc", b"small")
    mounted.remount()
    assert_bytes_equal(read_file(path), bytes(model), "after remount")
    assert read_file(mp / "o_trunc") == b"small"


@pytest.mark.chunk_size("64KiB")
def test_append(mounted: Archive) -> None:
    mp = mounted.mountpoint
    model = bytearray()
    for i, size in enumerate([0, 1, 4095, SMALL_CHUNK, 3, SMALL_CHUNK + 7, 10000]):
        data = pattern(("a", i), size)
        fd = os.open(mp / "log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.lseek(fd, 0, os.SEEK_SET)  # O_APPEND must ignore the position
            os.write(fd, data)
        finally:
            os.close(fd)
        model += data
        assert os.stat(mp / "log").st_size == len(model)
    assert_bytes_equal(read_file(mp / "log"), bytes(model), "after appends")
    mounted.remount()
    assert_bytes_equal(read_file(mp / "log"), bytes(model), "after remount")


# --- namespace ----------------------------------------------------------------------------


def test_directories_and_rename(mounted: Archive, tmp_path: Path) -> None:
    mp = mounted.mountpoint
    (mp / "a" / "b" / "c").mkdir(parents=True)
    write_file(mp / "a" / "b" / "c" / "deep", b"deep")
    write_file(mp / "src", b"source bytes")
    write_file(mp / "dst", b"old target, longer than the source")
    dst_ino = os.stat(mp / "dst").st_ino
    os.rename(mp / "src", mp / "dst")  # replaces an existing target
    assert not (mp / "src").exists()
    assert read_file(mp / "dst") == b"source bytes"
    assert os.stat(mp / "dst").st_ino != dst_ino
    os.rename(mp / "a" / "b", mp / "a" / "b2")  # rename a directory with contents
    assert read_file(mp / "a" / "b2" / "c" / "deep") == b"deep"
    (mp / "other").mkdir()
    os.rename(mp / "a" / "b2", mp / "other" / "moved")  # move between directories
    (mp / "empty").mkdir()
    os.rename(mp / "other" / "moved", mp / "empty")  # a directory may replace an empty one
    assert sorted(os.listdir(mp)) == ["a", "dst", "empty", "other"]
    assert os.listdir(mp / "a") == [] and os.listdir(mp / "other") == []
    assert read_file(mp / "empty" / "c" / "deep") == b"deep"
    os.rename(mp / "dst", mp / "empty" / "c" / "dst")
    os.rename(mp / "empty" / "c" / "dst", mp / "dst")  # and back
    os.rmdir(mp / "a")
    assert os.stat(mp / "empty").st_nlink in (1, 3)  # 2 + one subdirectory, or 1 if not counted
    expected = snapshot(mp)
    mounted.remount()
    assert snapshot(mp) == expected


def renameat2(old: Path, new: Path, flags: int) -> int:
    """renameat2(2) through libc; 0 or the errno."""
    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd = -100
    result = libc.renameat2(at_fdcwd, os.fsencode(old), at_fdcwd, os.fsencode(new), ctypes.c_uint(flags))
    return 0 if result == 0 else ctypes.get_errno()


RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


def test_rename_noreplace(mounted: Archive) -> None:
    mp = mounted.mountpoint
    write_file(mp / "a", b"A")
    write_file(mp / "b", b"B")
    rc = renameat2(mp / "a", mp / "b", RENAME_NOREPLACE)
    assert rc in (errno.EEXIST, errno.EINVAL), os.strerror(rc) if rc else "NOREPLACE replaced the target"
    assert read_file(mp / "a") == b"A" and read_file(mp / "b") == b"B"
    if rc == errno.EEXIST:  # supported: a free target must work
        assert renameat2(mp / "a", mp / "c", RENAME_NOREPLACE) == 0
        assert not (mp / "a").exists() and read_file(mp / "c") == b"A"


def test_rename_exchange(mounted: Archive) -> None:
    mp = mounted.mountpoint
    write_file(mp / "a", b"A" * 10)
    (mp / "d").mkdir()
    write_file(mp / "d" / "inner", b"inner")
    rc = renameat2(mp / "a", mp / "d", RENAME_EXCHANGE)
    assert rc in (0, errno.EINVAL), os.strerror(rc)
    if rc == errno.EINVAL:
        assert read_file(mp / "a") == b"A" * 10 and read_file(mp / "d" / "inner") == b"inner"
        return
    assert read_file(mp / "d") == b"A" * 10
    assert read_file(mp / "a" / "inner") == b"inner"
    assert renameat2(mp / "missing", mp / "a", RENAME_EXCHANGE) == errno.ENOENT
    mounted.remount()
    assert read_file(mp / "d") == b"A" * 10
    assert read_file(mp / "a" / "inner") == b"inner"


def test_hard_links(mounted: Archive) -> None:
    mp = mounted.mountpoint
    write_file(mp / "orig", b"one")
    (mp / "sub").mkdir()
    os.link(mp / "orig", mp / "sub" / "link")
    a, b = os.stat(mp / "orig"), os.stat(mp / "sub" / "link")
    assert a.st_ino == b.st_ino and a.st_nlink == b.st_nlink == 2
    with open(mp / "sub" / "link", "r+b") as fh:
        fh.write(b"TWO!")
    assert read_file(mp / "orig") == b"TWO!"
    os.link(mp / "orig", mp / "third")
    os.unlink(mp / "orig")
    assert os.stat(mp / "third").st_nlink == 2
    assert_errno(errno.EPERM, os.link, mp / "sub", mp / "dirlink")  # no links to directories
    mounted.remount()
    a, b = os.stat(mp / "third"), os.stat(mp / "sub" / "link")
    assert a.st_ino == b.st_ino and a.st_nlink == 2
    assert read_file(mp / "third") == b"TWO!"
    with open(mp / "third", "ab") as fh:
        fh.write(b"+")
    assert read_file(mp / "sub" / "link") == b"TWO!+"


def test_symlinks(mounted: Archive) -> None:
    mp = mounted.mountpoint
    (mp / "dir").mkdir()
    write_file(mp / "dir" / "target", b"target bytes")
    os.symlink("dir/target", mp / "rel")
    os.symlink(str(mp / "dir"), mp / "abs")
    os.symlink("nowhere/" + "x" * 200, mp / "dangling")
    long_target = "/".join(["d" * 200] * 10)  # a 2 KB target
    os.symlink(long_target, mp / "long")

    def check() -> None:
        assert os.readlink(mp / "rel") == "dir/target"
        assert os.readlink(mp / "abs") == str(mp / "dir")
        assert os.readlink(mp / "long") == long_target
        assert stat.S_ISLNK(os.lstat(mp / "rel").st_mode)
        assert os.lstat(mp / "rel").st_size == len("dir/target")
        assert read_file(mp / "rel") == b"target bytes"
        assert read_file(mp / "abs" / "target") == b"target bytes"
        assert_errno(errno.ENOENT, os.stat, mp / "dangling")
        assert os.readlink(mp / "dangling").startswith("nowhere/")

    assert_errno(errno.EEXIST, os.symlink, "x", mp / "rel")
    assert_errno(errno.EINVAL, os.readlink, mp / "dir" / "target")
    mounted.check_across_remount(check)


def test_xattrs(mounted: Archive) -> None:
    mounted.umount()
    mounted.mount(flags=["--xattrs"])
    mp = mounted.mountpoint
    write_file(mp / "f", b"x")
    (mp / "d").mkdir()
    expected = {
        mp / "f": {"user.small": b"v2", "user.binary": b"\x00\x01\xff\x00zero inside", "user.big": pattern("xattr", 4000)},
        mp / "d": {"user.ondir": b"dir value"},
    }
    os.setxattr(mp / "f", "user.small", b"v1")
    os.setxattr(mp / "f", "user.empty", b"")
    for path, attrs in expected.items():
        for name, value in attrs.items():
            os.setxattr(path, name, value)  # user.small: replaces v1
    assert_errno(errno.EEXIST, os.setxattr, mp / "f", "user.small", b"x", os.XATTR_CREATE)
    assert_errno(errno.ENODATA, os.setxattr, mp / "f", "user.absent", b"x", os.XATTR_REPLACE)
    assert_errno(errno.ENODATA, os.getxattr, mp / "f", "user.absent")
    assert os.getxattr(mp / "f", "user.empty") == b""
    os.removexattr(mp / "f", "user.empty")
    assert_errno(errno.ENODATA, os.removexattr, mp / "f", "user.empty")

    def check() -> None:
        for path, attrs in expected.items():
            assert sorted(os.listxattr(path)) == sorted(attrs), path
            for name, value in attrs.items():
                assert os.getxattr(path, name) == value, (path, name)

    mounted.check_across_remount(check)


def test_xattrs_are_off_unless_asked_for_or_already_in_the_archive(mounted: Archive) -> None:
    """Off by default (the kernel then stops asking for security.capability before every
    write(2)); an archive holding xattrs turns them on by itself; --no-xattrs hides them."""
    mp = mounted.mountpoint
    write_file(mp / "f", b"x")
    assert mounted.status_json()["xattrs"] is False
    assert_errno(errno.EOPNOTSUPP, os.setxattr, mp / "f", "user.a", b"1")
    assert_errno(errno.EOPNOTSUPP, os.getxattr, mp / "f", "user.a")
    assert_errno(errno.EOPNOTSUPP, os.listxattr, mp / "f")
    write_file(mp / "small-writes", pattern("4k", 64 * 1024), piece=4096)  # no getxattr needed
    mounted.umount()
    mounted.mount(flags=["--xattrs"])
    os.setxattr(mp / "f", "user.a", b"1")
    mounted.umount()
    mounted.mount()  # the archive has an xattr now: on without the flag
    assert mounted.status_json()["xattrs"] is True
    assert os.getxattr(mp / "f", "user.a") == b"1"
    mounted.umount()
    mounted.mount(flags=["--no-xattrs"])
    assert_errno(errno.EOPNOTSUPP, os.getxattr, mp / "f", "user.a")
    assert read_file(mp / "small-writes") == pattern("4k", 64 * 1024)
    mounted.umount()
    mounted.mount(flags=["--xattrs"])
    assert os.getxattr(mp / "f", "user.a") == b"1"  # kept while hidden


def test_chmod_chown_utime(mounted: Archive) -> None:
    mp = mounted.mountpoint
    write_file(mp / "f", b"data")
    (mp / "d").mkdir()
    os.chmod(mp / "f", 0o640)
    os.chmod(mp / "d", 0o1750)
    os.chown(mp / "f", 1234, 5678)
    os.chown(mp / "d", 4321, -1)
    times = {"f": (1_600_000_000_123_456_789, 1_500_000_000_987_654_321), "d": (1_000_000_000, 2_000_000_000_500)}
    for name, ns in times.items():
        os.utime(mp / name, ns=ns)

    def check() -> None:
        f, d = os.stat(mp / "f"), os.stat(mp / "d")
        assert stat.S_IMODE(f.st_mode) == 0o640 and stat.S_ISREG(f.st_mode)
        assert stat.S_IMODE(d.st_mode) == 0o1750 and stat.S_ISDIR(d.st_mode)
        assert (f.st_uid, f.st_gid) == (1234, 5678)
        assert d.st_uid == 4321 and d.st_gid == os.getgid()
        assert (f.st_atime_ns, f.st_mtime_ns) == times["f"]
        assert d.st_mtime_ns == times["d"][1]

    mounted.check_across_remount(check)
    assert read_file(mp / "f") == b"data"


def test_large_directory(mounted: Archive) -> None:
    mp = mounted.mountpoint
    big = mp / "big"
    big.mkdir()
    names = [f"entry-{i:05d}-{'x' * (i % 50)}" for i in range(3000)]
    for name in names:
        os.close(os.open(big / name, os.O_CREAT | os.O_WRONLY, 0o644))

    def check(expected: list[str], when: str) -> None:
        listed = os.listdir(big)
        assert len(listed) == len(set(listed)), f"{when}: duplicate entries in listing"
        assert sorted(listed) == sorted(expected), f"{when}: {len(listed)} listed, {len(expected)} expected"
        with os.scandir(big) as it:
            assert sorted(e.name for e in it) == sorted(expected), f"{when}: scandir differs"

    check(names, "after create")
    for name in names[::2]:
        os.unlink(big / name)
    check(names[1::2], "after unlinking half")
    mounted.remount()
    check(names[1::2], "after remount")


def test_errnos(mounted: Archive) -> None:
    mp = mounted.mountpoint
    write_file(mp / "file", b"x")
    (mp / "dir").mkdir()
    (mp / "full").mkdir()
    write_file(mp / "full" / "inside", b"y")
    (mp / "full2").mkdir()
    (mp / "full2" / "sub").mkdir()
    # ENOENT
    assert_errno(errno.ENOENT, os.stat, mp / "missing")
    assert_errno(errno.ENOENT, os.open, mp / "missing", os.O_RDONLY)
    assert_errno(errno.ENOENT, os.unlink, mp / "missing")
    assert_errno(errno.ENOENT, os.rmdir, mp / "missing")
    assert_errno(errno.ENOENT, os.rename, mp / "missing", mp / "x")
    assert_errno(errno.ENOENT, os.mkdir, mp / "missing" / "sub")
    assert_errno(errno.ENOENT, os.open, mp / "missing" / "f", os.O_CREAT | os.O_WRONLY)
    # EEXIST
    assert_errno(errno.EEXIST, os.mkdir, mp / "dir")
    assert_errno(errno.EEXIST, os.mkdir, mp / "file")
    assert_errno(errno.EEXIST, os.open, mp / "file", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    assert_errno(errno.EEXIST, os.link, mp / "file", mp / "dir")
    # ENOTEMPTY
    assert_errno(errno.ENOTEMPTY, os.rmdir, mp / "full")
    assert_errno(errno.ENOTEMPTY, os.rmdir, mp / "full2")
    assert_errno((errno.ENOTEMPTY, errno.EEXIST), os.rename, mp / "dir", mp / "full")
    # EISDIR
    assert_errno(errno.EISDIR, os.open, mp / "dir", os.O_WRONLY)
    assert_errno(errno.EISDIR, os.unlink, mp / "dir")
    assert_errno(errno.EISDIR, os.rename, mp / "file", mp / "dir")
    # ENOTDIR
    assert_errno(errno.ENOTDIR, os.rmdir, mp / "file")
    assert_errno(errno.ENOTDIR, os.listdir, mp / "file")
    assert_errno(errno.ENOTDIR, os.mkdir, mp / "file" / "sub")
    assert_errno(errno.ENOTDIR, os.stat, mp / "file" / "sub")
    assert_errno(errno.ENOTDIR, os.rename, mp / "dir", mp / "file")
    # EINVAL: a directory into its own subtree
    assert_errno(errno.EINVAL, os.rename, mp / "full2", mp / "full2" / "sub" / "x")
    # nothing above changed anything
    assert sorted(os.listdir(mp)) == ["dir", "file", "full", "full2"]
    assert read_file(mp / "file") == b"x" and read_file(mp / "full" / "inside") == b"y"


def test_name_length_limit(mounted: Archive) -> None:
    mp = mounted.mountpoint
    ok, too_long = "n" * 255, "n" * 256
    write_file(mp / ok, b"255")
    (mp / ("d" * 255)).mkdir()
    assert read_file(mp / ok) == b"255"
    write_file(mp / "short", b"s")
    assert_errno(errno.ENAMETOOLONG, os.open, mp / too_long, os.O_CREAT | os.O_WRONLY)
    assert_errno(errno.ENAMETOOLONG, os.mkdir, mp / too_long)
    assert_errno(errno.ENAMETOOLONG, os.rename, mp / "short", mp / too_long)
    assert_errno(errno.ENAMETOOLONG, os.symlink, "t", mp / too_long)
    assert_errno(errno.ENAMETOOLONG, os.link, mp / "short", mp / too_long)
    assert_errno(errno.ENAMETOOLONG, os.stat, mp / too_long)
    assert sorted(os.listdir(mp)) == sorted([ok, "d" * 255, "short"])
    mounted.remount()
    assert read_file(mp / ok) == b"255"


def test_open_handles_survive_unlink_and_rename(mounted: Archive) -> None:
    mp = mounted.mountpoint
    c = 64 * KiB
    data = pattern("handle", 3 * c + 5)
    write_file(mp / "victim", data)
    write_file(mp / "moving", data)
    fd = os.open(mp / "victim", os.O_RDWR)
    fd2 = os.open(mp / "moving", os.O_RDWR)
    try:
        os.unlink(mp / "victim")
        assert not (mp / "victim").exists()
        assert os.pread(fd, len(data) + 1, 0) == data
        os.pwrite(fd, b"still writable", 2 * c)
        assert os.fstat(fd).st_nlink == 0
        expected = bytearray(data)
        expected[2 * c:2 * c + 14] = b"still writable"
        assert os.pread(fd, len(data) + 1, 0) == bytes(expected)
        os.ftruncate(fd, c)
        assert os.pread(fd, len(data), 0) == bytes(expected[:c])
        # Attribute changes through the handle of an unlinked file still hold.
        os.fchmod(fd, 0o640)
        os.utime(fd, ns=(1_600_000_000_000_000_000, 1_500_000_000_000_000_000))
        st = os.fstat(fd)
        assert (stat.S_IMODE(st.st_mode), st.st_mtime_ns, st.st_size) == (0o640, 1_500_000_000_000_000_000, c)

        os.rename(mp / "moving", mp / "moved")
        os.pwrite(fd2, b"after rename", 0)
        assert read_file(mp / "moved")[:12] == b"after rename"
        write_file(mp / "replacement", b"new")
        os.rename(mp / "replacement", mp / "moved")  # the open file is unlinked by the rename
        assert os.pread(fd2, 12, 0) == b"after rename"
        assert read_file(mp / "moved") == b"new"
    finally:
        os.close(fd)
        os.close(fd2)
    assert sorted(os.listdir(mp)) == ["moved"]
    mounted.remount()
    assert sorted(os.listdir(mp)) == ["moved"]
    assert read_file(mp / "moved") == b"new"


def test_statvfs(mounted: Archive) -> None:
    mp = mounted.mountpoint
    before = os.statvfs(mp)
    assert before.f_bsize > 0 and before.f_frsize > 0
    assert before.f_blocks >= before.f_bfree >= before.f_bavail >= 0
    assert before.f_namemax == 255
    write_file(mp / "f", pattern("statvfs", 1 * MiB))
    after = os.statvfs(mp)
    assert after.f_bsize > 0 and after.f_namemax == 255


def test_fcntl_locks_between_processes(mounted: Archive) -> None:
    mp = mounted.mountpoint
    path = mp / "locked"
    write_file(path, b"0" * 100)
    probe = (
        "import fcntl, os, sys\n"
        "fd = os.open(sys.argv[1], os.O_RDWR)\n"
        "try:\n"
        "    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, int(sys.argv[3]), int(sys.argv[2]))\n"
        "    print('locked')\n"
        "except OSError as e:\n"
        "    print('busy', e.errno)\n"
    )

    def other_process_lock(start: int, length: int) -> str:
        out = subprocess.run([sys.executable, "-c", probe, str(path), str(start), str(length)],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout.split()[0]

    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX, 10, 0)  # bytes 0..9
        assert other_process_lock(0, 10) == "busy"
        assert other_process_lock(5, 1) == "busy"
        assert other_process_lock(10, 10) == "locked"  # a disjoint range is free
        fcntl.lockf(fd, fcntl.LOCK_UN, 10, 0)
        assert other_process_lock(0, 10) == "locked"
        fcntl.flock(fd, fcntl.LOCK_EX)
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@pytest.mark.chunk_size("64KiB")
def test_shared_mmap_persists(mounted: Archive) -> None:
    mp = mounted.mountpoint
    c = SMALL_CHUNK
    data = bytearray(pattern("mmap", 3 * c + 100))
    write_file(mp / "m", bytes(data))
    fd = os.open(mp / "m", os.O_RDWR)
    try:
        with mmap.mmap(fd, len(data), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as mm:
            assert mm[:] == bytes(data)
            for offset, patch in [(0, b"start"), (c - 2, b"ACROSS"), (2 * c + 4096, b"middle" * 100), (len(data) - 3, b"end")]:
                mm[offset:offset + len(patch)] = patch
                data[offset:offset + len(patch)] = patch
            mm.flush()
    finally:
        os.close(fd)
    assert_bytes_equal(read_file(mp / "m"), bytes(data), "read after msync+close")
    mounted.remount()
    assert_bytes_equal(read_file(mp / "m"), bytes(data), "after remount")


def test_cp_r_dicom_study(mounted: Archive, tmp_path: Path) -> None:
    src = tmp_path / "study_src"
    write_study(src, StudySpec(seed=7, images_per_series=100, series_count=3))
    subprocess.run(["cp", "-r", str(src), str(mounted.mountpoint / "study")], check=True, timeout=300)
    mounted.remount()
    result = subprocess.run(["diff", "-r", str(src), str(mounted.mountpoint / "study")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert len(list((mounted.mountpoint / "study").rglob("*.dcm"))) == 300


@pytest.mark.chunk_size("64KiB")
def test_concurrent_writers_interleaved_in_one_file(mounted: Archive) -> None:
    """Threads write interleaved 4 KiB stripes of one file through their own handles, so
    writes to the same chunk arrive concurrently; nothing may be lost."""
    mp = mounted.mountpoint
    stripe, threads, size = 4096, 4, 2 * MiB
    path = mp / "striped"
    write_file(path, b"")

    def worker(k: int) -> None:
        fd = os.open(path, os.O_WRONLY)
        try:
            for offset in range(k * stripe, size, threads * stripe):
                os.pwrite(fd, pattern(("stripe", offset), stripe), offset)
        finally:
            os.close(fd)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(worker, range(threads)))
    expected = b"".join(pattern(("stripe", offset), stripe) for offset in range(0, size, stripe))
    assert_bytes_equal(read_file(path), expected, "after concurrent writes")
    mounted.remount()
    assert_bytes_equal(read_file(path), expected, "after remount")


def test_concurrent_processes_write_separate_files(mounted: Archive) -> None:
    mp = mounted.mountpoint
    script = (
        "import os, sys\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "from mifs_e2e import pattern, write_file\n"
        "for i in range(20):\n"
        "    write_file(os.path.join(sys.argv[2], f'p{sys.argv[3]}-{i}'), pattern((sys.argv[3], i), 300_000 + i), piece=8192)\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, str(TESTS_DIR), str(mp), str(k)]) for k in range(4)]
    assert [p.wait(timeout=240) for p in procs] == [0] * 4
    expected = {f"p{k}-{i}": pattern((str(k), i), 300_000 + i) for k in range(4) for i in range(20)}
    verify_files(mp, expected, "after concurrent writers")
    mounted.remount()
    verify_files(mp, expected, "after remount")


def test_read_only_mount(archive: Archive) -> None:
    archive.mount()
    write_file(archive.mountpoint / "f", b"content")
    (archive.mountpoint / "d").mkdir()
    archive.umount()
    archive.mount(options=["ro"])
    mp = archive.mountpoint
    assert read_file(mp / "f") == b"content"
    assert_errno(errno.EROFS, os.open, mp / "f", os.O_WRONLY)
    assert_errno(errno.EROFS, os.open, mp / "new", os.O_CREAT | os.O_WRONLY)
    assert_errno(errno.EROFS, os.mkdir, mp / "d2")
    assert_errno(errno.EROFS, os.unlink, mp / "f")
    assert_errno(errno.EROFS, os.rename, mp / "f", mp / "g")
    assert_errno(errno.EROFS, os.chmod, mp / "f", 0o600)
    assert_errno(errno.EROFS, os.setxattr, mp / "f", "user.x", b"1")
    assert sorted(os.listdir(mp)) == ["d", "f"]


def status_json(archive: Archive, *args: object) -> dict[str, object]:
    result = archive.run_cli("status", *args, "--json")
    assert result.returncode == 0, describe(result)
    doc: dict[str, object] = json.loads(result.stdout)
    missing = {"mounted", "archive_id", "store", "files", "directories", "bytes", "objects",
               "pending_uploads", "pending_bytes"} - set(doc)
    assert not missing, f"status --json lacks {missing}"
    return doc


@pytest.mark.chunk_size("64KiB")
def test_status_counts(mounted: Archive) -> None:
    mp = mounted.mountpoint
    base = status_json(mounted, mp)
    assert base["mounted"] is True
    sizes = [0, 10, SMALL_CHUNK, 3 * SMALL_CHUNK + 1]
    (mp / "d1" / "d2").mkdir(parents=True)
    for i, size in enumerate(sizes):
        write_file(mp / "d1" / f"f{i}", pattern(i, size))
    live = status_json(mounted, mp)
    assert live["files"] == base["files"] + len(sizes)  # type: ignore[operator]
    assert live["directories"] == base["directories"] + 2  # type: ignore[operator]
    assert live["bytes"] == base["bytes"] + sum(sizes)  # type: ignore[operator]
    mounted.umount()
    offline = status_json(mounted, mounted.store, "--key-file", mounted.key_file, "--cache-dir", mounted.cache_dir)
    assert offline["mounted"] is False
    assert (offline["files"], offline["directories"], offline["bytes"]) == (live["files"], live["directories"], live["bytes"])
    assert offline["pending_uploads"] == 0 and offline["pending_bytes"] == 0, "umount returned with uploads pending"
    assert offline["objects"] == len(mounted.chunk_objects())
    mounted.mount()
