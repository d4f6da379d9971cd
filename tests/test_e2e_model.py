"""Model-based end-to-end test: random POSIX operations on the mount and on a plain directory
must give the same results, errnos and trees, also after a remount.

Talks to mifs only through the CLI and the mounted filesystem. The reference is the local
disk filesystem (ext4 here); only behaviour POSIX fixes is compared (no directory sizes or
directory link counts).
"""

from __future__ import annotations

import errno
import itertools
import os
import random
from pathlib import Path
from typing import Callable

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule, run_state_machine_as_test

from mifs_e2e import Archive, assert_same_tree, first_difference, pattern

NAMES = ["a", "b", "c", "d"]
LINK_TARGETS = NAMES + ["b/c", "missing"]
MAX_OFFSET = 3 * 65536 + 100

Op = tuple[object, ...]
Result = tuple[object, ...]


def apply(root: Path, op: Op) -> Result:
    """Run one operation under `root`: ("ok", value...) or ("err", errno name)."""
    kind, *args = op

    def p(rel: object) -> str:
        return os.path.join(root, str(rel))

    try:
        if kind == "create":
            os.close(os.open(p(args[0]), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            return ("ok",)
        if kind == "write":
            rel, offset, size, seed = args
            fd = os.open(p(rel), os.O_WRONLY)
            try:
                return ("ok", os.pwrite(fd, pattern(seed, int(size)), int(offset)))  # type: ignore[call-overload]
            finally:
                os.close(fd)
        if kind == "read":
            fd = os.open(p(args[0]), os.O_RDONLY)
            try:
                size = os.fstat(fd).st_size
                data = b""
                while chunk := os.read(fd, 1 << 20):
                    data += chunk
                return ("ok", size, data)
            finally:
                os.close(fd)
        if kind == "truncate":
            os.truncate(p(args[0]), int(args[1]))  # type: ignore[call-overload]
            return ("ok",)
        if kind == "rename":
            os.rename(p(args[0]), p(args[1]))
            return ("ok",)
        if kind == "link":
            os.link(p(args[0]), p(args[1]))
            return ("ok",)
        if kind == "symlink":
            os.symlink(str(args[0]), p(args[1]))
            return ("ok",)
        if kind == "readlink":
            return ("ok", os.readlink(p(args[0])))
        if kind == "unlink":
            os.unlink(p(args[0]))
            return ("ok",)
        if kind == "mkdir":
            os.mkdir(p(args[0]))
            return ("ok",)
        if kind == "rmdir":
            os.rmdir(p(args[0]))
            return ("ok",)
        if kind == "listdir":
            return ("ok", sorted(os.listdir(p(args[0]))))
        if kind == "stat":
            st = os.lstat(p(args[0]))
            kind_bits = st.st_mode & 0o170000
            if kind_bits == 0o040000:
                return ("ok", "dir", oct(st.st_mode & 0o7777))
            return ("ok", oct(st.st_mode), st.st_size, st.st_nlink)
    except OSError as exc:
        return ("err", errno.errorcode.get(exc.errno or 0, str(exc.errno)))
    raise ValueError(f"unknown op {kind}")


def _entries(root: Path) -> tuple[list[str], list[str], list[str]]:
    """(all entries, directories incl. "", regular files) relative to root."""
    entries: list[str] = []
    dirs: list[str] = [""]
    files: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        for name in dirnames + filenames:
            rel = name if rel_dir == "." else os.path.join(rel_dir, name)
            entries.append(rel)
            (dirs if name in dirnames and not os.path.islink(os.path.join(dirpath, name)) else files).append(rel)
    return entries, dirs, files


WEIGHTS = {"write": 25, "create": 12, "read": 12, "truncate": 6, "rename": 8, "unlink": 4,
           "mkdir": 8, "rmdir": 3, "link": 5, "symlink": 2, "readlink": 2, "stat": 4, "listdir": 3}
NEW_NAMES = NAMES + ["e", "f", "g"]


def random_op(rng: random.Random, ref_root: Path) -> Op:
    """An operation biased towards existing paths, with a tail of invalid ones for errnos."""
    entries, dirs, files = _entries(ref_root)

    def new_path() -> str:
        parent = rng.choice(dirs) if rng.random() < 0.9 else rng.choice(entries[:3] + ["nodir"])
        return os.path.join(parent, rng.choice(NEW_NAMES)) if parent else rng.choice(NEW_NAMES)

    def path(prefer: list[str]) -> str:
        roll = rng.random()
        if prefer and roll < 0.85:
            return rng.choice(prefer)
        if entries and roll < 0.92:
            return rng.choice(entries)
        return new_path()

    kind = rng.choices(list(WEIGHTS), weights=list(WEIGHTS.values()))[0]
    if kind == "write":
        size = rng.choice([1, 100, 4096, 65536, 65537, rng.randrange(1, 140_000)])
        return (kind, path(files), rng.randrange(0, MAX_OFFSET), size, rng.randrange(1 << 30))
    if kind == "truncate":
        return (kind, path(files), rng.choice([0, 1, 65535, 65536, rng.randrange(0, MAX_OFFSET)]))
    if kind == "rename":
        return (kind, path(entries), new_path() if rng.random() < 0.6 else path(entries))
    if kind == "link":
        return (kind, path(files), new_path() if rng.random() < 0.8 else path(entries))
    if kind == "symlink":
        return (kind, rng.choice(LINK_TARGETS), new_path())
    if kind in ("mkdir", "create"):
        return (kind, new_path() if rng.random() < 0.8 else path(entries))
    if kind == "rmdir":
        return (kind, path(dirs[1:]))
    if kind == "listdir":
        return (kind, rng.choice(dirs + entries[:2]))
    return (kind, path(files))


def describe_mismatch(op: Op, got: Result, want: Result) -> str:
    if got[0] == want[0] == "ok" and op[0] == "read":
        return f"{op}: size {got[1]} vs {want[1]}, {first_difference(got[2], want[2])}"  # type: ignore[arg-type]
    shorten: Callable[[Result], Result] = lambda r: tuple(f"<{len(x)} bytes>" if isinstance(x, bytes) else x for x in r)
    return f"{op}: mount gave {shorten(got)}, reference gave {shorten(want)}"


def check_op(mnt_root: Path, ref_root: Path, op: Op, history: list[Op]) -> None:
    want = apply(ref_root, op)
    got = apply(mnt_root, op)
    history.append(op)
    if got != want:
        raise AssertionError(describe_mismatch(op, got, want) + "\nlast ops:\n" + "\n".join(map(str, history[-15:])))


@pytest.mark.chunk_size("64KiB")
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_operations_match_reference(mounted: Archive, tmp_path: Path, seed: int) -> None:
    mnt_root = mounted.mountpoint / "model"
    ref_root = tmp_path / "reference"
    mnt_root.mkdir()
    ref_root.mkdir()
    rng = random.Random(seed)
    history: list[Op] = []
    for step in range(400):
        check_op(mnt_root, ref_root, random_op(rng, ref_root), history)
        if step % 50 == 49:
            assert_same_tree(mnt_root, ref_root, f"after {step + 1} operations")
    assert_same_tree(mnt_root, ref_root, "at the end")
    mounted.remount()
    assert_same_tree(mnt_root, ref_root, "after remount")


@pytest.mark.chunk_size("64KiB")
def test_state_machine_matches_reference(mounted: Archive, tmp_path: Path) -> None:
    """Hypothesis drives the same operations; one mount, a fresh directory pair per example."""
    mnt_base = mounted.mountpoint / "hyp"
    ref_base = tmp_path / "hyp"
    mnt_base.mkdir()
    ref_base.mkdir()
    counter = itertools.count()

    class FilesystemMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            n = next(counter)
            self.mnt = mnt_base / f"ex{n}"
            self.ref = ref_base / f"ex{n}"
            self.mnt.mkdir()
            self.ref.mkdir()
            self.history: list[Op] = []

        @rule(seed=st.integers(0, 2**32 - 1))
        def operation(self, seed: int) -> None:
            check_op(self.mnt, self.ref, random_op(random.Random(seed), self.ref), self.history)

        def teardown(self) -> None:
            assert_same_tree(self.mnt, self.ref, "end of example")

    run_state_machine_as_test(
        FilesystemMachine,
        settings=settings(
            max_examples=20,
            stateful_step_count=30,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        ),
    )
    assert_same_tree(mnt_base, ref_base, "all examples")
    mounted.remount()
    assert_same_tree(mnt_base, ref_base, "all examples after remount")
