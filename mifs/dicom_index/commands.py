"""The study commands of the control channel: studies, cache ls/pin/unpin/prefetch, reindex.

Must not know how the channel works: each handler gets the request and an async `send` for
its replies (progress lines, then one final {"ok": ...}). Errors the user must see become
{"ok": false, "error": ..., "kind": ...}; the CLI maps kinds to exit codes.
"""

from __future__ import annotations

import datetime
from typing import Any

import trio

from mifs.control_protocol import Handler, Send
from mifs.dicom_index.catalog import PinRefused, StudyCatalog, StudyNotFound
from mifs.dicom_index.indexer import Indexer
from mifs.dicom_index.prefetch import PRIORITY_ADMIN, PrefetchJob, Prefetcher
from mifs.metadb import studies
from mifs.metadb.db import MetaDb

PROGRESS_INTERVAL = 0.5

KIND_NOT_FOUND = "not-found"
KIND_USAGE = "usage"
KIND_UNAVAILABLE = "unavailable"


class StudyCommands:
    def __init__(self, db: MetaDb, catalog: StudyCatalog, prefetcher: Prefetcher, indexer: Indexer, indexing: bool) -> None:
        self._db = db
        self._catalog = catalog
        self._prefetcher = prefetcher
        self._indexer = indexer
        self._indexing = indexing

    def handlers(self) -> dict[str, Handler]:
        return {
            "studies": self._studies, "cache-ls": self._cache_ls, "pin": self._pin, "unpin": self._unpin,
            "prefetch": self._prefetch, "reindex": self._reindex,
        }

    def status(self) -> dict[str, Any]:
        instances, study_count, malformed = studies.counts(self._db)
        waiting, deferred = studies.backlog(self._db)
        pf = self._prefetcher.statistics()
        return {
            "dicom_instances": instances, "dicom_studies": study_count, "dicom_malformed": malformed,
            "index_backlog": waiting, "index_deferred": deferred, "indexing": self._indexing,
            "prefetch_queued_studies": pf.queued_studies, "prefetched_objects": pf.fetched_objects,
            "prefetched_bytes": pf.fetched_bytes, "prefetch_failures": pf.failed_objects,
        }

    # --- listings ---------------------------------------------------------------------------

    async def _studies(self, request: dict[str, Any], send: Send) -> None:
        try:
            flt = _filter(request)
        except ValueError as exc:
            await send({"ok": False, "error": str(exc), "kind": KIND_USAGE})
            return
        mode = request.get("mode", "studies")
        if mode == "instances":
            items = self._catalog.instances(flt)
        elif mode == "malformed":
            items = self._catalog.malformed()
        else:
            items = self._catalog.list_studies(flt)
        await send({"ok": True, "items": items, "indexing": self._indexing})

    async def _cache_ls(self, request: dict[str, Any], send: Send) -> None:
        await send({"ok": True, "items": self._catalog.cached_studies()})

    # --- pins -------------------------------------------------------------------------------

    async def _pin(self, request: dict[str, Any], send: Send) -> None:
        try:
            sid = self._catalog.pin(str(request.get("study", "")))
        except StudyNotFound as exc:
            await send({"ok": False, "error": str(exc), "kind": KIND_NOT_FOUND})
            return
        except PinRefused as exc:
            await send({"ok": False, "error": str(exc), "kind": KIND_USAGE})
            return
        job = self._prefetcher.request(sid, PRIORITY_ADMIN)  # a pinned study belongs on this host
        await send({"ok": True, "fetching": job.objects - job.done})

    async def _unpin(self, request: dict[str, Any], send: Send) -> None:
        try:
            self._catalog.unpin(str(request.get("study", "")))
        except StudyNotFound as exc:
            await send({"ok": False, "error": str(exc), "kind": KIND_NOT_FOUND})
            return
        await send({"ok": True})

    # --- prefetch ---------------------------------------------------------------------------

    async def _prefetch(self, request: dict[str, Any], send: Send) -> None:
        try:
            if request.get("patient"):
                ids = self._catalog.patient_study_ids(str(request["patient"]))
            else:
                ids = [self._catalog.study_id(str(request.get("study", "")))]
        except StudyNotFound as exc:
            await send({"ok": False, "error": str(exc), "kind": KIND_NOT_FOUND})
            return
        total = self._catalog.stored_bytes(ids)
        if total > self._prefetcher.cache_capacity():
            await send({
                "ok": False, "kind": KIND_USAGE,
                "error": f"{len(ids)} studies hold {total} bytes, more than the cache can keep "
                f"({self._prefetcher.cache_capacity()} bytes free of pins); mount with a larger --cache-size",
            })
            return
        jobs = [self._prefetcher.request(sid, PRIORITY_ADMIN) for sid in ids]
        if request.get("wait", True):
            while not all(j.finished.is_set() for j in jobs):
                with trio.move_on_after(PROGRESS_INTERVAL):
                    for job in jobs:
                        await job.finished.wait()
                if not all(j.finished.is_set() for j in jobs):
                    await send({"progress": _sum(jobs)})
        await send({"ok": True, "studies": len(ids), **_sum(jobs)})

    # --- reindex ----------------------------------------------------------------------------

    async def _reindex(self, request: dict[str, Any], send: Send) -> None:
        before = self._indexer.statistics()
        queued = studies.queue_all_files(self._db)
        self._indexer.wake()
        while True:
            waiting, _ = studies.backlog(self._db)
            if waiting == 0:
                break
            await send({"progress": {"files": queued, "left": waiting}})
            await trio.sleep(PROGRESS_INTERVAL)
        after = self._indexer.statistics()
        instances, study_count, malformed = studies.counts(self._db)
        await send({
            "ok": True, "files": queued, "instances": instances, "studies": study_count, "malformed": malformed,
            "other": after.other - before.other, "deferred": after.deferred - before.deferred,
            "failed": after.failed - before.failed,
        })


def _sum(jobs: list[PrefetchJob]) -> dict[str, int]:
    keys = ("objects", "done", "already_cached", "fetched", "fetched_bytes", "failed")
    return {k: sum(j.progress()[k] for j in jobs) for k in keys}


def _iso(text: str) -> str:
    digits = text.replace("-", "")
    try:
        if len(digits) != 8 or not digits.isdigit():
            raise ValueError
        return datetime.date(int(digits[:4]), int(digits[4:6]), int(digits[6:])).isoformat()
    except ValueError:
        raise ValueError(f"invalid date {text!r} (use YYYY-MM-DD)") from None


def _filter(request: dict[str, Any]) -> studies.StudyFilter:
    since = request.get("since")
    return studies.StudyFilter(
        patient_id=_text_or_none(request.get("patient")),
        study_uid=_text_or_none(request.get("study")),
        since=_iso(str(since)) if since is not None else None,
        modality=_text_or_none(request.get("modality")),
    )


def _text_or_none(value: Any) -> str | None:
    return None if value is None else str(value)
