"""End-to-end tests of crypto-shredding, retention/undelete and WORM on real mounts.

The attacker checks import mifs' own crypto (envelope, keyring, metasync's journal decoder):
with the KEK, every object left in the store (every version of it, for S3) is decrypted as far
as the KEK allows and searched for the shredded files' wrapped keys, file ids and content.
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3  # noqa: F401 - only for the exception type of sqlcipher3
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import sqlcipher3

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dicom_factory import Patient, StudySpec  # noqa: E402
from mifs_e2e import (  # noqa: E402
    CHUNK_MAGIC,
    Archive,
    assert_errno,
    describe,
    nonzero_pattern,
    read_file,
    wait_until,
    write_file,
)
from studies_e2e import factory_tree, study_uid, studies, wait_indexed, write_tree  # noqa: E402

from mifs.crypto import envelope  # noqa: E402
from mifs.crypto.keyring import load_key_file  # noqa: E402
from mifs.errors import IntegrityError  # noqa: E402
from mifs.metasync import decode_journal  # noqa: E402
from mifs.types import ArchiveId, FileId  # noqa: E402

CHUNK = "64KiB"
EXIT_NOT_FOUND = 9
EXIT_USAGE = 2
EXIT_REFUSED = 14


# --- the attacker ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Secret:
    """What an attacker with the KEK learns about one file while it exists."""

    file_id: bytes
    wrapped_dek: bytes
    dek: bytes
    chunks: list[tuple[str, int, int, int]]  # object key, index, generation, stored length
    marker: bytes  # a piece of its plaintext


def store_objects(arc: Archive) -> Iterator[tuple[str, bytes]]:
    """Every object (every stored version) of the archive: (key relative to the archive, bytes)."""
    if arc.s3_bucket is None:
        for path in arc.store.rglob("*"):
            if path.is_file() and ".tmp" not in path.relative_to(arc.store).parts:
                yield str(path.relative_to(arc.store)), path.read_bytes()
        return
    import boto3

    client = boto3.client("s3", endpoint_url=arc.store_flags[1], region_name=arc.env["AWS_DEFAULT_REGION"],
                          aws_access_key_id=arc.env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=arc.env["AWS_SECRET_ACCESS_KEY"])
    prefix = arc.s3_prefix + "/" if arc.s3_prefix else ""
    for page in client.get_paginator("list_object_versions").paginate(Bucket=arc.s3_bucket, Prefix=prefix):
        for version in page.get("Versions", ()):
            body = client.get_object(Bucket=arc.s3_bucket, Key=version["Key"], VersionId=version["VersionId"])["Body"].read()
            yield version["Key"][len(prefix):], body


def archive_keys(arc: Archive) -> tuple[ArchiveId, bytes, bytes, Any]:
    kek = load_key_file(arc.key_file)
    desc = dict(store_objects(arc))["mifs-archive.json"]
    archive_id = ArchiveId(bytes.fromhex(json.loads(desc)["archive_id"]))
    return archive_id, kek.derive(archive_id, "metadata-replica"), kek.derive(archive_id, "metadb"), kek


@contextmanager
def snapshot_db(replica_key: bytes, db_key: bytes, name: str, blob: bytes) -> Iterator[Any]:
    """A metadata snapshot from the store, opened with SQLCipher (from a temporary copy)."""
    image = envelope.open_blob(replica_key, 1, name.encode("ascii"), blob)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "snap.db"
        path.write_bytes(image)
        conn = sqlcipher3.connect(str(path))
        try:
            conn.execute(f"PRAGMA key = \"x'{db_key.hex()}'\"")
            yield conn
        finally:
            conn.close()


def newest_snapshot(objects: dict[str, bytes]) -> str:
    return max(k for k in objects if k.startswith("meta/snapshot/"))


def inode_of(conn: Any, relpath: str) -> int:
    inode = 1
    for part in relpath.split("/"):
        inode = conn.execute("SELECT inode FROM dentries WHERE parent = ? AND name = ?", (inode, part.encode())).fetchone()[0]
    return inode


def open_snapshot(replica_key: bytes, db_key: bytes, name: str, blob: bytes) -> list[tuple[Any, ...]]:
    """Every row of every table of a metadata snapshot."""
    with snapshot_db(replica_key, db_key, name, blob) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        rows: list[tuple[Any, ...]] = []
        for table in tables:
            rows += [tuple(r) for r in conn.execute(f'SELECT * FROM "{table}"')]
        return rows


def capture(arc: Archive, names: list[str]) -> dict[str, Secret]:
    """From the newest snapshot in the store (the archive must be unmounted): each file's keys."""
    archive_id, replica_key, db_key, kek = archive_keys(arc)
    objects = dict(store_objects(arc))
    newest = newest_snapshot(objects)
    found: dict[str, Secret] = {}
    with snapshot_db(replica_key, db_key, newest, objects[newest]) as conn:
        for rel in names:
            inode = inode_of(conn, rel)
            file_id, wrapped = conn.execute("SELECT file_id, wrapped_dek FROM inodes WHERE id = ?", (inode,)).fetchone()
            chunks = [tuple(r) for r in conn.execute(
                "SELECT object_key, idx, generation, stored_len FROM chunks WHERE inode = ?", (inode,)
            )]
            dek = envelope.unwrap_data_key(kek, archive_id, FileId(bytes(file_id)), bytes(wrapped))
            found[rel] = Secret(bytes(file_id), bytes(wrapped), dek, chunks, b"")  # type: ignore[arg-type]
    assert all(s.chunks for s in found.values()), "every captured file must have stored chunks"
    return found


