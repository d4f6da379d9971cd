"""End-to-end: no plaintext (patient data, names, pixels, xattrs, link targets) reaches the
store or the cache dir, and equal plaintext never gives equal ciphertext.

Talks to mifs only through the CLI, the mounted filesystem and the files it leaves behind.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import sqlite3
from pathlib import Path

import pytest

from dicom_factory import Patient, StudySpec, pixel_marker, study_files
from mifs_e2e import (
    CHUNK_HEADER_LEN,
    CHUNK_MAGIC,
    CHUNK_TAG_LEN,
    OBJECT_NAME_RE,
    WRAPPED_DEK_LEN,
    Archive,
    all_files,
    pattern,
    read_file,
    write_file,
)

PATIENT = Patient(name="DOE^JANE_SECRET", patient_id="PID-SECRET-4711", birth_date="19661231")
STUDY_DESCRIPTION = "SECRET STUDY DESCRIPTION ONCOLOGY"
DIR_NAME = "PATIENT_SMITH_JOHN_SECRET"
FILE_NAME = "DOE^JANE_SECRET.dcm"
XATTR_VALUE = b"SECRET-XATTR-VALUE-0815"
XATTR_NAME = "user.secret_attribute_name"
LINK_TARGET = "SECRET_LINK_TARGET_ROE"
SEED = 42


def write_secrets(mp: Path) -> list[bytes]:
    """Write a study full of PHI; return the byte strings that must not appear at rest."""
    spec = StudySpec(seed=SEED, patient=PATIENT, study_description=STUDY_DESCRIPTION, images_per_series=6)
    files = list(study_files(spec))
    target = mp / DIR_NAME
    target.mkdir()
    for i, item in enumerate(files):
        name = FILE_NAME if i == 0 else f"{PATIENT.patient_id}_{i:03d}.dcm"
        write_file(target / name, item.data, piece=4096)
    (mp / DIR_NAME / "by-uid").mkdir()
    write_file(mp / DIR_NAME / "by-uid" / (files[0].sop_instance_uid + ".dcm"), files[0].data)
    os.setxattr(target / FILE_NAME, XATTR_NAME, XATTR_VALUE)
    os.symlink(LINK_TARGET, target / "link")
    pixels = files[0].data[-(512 * 512 * 2):]
    return [
        PATIENT.name.encode(), PATIENT.patient_id.encode(), b"DOE^JANE", b"JANE_SECRET",
        STUDY_DESCRIPTION.encode(), DIR_NAME.encode(), FILE_NAME.encode(), XATTR_VALUE,
        XATTR_NAME.encode(), LINK_TARGET.encode(), files[0].study_instance_uid.encode(),
        files[0].sop_instance_uid.encode(), files[0].series_instance_uid.encode(),
        pixel_marker(SEED * 1000 + 1), pixels[100_000:100_032], pixels[300_000:300_064],
    ]


def find_leaks(roots: list[Path], needles: list[bytes]) -> list[str]:
    leaks = []
    for root in roots:
        for path in all_files(root):
            data = path.read_bytes()
            for needle in needles:
                if needle in data:
                    leaks.append(f"{path}: contains {needle[:40]!r}")
    return leaks


def test_no_plaintext_at_rest(archive: Archive) -> None:
    archive.mount(flags=["--xattrs"])
    needles = write_secrets(archive.mountpoint)
    os.sync()
    # while mounted: staged chunks and the metadata database must already be ciphertext
    leaks = find_leaks([archive.store, archive.cache_dir], needles)
    assert not leaks, "plaintext at rest while mounted:\n" + "\n".join(leaks[:30])
    archive.umount()
    leaks = find_leaks([archive.store, archive.cache_dir], needles)
    assert not leaks, "plaintext at rest after umount:\n" + "\n".join(leaks[:30])
    assert (archive.cache_dir / "meta.db").exists()
    # and the data is really there, for the searches above to mean something
    archive.mount()
    assert read_file(archive.mountpoint / DIR_NAME / FILE_NAME).startswith(b"\0" * 128 + b"DICM")


def test_metadata_database_is_not_plain_sqlite(archive: Archive, tmp_path: Path) -> None:
    archive.mount()
    write_file(archive.mountpoint / "f", b"x")
    archive.umount()
    db = archive.cache_dir / "meta.db"
    copy = tmp_path / "meta-copy.db"
    shutil.copyfile(db, copy)
    assert not read_file(copy).startswith(b"SQLite format 3\0")
    con = sqlite3.connect(copy)
    try:
        with pytest.raises(sqlite3.DatabaseError):
            con.execute("SELECT * FROM sqlite_master").fetchall()
    finally:
        con.close()


@pytest.mark.chunk_size("64KiB")
def test_equal_plaintext_gives_unrelated_ciphertext(archive: Archive) -> None:
    c = archive.chunk_size
    block = pattern("same", c)
    data = block * 3  # three equal chunks inside one file too
    first = archive.write_in_own_session("one", data)
    second = archive.write_in_own_session("two", data)
    assert len(first) == len(second) == 3, (sorted(first), sorted(second))
    everything = {**first, **second}
    assert len(everything) == 6, "two files share an object name"
    for key, blob in everything.items():
        parts = key.split("/")
        assert parts[0] == "data" and len(parts) == 3, key
        assert OBJECT_NAME_RE.match(parts[2]) and parts[1] == parts[2][:2], key
        assert blob[:4] == CHUNK_MAGIC and blob[4] == 1, f"{key}: header {blob[:6].hex()}"
    nonces = [blob[6:CHUNK_HEADER_LEN] for blob in everything.values()]
    assert len(set(nonces)) == len(nonces), "a nonce was used twice"
    bodies = {key: blob[CHUNK_HEADER_LEN:-CHUNK_TAG_LEN] for key, blob in everything.items()}
    for (ka, a), (kb, b) in itertools.combinations(bodies.items(), 2):
        blocks_a = {a[i:i + 16] for i in range(0, len(a) - 15, 16)}
        shared = sum(1 for i in range(0, len(b) - 15, 16) if b[i:i + 16] in blocks_a)
        assert shared == 0, f"objects {ka} and {kb} share {shared} ciphertext blocks: same key and nonce?"
    archive.mount()
    assert read_file(archive.mountpoint / "one") == data == read_file(archive.mountpoint / "two")


META_KEY_RE = re.compile(r"^(meta/(snapshot/[0-9a-f]{16}|journal/[0-9a-f]{16}-[0-9a-f]{16})|audit/segments/[0-9a-f]{16})$")


def test_store_holds_only_the_documented_layout(archive: Archive) -> None:
    """docs/FORMAT.md section 2: the descriptor, data/<h2>/<h32> chunks (magic MIFC),
    meta/ snapshots and journal segments and audit segments (magic MIFM), the wrapped audit
    key and the audit head; nothing left in .tmp/."""
    archive.mount()
    write_file(archive.mountpoint / "f", pattern("layout", 5 * 1024 * 1024))
    (archive.mountpoint / "d").mkdir()
    archive.umount()
    archive.mount()
    os.unlink(archive.mountpoint / "f")
    archive.umount()
    unexpected, snapshots = [], 0
    for path in all_files(archive.store):
        key = str(path.relative_to(archive.store))
        rel = key.split("/")
        head = path.read_bytes()[:5]
        if key == "mifs-archive.json":
            continue
        if rel[0] == ".tmp":
            unexpected.append(f"{key}: temp file left after umount")
        elif len(rel) == 3 and rel[0] == "data" and OBJECT_NAME_RE.match(rel[2]) and rel[1] == rel[2][:2]:
            if head != CHUNK_MAGIC + b"\x01":
                unexpected.append(f"{key}: chunk object starts with {head!r}")
        elif key == "audit/key":
            if len(path.read_bytes()) != WRAPPED_DEK_LEN or head[0] != 1:
                unexpected.append(f"{key}: not a wrapped key")
        elif key == "audit/head":
            if set(json.loads(path.read_bytes())) != {"head", "hmac"}:
                unexpected.append(f"{key}: not an audit head")
        elif META_KEY_RE.match(key):
            snapshots += rel[0] == "meta" and rel[1] == "snapshot"
            if head != b"MIFM\x01":
                unexpected.append(f"{key}: metadata blob starts with {head!r}")
        else:
            unexpected.append(f"{key}: not in the documented layout")
    assert not unexpected, unexpected
    assert 1 <= snapshots <= 2, f"{snapshots} metadata snapshots in the store (the two newest are kept)"


@pytest.mark.chunk_size("64KiB")
def test_deleted_data_leaves_no_objects(archive: Archive) -> None:
    """Unlinked files and truncated-away chunks do not stay in the store as ciphertext."""
    c = archive.chunk_size
    first = archive.write_in_own_session("gone", pattern("gone", 3 * c))
    second = archive.write_in_own_session("shrunk", pattern("shrunk", 2 * c))
    third = archive.write_in_own_session("open-unlinked", pattern("open-unlinked", 2 * c))
    archive.mount()
    mp = archive.mountpoint
    os.unlink(mp / "gone")
    os.truncate(mp / "shrunk", c // 2)
    fd = os.open(mp / "open-unlinked", os.O_RDONLY)
    try:
        os.unlink(mp / "open-unlinked")
        assert os.pread(fd, 10, c) == pattern("open-unlinked", 2 * c)[c:c + 10]
    finally:
        os.close(fd)
    archive.umount()
    left = set(archive.chunk_objects())
    assert not left & set(first), "objects of an unlinked file are still in the store"
    assert not left & set(third), "objects of a file unlinked while open are still in the store"
    assert len(left & set(second)) <= 1, "objects of truncated-away chunks are still in the store"
    assert len(left) == 1, f"expected only the shrunk file's one chunk, found {len(left)} objects"
    archive.mount()
    assert read_file(mp / "shrunk") == pattern("shrunk", 2 * c)[:c // 2]
