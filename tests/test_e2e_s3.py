"""End-to-end on an S3 store: real FUSE mounts through the CLI against a real SeaweedFS server.

Talks to mifs only through the CLI, the mounted filesystem, the cache dir and the bucket
(read with boto3 as the admin identity). One SeaweedFS server per session (s3_server); every
test gets a fresh prefix or bucket (s3_archive). Tests that stop the server start it again;
the fixture does so too if the test failed first, before it unmounts.

Timing contract used here (README "S3 stores", docs/ARCHITECTURE.md "The store side"): a
store operation retries transient failures for up to 60 s before the uploader calls the
store unreachable and requeues; a read of an uncached chunk fails with EIO after
--fetch-timeout; staged (not yet uploaded) chunks are never evicted.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from dicom_factory import Patient, StudySpec, pixel_marker, study_files, write_study
from faultproxy import FaultPlan, FaultProxy
from mifs_e2e import (
    CHUNK_HEADER_LEN,
    CHUNK_MAGIC,
    CHUNK_TAG_LEN,
    TESTS_DIR,
    WRAPPED_DEK_LEN,
    Archive,
    KiB,
    MiB,
    assert_bytes_equal,
    describe,
    first_difference,
    is_fuse_mounted,
    pattern,
    read_chunks_direct,
    read_file,
    s3_env,
    snapshot,
    wait_until,
    write_file,
)
from s3server import SeaweedS3

SMALL_CHUNK = 64 * KiB
CHUNK_OVERHEAD = CHUNK_HEADER_LEN + CHUNK_TAG_LEN  # stored object = plaintext + this
RETRY_DEADLINE = 60.0  # seconds the store wrapper retries one operation (docs/ARCHITECTURE.md)

# Daemon log lines that an outage of the store legitimately produces.
OUTAGE_LOG = (
    r"WARNING mifs\.store\.retry: store \w+ of \S+ failed with StoreUnavailable; retry \d+ in",
    r"WARNING mifs\.uploader: upload of object data/[0-9a-f]{2}/[0-9a-f]{32} failed, trying again",
    r"WARNING mifs\.metasync: shipping metadata to the store failed, will retry",
    r"WARNING mifs\.audit\.trail: shipping audit segments failed: ",
)
# Writers faster than the uploads into a small cache wait for them (backpressure).
CACHE_FULL_LOG = r"WARNING mifs\.chunks: cache is full of data not yet uploaded; slowing writers down"
FETCH_FAILED_LOG = r"ERROR mifs\.chunks: fetching object data/[0-9a-f]{2}/[0-9a-f]{32} (did not finish within|failed:)"

STORE_KEY_RE = re.compile(
    r"^(mifs-archive\.json"
    r"|data/(?P<fan>[0-9a-f]{2})/(?P<name>[0-9a-f]{32})"
    r"|meta/snapshot/[0-9a-f]{16}"
    r"|meta/journal/[0-9a-f]{16}-[0-9a-f]{16}"
    r"|audit/key|audit/head|audit/segments/[0-9a-f]{16})$"
)


# --- helpers --------------------------------------------------------------------------------


def bucket_keys(s3: SeaweedS3, bucket: str, prefix: str = "") -> list[str]:
    """Every object key in the bucket (under `prefix`), as the admin identity sees it."""
    paginator = s3.client().get_paginator("list_objects_v2")
    keys: list[str] = []
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        keys.extend(str(entry["Key"]) for entry in page.get("Contents", ()))
    return sorted(keys)


def data_keys(s3: SeaweedS3, arc: Archive) -> set[str]:
    """The archive's chunk objects in the bucket, as store keys (data/xx/name)."""
    assert arc.s3_bucket is not None
    strip = len(arc.s3_prefix) + 1
    return {k[strip:] for k in bucket_keys(s3, arc.s3_bucket, f"{arc.s3_prefix}/data/")}


def get_object(s3: SeaweedS3, bucket: str, key: str) -> bytes:
    return bytes(s3.client().get_object(Bucket=bucket, Key=key)["Body"].read())


def verify_files(root: Path, expected: dict[str, bytes], when: str) -> None:
    """Every file byte-exact (size and content); all problems in one message."""
    problems = []
    for name, data in sorted(expected.items()):
        path = root / name
        try:
            actual = read_file(path)
        except OSError as exc:
            problems.append(f"{name}: read failed with {errno.errorcode.get(exc.errno or 0, exc.errno)}")
            continue
        if actual != data:
            problems.append(f"{name}: {first_difference(actual, data)}")
    assert not problems, f"{when}: {len(problems)} of {len(expected)} files wrong:\n" + "\n".join(problems[:20])


def read_direct(path: Path, chunk: int) -> bytes:
    """The file's bytes read with O_DIRECT, one chunk per request: every request reaches the
    daemon (no page cache), so this shows what mifs itself serves."""
    parts = read_chunks_direct(path, chunk)
    errors = [p for p in parts if isinstance(p, OSError)]
    assert not errors, f"{path.name}: O_DIRECT read failed: {errors[0]!r}"
    return b"".join(p for p in parts if isinstance(p, bytes))