def attack(arc: Archive, secrets: dict[str, Secret]) -> list[str]:
    """Everything the KEK still recovers about the given files from the store: [] when none."""
    archive_id, replica_key, db_key, _ = archive_keys(arc)
    leaks: list[str] = []
    needles = {rel: (s.file_id, s.wrapped_dek) for rel, s in secrets.items()}
    objects = list(store_objects(arc))
    assert any(k.startswith("meta/snapshot/") for k, _ in objects), "the store must still hold a metadata snapshot"
    for key, blob in objects:
        if key.startswith("meta/snapshot/"):
            for row in open_snapshot(replica_key, db_key, key, blob):
                for rel, (file_id, wrapped) in needles.items():
                    if file_id in row or wrapped in row:
                        leaks.append(f"snapshot {key} holds the key of {rel}")
        elif key.startswith("meta/journal/"):
            groups = decode_journal(envelope.open_blob(replica_key, 2, key.encode("ascii"), blob))
            for _, statements in groups:
                for _, params in statements:
                    for rel, (file_id, wrapped) in needles.items():
                        if file_id in params or wrapped in params:
                            leaks.append(f"journal {key} holds the key of {rel}")
        elif key.startswith("data/"):
            for rel, s in secrets.items():
                if key in {c[0] for c in s.chunks}:
                    leaks.append(f"chunk object {key} of {rel} is still in the store")
                for _, idx, gen, length in s.chunks:
                    # The whole object, and every sealed chunk that may sit inside a pack
                    # (docs/FORMAT.md section 5b): wherever a chunk header starts.
                    for start, piece in [(0, blob)] + [(i, blob[i:i + length]) for i in chunk_starts(blob)]:
                        try:
                            envelope.open_chunk(s.dek, archive_id, FileId(s.file_id), idx, gen, piece)
                        except IntegrityError:
                            continue
                        leaks.append(f"object {key} (at {start}) decrypts with the key of {rel}")
    return leaks


def chunk_starts(blob: bytes) -> list[int]:
    """Every offset where a sealed chunk's magic appears (a pack holds several)."""
    starts = []
    at = blob.find(CHUNK_MAGIC)
    while at >= 0:
        starts.append(at)
        at = blob.find(CHUNK_MAGIC, at + 1)
    return starts


def shred(arc: Archive, *args: object) -> subprocess.CompletedProcess[str]:
    return arc.run_cli("shred", "--yes", *args)


def files_tree(count: int, size: int, seed: str) -> dict[str, bytes]:
    return {f"d/{seed}{i}.bin": nonzero_pattern(f"{seed}{i}", size) for i in range(count)}


# --- shred -------------------------------------------------------------------------------------------


