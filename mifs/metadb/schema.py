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

Version 2 adds the DICOM study index (see dicom_index/ and docs/FORMAT.md):

- dicom_studies: one row per Study Instance UID ever indexed; ``pinned`` = 1 keeps the study's
  chunks in the local cache. Ids are never reused; the cache groups chunks by this id.
- dicom_instances: one row per indexed inode (hard links count once; the path is looked up
  live, so renames need no update). ``status`` 1 = indexed, 2 = malformed (Part 10 magic but
  no usable header; ``error`` says why, never quoting the file).
- index_queue: inodes whose content changed and must be (re)indexed; written in the same
  transaction as the change, so a crash never loses an indexing job. ``seq`` detects a change
  that arrived while the indexer was reading; ``fetch`` = 1 lets the indexer fetch the header
  from the store (reindex, upgrade); ``deferred`` = 1 marks a header that was not local.
  The migration queues every existing file once, so an upgraded archive gets indexed.

Version 3 adds crypto-shredding, retention and WORM (see shred/, vfs/retention.py):

- inodes.sealed_ns: when the file was first closed by its last writer with content (the
  WORM age counts from here); NULL while it was never closed after writing. The migration
  sets it to the mtime of every existing non-empty file (they are all closed).
- retained: unlinked files kept for `--retention-days` (inode row, key and chunks intact,
  nlink 0) with where they were (parent inode, name) and when they were deleted, plus the
  study UID and Patient ID from the index (so shredding a study or patient also destroys its
  retained files; their index rows go at deletion).
- meta 'keys_destroyed' / 'keys_purged': counters. Every destruction of a data key (unlink,
  purge, shred) raises keys_destroyed in its transaction; metasync, once a fresh snapshot
  holding that value is in the store and every older metadata object (all versions) is
  deleted, records it as keys_purged. keys_destroyed > keys_purged: old metadata copies in
  the store may still hold a destroyed key.

Version 4 packs small chunks into larger store objects (see uploader.py, docs/FORMAT.md "Pack
object"): one GET or PUT per few MiB instead of one per chunk.

- chunks.pack_key, chunks.pack_offset: NULL, the chunk is the object `object_key`; otherwise
  its stored_len bytes at pack_offset of the object `pack_key` (object_key then names the
  chunk in the cache only, never in the store).
- packs: every pack object the metadata names, with its size. A row exists from before its
  upload starts (so the orphan sweep never takes a pack in flight); a pack no chunk names any
  more goes to `garbage` in the transaction that drops its last chunk, or at the next mount.
  ``repack`` = 1: a chunk of the pack was dropped while others live on; the uploader moves
  the live ones into new objects and the pack then goes, so no ciphertext of a deleted or
  shredded file stays in the store (uploader.py, "Repacking").
- garbage.cache_only = 1: the key named a chunk inside a pack; only its cached copy is
  deleted (the pack goes once its last chunk does).
"""

from __future__ import annotations

from typing import Callable

SCHEMA_VERSION = 4

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

_V2 = """
CREATE TABLE dicom_studies (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    study_uid TEXT NOT NULL UNIQUE,
    pinned INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE dicom_instances (
    inode INTEGER PRIMARY KEY,
    status INTEGER NOT NULL,
    error TEXT,
    study_id INTEGER,
    patient_id TEXT,
    patient_name TEXT,
    series_uid TEXT,
    sop_uid TEXT,
    sop_class_uid TEXT,
    modality TEXT,
    study_date TEXT,
    study_time TEXT,
    accession_number TEXT,
    study_description TEXT,
    series_number INTEGER,
    instance_number INTEGER,
    transfer_syntax TEXT,
    indexed_ns INTEGER NOT NULL
);
CREATE INDEX dicom_instances_by_study ON dicom_instances (study_id);
CREATE INDEX dicom_instances_by_patient ON dicom_instances (patient_id);
CREATE TABLE index_queue (
    inode INTEGER PRIMARY KEY,
    seq INTEGER NOT NULL,
    fetch INTEGER NOT NULL DEFAULT 0,
    deferred INTEGER NOT NULL DEFAULT 0
);
INSERT INTO index_queue (inode, seq, fetch) SELECT id, 0, 1 FROM inodes WHERE (mode & 61440) = 32768;
"""

_V3 = """
ALTER TABLE inodes ADD COLUMN sealed_ns INTEGER;
UPDATE inodes SET sealed_ns = mtime_ns WHERE (mode & 61440) = 32768 AND size > 0;
CREATE TABLE retained (
    inode INTEGER PRIMARY KEY,
    parent INTEGER NOT NULL,
    name BLOB NOT NULL,
    deleted_ns INTEGER NOT NULL,
    study_uid TEXT,
    patient_id TEXT
);
CREATE INDEX retained_by_place ON retained (parent, name);
INSERT OR IGNORE INTO meta (key, value) VALUES ('keys_destroyed', 0);
INSERT OR IGNORE INTO meta (key, value) VALUES ('keys_purged', 0)
"""

Execute = Callable[[str], object]

_V4 = """
ALTER TABLE chunks ADD COLUMN pack_key TEXT;
ALTER TABLE chunks ADD COLUMN pack_offset INTEGER;
CREATE INDEX chunks_by_pack ON chunks (pack_key) WHERE pack_key IS NOT NULL;
CREATE TABLE packs (pack_key TEXT PRIMARY KEY, size INTEGER NOT NULL, repack INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID;
CREATE INDEX packs_to_repack ON packs (repack) WHERE repack = 1;
ALTER TABLE garbage ADD COLUMN cache_only INTEGER NOT NULL DEFAULT 0
"""

MIGRATIONS: dict[int, str] = {1: _V1, 2: _V2, 3: _V3, 4: _V4}
"""Script that takes the schema from version N-1 to N; version 0 is an empty database."""
