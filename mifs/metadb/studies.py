"""Typed reads and writes of the DICOM study index tables (schema version 2, see schema.py).

Must not parse DICOM (dicom_index does) nor touch chunks' bytes, the cache or the store.
Study-level attributes are aggregated from the instances at query time, so a deleted or
re-indexed instance can never leave a stale study row behind.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Iterable, Iterator

from mifs.metadb.db import MetaDb, Row
from mifs.types import ROOT_INODE, InodeId, ObjectKey

STATUS_INDEXED = 1
STATUS_MALFORMED = 2
_REGULAR = "(mode & 61440) = 32768"
_BATCH = 500


@dataclass(frozen=True)
class InstanceFields:
    """What the index keeps of one instance: what dicom_index.header reads from its header.
    Dates are ISO 8601 (YYYY-MM-DD) and times HH:MM:SS, or None when absent or invalid."""

    patient_id: str
    patient_name: str
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    modality: str
    study_date: str | None
    study_time: str | None
    accession_number: str
    study_description: str
    series_number: int | None
    instance_number: int | None
    transfer_syntax: str | None


@dataclass(frozen=True)
class QueuedFile:
    inode: InodeId
    seq: int
    fetch: bool


@dataclass(frozen=True)
class StudyFilter:
    patient_id: str | None = None
    study_uid: str | None = None
    since: str | None = None  # ISO date
    modality: str | None = None


@dataclass(frozen=True)
class StudySummary:
    id: int
    study_uid: str
    pinned: bool
    patient_id: str
    patient_name: str
    study_date: str | None
    study_time: str | None
    accession_number: str
    study_description: str
    modalities: list[str]
    series: int
    instances: int
    bytes: int


@dataclass(frozen=True)
class StudyChunks:
    stored_bytes: int
    objects: int
    pending: int  # chunks not yet in the store


@dataclass(frozen=True)
class InstanceRow:
    inode: InodeId
    study_uid: str
    fields: InstanceFields
    bytes: int


@dataclass(frozen=True)
class ChunkRef:
    inode: InodeId
    idx: int
    object_key: ObjectKey
    stored_len: int
    state: int
    plain_len: int
    generation: int
    file_id: bytes
    wrapped_dek: bytes
    pack_key: ObjectKey | None = None
    pack_offset: int = 0


# --- the queue of files to (re)index -----------------------------------------------------------

_seq = itertools.count(time.time_ns())


def queue_change(db: MetaDb, inode: InodeId, *, fetch: bool = False) -> None:
    """The content of inode changed: index it again (in the caller's transaction)."""
    db.write(
        "INSERT OR REPLACE INTO index_queue (inode, seq, fetch, deferred) VALUES (?, ?, ?, 0)",
        (inode, next(_seq), int(fetch)),
    )


def queue_all_files(db: MetaDb) -> int:
    """Queue every regular file, allowing store fetches (reindex); returns how many."""
    return db.write_count(
        f"INSERT OR REPLACE INTO index_queue (inode, seq, fetch, deferred) SELECT id, ?, 1, 0 FROM inodes WHERE {_REGULAR}",
        (next(_seq),),
    )


def next_queued(db: MetaDb, limit: int) -> list[QueuedFile]:
    rows = db.all("SELECT inode, seq, fetch FROM index_queue WHERE deferred = 0 ORDER BY seq LIMIT ?", (limit,))
    return [QueuedFile(InodeId(r[0]), r[1], bool(r[2])) for r in rows]


def finish_queued(db: MetaDb, job: QueuedFile) -> bool:
    """Take the job off the queue unless the file changed again meanwhile (then it stays)."""
    return db.write_count("DELETE FROM index_queue WHERE inode = ? AND seq = ?", (job.inode, job.seq)) == 1


def defer_queued(db: MetaDb, job: QueuedFile) -> None:
    db.write("UPDATE index_queue SET deferred = 1 WHERE inode = ? AND seq = ?", (job.inode, job.seq))


def backlog(db: MetaDb) -> tuple[int, int]:
    """(files waiting to be indexed, files deferred until a reindex)."""
    row = db.one("SELECT count(*), coalesce(sum(deferred), 0) FROM index_queue") or (0, 0)
    return int(row[0]) - int(row[1]), int(row[1])


# --- instances ---------------------------------------------------------------------------------


def study_id(db: MetaDb, study_uid: str) -> int:
    """The numeric id of a study, created on first sight."""
    value = db.scalar("SELECT id FROM dicom_studies WHERE study_uid = ?", (study_uid,))
    if value is not None:
        return int(value)
    return db.write("INSERT INTO dicom_studies (study_uid) VALUES (?)", (study_uid,))


def put_instance(db: MetaDb, inode: InodeId, f: InstanceFields) -> int:
    """Index one inode as an instance of its study; returns the study id."""
    sid = study_id(db, f.study_uid)
    db.write(
        "INSERT OR REPLACE INTO dicom_instances (inode, status, error, study_id, patient_id, patient_name, series_uid, "
        "sop_uid, sop_class_uid, modality, study_date, study_time, accession_number, study_description, series_number, "
        "instance_number, transfer_syntax, indexed_ns) VALUES (?, ?, NULL, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            inode, STATUS_INDEXED, sid, f.patient_id, f.patient_name, f.series_uid, f.sop_uid, f.sop_class_uid,
            f.modality, f.study_date, f.study_time, f.accession_number, f.study_description, f.series_number,
            f.instance_number, f.transfer_syntax, time.time_ns(),
        ),
    )
    return sid


