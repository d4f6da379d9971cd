"""Opening the encrypted metadata database and grouping writes into durable commits.

Must not know about FUSE, chunks in flight or the store. Every call is synchronous and short
and runs on the trio thread; commits are batched by the caller (see vfs.durability).

The database is SQLCipher 4 keyed with a raw 256-bit key derived from the KEK
(purpose "metadb"), in WAL mode with synchronous=FULL so that a commit survives power loss.
temp_store=MEMORY keeps SQLite's temporary tables off the disk, where they would be plaintext.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable

import sqlcipher3

from mifs.errors import WrongKey
from mifs.metadb.schema import MIGRATIONS, SCHEMA_VERSION

log = logging.getLogger(__name__)

Row = tuple[Any, ...]


class DatabaseTooNew(Exception):
    """The database was written by a newer mifs."""


class MetaDb:
    """One connection to the metadata database, in explicit-transaction mode."""

    def __init__(self, path: Path, key: bytes) -> None:
        self.path = path
        self._conn = sqlcipher3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._conn.execute(f"PRAGMA key = \"x'{key.hex()}'\"")
        try:
            self._conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlcipher3.DatabaseError:
            self._conn.close()
            raise WrongKey("the metadata database cannot be opened with this key") from None
        self._conn.execute("PRAGMA journal_mode = WAL")
        self._conn.execute("PRAGMA synchronous = FULL")
        self._conn.execute("PRAGMA temp_store = MEMORY")
        self._conn.execute("PRAGMA foreign_keys = OFF")
        self._in_txn = False
        self.commits = 0
        self._migrate()

    def _migrate(self) -> None:
        version = self._conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise DatabaseTooNew(f"metadata schema version {version} is newer than this mifs ({SCHEMA_VERSION})")
        while version < SCHEMA_VERSION:
            version += 1
            log.info("migrating metadata database to schema version %d", version)
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in MIGRATIONS[version].split(";"):
                    if statement.strip():
                        self._conn.execute(statement)
                self._conn.execute(f"PRAGMA user_version = {version}")
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    # --- writes: grouped into one open transaction until commit() ------------------------

    def _begin(self) -> None:
        if not self._in_txn:
            self._conn.execute("BEGIN IMMEDIATE")
            self._in_txn = True

    def write(self, sql: str, params: Iterable[Any] = ()) -> int:
        """Run one modifying statement inside the open transaction; returns lastrowid."""
        self._begin()
        cur = self._conn.execute(sql, tuple(params))
        return int(cur.lastrowid or 0)

    def write_count(self, sql: str, params: Iterable[Any] = ()) -> int:
        """Run one modifying statement; returns the number of rows it changed."""
        self._begin()
        return int(self._conn.execute(sql, tuple(params)).rowcount)

    @property
    def dirty(self) -> bool:
        return self._in_txn

    def commit(self) -> None:
        """Make every write so far durable (one WAL fsync)."""
        if self._in_txn:
            self._conn.execute("COMMIT")
            self._in_txn = False
            self.commits += 1

    def rollback(self) -> None:
        if self._in_txn:
            self._conn.execute("ROLLBACK")
            self._in_txn = False

    # --- reads ------------------------------------------------------------------------------

    def one(self, sql: str, params: Iterable[Any] = ()) -> Row | None:
        row = self._conn.execute(sql, tuple(params)).fetchone()
        return tuple(row) if row is not None else None

    def all(self, sql: str, params: Iterable[Any] = ()) -> list[Row]:
        return [tuple(r) for r in self._conn.execute(sql, tuple(params)).fetchall()]

    def scalar(self, sql: str, params: Iterable[Any] = ()) -> Any:
        row = self._conn.execute(sql, tuple(params)).fetchone()
        return None if row is None else row[0]

    def close(self) -> None:
        self.commit()
        try:
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            self._conn.close()