def timed_direct_read_errno(path: Path, length: int) -> tuple[int, float]:
    """One O_DIRECT read request of `length` bytes at offset 0: (errno or 0, seconds)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, length)
    begin = time.monotonic()
    try:
        os.preadv(fd, [buf], 0)
        code = 0
    except OSError as exc:
        code = exc.errno or -1
    finally:
        elapsed = time.monotonic() - begin
        buf.close()
        os.close(fd)
    return code, elapsed


def timed_read_errno(path: Path) -> tuple[int, float]:
    begin = time.monotonic()
    try:
        read_file(path)
        code = 0
    except OSError as exc:
        code = exc.errno or -1
    return code, time.monotonic() - begin


def cache_disk_bytes(cache_dir: Path) -> int:
    """Bytes of chunk files in CACHE/chunks right now (files may vanish while we look)."""
    total = 0
    for dirpath, _dirs, files in os.walk(cache_dir / "chunks"):
        for name in files:
            try:
                total += os.stat(os.path.join(dirpath, name)).st_size
            except FileNotFoundError:
                pass
    return total


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def idle(status: dict[str, Any]) -> bool:
    return bool(status["pending_uploads"] == 0 and status["pending_bytes"] == 0)


def assert_healthy(status: dict[str, Any], when: str) -> None:
    assert status["failsafe"] in (None, ""), f"{when}: mount is in failsafe mode: {status['failsafe']}"
    assert status["integrity_failures"] == 0, f"{when}: integrity failures: {status['integrity_failures']}"


def assert_store_matches_metadata(s3: SeaweedS3, arc: Archive, objects: int, when: str) -> None:
    """After a clean unmount: every chunk row's object is in the bucket and nothing else is
    (no lost upload, no garbage left behind)."""
    keys = data_keys(s3, arc)
    bad = [k for k in keys if not STORE_KEY_RE.match(k)]
    assert not bad, f"{when}: unexpected object names: {bad[:5]}"
    assert len(keys) == objects, f"{when}: {len(keys)} chunk objects in the bucket, metadata names {objects}"


# --- 1. core -------------------------------------------------------------------------------


@pytest.mark.chunk_size("64KiB")
def test_round_trips_on_s3(s3_server: SeaweedS3, s3_mounted: Archive) -> None:
    arc = s3_mounted
    c = SMALL_CHUNK
    mp = arc.mountpoint
    expected: dict[str, bytes] = {}
    for size in (0, 1, 100, c - 1, c, c + 1, 2 * c + 1, 20 * c + 777):
        for piece in (0, 4096):
            name = f"f_{size}_{piece}"
            expected[name] = pattern(name, size)
            write_file(mp / name, expected[name], piece=piece)

    # sparse: islands of data in holes, a far tail, an all-hole file
    sparse = bytearray(40 * c + 5)
    fd = os.open(mp / "sparse", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        for offset, data in ((0, b"head"), (3 * c + 10, pattern("mid", 5000)), (10 * c - 2, b"across"), (40 * c + 1, b"tail")):
            os.pwrite(fd, data, offset)
            sparse[offset:offset + len(data)] = data
    finally:
        os.close(fd)
    expected["sparse"] = bytes(sparse)
    with open(mp / "allhole", "wb") as fh:
        fh.truncate(5 * c + 3)
    expected["allhole"] = bytes(5 * c + 3)

    # overwrite across a chunk boundary, inside one chunk, and past the end
    base = bytearray(pattern("ow", 6 * c + 123))
    write_file(mp / "overwrite", bytes(base))
    with open(mp / "overwrite", "r+b") as fh:
        for offset, data in ((c - 700, pattern("ow1", 1400)), (3 * c + 5, b"inside"), (6 * c + 100, pattern("ow2", c))):
            fh.seek(offset)
            fh.write(data)
            base[offset:offset + len(data)] = data
    expected["overwrite"] = bytes(base)

    # truncate: shrink into the middle of a chunk, then extend past it again, then append
    data = pattern("tr", 7 * c + 9)
    write_file(mp / "truncate", data)
    os.truncate(mp / "truncate", 2 * c + 77)
    os.truncate(mp / "truncate", 4 * c)
    with open(mp / "truncate", "ab") as fh:
        fh.write(b"appended")
    expected["truncate"] = data[:2 * c + 77] + bytes(4 * c - (2 * c + 77)) + b"appended"

    verify_files(mp, expected, "same mount")
    arc.remount()
    verify_files(mp, expected, "after remount (warm cache)")
    objects = arc.status_json()["objects"]
    arc.umount()
    assert_store_matches_metadata(s3_server, arc, objects, "after umount")
    arc.wipe_cache()
    arc.mount()
    verify_files(mp, expected, "after remount with a wiped cache dir (everything from S3)")
    status = arc.status_json()
    assert status["cache_misses"] > 0, "a cold read must have fetched from the store"
    assert_healthy(status, "cold read")


def test_dicom_tree_cp_r_and_cold_read_from_s3(s3_mounted: Archive, tmp_path: Path) -> None:
    arc = s3_mounted
    src = tmp_path / "src"
    written = write_study(src, StudySpec(seed=7, series_count=2, images_per_series=50))
    assert len(written) == 100 and all(512 * KiB < p.stat().st_size < 600 * KiB for p in written)
    result = subprocess.run(["cp", "-r", str(src), str(arc.mountpoint / "study")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr

    def diff(when: str) -> None:
        result = subprocess.run(["diff", "-r", str(src), str(arc.mountpoint / "study")], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"{when}: diff -r found differences:\n{result.stdout[-3000:]}{result.stderr[-1000:]}"

    diff("same mount")
    # The study index travels with the metadata only once the indexer has caught up (an
    # unmount leaves its backlog to the next mount, which would index from the store).
    arc.wait_status(lambda s: s["index_backlog"] == 0 and s["dicom_instances"] == 100, 60, "the study to be indexed")
    arc.umount()
    arc.wipe_cache()
    arc.mount()
    diff("after umount, wiped cache dir and remount (cold from S3)")
    status = arc.status_json()
    assert status["files"] == 100, status
    fetched = status["cache_misses"] + status["prefetched_objects"]
    # Each file is one chunk; it came from the store either for a reader (a miss) or through
    # study prefetch (the study index travelled with the metadata).
    assert fetched >= 100, f"every file must have come from the store: {status['cache_misses']} misses, {status['prefetched_objects']} prefetched"
    assert status["prefetched_objects"] > 0, "opening a file of an indexed study must prefetch the rest of it"
    assert status["dicom_instances"] == 100 and status["dicom_studies"] == 1, status
    assert_healthy(status, "cold read")


# --- 2. confidentiality ----------------------------------------------------------------------

PATIENT = Patient(name="ROE^RICHARD_S3SECRET", patient_id="PID-S3-0815", birth_date="19591103")
SECRET_DIR = "ROE_RICHARD_S3SECRET_CT"
SECRET_FILE = "ROE^RICHARD_S3SECRET_slice.dcm"
CONF_SEED = 4711


@pytest.mark.s3_own_bucket
def test_bucket_holds_no_plaintext_and_only_documented_names(s3_server: SeaweedS3, s3_archive: Archive) -> None:
    arc = s3_archive
    assert arc.s3_bucket is not None
    files = list(study_files(StudySpec(seed=CONF_SEED, patient=PATIENT, images_per_series=6)))
    arc.mount()
    (arc.mountpoint / SECRET_DIR).mkdir()
    for i, item in enumerate(files):
        name = SECRET_FILE if i == 0 else f"{PATIENT.patient_id}_{i:03d}.dcm"
        write_file(arc.mountpoint / SECRET_DIR / name, item.data)
    arc.umount()  # everything uploaded, final metadata snapshot written

    pixels = files[0].data[-(512 * 512 * 2):]
    secrets_ = {
        "patient name": PATIENT.name.encode(),
        "patient name (family)": b"ROE^RICHARD",
        "patient id": PATIENT.patient_id.encode(),
        "directory name": SECRET_DIR.encode(),
        "file name": SECRET_FILE.encode(),
        "study uid": files[0].study_instance_uid.encode(),
        "sop instance uid": files[0].sop_instance_uid.encode(),
        "pixel marker": pixel_marker(CONF_SEED * 1000 + 1),
        "pixel run": pixels[200_000:200_048],
    }
    keys = bucket_keys(s3_server, arc.s3_bucket)
    assert keys, "the bucket is empty"
    counts = {"descriptor": 0, "data": 0, "snapshot": 0, "journal": 0, "audit": 0}
    data_bytes = 0
    problems = []
    client = s3_server.client()
    for full in keys:
        if not full.startswith(arc.s3_prefix + "/"):
            problems.append(f"{full}: outside the archive's prefix")
            continue
        key = full[len(arc.s3_prefix) + 1:]
        match = STORE_KEY_RE.match(key)
        if not match:
            problems.append(f"{full}: not a documented object name")
            continue
        if match.group("fan") and match.group("fan") != match.group("name")[:2]:
            problems.append(f"{full}: fan-out directory is not the name's first two digits")
        head = client.head_object(Bucket=arc.s3_bucket, Key=full)
        if head.get("Metadata"):
            problems.append(f"{full}: carries user metadata {head['Metadata']}")
        body = get_object(s3_server, arc.s3_bucket, full)
        for what, secret in secrets_.items():
            if secret in body or secret in full.encode():
                problems.append(f"{full}: contains the {what}")
        if key == "mifs-archive.json":
            counts["descriptor"] += 1
            doc = json.loads(body)
            assert set(doc) == {"format", "format_version", "archive_id", "chunk_size", "cipher", "key_wrap",
                                "kdf", "kek_id", "created", "mac"}, doc
        elif key.startswith("data/"):
            counts["data"] += 1
            data_bytes += len(body)
            if body[:4] != CHUNK_MAGIC or len(body) < CHUNK_OVERHEAD:
                problems.append(f"{full}: not a sealed chunk (starts {body[:8].hex()})")
        elif key == "audit/key":
            counts["audit"] += 1
            if len(body) != WRAPPED_DEK_LEN or body[0] != 1:
                problems.append(f"{full}: not a wrapped key ({len(body)} bytes)")
        elif key == "audit/head":
            counts["audit"] += 1
            doc = json.loads(body)
            if set(doc) != {"head", "hmac"} or set(doc["head"]) != {"archive", "segment", "last_seq", "last", "open", "key_id", "written"}:
                problems.append(f"{full}: not an audit head: {sorted(doc)}")
        else:
            counts["snapshot" if key.startswith("meta/snapshot/") else "audit" if key.startswith("audit/") else "journal"] += 1
            if body[:4] != b"MIFM":
                problems.append(f"{full}: not a sealed metadata blob (starts {body[:8].hex()})")
    assert not problems, "\n".join(problems[:30])
    assert counts["descriptor"] == 1 and counts["snapshot"] >= 1, counts
    assert counts["audit"] >= 4, counts  # key, head, the init segment and the mount's
    # 6 files of ~525 KiB in 4 MiB chunks: one chunk each, the six packed into one object
    # (4 MiB packs by default on S3), each chunk in it sealed as a chunk object is
    assert counts["data"] == 1, counts
    assert data_bytes == sum(len(f.data) + CHUNK_OVERHEAD for f in files)


# --- 3. host loss ------------------------------------------------------------------------------


def test_host_loss_rebuilds_everything_from_key_and_bucket(s3_archive: Archive, tmp_path: Path) -> None:
    arc = s3_archive
    src = tmp_path / "src"
    write_study(src, StudySpec(seed=11, modality="MR", images_per_series=20))
    arc.mount(flags=["--xattrs"])  # after the host loss: on by itself (the archive has xattrs)
    mp = arc.mountpoint
    shutil.copytree(src, mp / "study")
    (mp / "empty-dir").mkdir()
    write_file(mp / "empty-file", b"")
    write_file(mp / "notes.txt", b"report pending\n")
    os.chmod(mp / "notes.txt", 0o640)
    os.utime(mp / "notes.txt", ns=(1_600_000_000_123_456_789, 1_600_000_000_987_654_321))
    os.symlink("study", mp / "latest")
    os.link(mp / "notes.txt", mp / "notes-link.txt")
    os.setxattr(mp / "notes.txt", "user.mifs-test", b"kept")
    before = snapshot(mp)
    notes = os.stat(mp / "notes.txt")
    arc.umount()

    # the host is gone: no cache dir, no metadata, only the key file and the bucket
    arc.wipe_cache()
    assert not arc.cache_dir.exists()
    arc.mount()
    after = snapshot(mp)
    diffs = [f"{k}: {after.get(k)} vs {before.get(k)}" for k in sorted(set(before) | set(after)) if after.get(k) != before.get(k)]
    assert not diffs, "tree after host loss differs:\n" + "\n".join(diffs[:20])
    result = subprocess.run(["diff", "-r", str(src), str(mp / "study")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout[-2000:]
    st = os.stat(mp / "notes.txt")
    assert (st.st_mode & 0o7777, st.st_mtime_ns, st.st_nlink) == (0o640, notes.st_mtime_ns, 2)
    assert os.getxattr(mp / "notes.txt", "user.mifs-test") == b"kept"
    assert os.readlink(mp / "latest") == "study"
    status = arc.status_json()
    assert status["files"] == 22 and idle(status), status


# --- 4. store outage in the middle of an ingest --------------------------------------------------

# Writes one file per line "NAME SIZE" read from stdin (pattern(NAME) bytes, 64 KiB writes)
# and logs "NAME closed" or "NAME failed ERRNO" once close() has returned.
WRITER = r"""
import os, sys
sys.path.insert(0, sys.argv[1])
from mifs_e2e import pattern
root, progress = sys.argv[2], sys.argv[3]
log = open(progress, "a", buffering=1)
for line in sys.stdin:
    name, size = line.split()
    data = pattern(name, int(size))
    try:
        fd = os.open(os.path.join(root, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            for pos in range(0, len(data), 65536):
                piece = memoryview(data)[pos:pos + 65536]
                while piece:
                    piece = piece[os.write(fd, piece):]
        finally:
            os.close(fd)
    except OSError as exc:
        log.write(f"{name} failed {exc.errno}\n")
        continue
    log.write(f"{name} closed\n")
"""


class Writer:
    """A child process that writes files into the mount on request and reports each close."""

    def __init__(self, root: Path, progress: Path) -> None:
        self.progress = progress
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(TESTS_DIR), str(root), str(progress)],
            stdin=subprocess.PIPE, text=True,
        )

    def request(self, name: str, size: int) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{name} {size}\n")
        self.proc.stdin.flush()

    def results(self) -> dict[str, str]:
        done = {}
        if self.progress.exists():
            for line in self.progress.read_text().splitlines():
                name, _, outcome = line.partition(" ")
                done[name] = outcome
        return done

    def wait_done(self, names: list[str], timeout: float) -> dict[str, str]:
        wait_until(lambda: all(n in self.results() for n in names), timeout, f"the writer to finish {names[-1]}", 0.01)
        return self.results()

    def finish(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        assert self.proc.wait(30) == 0

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def writer_factory() -> Iterator[list[Writer]]:
    writers: list[Writer] = []
    yield writers
    for w in writers:
        w.kill()


@pytest.mark.chunk_size("64KiB")
@pytest.mark.expect_log(*OUTAGE_LOG, FETCH_FAILED_LOG, CACHE_FULL_LOG)
def test_store_outage_mid_ingest(
    s3_server: SeaweedS3, s3_archive: Archive, tmp_path: Path, writer_factory: list[Writer]
) -> None:
    arc = s3_archive
    mp = arc.mountpoint
    fetch_timeout = 3.0
    flags = ["--cache-size", "4MiB", "--fetch-timeout", str(fetch_timeout)]
    expected: dict[str, bytes] = {}

    # Earlier studies: uploaded, and (10 MiB through a 4 MiB cache) mostly evicted.
    arc.mount(flags=flags)
    for i in range(40):
        name = f"early-{i:02d}"
        expected[name] = pattern(name, 256 * KiB)
        write_file(mp / name, expected[name])
    arc.umount()
    arc.mount(flags=flags)  # fresh kernel page cache and in-memory caches

    writer = Writer(mp, tmp_path / "progress")
    writer_factory.append(writer)
    before = [f"before-{i}" for i in range(5)]
    during = [f"during-{i}" for i in range(6)]
    sizes = {name: 192 * KiB + 1000 * i for i, name in enumerate(before + during)}
    for name in before:
        writer.request(name, sizes[name])
    writer.wait_done(before, 30)

    s3_server.stop(grace=0)  # the store dies in the middle of the ingest
    stopped = time.monotonic()
    for name in during:
        writer.request(name, sizes[name])
    results = writer.wait_done(during, 30)
    assert time.monotonic() - stopped < 20, "closes during the outage must not wait for the store"
    failed = {n: r for n, r in results.items() if r != "closed"}
    assert not failed, f"writes failed while the store was down (they must be staged locally): {failed}"
    expected.update({name: pattern(name, sizes[name]) for name in before + during})

    status = arc.wait_status(lambda s: s["pending_uploads"] > 0, 10, "pending uploads during the outage")
    assert status["pending_bytes"] > 0, status
    # Long before the store counts as unreachable, status shows the uploads being retried.
    status = arc.wait_status(lambda s: s["store_retrying"] > 0, 20, "status to show the store operations retried")
    assert "StoreUnavailable" in status["store_last_error"], status

    # staged data is served by the daemon itself (O_DIRECT: no page cache)
    for name in during:
        assert_bytes_equal(read_direct(mp / name, SMALL_CHUNK), expected[name], f"{name} read during the outage")

    # an evicted chunk cannot be fetched: EIO, after about --fetch-timeout
    code, elapsed = timed_direct_read_errno(mp / "early-00", SMALL_CHUNK)
    assert code == errno.EIO, f"read of an evicted chunk during the outage: {errno.errorcode.get(code, code)} after {elapsed:.1f}s"
    assert elapsed < fetch_timeout + 4, f"EIO took {elapsed:.1f}s with --fetch-timeout {fetch_timeout}"
    code, elapsed_buffered = timed_read_errno(mp / "early-01")
    assert code == errno.EIO, f"buffered read of an evicted file: {errno.errorcode.get(code, code)}"
    assert elapsed_buffered < 3 * fetch_timeout + 4, f"buffered read took {elapsed_buffered:.1f}s to fail"

    status = arc.wait_status(
        lambda s: s["store_reachable"] is False, RETRY_DEADLINE + 30, "status to report the store unreachable"
    )
    unreachable_after = time.monotonic() - stopped
    assert status["last_error"], status
    assert status["pending_uploads"] > 0, status
    assert status["oldest_pending_seconds"] > 0, status
    assert_healthy(status, "during the outage")
    # Every byte written during the outage waits for the store (checked at the end, so that
    # the recovery below is checked as well when this fails).
    problems = []
    staged_bytes = sum(sizes[name] for name in during)
    if status["pending_bytes"] < staged_bytes:
        problems.append(
            f"pending_bytes {status['pending_bytes']} < {staged_bytes} bytes written during the outage "
            f"(pending_uploads {status['pending_uploads']})"
        )

    s3_server.start()
    status = arc.wait_status(lambda s: idle(s) and s["store_reachable"] is True, 60, "the backlog to drain")
    assert_healthy(status, "after the outage")
    writer.finish()
    arc.umount()
    arc.wipe_cache()
    arc.mount(flags=flags)
    verify_files(mp, expected, "after the outage, from the store alone")
    print(f"store reported unreachable {unreachable_after:.1f}s after it stopped; "
          f"EIO after {elapsed:.1f}s (O_DIRECT) / {elapsed_buffered:.1f}s (buffered)")
    assert not problems, "\n".join(problems)


@pytest.mark.chunk_size("64KiB")
@pytest.mark.expect_log(
    *OUTAGE_LOG,
    r"ERROR mifs\.mount: could not store the final metadata snapshot: .*unreachable",
    r"WARNING mifs\.mount: the final metadata snapshot did not reach the store in time; the next mount takes one",
)
def test_umount_no_wait_during_an_outage(s3_server: SeaweedS3, s3_archive: Archive) -> None:
    """README: `umount --no-wait` does not wait for pending uploads; they stay staged and go up
    at the next mount. With the store down it must still return promptly."""
    arc = s3_archive
    mp = arc.mountpoint
    arc.mount()
    expected = {"uploaded": pattern("uploaded", 100_000)}
    write_file(mp / "uploaded", expected["uploaded"])
    arc.wait_status(idle, 30, "the first file to be uploaded")
    s3_server.stop(grace=0)
    expected["staged"] = pattern("staged", 3 * SMALL_CHUNK + 3)
    write_file(mp / "staged", expected["staged"])
    status = arc.wait_status(lambda s: s["pending_uploads"] >= 4, 10, "staged chunks")

    problems = []
    # README: status shows the pending uploads' count and bytes; the 4 chunks waiting for the
    # store are the whole backlog, whether a worker has taken them or not.
    if status["pending_bytes"] < len(expected["staged"]):
        problems.append(
            f"status: pending_uploads {status['pending_uploads']} but pending_bytes {status['pending_bytes']} "
            f"with {len(expected['staged'])} bytes waiting for the store"
        )
    begin = time.monotonic()
    try:
        result = arc.run_cli("umount", mp, "--no-wait", timeout=20)
        if result.returncode != 0 or "staged locally" not in result.stdout:
            problems.append(f"umount --no-wait during the outage:\n{describe(result)}")
    except AssertionError as exc:  # the CLI timed out and was killed; its daemon goes on
        problems.append(f"umount --no-wait did not return within 20 s while the store was down: {str(exc)[:300]}")
    elapsed = time.monotonic() - begin
    s3_server.start()
    wait_until(lambda: not arc.daemon_pids() and not is_fuse_mounted(mp), 60, "the daemon to finish unmounting")
    arc.mounts = [(m, c) for m, c in arc.mounts if m != mp]

    arc.mount()  # the staged chunks go up now
    arc.wait_status(idle, 60, "the chunks staged before the unmount")
    arc.umount()
    arc.wipe_cache()
    arc.mount()
    verify_files(mp, expected, "from the store after umount --no-wait during an outage")
    assert not problems, "\n".join(problems)
    print(f"umount --no-wait during the outage took {elapsed:.1f}s")


# --- 5. kill -9 with uploads pending -------------------------------------------------------------


@pytest.mark.chunk_size("64KiB")
@pytest.mark.expect_log(*OUTAGE_LOG)
def test_kill_9_with_uploads_pending(s3_server: SeaweedS3, s3_archive: Archive) -> None:
    arc = s3_archive
    mp = arc.mountpoint
    arc.mount()
    expected: dict[str, bytes] = {}
    for i in range(3):
        name = f"up-{i}"
        expected[name] = pattern(name, 300 * KiB + i)
        write_file(mp / name, expected[name])
    arc.wait_status(idle, 30, "the first files to be uploaded")

    s3_server.stop(grace=0)
    for i in range(5):
        name = f"staged-{i}"
        expected[name] = pattern(name, 200 * KiB + 17 * i)
        write_file(mp / name, expected[name])
    # metadata-only and rewriting changes the store has not seen either
    expected["up-0"] = pattern("up-0-new", 150 * KiB)
    write_file(mp / "up-0", expected["up-0"])  # its old chunks become garbage
    os.rename(mp / "up-1", mp / "renamed-1")
    expected["renamed-1"] = expected.pop("up-1")
    os.unlink(mp / "up-2")
    del expected["up-2"]
    fsync_dir(mp)  # directory changes are durable once the directory is fsynced (POSIX)
    arc.wait_status(lambda s: s["pending_uploads"] >= 5, 10, "staged chunks")
    # What the new daemon must upload: every live chunk written while the store was down
    # (the old daemon's pending count also holds chunks rewritten meanwhile, in flight).
    staged_chunks = sum(-(-len(data) // SMALL_CHUNK) for name, data in expected.items() if name.startswith("staged-"))
    staged_chunks += -(-len(expected["up-0"]) // SMALL_CHUNK)

    arc.kill_daemon()
    s3_server.start()
    arc.mount()  # same cache dir: the staged chunks are uploaded by the new daemon
    status = arc.wait_status(idle, 60, "the uploads left by the killed daemon")
    assert status["uploaded_objects"] >= staged_chunks, status
    assert_healthy(status, "after the restart")
    verify_files(mp, expected, "after kill -9 and remount")
    objects = status["objects"]
    arc.umount()
    assert_store_matches_metadata(s3_server, arc, objects, "after umount")
    arc.wipe_cache()
    arc.mount()
    verify_files(mp, expected, "from the store alone")
    assert sorted(os.listdir(mp)) == sorted(expected)


# --- 6. cache pressure ----------------------------------------------------------------------------


@pytest.mark.chunk_size("1MiB")
@pytest.mark.expect_log(CACHE_FULL_LOG)
def test_cache_pressure_evicts_clean_chunks_and_loses_nothing(s3_archive: Archive) -> None:
    arc = s3_archive
    mp = arc.mountpoint
    limit = 8 * MiB
    chunk = MiB
    stored = chunk + CHUNK_OVERHEAD
    arc.mount(flags=["--cache-size", "8MiB"])
    expected = {f"img-{i:02d}": pattern(f"img-{i}", 2 * chunk + 4 * KiB * i) for i in range(20)}  # ~41 MiB
    total_chunks = sum(-(-len(d) // chunk) for d in expected.values())

    samples: list[int] = []
    status_samples: list[int] = []
    stop = threading.Event()

    def sample_disk() -> None:
        while not stop.is_set():
            samples.append(cache_disk_bytes(arc.cache_dir))
            stop.wait(0.02)

    def sample_status() -> None:
        while not stop.is_set():
            try:
                status_samples.append(arc.status_json()["cache_bytes"])
            except AssertionError:
                pass
            stop.wait(0.1)

    threads = [threading.Thread(target=sample_disk), threading.Thread(target=sample_status)]
    for t in threads:
        t.start()
    try:
        for name, data in expected.items():
            write_file(mp / name, data, piece=256 * KiB)
        status = arc.wait_status(idle, 60, "the uploads")
    finally:
        stop.set()
        for t in threads:
            t.join()

    assert status["cache_limit"] == limit, status
    assert status["cache_bytes"] <= limit, f"idle cache holds {status['cache_bytes']} bytes, limit {limit}"
    assert cache_disk_bytes(arc.cache_dir) == status["cache_bytes"], "status disagrees with the cache dir"
    verify_files(mp, expected, "same mount")

    arc.remount()  # page cache and in-memory plaintext gone: reads go to the cache dir or S3
    before = arc.status_json()
    verify_files(mp, expected, "after remount, through an 8 MiB cache")
    after = arc.status_json()
    misses = after["cache_misses"] - before["cache_misses"]
    fetched = after["fetched_chunks"] - before["fetched_chunks"]  # a miss in a pack brings its neighbours too
    fitting = limit // stored
    assert misses >= 1 and fetched >= total_chunks - fitting, (
        f"{fetched} chunks fetched ({misses} cache misses) for {total_chunks} chunks, at most {fitting} fit")
    assert after["cache_bytes"] <= limit, after
    assert cache_disk_bytes(arc.cache_dir) == after["cache_bytes"]
    assert_healthy(after, "after the re-read")
    print(f"cache limit {limit}: peak cache_bytes {max(status_samples)} ({len(status_samples)} samples), "
          f"peak in the cache dir {max(samples)}; {misses} misses for {total_chunks} chunks")
    # Checked last, so that everything above is known too when this fails. While writing, the
    # cache may pass the limit by about the chunk being staged (the room check and the
    # staging are not one step) plus a chunk being replaced on disk; uploaded chunks must be
    # evicted to keep it there (staged ones never are).
    assert max(status_samples) <= limit + 2 * stored, f"cache_bytes reached {max(status_samples)} (limit {limit})"
    assert max(samples) <= limit + 2 * stored, f"the cache dir held {max(samples)} bytes of chunks (limit {limit})"


@pytest.mark.chunk_size("1MiB")
@pytest.mark.expect_log(*OUTAGE_LOG, CACHE_FULL_LOG)
def test_staged_data_displaces_cached_data_within_the_cache_size(s3_server: SeaweedS3, s3_archive: Archive) -> None:
    """--cache-size bounds the cache dir: staged chunks are never evicted, so when new data is
    staged, uploaded (clean) chunks must make room (README: data is staged "up to
    --cache-size"). Made deterministic with an outage: nothing gets uploaded meanwhile.
    (Writing the first 10 MiB into the 8 MiB cache may outrun the uploads on a busy machine:
    backpressure is allowed there, but not while the 4 MiB that fit are staged.)"""
    arc = s3_archive
    mp = arc.mountpoint
    limit = 8 * MiB
    stored = MiB + CHUNK_OVERHEAD
    arc.mount(flags=["--cache-size", "8MiB"])
    expected = {f"old-{i:02d}": pattern(f"old-{i}", MiB) for i in range(10)}
    for name, data in expected.items():
        write_file(mp / name, data)
    full = arc.wait_status(idle, 60, "the first 10 MiB to be uploaded")
    assert limit - stored < full["cache_bytes"] <= limit, f"the cache should be full of uploaded chunks: {full}"
    waits_before = full["staging_waits"]

    s3_server.stop(grace=0)
    for i in range(4):  # 4 MiB staged: fits the limit, so no writer waits
        name = f"new-{i}"
        expected[name] = pattern(name, MiB)
        write_file(mp / name, expected[name])
    status = arc.wait_status(lambda s: s["pending_uploads"] >= 4, 10, "the new chunks to be staged")
    on_disk = cache_disk_bytes(arc.cache_dir)
    s3_server.start()
    assert status["staging_waits"] == waits_before, f"a writer waited for room although 4 MiB fit: {status}"
    assert status["cache_bytes"] <= limit + stored and on_disk <= limit + stored, (
        f"with 4 MiB staged the cache holds {status['cache_bytes']} bytes ({on_disk} in the cache dir), "
        f"limit {limit}: uploaded chunks were not evicted to make room for staged ones"
    )
    status = arc.wait_status(idle, 60, "the staged chunks to be uploaded")
    assert status["cache_bytes"] <= limit, status
    arc.remount()
    verify_files(mp, expected, "after the outage")


# --- 7. a flaky store -------------------------------------------------------------------------------

FLAKY_PLAN = FaultPlan(
    error_500=0.05, slowdown_503=0.05, drop_before=0.03, drop_after=0.03, truncate=0.02,
    delay=0.05, delay_seconds=0.3, seed=20240611, max_consecutive=3,
    # HEAD is spared: the bucket access check at mount is not retried (see the next test),
    # and this test is about the data path.
    methods=frozenset({"GET", "PUT", "POST", "DELETE"}),
)


@pytest.fixture
def fault_proxy(s3_server: SeaweedS3) -> Iterator[FaultProxy]:
    """A fault-injecting proxy in front of SeaweedFS, injecting nothing until told.
    List it before s3_archive in a test's arguments: then it outlives the archive's teardown
    (whose unmount still talks to the store through it)."""
    with FaultProxy(s3_server.endpoint_url) as proxy:
        yield proxy


def proxied(arc: Archive, proxy: FaultProxy) -> None:
    """From now on the archive's CLI calls (and daemons) reach the store through the proxy."""
    arc.store_flags = ["--endpoint-url", proxy.endpoint_url]


@pytest.mark.chunk_size("64KiB")
@pytest.mark.expect_log(r"WARNING mifs\.store\.retry: store \w+ of \S+ failed with StoreUnavailable; retry \d+ in")
def test_flaky_store_loses_nothing(fault_proxy: FaultProxy, s3_archive: Archive) -> None:
    arc = s3_archive
    proxied(arc, fault_proxy)
    fault_proxy.set_plan(FLAKY_PLAN)
    files = list(study_files(StudySpec(seed=99, modality="MR", images_per_series=50)))
    expected = {f"{i:02d}-{item.relpath.name}": item.data for i, item in enumerate(files)}
    arc.mount()
    for name, data in expected.items():
        write_file(arc.mountpoint / name, data)
    arc.wait_status(idle, 90, "uploads through the flaky proxy")
    arc.umount()
    arc.wipe_cache()
    arc.mount()  # the metadata is rebuilt through the flaky proxy too
    verify_files(arc.mountpoint, expected, "read back through the flaky proxy with a wiped cache")
    status = arc.status_json()
    assert_healthy(status, "after the flaky ingest")
    counts = fault_proxy.counts()
    assert fault_proxy.failures_injected > 0 and counts["delay"] > 0, counts
    print(f"fault proxy: {counts}")


@pytest.mark.expect_log(r"WARNING mifs\.store\.retry: store \w+ of \S+ failed with StoreUnavailable; retry \d+ in")
@pytest.mark.parametrize("fault", ["error_500", "slowdown_503", "drop_before"])
def test_mount_rides_out_one_transient_error(fault_proxy: FaultProxy, s3_archive: Archive, fault: str) -> None:
    """Transient failures are retried everywhere (README); the very first request of a mount,
    the bucket access check, included."""
    arc = s3_archive
    proxied(arc, fault_proxy)
    plans = {
        "error_500": FaultPlan(error_500=1.0, max_faults=1),
        "slowdown_503": FaultPlan(slowdown_503=1.0, max_faults=1),
        "drop_before": FaultPlan(drop_before=1.0, max_faults=1),
    }
    fault_proxy.set_plan(plans[fault])
    result = arc.try_mount()
    assert result.returncode == 0, f"one {fault} made the mount fail\n{describe(result)}"
    assert fault_proxy.counts()[fault] == 1
    write_file(arc.mountpoint / "x", b"x")


def test_init_rides_out_one_transient_error(fault_proxy: FaultProxy, s3_server: SeaweedS3, tmp_path: Path) -> None:
    bucket = s3_server.session_bucket("mifs-e2e")
    arc = Archive(
        tmp_path / "archive", store_url=f"s3://{bucket}/{s3_server.unique_prefix('init')}",
        store_flags=["--endpoint-url", fault_proxy.endpoint_url],
        env=s3_env(s3_server.access_key, s3_server.secret_key, s3_server.region),
    )
    fault_proxy.set_plan(FaultPlan(error_500=1.0, max_faults=1))
    result = arc.run_cli("init", arc.store_url, "--key-file", arc.key_file, *arc.store_flags)
    assert result.returncode == 0, f"one 500 made `mifs init` fail\n{describe(result)}"


# --- 8. permanent error: an identity that may read but not write -------------------------------------


@pytest.mark.chunk_size("64KiB")
@pytest.mark.expect_log(
    r"WARNING mifs\.uploader: upload of object data/[0-9a-f]{2}/[0-9a-f]{32} failed, trying again in \d+s: access denied",
    r"WARNING mifs\.metasync: shipping metadata to the store failed, will retry: access denied",
    r"ERROR mifs\.mount: could not store the final metadata snapshot",
    r"WARNING mifs\.audit\.trail: shipping audit segments failed: access denied",
)
def test_write_denied_keeps_data_staged_and_reports_it(s3_server: SeaweedS3, s3_archive: Archive) -> None:
    arc = s3_archive
    mp = arc.mountpoint
    reader = s3_env(s3_server.reader.access_key, s3_server.reader.secret_key, s3_server.region)
    result = arc.try_mount(env=reader)
    # Behaviour found: the access check (HEAD bucket) and the descriptor read succeed for a
    # read-only identity, so the mount comes up; writes are refused only at upload time.
    assert result.returncode == 0, describe(result)
    data = pattern("denied", 3 * SMALL_CHUNK + 5)
    write_file(mp / "denied", data)
    status = arc.wait_status(
        lambda s: s["store_reachable"] is False and "access denied" in str(s["last_error"]).lower(),
        20, "status to report the refused upload",
    )
    assert status["pending_uploads"] >= 4, status
    assert_bytes_equal(read_direct(mp / "denied", SMALL_CHUNK), data, "staged file while uploads are refused")
    assert data_keys(s3_server, arc) == set(), "a read-only identity wrote chunk objects"

    # An admin fixing the permission unmounts without waiting (the uploads cannot finish):
    # README: exit 0, the staged chunks stay in the cache dir for the next mount. Problems
    # are collected so that the recovery below is checked as well.
    problems = []
    result = arc.run_cli("umount", mp, "--no-wait")
    if result.returncode != 0 or "staged locally" not in result.stdout:
        problems.append(f"umount --no-wait with refused uploads:\n{describe(result)}")
    if is_fuse_mounted(mp):
        problems.append("still mounted after umount --no-wait")
        arc.force_cleanup()
    wait_until(lambda: not arc.daemon_pids(), 10, "the daemon to exit")
    arc.mounts = [(m, c) for m, c in arc.mounts if m != mp]

    arc.mount()  # the admin identity again: the staged chunks go up
    arc.wait_status(idle, 60, "the staged chunks to be uploaded with write permission")
    arc.umount()
    arc.wipe_cache()
    arc.mount()
    assert_bytes_equal(read_file(mp / "denied"), data, "file from the store after the permission was fixed")
    assert not problems, "\n".join(problems)


# --- 9. --sync-uploads ----------------------------------------------------------------------------


@pytest.mark.chunk_size("64KiB")
@pytest.mark.expect_log(*OUTAGE_LOG)
def test_sync_uploads_close_waits_for_the_store(s3_server: SeaweedS3, s3_archive: Archive) -> None:
    arc = s3_archive
    mp = arc.mountpoint
    arc.mount(flags=["--sync-uploads"])
    first = pattern("sync-first", 2 * SMALL_CHUNK)
    write_file(mp / "first", first)
    status = arc.status_json()
    assert status["pending_uploads"] == 0 and status["chunks"] == 2, "close() on --sync-uploads returned before the chunks were in the store"
    keys_after_first = data_keys(s3_server, arc)
    assert len(keys_after_first) == status["objects"] >= 1, status  # two objects, or one pack of both

    s3_server.stop(grace=0)
    data = pattern("sync-second", 3 * SMALL_CHUNK + 1)
    outcome: list[BaseException | None] = []

    def write() -> None:
        try:
            write_file(mp / "second", data)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            outcome.append(exc)

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    thread.join(4.0)  # a window in which close() must not return
    assert thread.is_alive(), f"close() returned while the store was down: {outcome}"
    status = arc.status_json()
    assert status["pending_uploads"] >= 4, status

    s3_server.start()
    thread.join(60)
    assert not thread.is_alive(), "close() still blocked 60 s after the store came back"
    assert outcome == [None], f"write/close failed: {outcome}"
    status = arc.status_json()
    assert status["pending_uploads"] == 0, f"close() returned with chunks not yet in the store: {status}"
    assert status["chunks"] == 6, status
    assert len(data_keys(s3_server, arc)) == status["objects"], status
    assert idle(status)
    arc.umount()
    arc.wipe_cache()
    arc.mount()
    assert_bytes_equal(read_file(mp / "second"), data, "sync-uploaded file from the store")
    assert_bytes_equal(read_file(mp / "first"), first, "first file from the store")


# --- 10. packs (docs/FORMAT.md section 5b) -------------------------------------------------------


def mount_and_write(arc: Archive, files: dict[str, bytes]) -> None:
    """Mount the archive and write `files` (relative paths, directories made as needed)."""
    arc.mount()
    for rel, data in files.items():
        (arc.mountpoint / rel).parent.mkdir(parents=True, exist_ok=True)
        write_file(arc.mountpoint / rel, data)


def read_file_without_mifs(arc: Archive, relpath: str) -> bytes:
    """docs/FORMAT.md section 7 by hand, from the key file and the bucket only: the newest
    metadata snapshot opened with SQLCipher, the chunks read at their pack offsets."""
    from test_e2e_shred import archive_keys, inode_of, newest_snapshot, snapshot_db, store_objects

    from mifs.crypto import envelope
    from mifs.types import FileId

    archive_id, replica_key, db_key, kek = archive_keys(arc)
    objects = dict(store_objects(arc))
    newest = newest_snapshot(objects)
    with snapshot_db(replica_key, db_key, newest, objects[newest]) as conn:
        inode = inode_of(conn, relpath)
        file_id, wrapped, size = conn.execute("SELECT file_id, wrapped_dek, size FROM inodes WHERE id = ?", (inode,)).fetchone()
        rows = conn.execute(
            "SELECT idx, generation, object_key, pack_key, pack_offset, stored_len FROM chunks WHERE inode = ? ORDER BY idx",
            (inode,),
        ).fetchall()
    chunk_size = int(json.loads(objects["mifs-archive.json"])["chunk_size"])
    dek = envelope.unwrap_data_key(kek, archive_id, FileId(bytes(file_id)), bytes(wrapped))
    out = bytearray(size)
    for idx, generation, object_key, pack_key, offset, stored_len in rows:
        blob = objects[object_key] if pack_key is None else objects[pack_key][offset:offset + stored_len]
        plain, _ = envelope.open_chunk(dek, archive_id, FileId(bytes(file_id)), idx, generation, blob)
        out[idx * chunk_size:idx * chunk_size + len(plain)] = plain
    return bytes(out[:size])


def test_a_study_goes_up_in_packs_and_comes_back_byte_exact(s3_server: SeaweedS3, s3_archive: Archive) -> None:
    arc = s3_archive
    mp = arc.mountpoint
    files = {str(f.relpath): f.data for f in study_files(StudySpec(seed=31, series_count=2, images_per_series=12))}
    assert len(files) == 24 and all(512 * KiB < len(d) < 600 * KiB for d in files.values())
    mount_and_write(arc, files)
    arc.wait_status(lambda s: s["index_backlog"] == 0 and s["dicom_instances"] == 24, 60, "the study to be indexed")
    arc.umount()  # drains: every chunk in the store

    keys = data_keys(s3_server, arc)
    # 24 chunks of ~525 KiB in 4 MiB packs: 7 chunks a pack, 4 objects (not 24).
    assert len(keys) == 4, f"{len(keys)} data objects for 24 small files"
    arc.mount()
    status = arc.status_json()
    assert (status["chunks"], status["packs"], status["objects"]) == (24, 4, 4), status
    assert status["pack_dead_bytes"] == 0, status
    arc.umount()
    stored = sum(len(get_object(s3_server, arc.s3_bucket or "", f"{arc.s3_prefix}/{k}")) for k in keys)
    assert stored == sum(len(d) + CHUNK_OVERHEAD for d in files.values()), "a pack is its chunks and nothing else"
    # A vendor reading the archive without mifs (FORMAT.md section 7) finds every chunk.
    some = sorted(files)[5]
    assert_bytes_equal(read_file_without_mifs(arc, some), files[some], "read without mifs")

    # Cold from the store: ranged GETs one file at a time (no prefetch) ...
    arc.wipe_cache()
    arc.mount(flags=["--no-prefetch"])
    verify_files(mp, files, "cold, ranged GETs")
    assert arc.status_json()["prefetched_objects"] == 0
    arc.umount()
    # ... and with study prefetch, which fetches whole packs.
    arc.wipe_cache()
    arc.mount()
    verify_files(mp, files, "cold, with study prefetch")
    status = arc.wait_status(lambda s: s["prefetch_queued_studies"] == 0, 60, "the prefetch to finish")
    assert status["prefetched_objects"] > 0, status
    assert_healthy(status, "cold read of a packed study")
    arc.umount()


@pytest.mark.expect_log(
    r"ERROR mifs\.chunks: integrity failure: object data/[0-9a-f]{2}/[0-9a-f]{32} \(inode \d+, chunk 0, generation \d+\) from store failed authentication",
)
def test_a_damaged_pack_fails_only_the_chunk_hit(s3_server: SeaweedS3, s3_archive: Archive) -> None:
    arc = s3_archive
    mp = arc.mountpoint
    files = {f"f{i}.bin": pattern(f"pack-{i}", 300 * KiB + i) for i in range(6)}
    mount_and_write(arc, files)
    arc.umount()
    (pack,) = data_keys(s3_server, arc)  # 6 x 300 KiB: one pack
    name = f"{arc.s3_prefix}/{pack}"
    body = bytearray(get_object(s3_server, arc.s3_bucket or "", name))
    third = 2 * (300 * KiB + CHUNK_OVERHEAD) + 1  # the chunks are in write order: f2 starts here
    body[third + 1000] ^= 0x01
    s3_server.client().put_object(Bucket=arc.s3_bucket, Key=name, Body=bytes(body))
    arc.wipe_cache()
    arc.mount(flags=["--no-prefetch"])
    for rel, data in files.items():
        if rel == "f2.bin":
            with pytest.raises(OSError) as err:
                read_file(mp / rel)
            assert err.value.errno == errno.EIO, err.value
        else:
            assert_bytes_equal(read_file(mp / rel), data, f"{rel}, a neighbour of the damaged chunk")
    assert arc.status_json()["integrity_failures"] >= 1


def test_deleting_files_leaves_none_of_their_bytes_in_the_store(s3_server: SeaweedS3, s3_archive: Archive) -> None:
    arc = s3_archive
    mp = arc.mountpoint
    files = {f"f{i}.bin": pattern(f"del-{i}", 400 * KiB + i) for i in range(8)}
    mount_and_write(arc, files)
    assert arc.run_cli("sync", mp).returncode == 0
    before = data_keys(s3_server, arc)
    assert len(before) == 1, before  # 8 x 400 KiB: one pack
    gone = ["f1.bin", "f4.bin", "f5.bin"]
    for rel in gone:
        os.unlink(mp / rel)
    # The pack is repacked: the five live chunks move to a new object, the old one goes.
    arc.wait_status(
        lambda s: s["packs"] == 1 and s["pack_dead_bytes"] == 0 and idle(s) and s["garbage"] == 0
        and data_keys(s3_server, arc).isdisjoint(before),
        60, "the pack holding the deleted files to be replaced",
    )
    after = data_keys(s3_server, arc)
    assert len(after) == 1, after
    kept = {k: v for k, v in files.items() if k not in gone}
    verify_files(mp, kept, "after repacking, same mount")
    arc.umount()
    body = get_object(s3_server, arc.s3_bucket or "", f"{arc.s3_prefix}/{next(iter(after))}")
    assert len(body) == sum(len(d) + CHUNK_OVERHEAD for d in kept.values()), "only the live chunks are stored"
    arc.wipe_cache()
    arc.mount()
    verify_files(mp, kept, "after repacking, cold from the store")
    assert not any((mp / rel).exists() for rel in gone)


def test_a_read_inside_a_pack_brings_its_neighbours_unless_prefetch_is_off(s3_server: SeaweedS3, s3_archive: Archive) -> None:
    arc = s3_archive
    mp = arc.mountpoint
    files = {f"f{i}.bin": pattern(f"nb-{i}", 300 * KiB + i) for i in range(6)}  # not DICOM: no study prefetch
    mount_and_write(arc, files)
    arc.umount()
    assert len(data_keys(s3_server, arc)) == 1  # one pack

    arc.wipe_cache()
    arc.mount()
    assert_bytes_equal(read_direct(mp / "f3.bin", 4 * MiB), files["f3.bin"], "the first read")
    status = arc.status_json()
    assert (status["cache_misses"], status["fetched_chunks"]) == (1, 6), status  # one GET, the whole pack kept
    verify_files(mp, files, "the neighbours, from the cache")
    assert arc.status_json()["cache_misses"] == 1
    arc.umount()

    arc.wipe_cache()
    arc.mount(flags=["--no-prefetch"])  # only what is read is fetched
    assert_bytes_equal(read_direct(mp / "f3.bin", 4 * MiB), files["f3.bin"], "the first read, --no-prefetch")
    status = arc.status_json()
    assert (status["cache_misses"], status["fetched_chunks"]) == (1, 1), status
    verify_files(mp, files, "every file, one ranged GET each")
    assert arc.status_json()["fetched_chunks"] == 6
