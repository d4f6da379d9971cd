"""Control-channel handlers of a live mount: `audit-verify` and `audit-query`.

Must not change the trail beyond flushing it: both read the store's segments and the local
spool after making every record so far durable, so their answer includes this very moment.
"""

from __future__ import annotations

from typing import Any

from mifs.audit import records, verify
from mifs.audit.trail import AuditTrail
from mifs.control_protocol import Handler, Send
from mifs.metadb import studies
from mifs.metadb.db import MetaDb
from mifs.types import InodeId


def query_from_request(request: dict[str, Any]) -> verify.Query:
    """The filters of a query request; ValueError with a message for a bad one."""
    def time_of(key: str) -> str | None:
        value = request.get(key)
        if value is None:
            return None
        try:
            return records.iso_ms(records.parse_time(str(value)))
        except ValueError:
            raise ValueError(f"--{key}: {value!r} is not an ISO 8601 time (2024-05-01 or 2024-05-01T13:00:00Z)") from None

    uid = request.get("uid")
    if uid is not None and (not isinstance(uid, int) or isinstance(uid, bool) or uid < 0):
        raise ValueError("--uid must be a non-negative integer")
    return verify.Query(
        patient=request.get("patient"), study=request.get("study"), uid=uid,
        since=time_of("since"), until=time_of("until"),
    )


class AuditCommands:
    def __init__(self, trail: AuditTrail, db: MetaDb) -> None:
        self._trail = trail
        self._db = db

    def handlers(self) -> dict[str, Handler]:
        return {"audit-verify": self._verify, "audit-query": self._query}

    async def _report(self) -> verify.Report:
        await self._trail.flush()
        image = await verify.read_image(self._trail.store, self._trail.spool)
        report = verify.analyse(self._trail.keys, self._trail.archive_id, image, live_session=self._trail.session)
        state = self._trail.open_state()
        if state is not None:
            segment, written = state
            found = next((len(s.records) for s in report.segments if s.number == segment), 0)
            if found < written:
                report.problems.append(
                    f"segment {segment}: {written - found} of its {written} records are missing from the local spool (deleted or truncated)"
                )
        return report

    async def _verify(self, request: dict[str, Any], send: Send) -> None:
        report = await self._report()
        await send({
            "ok": True, "problems": report.problems, "gaps": report.gaps,
            "segments": len(report.segments), "sealed_segments": report.sealed_count, "records": report.record_count,
        })

    def _enrich(self, ino: int) -> dict[str, Any] | None:
        ids = studies.identity_of(self._db, InodeId(ino))
        return None if ids is None else {"patient": ids[0], "study": ids[1], "sop": ids[2]}

    async def _query(self, request: dict[str, Any], send: Send) -> None:
        try:
            query = query_from_request(request)
        except ValueError as exc:
            await send({"ok": False, "error": str(exc), "kind": "usage"})
            return
        report = await self._report()
        await send({"ok": True, "records": verify.select(report, query, self._enrich), "problems": report.problems})
