"""End-to-end: kill -9 of the daemon loses nothing that was closed, and never shows wrong bytes.

Talks to mifs only through the CLI, the mounted filesystem and signals. Contract (docs/CONFIG.md,
"Durability"): what close() or fsync() returned survives a crash of the daemon; the next mount
recovers by itself.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mifs_e2e import (
    TESTS_DIR,
    Archive,
    KiB,
    MiB,
    assert_bytes_equal,
    describe,
    is_fuse_mounted,
    nonzero_pattern,
    read_chunks_direct,
    read_file,
    wait_until,
    write_file,
)

CHUNK = 64 * KiB

# Writes files of nonzero_pattern(name) in pieces, fdatasync every 16 pieces, and logs its
# progress to a local file, so the test knows which files were closed (must survive whole),
# how far each was synced (that prefix must survive) and which were in flight.
WRITER = r"""
import os, sys
sys.path.insert(0, sys.argv[1])
from mifs_e2e import nonzero_pattern
root, progress, piece, size = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
log = open(progress, "a", buffering=1)
for i in range(500):
    name = f"inflight-{i:03d}"
    data = nonzero_pattern(name, size)
    fd = os.open(os.path.join(root, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    for n, pos in enumerate(range(0, size, piece)):
        os.write(fd, data[pos:pos + piece])
        if n % 16 == 15:
            os.fdatasync(fd)
            log.write(f"{name} synced {min(pos + piece, size)}\n")
    os.close(fd)
    log.write(f"{name} closed\n")
"""


@dataclass
class Progress:
    closed: set[str] = field(default_factory=set)
    synced: dict[str, int] = field(default_factory=dict)  # name -> bytes made durable by fdatasync


def progress_of(path: Path) -> Progress:
    progress = Progress()
    if path.exists():
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1] == "closed":
                progress.closed.add(parts[0])
            elif len(parts) == 3 and parts[1] == "synced":
                progress.synced[parts[0]] = int(parts[2])
    return progress


def check_partial_file(path: Path, expected: bytes, synced: int) -> str | None:
    """A file that was being written: the fdatasync'ed prefix must be intact; after it the
    file may be shorter or have holes, and a chunk may give EIO, but every byte present must
    be the written byte or 0 (a hole). None if fine."""
    size = os.stat(path).st_size
    if size > len(expected):
        return f"{path.name}: size {size} > {len(expected)} bytes ever written"
    if size < synced:
        return f"{path.name}: size {size} < {synced} bytes made durable by fdatasync"
    for index, chunk in enumerate(read_chunks_direct(path, CHUNK)):
        start = index * CHUNK
        if isinstance(chunk, OSError):
            if chunk.errno != errno.EIO or start < synced:
                return f"{path.name}: chunk {index} read failed with {chunk!r} (synced up to {synced})"
            continue
        want = expected[start:start + len(chunk)]
        for offset, (got, exp) in enumerate(zip(chunk, want)):
            if got != exp and (got != 0 or start + offset < synced):
                return f"{path.name}: wrong byte at {start + offset}: {got:#x}, written {exp:#x} (synced up to {synced})"
    return None


@pytest.mark.chunk_size("64KiB")
@pytest.mark.expect_log(r"\bWARNING\b")  # recovery after an unclean shutdown may warn
def test_kill_9_while_writing(archive: Archive, tmp_path: Path) -> None:
    mp = archive.mountpoint
    archive.mount()
    old = nonzero_pattern("pre-existing", 5 * CHUNK + 3)
    write_file(mp / "pre-existing", old)
    write_file(mp / "to-rename", b"rename me")
    archive.umount()

    archive.mount()
    synced = {f"synced-{i}": nonzero_pattern(f"synced-{i}", size)
              for i, size in enumerate([0, 1, CHUNK - 1, CHUNK, 3 * CHUNK + 17, 2 * MiB + 5])}
    (mp / "dir" / "sub").mkdir(parents=True)
    for name, data in synced.items():
        write_file(mp / "dir" / name, data, piece=4096, sync=True)
    unsynced = nonzero_pattern("closed-no-fsync", 4 * CHUNK + 99)
    write_file(mp / "dir" / "sub" / "closed-no-fsync", unsynced, piece=4096)
    overwritten = bytearray(old)
    overwritten[CHUNK - 10:2 * CHUNK + 10] = nonzero_pattern("patch", CHUNK + 20)
    with open(mp / "pre-existing", "r+b") as fh:
        fh.seek(CHUNK - 10)
        fh.write(overwritten[CHUNK - 10:2 * CHUNK + 10])
    os.rename(mp / "to-rename", mp / "renamed")

    inflight_dir = mp / "inflight"
    inflight_dir.mkdir()
    progress = tmp_path / "progress.log"
    size = 2 * MiB + 12345
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(TESTS_DIR), str(inflight_dir), str(progress), str(8 * KiB), str(size)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: len(progress_of(progress).closed) >= 2 and len(progress_of(progress).synced) >= 3, 120,
                   "the writer to close two files and sync part of a third")
        archive.kill_daemon()
        writer.wait(timeout=60)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    done = progress_of(progress)

    archive.mount()
    problems = []
    for name, data in synced.items():
        path = mp / "dir" / name
        if not path.exists() or read_file(path) != data:
            problems.append(f"fsynced file {name} lost or changed")
    if not (mp / "dir" / "sub" / "closed-no-fsync").exists() or read_file(mp / "dir" / "sub" / "closed-no-fsync") != unsynced:
        problems.append("file closed without fsync lost or changed")
    if read_file(mp / "pre-existing") != bytes(overwritten):
        problems.append("overwrite of an existing file, closed, was lost or changed")
    names = {p.name for p in mp.iterdir()}
    if len({"to-rename", "renamed"} & names) != 1:
        problems.append(f"rename before the crash left {sorted({'to-rename', 'renamed'} & names)}")
    for name in sorted(done.closed):
        path = inflight_dir / name
        if not path.exists() or read_file(path) != nonzero_pattern(name, size):
            problems.append(f"writer's closed file {name} lost or changed")
    for name in sorted(set(done.synced) - done.closed):
        if not (inflight_dir / name).exists():
            problems.append(f"{name}: lost, though {done.synced[name]} bytes of it were fdatasync'ed")
    for path in sorted(inflight_dir.iterdir()):
        if not path.name.startswith("inflight-") or path.name > f"inflight-{len(done.synced):03d}":
            problems.append(f"unexpected file {path.name}")
        elif path.name not in done.closed:
            problem = check_partial_file(path, nonzero_pattern(path.name, size), done.synced.get(path.name, 0))
            if problem:
                problems.append(problem)
    assert not problems, "\n".join(problems)

    # the recovered archive keeps working
    write_file(mp / "after-crash", b"fine")
    archive.remount()
    assert read_file(mp / "after-crash") == b"fine"
    assert_bytes_equal(read_file(mp / "dir" / "synced-5"), synced["synced-5"], "synced file after second remount")


@pytest.mark.expect_log(r"\bWARNING\b")
def test_kill_9_right_after_many_closes(archive: Archive) -> None:
    """Closed files survive a crash at once, not only after an upload that may still be queued."""
    mp = archive.mountpoint
    archive.mount()
    expected = {f"f{i:03d}": nonzero_pattern(("burst", i), (i * 37 * KiB) % (3 * MiB) + i) for i in range(60)}
    for name, data in expected.items():
        write_file(mp / name, data)
    archive.kill_daemon(detach=False)
    # `mifs umount` on the dead mount: one error line, and the dead mount is detached
    result = archive.run_cli("umount", mp)
    assert result.returncode != 0 and "Traceback" not in result.stderr, describe(result)
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("mifs: error: "), describe(result)
    assert not is_fuse_mounted(mp), "mifs umount left the dead mount attached"
    archive.mounts.clear()
    archive.mount()
    missing = [n for n in expected if not (mp / n).exists()]
    wrong = [n for n in expected if n not in missing and read_file(mp / n) != expected[n]]
    assert not missing and not wrong, f"missing: {missing}, wrong content: {wrong}"
