"""Typed reads and writes of the retention, WORM and key-destruction state (schema version 3).

Must not decide policy (vfs/retention.py and shred/ do) nor touch the store or keys' bytes.
Destroying a file here means: its inode row (with the wrapped data key) and every row naming
it are deleted in the caller's transaction, its chunk objects become garbage (deleted from
store, every object version, and cache after the commit) and `keys_destroyed` grows, which
makes metasync replace every older metadata copy in the store (docs/FORMAT.md section 11).
"""

from __future__ import annotations

from dataclasses import dataclass

from mifs.metadb import tables
from mifs.metadb.db import MetaDb
from mifs.types import InodeId, ObjectKey

KEYS_DESTROYED = "keys_destroyed"
KEYS_PURGED = "keys_purged"


@dataclass(frozen=True)
class RetainedRow:
    inode: InodeId
    parent: InodeId
    name: bytes
    deleted_ns: int
    size: int
    study_uid: str | None
    patient_id: str | None


# --- WORM age ----------------------------------------------------------------------------------


def sealed_at(db: MetaDb, inode: InodeId) -> int | None:
    return tables.inode_sealed_ns(db, inode)


def mark_sealed(db: MetaDb, inode: InodeId, now_ns: int) -> bool:
    """Record the first close after writing (only the first one counts); True when this
    call sealed the file (False: it was sealed already)."""
    if tables.inode_sealed_ns(db, inode) is not None:
        return False  # no write: a close of a sealed file costs no commit
    return db.write_count("UPDATE inodes SET sealed_ns = ? WHERE id = ? AND sealed_ns IS NULL", (now_ns, inode), inode=inode) > 0


# --- retained (deleted, recoverable) files -----------------------------------------------------


def retain(db: MetaDb, inode: InodeId, parent: InodeId, name: bytes, now_ns: int) -> None:
    """Keep an unlinked file (nlink already 0) for undelete; its index rows go (it no longer
    is a study's file) but its study and patient are remembered for shred."""
    row = db.one(
        "SELECT s.study_uid, i.patient_id FROM dicom_instances i LEFT JOIN dicom_studies s ON s.id = i.study_id "
        "WHERE i.inode = ?",
        (inode,),
    )
    study_uid, patient_id = (row[0], row[1]) if row else (None, None)
    db.write(
        "INSERT OR REPLACE INTO retained (inode, parent, name, deleted_ns, study_uid, patient_id) VALUES (?, ?, ?, ?, ?, ?)",
        (inode, parent, name, now_ns, study_uid, patient_id),
    )
    db.write("DELETE FROM dicom_instances WHERE inode = ?", (inode,))
    db.write("DELETE FROM index_queue WHERE inode = ?", (inode,))


def is_retained(db: MetaDb, inode: InodeId) -> bool:
    return db.one("SELECT 1 FROM retained WHERE inode = ?", (inode,)) is not None


_RETAINED_COLS = "r.inode, r.parent, r.name, r.deleted_ns, i.size, r.study_uid, r.patient_id"


def _retained(rows: list[tuple[object, ...]]) -> list[RetainedRow]:
    return [
        RetainedRow(InodeId(int(r[0])), InodeId(int(r[1])), bytes(r[2]), int(r[3]), int(r[4]), r[5], r[6])  # type: ignore[arg-type, call-overload]
        for r in rows
    ]


def list_retained(db: MetaDb) -> list[RetainedRow]:
    return _retained(db.all(f"SELECT {_RETAINED_COLS} FROM retained r JOIN inodes i ON i.id = r.inode ORDER BY r.deleted_ns"))


def retained_at(db: MetaDb, parent: InodeId, name: bytes) -> RetainedRow | None:
    """The most recently deleted file that was at (parent, name)."""
    rows = _retained(db.all(
        f"SELECT {_RETAINED_COLS} FROM retained r JOIN inodes i ON i.id = r.inode "
        "WHERE r.parent = ? AND r.name = ? ORDER BY r.deleted_ns DESC LIMIT 1",
        (parent, name),
    ))
    return rows[0] if rows else None


