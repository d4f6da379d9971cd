"""Typed reads and writes of the metadata tables (schema in schema.py).

Must not decide POSIX semantics (vfs does) nor touch keys, chunks' bytes or the store.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from mifs.metadb.db import MetaDb, Row
from mifs.types import FileId, InodeId, ObjectKey

STATE_STAGED = 0
STATE_STORED = 1

_INODE_COLS = "id, mode, uid, gid, nlink, size, atime_ns, mtime_ns, ctime_ns, rdev, file_id, wrapped_dek, next_gen, target"


@dataclass
class InodeRow:
    id: InodeId
    mode: int
    uid: int
    gid: int
    nlink: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    rdev: int = 0
    file_id: FileId | None = None
    wrapped_dek: bytes | None = None
    next_gen: int = 1
    target: bytes | None = None

    @classmethod
    def from_row(cls, row: Row) -> InodeRow:
        return cls(
            InodeId(row[0]), row[1], row[2], row[3], row[4], row[5], row[6], row[7], row[8], row[9],
            FileId(row[10]) if row[10] is not None else None, row[11], row[12], row[13],
        )


@dataclass(frozen=True)
class ChunkRow:
    inode: InodeId
    idx: int
    object_key: ObjectKey
    plain_len: int
    stored_len: int
    generation: int
    state: int
    pack_key: ObjectKey | None = None
    """None: the chunk is the store object `object_key`; else stored_len bytes at pack_offset
    of this pack object (object_key then names it only in the cache)."""
    pack_offset: int = 0


# --- meta --------------------------------------------------------------------------------------


def get_meta(db: MetaDb, key: str) -> bytes | None:
    value = db.scalar("SELECT value FROM meta WHERE key = ?", (key,))
    return bytes(value) if value is not None else None


def set_meta(db: MetaDb, key: str, value: bytes) -> None:
    db.write("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))


# --- inodes ------------------------------------------------------------------------------------


_GET_INODE = f"SELECT {_INODE_COLS}, sealed_ns FROM inodes WHERE id = ?"
_SEALED_NS = 14  # the column after InodeRow's: read by retention (WORM), not kept in InodeRow


def get_inode(db: MetaDb, inode: InodeId) -> InodeRow | None:
    """A fresh InodeRow (the caller may change it and save it), from the rows the database
    keeps in memory (MetaDb.inode_row)."""
    row = db.inode_row(_GET_INODE, inode)
    return InodeRow.from_row(row) if row else None


def inode_sealed_ns(db: MetaDb, inode: InodeId) -> int | None:
    """When the file was first closed after writing (WORM age), None if never or no inode."""
    row = db.inode_row(_GET_INODE, inode)
    return int(row[_SEALED_NS]) if row is not None and row[_SEALED_NS] is not None else None


def insert_inode(db: MetaDb, row: InodeRow, *, with_id: bool = False) -> InodeId:
    cols = _INODE_COLS if with_id else _INODE_COLS.split(", ", 1)[1]
    values: tuple[object, ...] = (
        row.mode, row.uid, row.gid, row.nlink, row.size, row.atime_ns, row.mtime_ns, row.ctime_ns,
        row.rdev, row.file_id, row.wrapped_dek, row.next_gen, row.target,
    )
    if with_id:
        values = (row.id, *values)
    marks = ", ".join("?" * len(values))
    # A new row changes no kept one; with_id (a restore) may replace one: forget it.
    return InodeId(db.write(f"INSERT INTO inodes ({cols}) VALUES ({marks})", values, inode=row.id if with_id else 0))


def save_inode_attrs(db: MetaDb, row: InodeRow) -> None:
    """Persist the mutable attributes of an inode (not its key or content map)."""
    kept = db.kept_inode_row(row.id)
    attrs = (row.mode, row.uid, row.gid, row.nlink, row.size, row.atime_ns, row.mtime_ns, row.ctime_ns)
    db.write(
        "UPDATE inodes SET mode=?, uid=?, gid=?, nlink=?, size=?, atime_ns=?, mtime_ns=?, ctime_ns=? WHERE id=?",
        (*attrs, row.id),
        inode=row.id,
    )
    if kept is not None:  # the columns after ctime_ns are untouched by this statement
        db.keep_inode_row(row.id, (kept[0], *(int(v) for v in attrs), *kept[9:]))


def take_generations(db: MetaDb, inode: InodeId, count: int = 1) -> int:
    """Reserve `count` chunk generations for an inode; returns the first. Never reused."""
    row = db.inode_row(_GET_INODE, inode)
    if row is None:
        raise KeyError(f"inode {inode} does not exist")
    db.write("UPDATE inodes SET next_gen = next_gen + ? WHERE id = ?", (count, inode), inode=inode)
    first = int(row[12])  # next_gen
    db.keep_inode_row(inode, (*row[:12], first + count, *row[13:]))
    return first


def delete_inode(db: MetaDb, inode: InodeId) -> None:
    """Remove an inode with its xattrs; its chunk objects become garbage. A file's wrapped
    data key goes with the row: counted in meta 'keys_destroyed' (see metadb/retention.py)."""
    row = db.inode_row(_GET_INODE, inode)
    if row is not None and row[11] is not None:  # wrapped_dek
        db.write(
            "INSERT INTO meta (key, value) VALUES ('keys_destroyed', 1) "
            "ON CONFLICT (key) DO UPDATE SET value = coalesce(value, 0) + 1"
        )
    db.write("DELETE FROM retained WHERE inode = ?", (inode,))
    _retire_chunks(db, "inode = ?", (inode,))
    db.write("DELETE FROM xattrs WHERE inode = ?", (inode,))
    db.write("DELETE FROM dicom_instances WHERE inode = ?", (inode,))
    db.write("DELETE FROM index_queue WHERE inode = ?", (inode,))
    db.write("DELETE FROM inodes WHERE id = ?", (inode,), inode=inode)


def orphan_inodes(db: MetaDb) -> list[InodeId]:
    """Unlinked inodes that are not kept for undelete (retained)."""
    return [InodeId(r[0]) for r in db.all("SELECT id FROM inodes WHERE nlink = 0 AND id NOT IN (SELECT inode FROM retained)")]


# --- directory entries -------------------------------------------------------------------------


def lookup(db: MetaDb, parent: InodeId, name: bytes) -> InodeId | None:
    value = db.scalar("SELECT inode FROM dentries WHERE parent = ? AND name = ?", (parent, name))
    return InodeId(value) if value is not None else None


def add_dentry(db: MetaDb, parent: InodeId, name: bytes, inode: InodeId) -> None:
    db.write("INSERT INTO dentries (parent, name, inode) VALUES (?, ?, ?)", (parent, name, inode))


def remove_dentry(db: MetaDb, parent: InodeId, name: bytes) -> None:
    db.write("DELETE FROM dentries WHERE parent = ? AND name = ?", (parent, name))


def move_dentry(db: MetaDb, parent: InodeId, name: bytes, new_parent: InodeId, new_name: bytes) -> None:
    db.write(
        "UPDATE dentries SET parent = ?, name = ? WHERE parent = ? AND name = ?",
        (new_parent, new_name, parent, name),
    )


def repoint_dentry(db: MetaDb, parent: InodeId, name: bytes, inode: InodeId) -> None:
    db.write("UPDATE dentries SET inode = ? WHERE parent = ? AND name = ?", (inode, parent, name))


def has_children(db: MetaDb, parent: InodeId) -> bool:
    return db.one("SELECT 1 FROM dentries WHERE parent = ? LIMIT 1", (parent,)) is not None


def parent_of_dir(db: MetaDb, inode: InodeId) -> InodeId | None:
    value = db.scalar("SELECT parent FROM dentries WHERE inode = ? LIMIT 1", (inode,))
    return InodeId(value) if value is not None else None


def list_dentries(db: MetaDb, parent: InodeId, after_id: int, limit: int) -> list[tuple[int, bytes, InodeRow]]:
    """Entries of a directory with their inodes, in stable id order after `after_id`."""
    rows = db.all(
        f"SELECT d.id, d.name, {', '.join('i.' + c for c in _INODE_COLS.split(', '))} "
        "FROM dentries d JOIN inodes i ON i.id = d.inode "
        "WHERE d.parent = ? AND d.id > ? ORDER BY d.id LIMIT ?",
        (parent, after_id, limit),
    )
    return [(r[0], bytes(r[1]), InodeRow.from_row(r[2:])) for r in rows]


# --- chunks ------------------------------------------------------------------------------------


_CHUNK_COLS = "inode, idx, object_key, plain_len, stored_len, generation, state, pack_key, pack_offset"


def chunk_from_row(row: Row) -> ChunkRow:
    """A ChunkRow from the _CHUNK_COLS of a SELECT."""
    pack = row[7]
    return ChunkRow(
        InodeId(row[0]), row[1], ObjectKey(row[2]), row[3], row[4], row[5], row[6],
        ObjectKey(pack) if pack is not None else None, int(row[8] or 0),
    )


def get_chunk(db: MetaDb, inode: InodeId, idx: int) -> ChunkRow | None:
    row = db.one(f"SELECT {_CHUNK_COLS} FROM chunks WHERE inode = ? AND idx = ?", (inode, idx))
    return chunk_from_row(row) if row else None


def put_chunk(db: MetaDb, chunk: ChunkRow) -> ObjectKey | None:
    """Record a newly sealed chunk; the object it replaces (if any) becomes garbage and its
    key is returned."""
    old = db.scalar("SELECT object_key FROM chunks WHERE inode = ? AND idx = ?", (chunk.inode, chunk.idx))
    if old is not None:
        _retire_chunks(db, "inode = ? AND idx = ?", (chunk.inode, chunk.idx))
    db.write(
        "INSERT INTO chunks (inode, idx, object_key, plain_len, stored_len, generation, state) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        (chunk.inode, chunk.idx, chunk.object_key, chunk.plain_len, chunk.stored_len, chunk.generation, chunk.state),
    )
    return ObjectKey(old) if old is not None else None


def drop_chunks_from(db: MetaDb, inode: InodeId, first_idx: int) -> int:
    """Forget chunks at and beyond first_idx (truncate); their objects become garbage."""
    return _retire_chunks(db, "inode = ? AND idx >= ?", (inode, first_idx))


def _retire_chunks(db: MetaDb, where: str, params: tuple[object, ...]) -> int:
    """Delete the chunk rows matching `where`; what stored them becomes garbage. A chunk of its
    own is an object of its own; a chunk inside a pack leaves only its cached copy
    (cache_only), and the pack goes with the last chunk that names it, or is marked for
    repacking while others live on (no ciphertext of a deleted file may stay in the store).
    Returns the count."""
    db.write(
        "INSERT OR IGNORE INTO garbage (object_key, cache_only) "
        f"SELECT object_key, pack_key IS NOT NULL FROM chunks WHERE {where}",
        params,
    )
    packs = [r[0] for r in db.all(f"SELECT DISTINCT pack_key FROM chunks WHERE {where} AND pack_key IS NOT NULL", params)]
    count = db.write_count(f"DELETE FROM chunks WHERE {where}", params)
    for pack in packs:
        if not drop_pack_if_unused(db, ObjectKey(pack)):
            db.write("UPDATE packs SET repack = 1 WHERE pack_key = ?", (pack,))
    return count


def mark_stored(db: MetaDb, key: ObjectKey) -> None:
    db.write("UPDATE chunks SET state = ? WHERE object_key = ?", (STATE_STORED, key))


# --- packs -------------------------------------------------------------------------------------


def add_pack(db: MetaDb, pack: ObjectKey, size: int) -> None:
    """Name a pack object before its upload starts (the orphan sweep keeps what is named)."""
    db.write("INSERT INTO packs (pack_key, size) VALUES (?, ?)", (pack, size))


def mark_packed(db: MetaDb, key: ObjectKey, pack: ObjectKey, offset: int) -> bool:
    """A staged chunk is now in the store inside `pack`; False if it is no longer staged
    (dropped or stored meanwhile: its bytes in the pack are dead)."""
    return db.write_count(
        "UPDATE chunks SET state = ?, pack_key = ?, pack_offset = ? WHERE object_key = ? AND state = ?",
        (STATE_STORED, pack, offset, key, STATE_STAGED),
    ) > 0


def drop_pack(db: MetaDb, pack: ObjectKey) -> None:
    """A pack no chunk needs any more: forget it and hand it to the garbage collector."""
    db.write("DELETE FROM packs WHERE pack_key = ?", (pack,))
    db.write("INSERT OR IGNORE INTO garbage (object_key) VALUES (?)", (pack,))


def packs_to_repack(db: MetaDb, limit: int = 100) -> list[ObjectKey]:
    return [ObjectKey(r[0]) for r in db.all("SELECT pack_key FROM packs WHERE repack = 1 LIMIT ?", (limit,))]


def pack_members(db: MetaDb, pack: ObjectKey) -> list[ChunkRow]:
    """The chunks stored in a pack, in pack order."""
    return [chunk_from_row(r) for r in db.all(
        f"SELECT {_CHUNK_COLS} FROM chunks WHERE pack_key = ? ORDER BY pack_offset", (pack,)
    )]


def packs_left(db: MetaDb, packs: Sequence[ObjectKey]) -> int:
    """How many of `packs` still wait for their repack or for deletion (a repack that gave
    up, on a pack missing from the store or cut short, no longer counts: it is logged)."""
    left = 0
    for start in range(0, len(packs), 500):
        part = packs[start:start + 500]
        marks = ", ".join("?" * len(part))
        left += int(db.scalar(
            f"SELECT (SELECT count(*) FROM packs WHERE repack = 1 AND pack_key IN ({marks})) "
            f"+ (SELECT count(*) FROM garbage WHERE object_key IN ({marks}))", (*part, *part),
        ) or 0)
    return left


def packs_of_inodes(db: MetaDb, inodes: Sequence[InodeId]) -> list[ObjectKey]:
    if not inodes:
        return []
    marks = ", ".join("?" * len(inodes))
    return [ObjectKey(r[0]) for r in db.all(
        f"SELECT DISTINCT pack_key FROM chunks WHERE inode IN ({marks}) AND pack_key IS NOT NULL", tuple(inodes)
    )]


def unpack_chunk(db: MetaDb, chunk: ChunkRow, new_key: ObjectKey) -> bool:
    """Repacking: the chunk, still where `chunk` says, now has a staged copy under new_key
    (the same sealed bytes) and leaves its pack; its old key names only a cached copy
    (cache_only garbage). False if the row changed meanwhile (nothing written)."""
    moved = db.write_count(
        "UPDATE chunks SET object_key = ?, state = ?, pack_key = NULL, pack_offset = NULL "
        "WHERE object_key = ? AND pack_key = ? AND pack_offset = ?",
        (new_key, STATE_STAGED, chunk.object_key, chunk.pack_key, chunk.pack_offset),
    ) > 0
    if moved:
        db.write("INSERT OR IGNORE INTO garbage (object_key, cache_only) VALUES (?, 1)", (chunk.object_key,))
    return moved


def drop_pack_if_unused(db: MetaDb, pack: ObjectKey) -> bool:
    if db.one("SELECT 1 FROM chunks WHERE pack_key = ? LIMIT 1", (pack,)) is not None:
        return False
    drop_pack(db, pack)
    return True


def give_up_repack(db: MetaDb, pack: ObjectKey) -> None:
    db.write("UPDATE packs SET repack = 0 WHERE pack_key = ?", (pack,))


def drop_unused_packs(db: MetaDb) -> int:
    """At mount, with no upload in flight: packs no chunk names (an upload that a crash cut
    short before its chunks were recorded, or every chunk dropped meanwhile) become garbage."""
    unused = [ObjectKey(r[0]) for r in db.all(
        "SELECT pack_key FROM packs WHERE NOT EXISTS (SELECT 1 FROM chunks c WHERE c.pack_key = packs.pack_key)"
    )]
    for pack in unused:
        drop_pack(db, pack)
    return len(unused)


def pending_uploads(db: MetaDb) -> list[tuple[ObjectKey, int]]:
    return [(ObjectKey(r[0]), r[1]) for r in db.all("SELECT object_key, stored_len FROM chunks WHERE state = 0")]


def chunk_state(db: MetaDb, key: ObjectKey) -> int | None:
    value = db.scalar("SELECT state FROM chunks WHERE object_key = ?", (key,))
    return int(value) if value is not None else None


# --- garbage -----------------------------------------------------------------------------------


def garbage_keys(db: MetaDb, limit: int = 1000) -> list[ObjectKey]:
    return [ObjectKey(r[0]) for r in db.all("SELECT object_key FROM garbage LIMIT ?", (limit,))]


def garbage_in_store(db: MetaDb, key: ObjectKey) -> bool:
    """Whether deleting this garbage key must delete a store object (False: a chunk that was
    inside a pack, only its cached copy goes)."""
    return bool(db.scalar("SELECT cache_only FROM garbage WHERE object_key = ?", (key,)) != 1)


def forget_garbage(db: MetaDb, key: ObjectKey) -> None:
    db.write("DELETE FROM garbage WHERE object_key = ?", (key,))


def named_object_keys(db: MetaDb, keys: Sequence[ObjectKey]) -> set[ObjectKey]:
    """Those of `keys` a chunk, pack or garbage row names (the orphan sweep keeps them)."""
    if not keys:
        return set()
    marks = ",".join("?" * len(keys))
    rows = db.all(
        f"SELECT object_key FROM chunks WHERE object_key IN ({marks}) "
        f"UNION SELECT object_key FROM garbage WHERE object_key IN ({marks}) "
        f"UNION SELECT pack_key FROM packs WHERE pack_key IN ({marks})",
        (*keys, *keys, *keys),
    )
    return {ObjectKey(r[0]) for r in rows}


# --- extended attributes -----------------------------------------------------------------------


def get_xattr(db: MetaDb, inode: InodeId, name: bytes) -> bytes | None:
    value = db.scalar("SELECT value FROM xattrs WHERE inode = ? AND name = ?", (inode, name))
    return bytes(value) if value is not None else None


def set_xattr(db: MetaDb, inode: InodeId, name: bytes, value: bytes) -> None:
    db.write("INSERT OR REPLACE INTO xattrs (inode, name, value) VALUES (?, ?, ?)", (inode, name, value))


def remove_xattr(db: MetaDb, inode: InodeId, name: bytes) -> bool:
    return db.write_count("DELETE FROM xattrs WHERE inode = ? AND name = ?", (inode, name)) > 0


def xattrs_in_use(db: MetaDb) -> bool:
    return db.one("SELECT 1 FROM xattrs LIMIT 1") is not None


def xattr_name_in_use(db: MetaDb, name: bytes) -> bool:
    return db.one("SELECT 1 FROM xattrs WHERE name = ? LIMIT 1", (name,)) is not None


def list_xattrs(db: MetaDb, inode: InodeId) -> list[bytes]:
    return [bytes(r[0]) for r in db.all("SELECT name FROM xattrs WHERE inode = ? ORDER BY name", (inode,))]


# --- statistics --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArchiveCounts:
    files: int
    directories: int
    symlinks: int
    bytes: int
    objects: int
    """Data objects in the store the metadata names: chunks of their own and packs."""
    stored_bytes: int
    pending_uploads: int
    pending_bytes: int
    garbage: int
    chunks: int = 0
    packs: int = 0
    pack_dead_bytes: int = 0
    """Bytes of packs that no chunk needs any more (shared with live chunks, or a pack whose
    upload is in flight)."""


def counts(db: MetaDb) -> ArchiveCounts:
    files, file_bytes = db.one("SELECT count(*), coalesce(sum(size), 0) FROM inodes WHERE (mode & 61440) = 32768") or (0, 0)
    dirs = db.scalar("SELECT count(*) FROM inodes WHERE (mode & 61440) = 16384")
    links = db.scalar("SELECT count(*) FROM inodes WHERE (mode & 61440) = 40960")
    chunks, stored, unpacked, packed = db.one(
        "SELECT count(*), coalesce(sum(stored_len), 0), coalesce(sum(pack_key IS NULL), 0), "
        "coalesce(sum(CASE WHEN pack_key IS NOT NULL THEN stored_len END), 0) FROM chunks"
    ) or (0, 0, 0, 0)
    pending, pending_bytes = db.one("SELECT count(*), coalesce(sum(stored_len), 0) FROM chunks WHERE state = 0") or (0, 0)
    garbage = db.scalar("SELECT count(*) FROM garbage")
    packs, pack_bytes = db.one("SELECT count(*), coalesce(sum(size), 0) FROM packs") or (0, 0)
    return ArchiveCounts(
        files, dirs, links, file_bytes, unpacked + packs, stored, pending, pending_bytes, garbage, chunks, packs,
        pack_bytes - packed,
    )