def put_malformed(db: MetaDb, inode: InodeId, error: str) -> None:
    db.write(
        "INSERT OR REPLACE INTO dicom_instances (inode, status, error, indexed_ns) VALUES (?, ?, ?, ?)",
        (inode, STATUS_MALFORMED, error, time.time_ns()),
    )


def drop_instance(db: MetaDb, inode: InodeId) -> None:
    db.write("DELETE FROM dicom_instances WHERE inode = ?", (inode,))


def study_of_inode(db: MetaDb, inode: InodeId) -> int | None:
    value = db.scalar("SELECT study_id FROM dicom_instances WHERE inode = ? AND status = 1", (inode,))
    return int(value) if value is not None else None


def study_of_key(db: MetaDb, key: ObjectKey) -> int | None:
    value = db.scalar(
        "SELECT d.study_id FROM chunks c JOIN dicom_instances d ON d.inode = c.inode WHERE c.object_key = ? AND d.status = 1",
        (key,),
    )
    return int(value) if value is not None else None


def chunk_keys(db: MetaDb, inode: InodeId) -> list[ObjectKey]:
    return [ObjectKey(r[0]) for r in db.all("SELECT object_key FROM chunks WHERE inode = ?", (inode,))]


def counts(db: MetaDb) -> tuple[int, int, int]:
    """(indexed instances, studies with at least one, malformed files)."""
    row = db.one(
        "SELECT coalesce(sum(status = 1), 0), count(DISTINCT study_id), coalesce(sum(status = 2), 0) FROM dicom_instances"
    ) or (0, 0, 0)
    return int(row[0]), int(row[1]), int(row[2])


# --- studies -----------------------------------------------------------------------------------


def find_study(db: MetaDb, study_uid: str) -> tuple[int, bool] | None:
    """(id, pinned) of a study that has indexed instances or a pin; None if unknown."""
    row = db.one(
        "SELECT s.id, s.pinned FROM dicom_studies s WHERE s.study_uid = ? AND (s.pinned = 1 OR EXISTS "
        "(SELECT 1 FROM dicom_instances d WHERE d.study_id = s.id AND d.status = 1))",
        (study_uid,),
    )
    return (int(row[0]), bool(row[1])) if row else None


def set_pinned(db: MetaDb, sid: int, pinned: bool) -> None:
    db.write("UPDATE dicom_studies SET pinned = ? WHERE id = ?", (int(pinned), sid))


def pinned_ids(db: MetaDb) -> list[int]:
    return [int(r[0]) for r in db.all("SELECT id FROM dicom_studies WHERE pinned = 1")]


def studies_of_patient(db: MetaDb, patient_id: str) -> list[int]:
    """Ids of the patient's studies, most recent first (by study date and time)."""
    rows = db.all(
        "SELECT study_id, max(coalesce(study_date, '')) AS d, max(coalesce(study_time, '')) AS t FROM dicom_instances "
        "WHERE status = 1 AND patient_id = ? GROUP BY study_id ORDER BY d DESC, t DESC, study_id DESC",
        (patient_id,),
    )
    return [int(r[0]) for r in rows]