def retained_before(db: MetaDb, cutoff_ns: int) -> list[InodeId]:
    return [InodeId(int(r[0])) for r in db.all("SELECT inode FROM retained WHERE deleted_ns < ?", (cutoff_ns,))]


def retained_of_study(db: MetaDb, study_uid: str) -> list[InodeId]:
    return [InodeId(int(r[0])) for r in db.all("SELECT inode FROM retained WHERE study_uid = ?", (study_uid,))]


def retained_of_patient(db: MetaDb, patient_id: str) -> list[InodeId]:
    return [InodeId(int(r[0])) for r in db.all("SELECT inode FROM retained WHERE patient_id = ?", (patient_id,))]


def restore(db: MetaDb, inode: InodeId, parent: InodeId, name: bytes, now_ns: int) -> None:
    """Give a retained file a name again (the caller checked the place) and queue it for
    indexing (its index row went at deletion)."""
    db.write("DELETE FROM retained WHERE inode = ?", (inode,))
    db.write("INSERT INTO dentries (parent, name, inode) VALUES (?, ?, ?)", (parent, name, inode))
    db.write("UPDATE inodes SET nlink = 1, ctime_ns = ? WHERE id = ?", (now_ns, inode), inode=inode)
    db.write(
        "INSERT INTO index_queue (inode, seq, fetch) VALUES (?, 0, 1) "
        "ON CONFLICT (inode) DO UPDATE SET seq = seq + 1, fetch = 1, deferred = 0",
        (inode,),
    )


# --- destroying ----------------------------------------------------------------------------------


def chunk_keys(db: MetaDb, inode: InodeId) -> list[tuple[ObjectKey, int]]:
    return [(ObjectKey(r[0]), int(r[1])) for r in db.all("SELECT object_key, stored_len FROM chunks WHERE inode = ?", (inode,))]


def names_of(db: MetaDb, inode: InodeId) -> list[tuple[InodeId, bytes]]:
    return [(InodeId(int(r[0])), bytes(r[1])) for r in db.all("SELECT parent, name FROM dentries WHERE inode = ?", (inode,))]


def destroy(db: MetaDb, inode: InodeId) -> None:
    """Delete a file for good in the open transaction: every name, the retained entry, the index
    rows, the chunk rows (objects -> garbage) and the inode row with its wrapped data key."""
    db.write("DELETE FROM dentries WHERE inode = ?", (inode,))
    tables.delete_inode(db, inode)  # counts the destroyed key in 'keys_destroyed'


def drop_empty_studies(db: MetaDb) -> int:
    """Forget studies no instance refers to any more (after a shred: their UIDs go too). Ids
    are AUTOINCREMENT, so they are never handed out again."""
    return db.write_count("DELETE FROM dicom_studies WHERE id NOT IN (SELECT study_id FROM dicom_instances WHERE study_id IS NOT NULL)")


def _counter(db: MetaDb, key: str) -> int:
    value = db.scalar("SELECT value FROM meta WHERE key = ?", (key,))
    return int(value) if value is not None else 0


def keys_destroyed(db: MetaDb) -> int:
    return _counter(db, KEYS_DESTROYED)


def keys_purged(db: MetaDb) -> int:
    return _counter(db, KEYS_PURGED)


def set_keys_purged(db: MetaDb, value: int) -> None:
    if value > keys_purged(db):
        db.write("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (KEYS_PURGED, value))


def garbage_left(db: MetaDb, keys: list[ObjectKey]) -> int:
    """How many of `keys` still wait for deletion from the store."""
    left = 0
    for start in range(0, len(keys), 500):
        part = keys[start : start + 500]
        marks = ", ".join("?" * len(part))
        left += int(db.scalar(f"SELECT count(*) FROM garbage WHERE object_key IN ({marks})", part) or 0)
    return left
