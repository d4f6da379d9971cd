"""Schema of the metadata database and the migrations that reach it.

Must not hold queries used at run time (see tables.py) nor any key material.

Version 1 (documented in docs/FORMAT.md, "Metadata database"):

- meta(key TEXT PRIMARY KEY, value BLOB): 'schema_version', 'archive_id', 'chunk_size'.
- inodes: one row per file, directory or symlink; ids are never reused (AUTOINCREMENT). ``mode`` is the full st_mode (type bits
  included). Files carry ``file_id`` (16 random bytes bound into every chunk's AAD) and
  ``wrapped_dek`` (see envelope.wrap_data_key). ``next_gen`` is the next chunk generation of
  the file: generations only grow, so an old chunk object can never be replayed.
  Symlinks keep their target in ``target``. ``nlink`` = 0 marks an unlinked inode that is
  still open; such rows are purged when the last handle closes or at the next mount.
- dentries: (parent, name) -> inode. ``id`` is never reused (AUTOINCREMENT) and serves as the
  stable readdir offset.
- chunks: (inode, idx) -> object_key, plaintext length, stored length, generation, state
  (0 = staged on local disk only, 1 = in the store).
- xattrs: extended attributes (name and value as bytes).
- garbage: object keys no committed row refers to any more; deleted from store and cache after
  the commit that orphaned them.
"""

from __future__ import annotations

from typing import Callable

SCHEMA_VERSION = 1

_V1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB);
CREATE TABLE inodes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    mode INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    gid INTEGER NOT NULL,
    nlink INTEGER NOT NULL,
    size INTEGER NOT NULL DEFAULT 0,
    atime_ns INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL,
    rdev INTEGER NOT NULL DEFAULT 0,
    file_id BLOB,
    wrapped_dek BLOB,
    next_gen INTEGER NOT NULL DEFAULT 1,
    target BLOB
);
CREATE TABLE dentries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    parent INTEGER NOT NULL,
    name BLOB NOT NULL,
    inode INTEGER NOT NULL,
    UNIQUE (parent, name)
);
CREATE INDEX dentries_by_inode ON dentries (inode);
CREATE TABLE chunks (
    inode INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    object_key TEXT NOT NULL UNIQUE,
    plain_len INTEGER NOT NULL,
    stored_len INTEGER NOT NULL,
    generation INTEGER NOT NULL,
    state INTEGER NOT NULL,
    PRIMARY KEY (inode, idx)
) WITHOUT ROWID;
CREATE INDEX chunks_pending ON chunks (state) WHERE state = 0;
CREATE TABLE xattrs (
    inode INTEGER NOT NULL,
    name BLOB NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (inode, name)
) WITHOUT ROWID;
CREATE TABLE garbage (object_key TEXT PRIMARY KEY) WITHOUT ROWID;
"""

Execute = Callable[[str], object]

MIGRATIONS: dict[int, str] = {1: _V1}
"""Script that takes the schema from version N-1 to N; version 0 is an empty database."""
