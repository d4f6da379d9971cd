"""End-to-end: how a PACS uses the mount: an SQLite index in WAL mode written by two
processes at once, and DICOM files written in 4 KiB pieces with fdatasync after each.

Talks to mifs only through the CLI and the mounted filesystem.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from dicom_factory import Patient, StudySpec, study_files
from mifs_e2e import Archive, assert_bytes_equal, read_file

WRITER = r"""
import sqlite3, sys, random
db, writer, txns, rows = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
con = sqlite3.connect(db, timeout=60, isolation_level=None)
con.execute("PRAGMA busy_timeout=60000")
assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
rng = random.Random(writer)
for t in range(txns):
    con.execute("BEGIN IMMEDIATE")
    for r in range(rows):
        n = t * rows + r
        con.execute(
            "INSERT INTO instances (writer, n, sop_uid, study_uid, path, size, payload) VALUES (?,?,?,?,?,?,?)",
            (writer, n, f"1.2.3.{writer}.{n}", f"1.2.3.{writer}.{n // 50}", f"/w{writer}/{n}.dcm",
             512 * 1024 + n, rng.randbytes(rng.randrange(200, 3000))),
        )
    con.execute("COMMIT")
    if t % 10 == 0:  # readers and writers interleave
        con.execute("SELECT count(*) FROM instances WHERE writer != ?", (writer,)).fetchone()
con.close()
print("done")
"""

SCHEMA = """
CREATE TABLE instances (
    id INTEGER PRIMARY KEY, writer INTEGER NOT NULL, n INTEGER NOT NULL, sop_uid TEXT UNIQUE NOT NULL,
    study_uid TEXT NOT NULL, path TEXT NOT NULL, size INTEGER NOT NULL, payload BLOB NOT NULL
);
CREATE INDEX instances_study ON instances (study_uid);
"""


def open_index(path: Path) -> sqlite3.Connection:
    con = sqlite3.connect(path, timeout=60, isolation_level=None)
    con.execute("PRAGMA busy_timeout=60000")
    return con


def check_index(path: Path, expected_per_writer: int, writers: int) -> str:
    """integrity_check is ok and every writer's rows are all there; returns a content digest."""
    con = open_index(path)
    try:
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        for writer in range(writers):
            count, distinct = con.execute(
                "SELECT count(*), count(DISTINCT n) FROM instances WHERE writer = ?", (writer,)
            ).fetchone()
            assert (count, distinct) == (expected_per_writer, expected_per_writer), f"writer {writer}"
        digest = con.execute(
            "SELECT group_concat(sop_uid || ':' || length(payload) || ':' || hex(substr(payload, 1, 8)), ',')"
            " FROM (SELECT * FROM instances ORDER BY sop_uid)"
        ).fetchone()[0]
        return str(digest)
    finally:
        con.close()


def test_sqlite_wal_two_concurrent_writers(mounted: Archive) -> None:
    db = mounted.mountpoint / "index" / "pacs.sqlite"
    db.parent.mkdir()
    con = open_index(db)
    assert con.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
    con.executescript(SCHEMA)
    con.close()

    txns, rows, writers = 60, 10, 2
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(db), str(w), str(txns), str(rows)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for w in range(writers)
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0 and out.strip() == "done", err[-3000:]
    before = check_index(db, txns * rows, writers)
    mounted.remount()
    after = check_index(db, txns * rows, writers)
    assert after == before


def test_dicom_ingest_in_4k_pieces_with_fdatasync(mounted: Archive) -> None:
    """Orthanc-style ingest: each file in 4 KiB writes, fdatasync, close, then index it."""
    root = mounted.mountpoint / "storage"
    db = mounted.mountpoint / "index.sqlite"
    con = open_index(db)
    assert con.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
    con.execute("CREATE TABLE files (path TEXT PRIMARY KEY, size INTEGER, sop_uid TEXT)")
    spec = StudySpec(seed=11, patient=Patient("ROE^RICHARD", "PID-4711"), images_per_series=20, series_count=2)
    expected: dict[Path, bytes] = {}
    for item in study_files(spec):
        path = root / item.relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            for pos in range(0, len(item.data), 4096):
                assert os.write(fd, item.data[pos:pos + 4096]) == len(item.data[pos:pos + 4096])
            os.fdatasync(fd)
        finally:
            os.close(fd)
        # readable at once, with the right size
        assert os.stat(path).st_size == len(item.data), path
        assert_bytes_equal(read_file(path), item.data, f"{item.relpath} right after close")
        con.execute("INSERT INTO files VALUES (?, ?, ?)", (str(item.relpath), len(item.data), item.sop_instance_uid))
        expected[path] = item.data
    con.close()
    mounted.remount()
    for path, data in expected.items():
        assert os.stat(path).st_size == len(data), path
        assert_bytes_equal(read_file(path), data, f"{path} after remount")
    con = open_index(db)
    try:
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert con.execute("SELECT count(*), sum(size) FROM files").fetchone() == (
            len(expected), sum(len(d) for d in expected.values()))
    finally:
        con.close()

