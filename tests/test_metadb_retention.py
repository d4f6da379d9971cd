"""Schema version 3 (retention, WORM, key destruction): the upgrade of a version 2 database and
the tables' rules (metadb/retention.py)."""

from __future__ import annotations

import os
from pathlib import Path

import sqlcipher3

from mifs.metadb import retention, tables
from mifs.metadb.db import MetaDb
from mifs.metadb.schema import MIGRATIONS, SCHEMA_VERSION
from mifs.types import InodeId, ObjectKey

KEY = bytes(range(32))
S_IFREG, S_IFDIR = 0o100000, 0o040000


def _v2_database(path: Path) -> None:
    """A database exactly as a version-2 mifs left it: one directory, two files."""
    conn = sqlcipher3.connect(str(path), isolation_level=None)
    conn.execute(f"PRAGMA key = \"x'{KEY.hex()}'\"")
    for version in (1, 2):
        for statement in MIGRATIONS[version].split(";"):
            if statement.strip():
                conn.execute(statement)
    conn.execute("PRAGMA user_version = 2")
    conn.execute("INSERT INTO inodes (id, mode, uid, gid, nlink, size, atime_ns, mtime_ns, ctime_ns) VALUES (1, ?, 0, 0, 2, 0, 1, 1, 1)", (S_IFDIR | 0o755,))
    conn.execute(
        "INSERT INTO inodes (id, mode, uid, gid, nlink, size, atime_ns, mtime_ns, ctime_ns, file_id, wrapped_dek) "
        "VALUES (2, ?, 0, 0, 1, 10, 5, 123456789, 5, ?, ?)", (S_IFREG | 0o644, os.urandom(16), os.urandom(77)),
    )
    conn.execute(
        "INSERT INTO inodes (id, mode, uid, gid, nlink, size, atime_ns, mtime_ns, ctime_ns, file_id, wrapped_dek) "
        "VALUES (3, ?, 0, 0, 1, 0, 5, 999, 5, ?, ?)", (S_IFREG | 0o644, os.urandom(16), os.urandom(77)),
    )
    conn.execute("INSERT INTO dentries (parent, name, inode) VALUES (1, ?, 2), (1, ?, 3)", (b"a", b"empty"))
    conn.execute("INSERT INTO chunks VALUES (2, 0, 'data/aa/00', 10, 38, 1, 1)")
    conn.execute("INSERT INTO meta (key, value) VALUES ('commit_seq', 7)")
    conn.close()


def test_version_2_database_upgrades(tmp_path: Path) -> None:
    path = tmp_path / "meta.db"
    _v2_database(path)
    db = MetaDb(path, KEY)
    try:
        assert SCHEMA_VERSION == 4
        assert db.scalar("PRAGMA user_version") == 4
        # version 4: every chunk is an object of its own, no pack, nothing to repack
        chunk = tables.get_chunk(db, InodeId(2), 0)
        assert chunk is not None and chunk.object_key == "data/aa/00" and chunk.pack_key is None
        assert db.all("SELECT * FROM packs") == []
        assert db.scalar("SELECT count(*) FROM garbage WHERE cache_only = 1") == 0
        assert db.commit_seq == 7
        assert retention.sealed_at(db, InodeId(2)) == 123456789  # a closed file: sealed at its mtime
        assert retention.sealed_at(db, InodeId(3)) is None  # empty: never written
        assert retention.keys_destroyed(db) == 0 and retention.keys_purged(db) == 0
        assert retention.list_retained(db) == []
        assert tables.get_inode(db, InodeId(2)) is not None
        assert db.scalar("PRAGMA secure_delete") == 1
    finally:
        db.close()


def test_retain_restore_destroy(tmp_path: Path) -> None:
    path = tmp_path / "meta.db"
    _v2_database(path)
    db = MetaDb(path, KEY)
    try:
        db.write("DELETE FROM dentries WHERE inode = 2")
        db.write("UPDATE inodes SET nlink = 0 WHERE id = 2")
        retention.retain(db, InodeId(2), InodeId(1), b"a", 1000)
        db.commit()
        assert tables.orphan_inodes(db) == []  # retained files are not purged at mount
        row = retention.retained_at(db, InodeId(1), b"a")
        assert row is not None and row.inode == 2 and row.size == 10 and row.deleted_ns == 1000
        assert retention.retained_before(db, 1000) == [] and retention.retained_before(db, 1001) == [2]
        retention.restore(db, InodeId(2), InodeId(1), b"b", 2000)
        db.commit()
        assert tables.lookup(db, InodeId(1), b"b") == 2 and tables.get_inode(db, InodeId(2)).nlink == 1  # type: ignore[union-attr]
        assert db.scalar("SELECT fetch FROM index_queue WHERE inode = 2") == 1
        retention.destroy(db, InodeId(2))
        db.commit()
        assert tables.get_inode(db, InodeId(2)) is None
        assert tables.lookup(db, InodeId(1), b"b") is None
        assert tables.garbage_keys(db) == [ObjectKey("data/aa/00")]
        assert retention.keys_destroyed(db) == 1
        assert retention.garbage_left(db, [ObjectKey("data/aa/00"), ObjectKey("data/bb/00")]) == 1
        tables.delete_inode(db, InodeId(3))  # an unlink destroys a key too
        db.commit()
        assert retention.keys_destroyed(db) == 2
        retention.set_keys_purged(db, 2)
        retention.set_keys_purged(db, 1)  # never goes back
        db.commit()
        assert retention.keys_purged(db) == 2
        assert db.checkpoint_truncate() is True
    finally:
        db.close()
    assert not os.path.exists(str(path) + "-wal") or os.path.getsize(str(path) + "-wal") == 0