def patient_of_study(db: MetaDb, sid: int) -> str:
    return str(db.scalar("SELECT max(patient_id) FROM dicom_instances WHERE study_id = ? AND status = 1", (sid,)) or "")


def list_studies(db: MetaDb, flt: StudyFilter, ids: Iterable[int] | None = None) -> list[StudySummary]:
    """Indexed studies matching the filter (and among `ids` when given), most recent first."""
    where = ["d.status = 1"]
    having: list[str] = []
    params: list[object] = []
    if flt.study_uid is not None:
        where.append("s.study_uid = ?")
        params.append(flt.study_uid)
    if flt.patient_id is not None:
        where.append("s.id IN (SELECT study_id FROM dicom_instances WHERE status = 1 AND patient_id = ?)")
        params.append(flt.patient_id)
    if ids is not None:
        id_list = sorted(set(ids))
        if not id_list:
            return []
        where.append(f"s.id IN ({', '.join(str(int(i)) for i in id_list)})")
    hparams: list[object] = []
    if flt.since is not None:
        having.append("min(d.study_date) >= ?")
        hparams.append(flt.since)
    if flt.modality is not None:
        having.append("sum(upper(d.modality) = upper(?)) > 0")
        hparams.append(flt.modality)
    sql = (
        "SELECT s.id, s.study_uid, s.pinned, max(d.patient_id), max(d.patient_name), min(d.study_date), "
        "min(d.study_time), max(d.accession_number), max(d.study_description), group_concat(DISTINCT d.modality), "
        "count(DISTINCT d.series_uid), count(*), coalesce(sum(i.size), 0) "
        "FROM dicom_instances d JOIN dicom_studies s ON s.id = d.study_id JOIN inodes i ON i.id = d.inode "
        f"WHERE {' AND '.join(where)} GROUP BY s.id"
        + (f" HAVING {' AND '.join(having)}" if having else "")
        + " ORDER BY min(d.study_date) IS NULL, min(d.study_date) DESC, min(d.study_time) DESC, s.study_uid"
    )
    result = []
    for r in db.all(sql, (*params, *hparams)):
        modalities = sorted({m for m in (r[9] or "").split(",") if m})
        result.append(StudySummary(
            int(r[0]), r[1], bool(r[2]), r[3] or "", r[4] or "", r[5], r[6], r[7] or "", r[8] or "",
            modalities, int(r[10]), int(r[11]), int(r[12]),
        ))
    return result


def study_chunks(db: MetaDb, ids: list[int]) -> dict[int, StudyChunks]:
    """Stored bytes, object count and pending uploads of each study's chunks."""
    result: dict[int, StudyChunks] = {}
    for batch in _batches(ids):
        marks = ", ".join("?" * len(batch))
        for r in db.all(
            "SELECT d.study_id, coalesce(sum(c.stored_len), 0), count(c.object_key), coalesce(sum(c.state = 0), 0) "
            f"FROM dicom_instances d JOIN chunks c ON c.inode = d.inode WHERE d.status = 1 AND d.study_id IN ({marks}) "
            "GROUP BY d.study_id",
            batch,
        ):
            result[int(r[0])] = StudyChunks(int(r[1]), int(r[2]), int(r[3]))
    return result


def study_chunk_refs(db: MetaDb, sid: int) -> list[ChunkRef]:
    """Every chunk of a study in viewing order: series by series, instance number, offset."""
    rows = db.all(
        f"SELECT {_REF_COLS} "
        "FROM dicom_instances d JOIN chunks c ON c.inode = d.inode JOIN inodes i ON i.id = d.inode "
        "WHERE d.study_id = ? AND d.status = 1 "
        "ORDER BY d.series_number IS NULL, d.series_number, d.series_uid, d.instance_number IS NULL, "
        "d.instance_number, d.inode, c.idx",
        (sid,),
    )
    return [_chunk_ref(r) for r in rows]


_REF_COLS = (
    "c.inode, c.idx, c.object_key, c.stored_len, c.state, c.plain_len, c.generation, i.file_id, i.wrapped_dek, "
    "c.pack_key, c.pack_offset"
)
"""The columns _chunk_ref reads, from chunks c joined with inodes i."""


def _chunk_ref(r: Row) -> ChunkRef:
    return ChunkRef(
        InodeId(r[0]), int(r[1]), ObjectKey(r[2]), int(r[3]), int(r[4]), int(r[5]), int(r[6]), bytes(r[7]), bytes(r[8]),
        ObjectKey(r[9]) if r[9] is not None else None, int(r[10] or 0),
    )


