"""Opening the encrypted metadata database and grouping writes into durable commits.

Must not know about FUSE, chunks in flight or the store. Every call is synchronous and short
and runs on the trio thread; commits are batched by the caller (see vfs.durability).

The database is SQLCipher 4 keyed with a raw 256-bit key derived from the KEK
(purpose "metadb"), in WAL mode with synchronous=NORMAL: a commit survives the death of the
process at once (it is in the kernel's page cache), and survives power loss once a durable
commit (`commit(durable=True)`: COMMIT, then fdatasync of the WAL file) covered it. That is
SQLite's synchronous=FULL, decided per commit instead of per connection (see commits.py).
temp_store=MEMORY keeps SQLite's temporary tables off the disk, where they would be plaintext.
"""

from __future__ import annotations

import hmac
import logging
from pathlib import Path
from typing import Any, Iterable

import sqlcipher3

from mifs.errors import LocalIOError, WrongKey
from mifs.localfs import fdatasync_path
from mifs.metadb.schema import MIGRATIONS, SCHEMA_VERSION

log = logging.getLogger(__name__)

Row = tuple[Any, ...]
Statement = tuple[str, tuple[Any, ...]]
JournalGroup = tuple[int, list[Statement]]
"""The statements of one committed transaction, with its commit sequence number."""

