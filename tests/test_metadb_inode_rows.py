"""The inode rows MetaDb keeps in memory (MetaDb.inode_row, tables.get_inode): what a read
returns is always what the database holds, after every kind of change, a rollback, a replay and
the bound on how many are kept. A stale row would hand the kernel a wrong size or mode."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from mifs.metadb import db as metadb_module
from mifs.metadb import retention, tables
from mifs.metadb.db import MetaDb
from mifs.types import InodeId

KEY = bytes(range(32))
S_IFREG = 0o100000


def _new_file(db: MetaDb, size: int = 10) -> InodeId:
    row = tables.InodeRow(InodeId(0), S_IFREG | 0o644, 0, 0, 1, size, 1, 1, 1)
    return tables.insert_inode(db, row)


def _on_disk(db: MetaDb, inode: InodeId) -> tuple[int, int, int] | None:
    row = db.one("SELECT size, nlink, next_gen FROM inodes WHERE id = ?", (inode,))
    return (row[0], row[1], row[2]) if row else None


@pytest.fixture
def db(tmp_path: Path) -> Iterator[MetaDb]:
    database = MetaDb(tmp_path / "meta.db", KEY)
    yield database
    database.close()


def test_reads_follow_every_write(db: MetaDb) -> None:
    inode = _new_file(db)
    db.commit()
    row = tables.get_inode(db, inode)
    assert row is not None and row.size == 10
    row.size = 99  # a caller's copy: changing it changes nothing kept
    again = tables.get_inode(db, inode)
    assert again is not None and again.size == 10
    tables.save_inode_attrs(db, row)
    assert tables.get_inode(db, inode).size == 99 == _on_disk(db, inode)[0]  # type: ignore[union-attr,index]
    assert tables.take_generations(db, inode, 3) == 1
    assert tables.get_inode(db, inode).next_gen == 4 == _on_disk(db, inode)[2]  # type: ignore[union-attr,index]
    # A statement naming the table without saying which row: every kept row is forgotten.
    db.write("UPDATE inodes SET size = size + 1")
    assert tables.get_inode(db, inode).size == 100  # type: ignore[union-attr]
    assert retention.sealed_at(db, inode) is None
    assert retention.mark_sealed(db, inode, 5)
    assert retention.sealed_at(db, inode) == 5 and not retention.mark_sealed(db, inode, 6)
    tables.delete_inode(db, inode)
    assert tables.get_inode(db, inode) is None and _on_disk(db, inode) is None


def test_a_row_kept_after_a_write_is_what_the_database_holds(db: MetaDb) -> None:
    """save_inode_attrs and take_generations keep the row they wrote instead of reading it
    again: it must be column for column what a SELECT returns."""
    inode = _new_file(db)
    tables.get_inode(db, inode)
    row = tables.get_inode(db, inode)
    assert row is not None
    row.mode, row.uid, row.gid, row.nlink, row.size = S_IFREG | 0o600, 7, 8, 2, 12345
    row.atime_ns, row.mtime_ns, row.ctime_ns = 11, 22, 33
    tables.save_inode_attrs(db, row)
    tables.take_generations(db, inode, 2)
    kept = db.kept_inode_row(inode)
    assert kept is not None
    db._inode_rows.clear()
    assert kept == db.inode_row(tables._GET_INODE, inode)


def test_a_rollback_forgets_what_the_transaction_wrote(db: MetaDb) -> None:
    inode = _new_file(db)
    db.commit()
    row = tables.get_inode(db, inode)
    assert row is not None
    row.nlink = 7
    tables.save_inode_attrs(db, row)
    assert tables.get_inode(db, inode).nlink == 7  # type: ignore[union-attr]
    db.rollback()
    assert tables.get_inode(db, inode).nlink == 1 == _on_disk(db, inode)[1]  # type: ignore[union-attr,index]


def test_a_failed_statement_leaves_no_stale_row(db: MetaDb) -> None:
    inode = _new_file(db)
    db.commit()
    assert tables.get_inode(db, inode) is not None
    with pytest.raises(Exception):
        db.write("UPDATE inodes SET no_such_column = 1 WHERE id = ?", (inode,), inode=inode)
    db.rollback()
    assert tables.get_inode(db, inode).size == 10  # type: ignore[union-attr]


def test_a_replayed_journal_is_seen(tmp_path: Path, db: MetaDb) -> None:
    """A replica brought up to date by replay (metasync) answers with the replayed rows."""
    inode = _new_file(db)
    db.commit()
    replica = MetaDb(tmp_path / "replica.db", KEY)
    try:
        groups, _ = db.take_journal()
        replica.replay(groups)
        assert tables.get_inode(replica, inode).size == 10  # type: ignore[union-attr]
        row = tables.get_inode(db, inode)
        assert row is not None
        row.size = 4242
        tables.save_inode_attrs(db, row)
        db.commit()
        groups, _ = db.take_journal()
        assert replica.replay(groups) == 1
        assert tables.get_inode(replica, inode).size == 4242  # type: ignore[union-attr]
    finally:
        replica.close()


def test_memory_is_bounded(db: MetaDb, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metadb_module, "INODE_ROWS_KEPT", 8)
    inodes = [_new_file(db, size=i) for i in range(20)]
    db.commit()
    for i, inode in enumerate(inodes):
        assert tables.get_inode(db, inode).size == i  # type: ignore[union-attr]
    assert len(db._inode_rows) == 8
    # The newest are kept; the first ones are read from the database again, correctly.
    assert set(db._inode_rows) == set(inodes[-8:])
    assert tables.get_inode(db, inodes[0]).size == 0  # type: ignore[union-attr]