def _shred_file_and_attack(
    arc: Archive, before_shred: Callable[[], None] | None = None, at_shred: Callable[[], None] | None = None,
) -> None:
    """before_shred: runs while unmounted, before the mount that shreds; at_shred: on that
    mount, right before the shred."""
    keep = files_tree(2, 150_000, "keep")
    gone = files_tree(2, 200_000, "gone")
    arc.mount()
    write_tree(arc.mountpoint, {**keep, **gone})
    arc.umount()
    secrets = capture(arc, list(gone))
    if before_shred is not None:
        before_shred()
    assert attack(arc, secrets), "the attacker check must find the files before the shred (else it proves nothing)"
    arc.mount()
    if at_shred is not None:
        at_shred()
    result = shred(arc, *(arc.mountpoint / rel for rel in gone))
    assert result.returncode == 0, describe(result)
    assert "shredded 2 files" in result.stdout, describe(result)
    for rel in gone:
        assert not (arc.mountpoint / rel).exists(), f"{rel} still visible after shred"
        assert rel.split("/")[-1] not in os.listdir(arc.mountpoint / "d")
    assert attack(arc, secrets) == [], "the store still yields the shredded files right after shred returned"
    for rel, data in keep.items():
        assert read_file(arc.mountpoint / rel) == data
    status = arc.status_json()
    assert status["key_purge_pending"] is False and status["shredded_files"] == 2
    arc.umount()
    assert attack(arc, secrets) == [], "the store yields the shredded files after unmount"
    arc.mount()
    for rel, data in keep.items():
        assert read_file(arc.mountpoint / rel) == data
    assert not any((arc.mountpoint / rel).exists() for rel in gone)


@pytest.mark.chunk_size(CHUNK)
def test_shred_files_local_store(archive: Archive) -> None:
    _shred_file_and_attack(archive)


@pytest.mark.chunk_size(CHUNK)
@pytest.mark.s3_own_bucket
def test_shred_files_s3_versioned_bucket(s3_archive: Archive, s3_server: Any) -> None:
    """SeaweedFS (4.x) implements bucket versioning: with it on, every old version of the
    chunks and metadata objects must go too."""
    client = s3_server.client()
    bucket = s3_archive.s3_bucket
    client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    assert client.get_bucket_versioning(Bucket=bucket).get("Status") == "Enabled"

    def old_snapshot_versions() -> None:
        # More mount cycles: routine snapshots rewrite or prune older ones, which in a versioned
        # bucket stay behind as old versions (holding the files' keys).
        for _ in range(2):
            s3_archive.mount()
            s3_archive.umount()
        assert old_meta_versions(), "no old metadata versions were left behind (else the test proves nothing)"

    def old_meta_versions() -> list[str]:
        listing = client.list_object_versions(Bucket=bucket)
        return [v["Key"] for v in listing.get("Versions", []) + listing.get("DeleteMarkers", [])
                if "/meta/" in v["Key"] and not v.get("IsLatest", True)] + [
                m["Key"] for m in listing.get("DeleteMarkers", []) if "/meta/" in m["Key"]]

    def meta_versions() -> set[tuple[str, str]]:
        listing = client.list_object_versions(Bucket=bucket)
        return {(v["Key"], v["VersionId"]) for v in listing.get("Versions", []) + listing.get("DeleteMarkers", [])
                if "/meta/" in v["Key"]}

    # Every metadata version that exists when the shred starts may hold the shredded keys: none
    # may survive it, current or old. (Versions made afterwards, e.g. a journal segment of a
    # later commit pruned by a routine snapshot, hold no destroyed key.)
    before: set[tuple[str, str]] = set()
    _shred_file_and_attack(s3_archive, old_snapshot_versions, at_shred=lambda: before.update(meta_versions()))
    assert before, "no metadata versions before the shred (else the test proves nothing)"
    survivors = before & meta_versions()
    assert not survivors, f"metadata versions from before the shred survived it: {sorted(survivors)[:5]}"


