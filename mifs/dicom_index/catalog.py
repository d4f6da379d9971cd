"""What the CLI asks about studies: listings with their cache state, pins, lookups.

Must not change files or fetch data (the prefetcher does); answers are plain dicts ready for
JSON. Runs on the trio thread, synchronously: every answer is a few indexed queries.
"""

from __future__ import annotations

from typing import Any

from mifs.cache import ChunkCache
from mifs.errors import MifsError
from mifs.metadb import studies
from mifs.metadb.db import MetaDb
from mifs.types import InodeId

PIN_BUDGET = 0.8
"""Pinned studies may fill at most this share of the cache: the rest must stay free for
writes waiting to be uploaded and for reads."""


class StudyNotFound(MifsError):
    """No indexed study (or patient) matches."""


class PinRefused(MifsError):
    """Pinning would leave too little of the cache for everything else."""


class StudyCatalog:
    def __init__(self, db: MetaDb, cache: ChunkCache, store_is_local: bool) -> None:
        self._db = db
        self._cache = cache
        self._store_is_local = store_is_local

    # --- listings ---------------------------------------------------------------------------

    def _cache_state(self, study_id: int, chunks: studies.StudyChunks | None) -> tuple[str, int]:
        """(state, bytes on this host). With a store on local disk every chunk is local."""
        cached = self._cache.group_bytes(study_id)
        if self._store_is_local and chunks is not None:
            cached = chunks.stored_bytes
        if chunks is None or chunks.objects == 0:
            return "full", cached
        if chunks.pending:
            return "pending", cached
        if self._store_is_local:
            return "full", cached
        if cached >= chunks.stored_bytes:
            return "full", cached
        return ("partial" if cached else "cold"), cached

    def list_studies(self, flt: studies.StudyFilter, ids: list[int] | None = None) -> list[dict[str, Any]]:
        found = studies.list_studies(self._db, flt, ids)
        chunks = studies.study_chunks(self._db, [s.id for s in found])
        result = []
        for s in found:
            state, cached = self._cache_state(s.id, chunks.get(s.id))
            stored = chunks.get(s.id)
            result.append({
                "study_instance_uid": s.study_uid, "patient_id": s.patient_id, "patient_name": s.patient_name,
                "study_date": s.study_date, "study_time": s.study_time, "accession_number": s.accession_number,
                "study_description": s.study_description, "modalities": s.modalities, "series": s.series,
                "instances": s.instances, "bytes": s.bytes, "stored_bytes": stored.stored_bytes if stored else 0,
                "cached_bytes": cached, "cache": state, "pinned": s.pinned,
            })
        return result

    def cached_studies(self) -> list[dict[str, Any]]:
        """Studies with chunks in the cache or a pin (`mifs cache ls`)."""
        ids = set(studies.pinned_ids(self._db))
        everything = studies.list_studies(self._db, studies.StudyFilter())
        ids.update(s.id for s in everything if self._store_is_local or self._cache.group_bytes(s.id))
        return self.list_studies(studies.StudyFilter(), sorted(ids))

    def instances(self, flt: studies.StudyFilter) -> list[dict[str, Any]]:
        memo: dict[InodeId, str] = {}
        result = []
        for inst in studies.list_instances(self._db, flt):
            f = inst.fields
            result.append({
                "path": studies.path_of(self._db, inst.inode, memo), "study_instance_uid": inst.study_uid,
                "series_instance_uid": f.series_uid, "sop_instance_uid": f.sop_uid, "sop_class_uid": f.sop_class_uid,
                "modality": f.modality, "series_number": f.series_number, "instance_number": f.instance_number,
                "transfer_syntax": f.transfer_syntax, "patient_id": f.patient_id, "patient_name": f.patient_name,
                "study_date": f.study_date, "study_time": f.study_time, "accession_number": f.accession_number,
                "bytes": inst.bytes,
            })
        return result

    def malformed(self) -> list[dict[str, Any]]:
        memo: dict[InodeId, str] = {}
        return [
            {"path": studies.path_of(self._db, inode, memo), "bytes": size, "error": error}
            for inode, error, size in studies.list_malformed(self._db)
        ]

    # --- lookups and pins -------------------------------------------------------------------

    def study_id(self, study_uid: str) -> int:
        found = studies.find_study(self._db, study_uid)
        if found is None:
            raise StudyNotFound(f"no study {study_uid} in this archive")
        return found[0]

    def patient_study_ids(self, patient_id: str) -> list[int]:
        ids = studies.studies_of_patient(self._db, patient_id)
        if not ids:
            raise StudyNotFound(f"no studies of patient {patient_id} in this archive")
        return ids

    def stored_bytes(self, ids: list[int]) -> int:
        return sum(c.stored_bytes for c in studies.study_chunks(self._db, ids).values())

    def pin(self, study_uid: str) -> int:
        """Pin a study (idempotent); returns its id. Refused when pins would crowd the cache."""
        sid = self.study_id(study_uid)
        pinned = set(studies.pinned_ids(self._db))
        if sid not in pinned and not self._store_is_local:
            total = self.stored_bytes(sorted(pinned | {sid}))
            budget = int(self._cache.limit * PIN_BUDGET)
            if total > budget:
                raise PinRefused(
                    f"pinning {study_uid} would make pinned studies {total} bytes, more than "
                    f"{int(PIN_BUDGET * 100)}% of the cache ({budget} of {self._cache.limit} bytes); "
                    "unpin others or mount with a larger --cache-size"
                )
        studies.set_pinned(self._db, sid, True)
        self._cache.set_pinned(studies.pinned_ids(self._db))
        return sid

    def unpin(self, study_uid: str) -> None:
        sid = self.study_id(study_uid)
        studies.set_pinned(self._db, sid, False)
        self._cache.set_pinned(studies.pinned_ids(self._db))
