"""The CT study the workloads move, and the client side of a PACS: ingest a study into a
directory tree and read it back in instance order.

Must not import mifs: it sees only a directory (plain disk or any mount). The study comes
from tests/dicom_factory.py (synthetic CT: 512x512 uint16 slices, ~513 KiB per file).
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.registry import BenchError

REPO_ROOT = Path(__file__).resolve().parent.parent
TESTS_DIR = REPO_ROOT / "tests"
IO_SIZE = 1024 * 1024
"""Bytes per read() and write() call of the client."""


@dataclass(frozen=True)
class StudyFile:
    relpath: str  # Patient/Study/Series/IMxxxxx.dcm
    data: bytes


@dataclass(frozen=True)
class Study:
    """Files in instance order (series by series, instance number), as a viewer reads them."""

    files: tuple[StudyFile, ...]
    series: int
    slices_per_series: int

    @property
    def total_bytes(self) -> int:
        return sum(len(f.data) for f in self.files)

    def describe(self) -> dict[str, object]:
        return {
            "modality": "CT",
            "series": self.series,
            "slices_per_series": self.slices_per_series,
            "files": len(self.files),
            "bytes": self.total_bytes,
            "mean_file_bytes": self.total_bytes // max(len(self.files), 1),
        }


def make_study(slices: int, series: int = 1, seed: int = 6) -> Study:
    if str(TESTS_DIR) not in sys.path:
        sys.path.insert(0, str(TESTS_DIR))
    import dicom_factory  # type: ignore[import-not-found]  # tests/dicom_factory.py (pydicom only)

    spec = dicom_factory.StudySpec(seed=seed, series_count=series, images_per_series=slices)
    files = tuple(StudyFile(str(f.relpath), f.data) for f in dicom_factory.study_files(spec))
    return Study(files, series, slices)


@dataclass(frozen=True)
class Timing:
    seconds: float
    files: int
    bytes: int

    @property
    def files_per_second(self) -> float:
        return self.files / self.seconds if self.seconds > 0 else float("inf")

    @property
    def mib_per_second(self) -> float:
        return self.bytes / (1024 * 1024) / self.seconds if self.seconds > 0 else float("inf")


def ingest(root: Path, study: Study, *, fsync: bool = False, io_size: int = IO_SIZE) -> Timing:
    """Store the study the way a PACS does: each file is written (`io_size` writes) under a
    temporary name in an incoming directory, (with fsync: fdatasync,) closed, then renamed
    into Patient/Study/Series directories created on first use. Timed from the first create
    to the last rename."""
    incoming = root / ".incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    made: set[str] = set()
    begin = time.perf_counter()
    for number, item in enumerate(study.files):
        tmp = os.path.join(incoming, f"{number:06d}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(item.data)
            pos = 0
            while pos < len(view):
                pos += os.write(fd, view[pos:pos + io_size])
            if fsync:
                os.fdatasync(fd)
        finally:
            os.close(fd)
        final = os.path.join(root, item.relpath)
        parent = os.path.dirname(final)
        if parent not in made:
            os.makedirs(parent, exist_ok=True)
            made.add(parent)
        os.rename(tmp, final)
    seconds = time.perf_counter() - begin
    return Timing(seconds, len(study.files), study.total_bytes)


def read_all(root: Path, study: Study) -> Timing:
    """Read every file in instance order, one reader: open, read to EOF in IO_SIZE reads into
    one reused buffer, close. A short or long file is a BenchError (wrong data, not slow data)."""
    buf = bytearray(IO_SIZE)
    views = [memoryview(buf)]
    total = 0
    begin = time.perf_counter()
    for item in study.files:
        fd = os.open(os.path.join(root, item.relpath), os.O_RDONLY)
        try:
            size = 0
            while True:
                got = os.readv(fd, views)
                if got == 0:
                    break
                size += got
        finally:
            os.close(fd)
        if size != len(item.data):
            raise BenchError(f"{item.relpath}: read {size} bytes, expected {len(item.data)}")
        total += size
    seconds = time.perf_counter() - begin
    return Timing(seconds, len(study.files), total)


def verify(root: Path, study: Study) -> None:
    """Untimed: every file's content is what was written (a benchmark of wrong data is void)."""
    for item in study.files:
        with open(os.path.join(root, item.relpath), "rb") as fh:
            got = hashlib.sha256(fh.read()).digest()
        if got != hashlib.sha256(item.data).digest():
            raise BenchError(f"{item.relpath}: content differs from what was written")


def drop_page_cache(root: Path, study: Study) -> None:
    """Make the study cold on a local file system without root-wide drop_caches: write back,
    then ask the kernel to drop these files' pages (POSIX_FADV_DONTNEED)."""
    for item in study.files:
        fd = os.open(os.path.join(root, item.relpath), os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def drop_page_cache_tree(root: Path) -> None:
    """drop_page_cache for every regular file under `root` (a local peer's cipher dir)."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            except OSError:
                continue
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def tree_bytes(root: Path) -> tuple[int, int]:
    """(files, bytes) of the regular files under `root` (what a local peer stores)."""
    count = size = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            count += 1
            size += st.st_size
    return count, size


# --- the sequential file and the many-files directory -------------------------------------------

SEQ_NAME = "seq.bin"
_PATTERN: bytes | None = None
PATTERN_SIZE = 64 * IO_SIZE
"""The sequential file is this much random data repeated: no two blocks of a 4 MiB chunk are
alike (so compression before encryption gains nothing, as with real pixel data)."""


def pattern() -> bytes:
    global _PATTERN
    if _PATTERN is None:
        _PATTERN = os.urandom(PATTERN_SIZE)
    return _PATTERN


def seq_block(index: int) -> memoryview:
    """The `index`-th IO_SIZE block of the sequential file."""
    start = (index * IO_SIZE) % PATTERN_SIZE
    return memoryview(pattern())[start:start + IO_SIZE]


def write_seq(root: Path, size: int) -> Timing:
    """One file of `size` bytes written in IO_SIZE writes, closed (no fsync: the timing is
    what the writer sees; durability is the drain, timed apart). Timed create to close."""
    blocks = size // IO_SIZE
    begin = time.perf_counter()
    fd = os.open(os.path.join(root, SEQ_NAME), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for i in range(blocks):
            view = seq_block(i)
            pos = 0
            while pos < len(view):
                pos += os.write(fd, view[pos:])
    finally:
        os.close(fd)
    return Timing(time.perf_counter() - begin, 1, blocks * IO_SIZE)


def read_seq(root: Path, size: int, *, check: bool = False) -> Timing:
    """Read the sequential file to EOF in IO_SIZE reads; a wrong size (or, with check, wrong
    content) is a BenchError."""
    buf = bytearray(IO_SIZE)
    view = memoryview(buf)
    digest = hashlib.sha256() if check else None
    total = 0
    begin = time.perf_counter()
    fd = os.open(os.path.join(root, SEQ_NAME), os.O_RDONLY)
    try:
        while True:
            got = os.readv(fd, [view])
            if got == 0:
                break
            if digest is not None:
                digest.update(view[:got])
            total += got
    finally:
        os.close(fd)
    seconds = time.perf_counter() - begin
    blocks = size // IO_SIZE
    if total != blocks * IO_SIZE:
        raise BenchError(f"{SEQ_NAME}: read {total} bytes, expected {blocks * IO_SIZE}")
    if digest is not None:
        expected = hashlib.sha256()
        for i in range(blocks):
            expected.update(seq_block(i))
        if digest.digest() != expected.digest():
            raise BenchError(f"{SEQ_NAME}: content differs from what was written")
    return Timing(seconds, 1, total)