@pytest.mark.chunk_size(CHUNK)
def test_shred_study_and_patient(archive: Archive) -> None:
    jane = Patient("DOE^JANE", "PID-SHRED-1")
    john = Patient("ROE^JOHN", "PID-SHRED-2")
    s1 = StudySpec(seed=71, patient=jane, images_per_series=3, rows=128, columns=128)
    s2 = StudySpec(seed=72, patient=jane, images_per_series=2, rows=128, columns=128, modality="MR")
    s3 = StudySpec(seed=73, patient=john, images_per_series=2, rows=128, columns=128)
    tree1, tree2, tree3 = factory_tree(s1), factory_tree(s2), factory_tree(s3)
    archive.mount()
    write_tree(archive.mountpoint, {**tree1, **tree2, **tree3})
    wait_indexed(archive, 7)
    archive.umount()
    secrets1, secrets2 = capture(archive, list(tree1)), capture(archive, list(tree2))
    archive.mount()
    uids = {s["study_instance_uid"] for s in studies(archive)}
    assert uids == {study_uid(s1), study_uid(s2), study_uid(s3)}

    result = shred(archive, "--study", study_uid(s1), "-m", archive.mountpoint)
    assert result.returncode == 0, describe(result)
    assert "shredded 3 files" in result.stdout, describe(result)
    assert not any((archive.mountpoint / rel).exists() for rel in tree1)
    assert {s["study_instance_uid"] for s in studies(archive)} == {study_uid(s2), study_uid(s3)}
    assert attack(archive, secrets1) == []

    result = shred(archive, "--patient", "PID-SHRED-1", "-m", archive.mountpoint)
    assert result.returncode == 0, describe(result)
    assert "shredded 2 files" in result.stdout, describe(result)
    assert {s["study_instance_uid"] for s in studies(archive)} == {study_uid(s3)}
    assert attack(archive, secrets2) == []
    for rel, data in tree3.items():
        assert read_file(archive.mountpoint / rel) == data

    result = shred(archive, "--study", study_uid(s1), "-m", archive.mountpoint)
    assert result.returncode == EXIT_NOT_FOUND, describe(result)
    assert result.stderr.startswith("mifs: error:") and "Traceback" not in result.stderr


@pytest.mark.chunk_size(CHUNK)
def test_shred_cli_errors_and_confirmation(mounted: Archive) -> None:
    arc = mounted
    write_file(arc.mountpoint / "a.bin", b"x" * 1000)
    (arc.mountpoint / "dir").mkdir()
    for args, code in (
        ((), EXIT_USAGE),
        ((arc.mountpoint / "missing.bin",), EXIT_NOT_FOUND),
        ((arc.mountpoint / "dir",), EXIT_USAGE),
        (("/tmp",), EXIT_USAGE),
        ((arc.mountpoint / "a.bin", "--study", "1.2.3"), EXIT_USAGE),
    ):
        result = shred(arc, *args)
        assert result.returncode == code, describe(result)
        assert result.stderr.startswith("mifs: error:") and "Traceback" not in result.stderr, describe(result)
    # Without --yes and without a terminal: refused, nothing destroyed.
    result = arc.run_cli("shred", arc.mountpoint / "a.bin")
    assert result.returncode == EXIT_USAGE and "--yes" in result.stderr, describe(result)
    assert read_file(arc.mountpoint / "a.bin") == b"x" * 1000
    # An open file is not shredded.
    with open(arc.mountpoint / "a.bin", "rb"):
        result = shred(arc, arc.mountpoint / "a.bin")
        assert result.returncode == EXIT_REFUSED and "open" in result.stderr, describe(result)
    assert read_file(arc.mountpoint / "a.bin") == b"x" * 1000