def pack_neighbours(db: MetaDb, pack: ObjectKey, but: ObjectKey) -> list[tuple[ChunkRef, int | None]]:
    """The other chunks stored in a pack, with their files' keys and their studies (None:
    not an indexed DICOM file): a read that fetches the pack keeps them too."""
    rows = db.all(
        f"SELECT {_REF_COLS}, d.study_id "
        "FROM chunks c JOIN inodes i ON i.id = c.inode LEFT JOIN dicom_instances d ON d.inode = c.inode AND d.status = 1 "
        "WHERE c.pack_key = ? AND c.object_key != ? AND i.wrapped_dek IS NOT NULL ORDER BY c.pack_offset",
        (pack, but),
    )
    return [(_chunk_ref(r), int(r[11]) if r[11] is not None else None) for r in rows]


def list_instances(db: MetaDb, flt: StudyFilter) -> list[InstanceRow]:
    """Indexed instances of the studies matching the filter, in viewing order."""
    ids = [s.id for s in list_studies(db, flt)]
    result: list[InstanceRow] = []
    for batch in _batches(ids):
        marks = ", ".join("?" * len(batch))
        for r in db.all(
            "SELECT d.inode, s.study_uid, d.patient_id, d.patient_name, d.series_uid, d.sop_uid, d.sop_class_uid, "
            "d.modality, d.study_date, d.study_time, d.accession_number, d.study_description, d.series_number, "
            "d.instance_number, d.transfer_syntax, i.size FROM dicom_instances d JOIN dicom_studies s ON s.id = d.study_id "
            f"JOIN inodes i ON i.id = d.inode WHERE d.status = 1 AND d.study_id IN ({marks}) "
            "ORDER BY s.study_uid, d.series_number IS NULL, d.series_number, d.series_uid, "
            "d.instance_number IS NULL, d.instance_number, d.inode",
            batch,
        ):
            fields = InstanceFields(
                r[2] or "", r[3] or "", r[1], r[4] or "", r[5] or "", r[6] or "", r[7] or "", r[8], r[9],
                r[10] or "", r[11] or "", r[12], r[13], r[14],
            )
            result.append(InstanceRow(InodeId(r[0]), r[1], fields, int(r[15])))
    return result


def list_malformed(db: MetaDb) -> list[tuple[InodeId, str, int]]:
    rows = db.all(
        "SELECT d.inode, d.error, i.size FROM dicom_instances d JOIN inodes i ON i.id = d.inode WHERE d.status = 2 ORDER BY d.inode"
    )
    return [(InodeId(r[0]), r[1] or "", int(r[2])) for r in rows]


def path_of(db: MetaDb, inode: InodeId, dir_paths: dict[InodeId, str]) -> str | None:
    """One path of inode relative to the mount root ('a/b/c'), or None if it has no name;
    `dir_paths` memoises directories across calls."""
    row = db.one("SELECT parent, name FROM dentries WHERE inode = ? ORDER BY id LIMIT 1", (inode,))
    if row is None:
        return None
    parent, name = InodeId(row[0]), bytes(row[1]).decode("utf-8", "surrogateescape")
    prefix = _dir_path(db, parent, dir_paths)
    return f"{prefix}/{name}" if prefix else name


def _dir_path(db: MetaDb, inode: InodeId, memo: dict[InodeId, str]) -> str:
    if inode == ROOT_INODE:
        return ""
    if inode not in memo:
        memo[inode] = path_of(db, inode, memo) or ""
    return memo[inode]


def _batches(ids: list[int]) -> Iterator[list[int]]:
    for start in range(0, len(ids), _BATCH):
        yield ids[start : start + _BATCH]


def identity_of(db: MetaDb, inode: InodeId) -> tuple[str, str, str] | None:
    """(Patient ID, Study Instance UID, SOP Instance UID) of an indexed inode, for the audit
    trail; None if the inode is not (or not yet) indexed."""
    row = db.one(
        "SELECT d.patient_id, s.study_uid, d.sop_uid FROM dicom_instances d JOIN dicom_studies s ON s.id = d.study_id"
        " WHERE d.inode = ? AND d.status = 1",
        (inode,),
    )
    return (str(row[0] or ""), str(row[1] or ""), str(row[2] or "")) if row is not None else None