JOURNAL_MEMORY_LIMIT = 32 * 1024 * 1024
INODE_ROWS_KEPT = 4096
"""Inode rows kept in memory (~250 bytes each): a file's ingest reads its row and its
directories' rows about 14 times (lookup, getattr, setattr, flush, rename)."""


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
        self._conn.execute("PRAGMA synchronous = NORMAL")
        self._conn.execute("PRAGMA temp_store = MEMORY")
        self._conn.execute("PRAGMA foreign_keys = OFF")
        # Deleted rows (a destroyed file's wrapped key) are overwritten with zeros, not left
        # in free pages of the file (crypto-shredding, docs/FORMAT.md section 11).
        self._conn.execute("PRAGMA secure_delete = ON")
        self._in_txn = False
        self.commits = 0
        self._key = key
        self._migrate()
        self._txn_log: list[Statement] = []
        self._inode_rows: dict[int, Row] = {}  # see inode_row
        self._journal: list[JournalGroup] = []
        self._journal_bytes = 0
        self._journal_overflow = False
        self.commit_seq = int(self.scalar("SELECT value FROM meta WHERE key = 'commit_seq'") or 0)
        self.durable_seq = self.commit_seq
        """The last commit known to survive power loss (everything up to it is fsynced)."""
        self._wal_path = f"{path}-wal"

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

    def _execute_logged(self, sql: str, params: Iterable[Any], inode: int | None = None) -> Any:
        # Before executing: a statement that fails half-way must not leave a stale row behind.
        if "inodes" in sql:
            if inode is None:
                self._inode_rows.clear()
            else:
                self._inode_rows.pop(inode, None)
        self._begin()
        values = tuple(params)
        cur = self._conn.execute(sql, values)
        # Every statement is deterministic given the database state, so replaying the log of
        # committed statements on a snapshot reproduces the database (see metasync).
        self._txn_log.append((sql, values))
        self._journal_bytes += len(sql) + sum(len(v) if isinstance(v, (bytes, str)) else 8 for v in values)
        return cur

    def write(self, sql: str, params: Iterable[Any] = (), *, inode: int | None = None) -> int:
        """Run one modifying statement inside the open transaction; returns lastrowid.
        inode: the statement changes the inodes table in this row only (else any statement
        naming the table forgets every kept row; see inode_row)."""
        return int(self._execute_logged(sql, params, inode).lastrowid or 0)

    def write_count(self, sql: str, params: Iterable[Any] = (), *, inode: int | None = None) -> int:
        """Run one modifying statement; returns the number of rows it changed."""
        return int(self._execute_logged(sql, params, inode).rowcount)

    def kept_inode_row(self, inode: int) -> Row | None:
        """The row inode_row keeps for `inode`, without reading the database."""
        return self._inode_rows.get(inode)

    def keep_inode_row(self, inode: int, row: Row) -> None:
        """Keep `row` as inode `inode`'s: as read, or as a write the caller made left it
        (write(..., inode=inode) forgot the old one), so the next read needs no SELECT."""
        if len(self._inode_rows) >= INODE_ROWS_KEPT:
            del self._inode_rows[next(iter(self._inode_rows))]  # the oldest kept
        self._inode_rows[inode] = row

    def inode_row(self, sql: str, inode: int) -> Row | None:
        """`one(sql, (inode,))` for the inodes table's row `inode`, kept in memory; every
        caller passes the same statement (tables' one read of an inode row). Exact as long as
        every change of the table goes through write/write_count (which forget the rows they
        may change) and rollback forgets them all: this connection is the database's only
        writer while it is open (the cache directory's lock)."""
        row = self._inode_rows.get(inode)
        if row is None:
            row = self.one(sql, (inode,))
            if row is not None:
                self.keep_inode_row(inode, row)
        return row

    @property
    def dirty(self) -> bool:
        return self._in_txn

    @property
    def undurable(self) -> bool:
        """Whether commits were made that would not survive power loss yet."""
        return self.durable_seq < self.commit_seq

    def commit(self, *, durable: bool = True) -> None:
        """Commit every write so far. durable: and make it, and every earlier commit, survive
        power loss (one fdatasync of the WAL); otherwise it survives a crash of the process."""
        self._commit_txn()
        if durable and self.undurable:
            self.sync_wal_sync()
            self.durable_seq = self.commit_seq

    def mark_durable(self, seq: int) -> None:
        """Commits up to `seq` survive power loss: the WAL was synced after they were made."""
        self.durable_seq = max(self.durable_seq, seq)

    def sync_wal_sync(self) -> None:
        """fdatasync the WAL file, so every commit made before the call survives power loss.
        Touches no connection: safe in a worker thread while the trio thread keeps committing."""
        fdatasync_path(self._wal_path)  # no WAL file: checkpointed and removed, the database was synced

    def _commit_txn(self) -> None:
        if self._in_txn:
            seq = self.commit_seq + 1
            self._conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('commit_seq', ?)", (seq,))
            self._conn.execute("COMMIT")
            self._in_txn = False
            self.commit_seq = seq
            self.commits += 1
            self._journal.append((seq, self._txn_log))
            self._txn_log = []
            if self._journal_bytes > JOURNAL_MEMORY_LIMIT:
                self._journal = []
                self._journal_bytes = 0
                self._journal_overflow = True

    def rollback(self) -> None:
        self._inode_rows.clear()
        if self._in_txn:
            self._conn.execute("ROLLBACK")
            self._in_txn = False
            self._txn_log = []

    def rekey(self, key: bytes) -> None:
        """Re-encrypt the whole database under a new key (SQLCipher PRAGMA rekey: one
        transaction, so a crash leaves it under the old or the new key, never mixed). Blocks
        for the time it takes to rewrite every page; the caller commits first."""
        if self._in_txn:
            raise RuntimeError("rekey inside an open transaction")
        self._conn.execute(f"PRAGMA rekey = \"x'{key.hex()}'\"")
        self._key = key
        self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def keyed_with(self, key: bytes) -> bool:
        """Whether the database is encrypted under `key` (tells which KEK it is under)."""
        return hmac.compare_digest(self._key, key)

    # --- replication (see metasync) ---------------------------------------------------------

    def first_unshipped_seq(self) -> int:
        """The commit sequence number of the oldest transaction not yet taken by take_journal."""
        return self._journal[0][0] if self._journal else self.commit_seq + 1

    def take_journal(self) -> tuple[list[JournalGroup], bool]:
        """The durable committed transactions not yet handed out, and whether some were
        dropped (memory limit) so that only a full snapshot can bring a replica up to date.
        A light commit is handed out only once a durable commit covered it: a replica must
        never be ahead of what this database still has after a power loss."""
        cut = len(self._journal)
        while cut and self._journal[cut - 1][0] > self.durable_seq:
            cut -= 1
        groups, self._journal = self._journal[:cut], self._journal[cut:]
        overflow, self._journal_overflow = self._journal_overflow, False
        if not self._journal:
            self._journal_bytes = 0  # else an overestimate until then: at worst an early snapshot
        return groups, overflow

    def snapshot_to_sync(self, target: Path) -> int:
        """Write a consistent encrypted copy of the database to target (same key); returns the
        commit sequence number it contains. Uses its own connection: safe in a worker thread."""
        return self.snapshot_with_meta_sync(target)[0]

    def snapshot_with_meta_sync(self, target: Path, meta_key: str = "commit_seq") -> tuple[int, int]:
        """As snapshot_to_sync, and also the integer meta value `meta_key` in the copy."""
        try:
            conn = sqlcipher3.connect(str(self.path), isolation_level=None, check_same_thread=False)
            try:
                conn.execute(f"PRAGMA key = \"x'{self._key.hex()}'\"")
                conn.execute("PRAGMA temp_store = MEMORY")
                conn.execute("VACUUM INTO ?", (str(target),))  # copies live rows only, no free pages
            finally:
                conn.close()
            copy = sqlcipher3.connect(str(target))
            try:
                copy.execute(f"PRAGMA key = \"x'{self._key.hex()}'\"")
                row = copy.execute("SELECT value FROM meta WHERE key = 'commit_seq'").fetchone()
                extra = copy.execute("SELECT value FROM meta WHERE key = ?", (meta_key,)).fetchone()
            finally:
                copy.close()
        except sqlcipher3.Error as exc:
            # The cache disk is full or its directory gone: a local failure the caller can
            # survive (the mount goes on; the copy is tried again), not a broken database.
            raise LocalIOError(f"cannot copy the metadata database: {exc}") from None
        return (int(row[0]) if row else 0), (int(extra[0]) if extra and extra[0] is not None else 0)

    def replay(self, groups: list[JournalGroup]) -> int:
        """Apply shipped transactions with sequence numbers after ours, in order, stopping at a
        gap. Returns how many were applied. Not journaled again."""
        self._inode_rows.clear()
        applied = 0
        for seq, statements in sorted(groups, key=lambda g: g[0]):
            if seq <= self.commit_seq:
                continue
            if seq != self.commit_seq + 1:
                log.warning("metadata journal has a gap after commit %d; stopping there", self.commit_seq)
                break
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                for sql, values in statements:
                    self._conn.execute(sql, values)
                self._conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('commit_seq', ?)", (seq,))
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self.commit_seq = seq
            applied += 1
        if applied:
            self.commit()  # durable
        return applied

    def checkpoint_truncate(self) -> bool:
        """Copy the WAL into the database and truncate it to zero bytes, so old page images
        (a destroyed key) leave the WAL file. False if a reader kept it from completing."""
        if self._in_txn:
            return False
        busy, _, _ = self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        return not busy

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