@pytest.mark.chunk_size(CHUNK)
@pytest.mark.s3_own_bucket
@pytest.mark.expect_log(r"WARNING .*(failed|retry|unreachable|retrying)", r"ERROR .*could not store the final")
def test_shred_interrupted_by_kill_completes_at_next_mount(s3_archive: Archive, s3_server: Any) -> None:
    arc = s3_archive
    gone = files_tree(2, 200_000, "kill")
    arc.mount()
    write_tree(arc.mountpoint, gone)
    arc.umount()
    secrets = capture(arc, list(gone))
    arc.mount()
    s3_server.stop()  # the store refuses: the shred commits its first step and waits
    proc = subprocess.Popen(
        [sys.executable, "-m", "mifs", "shred", "--yes", *(str(arc.mountpoint / r) for r in gone)],
        env={**os.environ, **arc.env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_until(lambda: not any((arc.mountpoint / r).exists() for r in gone), 60, "the shredded files to vanish")
        arc.kill_daemon()
    finally:
        proc.wait(timeout=30)
        s3_server.start()
    assert proc.returncode != 0  # the daemon died under it
    assert attack(arc, secrets), "the crash must have interrupted the shred (else this tests nothing)"
    arc.mount()
    assert not any((arc.mountpoint / r).exists() for r in gone), "a shredded file came back after the crash"
    arc.wait_status(lambda s: s["key_purge_pending"] is False and s["objects"] == 0 and s["pending_uploads"] == 0,
                    60, "the interrupted shred to finish")
    wait_until(lambda: attack(arc, secrets) == [], 30, "no trace of the shredded files in the store")


# --- retention and undelete -------------------------------------------------------------------------


@pytest.mark.chunk_size(CHUNK)
def test_retention_undelete_and_expiry(archive: Archive) -> None:
    arc = archive
    arc.mount(flags=["--retention-days", "1"])
    data = nonzero_pattern("keep-me", 300_000)
    (arc.mountpoint / "d").mkdir()
    write_file(arc.mountpoint / "d" / "img.dcm", data)
    os.unlink(arc.mountpoint / "d" / "img.dcm")
    assert not (arc.mountpoint / "d" / "img.dcm").exists()
    listing = json.loads(arc.run_cli("undelete", "--list", "--json", "-m", arc.mountpoint).stdout)
    assert [(i["path"], i["bytes"]) for i in listing] == [("d/img.dcm", 300_000)]
    # The name is taken now: refused with one line.
    write_file(arc.mountpoint / "d" / "img.dcm", b"new")
    result = arc.run_cli("undelete", arc.mountpoint / "d" / "img.dcm")
    assert result.returncode == EXIT_REFUSED and "taken" in result.stderr, describe(result)
    os.unlink(arc.mountpoint / "d" / "img.dcm")  # retained too (newer)
    result = arc.run_cli("undelete", "--id", str(listing[0]["id"]), "--to", arc.mountpoint / "d" / "back.dcm", "-m", arc.mountpoint)
    assert result.returncode == 0, describe(result)
    assert read_file(arc.mountpoint / "d" / "back.dcm") == data
    result = arc.run_cli("undelete", arc.mountpoint / "d" / "img.dcm")  # the newer one, "new"
    assert result.returncode == 0, describe(result)
    assert read_file(arc.mountpoint / "d" / "img.dcm") == b"new"
    # Survives a remount (the retained state is durable).
    os.unlink(arc.mountpoint / "d" / "back.dcm")
    arc.remount()
    result = arc.run_cli("undelete", arc.mountpoint / "d" / "back.dcm")
    assert result.returncode == 0, describe(result)
    assert read_file(arc.mountpoint / "d" / "back.dcm") == data
    result = arc.run_cli("undelete", arc.mountpoint / "d" / "never.dcm")
    assert result.returncode == EXIT_NOT_FOUND and result.stderr.startswith("mifs: error:"), describe(result)
    arc.umount()
    secrets = capture(arc, ["d/back.dcm"])

    # A tiny window (about 0.9 s): after it the key is destroyed and undelete fails cleanly.
    arc.mount(flags=["--retention-days", "0.00001"])
    os.unlink(arc.mountpoint / "d" / "back.dcm")
    arc.wait_status(lambda s: s["retained_files"] == 0 and s["purged_files"] >= 1, 30, "the retention purge")
    result = arc.run_cli("undelete", arc.mountpoint / "d" / "back.dcm")
    assert result.returncode == EXIT_NOT_FOUND, describe(result)
    arc.wait_status(lambda s: s["pending_uploads"] == 0 and s["objects"] == 1, 30, "the purged chunks to go")
    arc.umount()
    assert len([k for k, _ in store_objects(arc) if k.startswith("data/")]) == 1  # only img.dcm ("new")
    assert attack(arc, secrets) == [], "the store still yields the purged file"


@pytest.mark.chunk_size(CHUNK)
def test_unlink_without_retention_destroys_key(archive: Archive) -> None:
    arc = archive
    arc.mount()
    write_file(arc.mountpoint / "x.bin", nonzero_pattern("x", 100_000))
    arc.umount()
    secrets = capture(arc, ["x.bin"])
    arc.mount()
    os.unlink(arc.mountpoint / "x.bin")
    assert arc.run_cli("undelete", arc.mountpoint / "x.bin").returncode == EXIT_NOT_FOUND
    arc.umount()  # the unmount snapshot is a purging one: a key was destroyed
    assert attack(arc, secrets) == []


# --- WORM -------------------------------------------------------------------------------------------


@pytest.mark.chunk_size(CHUNK)
def test_worm(archive: Archive) -> None:
    arc = archive
    arc.mount(flags=["--worm", "1"])
    mp = arc.mountpoint
    # The PACS pattern: create a temporary name, write, close, rename to the final name.
    write_file(mp / "tmp.part", b"image-1")
    os.rename(mp / "tmp.part", mp / "final.dcm")
    assert read_file(mp / "final.dcm") == b"image-1"
    # A file still being written is not protected yet.
    with open(mp / "open.dcm", "wb") as fh:
        fh.write(b"abc")
        fh.flush()
        os.truncate(mp / "open.dcm", 1)
    write_file(mp / "other", b"other")
    assert_errno(errno.EPERM, os.unlink, mp / "final.dcm")
    assert_errno(errno.EPERM, os.truncate, mp / "final.dcm", 0)
    assert_errno(errno.EPERM, open, mp / "final.dcm", "r+b")
    assert_errno(errno.EPERM, open, mp / "final.dcm", "wb")
    assert_errno(errno.EPERM, os.rename, mp / "other", mp / "final.dcm")
    assert read_file(mp / "final.dcm") == b"image-1"
    result = shred(arc, mp / "final.dcm")
    assert result.returncode == EXIT_REFUSED and "WORM" in result.stderr, describe(result)
    os.rename(mp / "final.dcm", mp / "moved.dcm")  # moving keeps the data: allowed
    assert read_file(mp / "moved.dcm") == b"image-1"
    result = shred(arc, "--override-worm", mp / "moved.dcm")
    assert result.returncode == 0, describe(result)
    assert not (mp / "moved.dcm").exists()
    arc.umount()

    # A window of about 0.9 s: once it has passed, the same operations are allowed.
    arc.mount(flags=["--worm", "0.00001"])
    write_file(mp / "young.dcm", b"young")
    sealed = time.monotonic()

    def truncated() -> bool:
        try:
            os.truncate(mp / "young.dcm", 2)
        except PermissionError:
            return False
        return True

    assert_errno(errno.EPERM, os.unlink, mp / "young.dcm")  # young at first
    wait_until(truncated, 30, "the WORM window to pass")
    assert time.monotonic() - sealed >= 0.8, "truncate was allowed before the window had passed"
    assert read_file(mp / "young.dcm") == b"yo"
    write_file(mp / "other", b"replaced")
    os.rename(mp / "other", mp / "young.dcm")
    os.unlink(mp / "young.dcm")


@pytest.mark.chunk_size(CHUNK)
def test_worm_seal_is_durable_when_close_returns(archive: Archive) -> None:
    """The close of a file's only writer seals it in the same commit as its data: a daemon
    killed right after close() and rename() still protects the file after remounting."""
    arc = archive
    arc.mount(flags=["--worm", "1"])
    mp = arc.mountpoint
    for i in range(3):
        write_file(mp / f"img{i}.part", b"image-%d" % i)
        os.rename(mp / f"img{i}.part", mp / f"img{i}.dcm")
    fh = open(mp / "open.dcm", "wb")  # still being written when the daemon dies
    fh.write(b"abc")
    fh.flush()
    os.fsync(fh.fileno())
    arc.kill_daemon()
    try:
        fh.close()
    except OSError:
        pass  # the mount is gone
    arc.mount(flags=["--worm", "1"])
    for i in range(3):
        assert read_file(mp / f"img{i}.dcm") == b"image-%d" % i
        assert_errno(errno.EPERM, os.unlink, mp / f"img{i}.dcm")
        assert_errno(errno.EPERM, open, mp / f"img{i}.dcm", "r+b")
    assert read_file(mp / "open.dcm") == b"abc"
    os.unlink(mp / "open.dcm")  # never closed after writing: not protected
    arc.umount()
