"""Reading the whole trail back: verification (which segment or record was modified, deleted,
reordered or truncated) and queries (who accessed what, when).

Must not write anything: reads the store's segments and head and the local spool. Pure
analysis lives in `analyse`, so tests can feed it edited segments directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import trio

from mifs.audit import records
from mifs.audit.records import AuditKeys, Segment
from mifs.audit.spool import HEAD_FILE, Spool, open_name, sealed_name
from mifs.audit.trail import SEGMENT_PREFIX, STORE_HEAD, segment_key, segment_of_key
from mifs.errors import IntegrityError, ObjectNotFound
from mifs.store.base import ObjectStore
from mifs.types import ArchiveId

CRASH_BOUND = "records of up to about 1 s before the crash (one flush interval) and files still open then"


@dataclass
class TrailImage:
    """What was found: sealed segment objects by number (store and local copies), the open
    segment's spool file, and the heads (raw bytes; None if absent)."""

    store_segments: dict[int, bytes] = field(default_factory=dict)
    local_segments: dict[int, bytes] = field(default_factory=dict)
    open_segments: dict[int, bytes] = field(default_factory=dict)
    store_head: bytes | None = None
    local_head: bytes | None = None


@dataclass
class Report:
    problems: list[str]
    gaps: list[dict[str, Any]]
    segments: list[Segment]
    sealed_count: int
    record_count: int

    def records(self) -> list[dict[str, Any]]:
        return [r for seg in self.segments for r in seg.records]


async def read_image(store: ObjectStore | None, spool: Spool | None) -> TrailImage:
    image = TrailImage()
    if store is not None:
        keys = await store.list(SEGMENT_PREFIX)
        numbers = sorted(n for n in (segment_of_key(k) for k in keys) if n is not None)
        limiter = trio.CapacityLimiter(8)

        async def fetch(n: int) -> None:
            async with limiter:
                try:
                    image.store_segments[n] = await store.get(segment_key(n))
                except ObjectNotFound:
                    pass

        async with trio.open_nursery() as nursery:
            for n in numbers:
                nursery.start_soon(fetch, n)
        try:
            image.store_head = await store.get(STORE_HEAD)
        except ObjectNotFound:
            pass
    if spool is not None:
        def local() -> None:
            for n in spool.sealed_segments():
                data = spool.read(sealed_name(n))
                if data is not None:
                    image.local_segments[n] = data
            for n in spool.open_segments():
                data = spool.read(open_name(n))
                if data is not None:
                    image.open_segments[n] = data
            image.local_head = spool.read(HEAD_FILE)

        await trio.to_thread.run_sync(local)
    return image


def _open_sealed(keys: AuditKeys, archive_id: ArchiveId, n: int, blob: bytes, others: list[int], problems: list[str]) -> bytes | None:
    try:
        return records.open_segment(keys, archive_id, n, blob)
    except IntegrityError:
        pass
    for m in others[:500]:
        if m == n:
            continue
        try:
            records.open_segment(keys, archive_id, m, blob)
        except IntegrityError:
            continue
        problems.append(f"segment {n}: the object holds segment {m} (segments reordered or renamed)")
        return None
    problems.append(f"segment {n}: fails authentication (modified, truncated or not ours)")
    return None


def analyse(keys: AuditKeys, archive_id: ArchiveId, image: TrailImage, *, live_session: str | None = None) -> Report:
    problems: list[str] = []
    heads: list[tuple[str, dict[str, Any]]] = []
    for where, raw in (("store", image.store_head), ("local", image.local_head)):
        if raw is None:
            continue
        try:
            heads.append((where, records.parse_head(keys, archive_id, raw)))
        except IntegrityError as exc:
            problems.append(f"{where} head: {exc}")
    numbers = sorted(set(image.store_segments) | set(image.local_segments))
    sealed: dict[int, Segment] = {}
    for n in numbers:
        copies = [b for b in (image.store_segments.get(n), image.local_segments.get(n)) if b is not None]
        if len(copies) == 2 and copies[0] != copies[1]:
            problems.append(f"segment {n}: the store copy and the local copy differ")
        plain = None
        for blob in copies:
            plain = _open_sealed(keys, archive_id, n, blob, numbers, problems)
            if plain is not None:
                break
        if plain is None:
            continue
        seg = records.parse_segment(keys, archive_id, n, plain.splitlines(), sealed=True)
        problems += seg.problems
        sealed[n] = seg
    opened: dict[int, Segment] = {}
    torn_notes: list[tuple[int, str]] = []
    for n, data in sorted(image.open_segments.items()):
        lines, _frames, problem = records.open_frames(keys, archive_id, n, data)
        if problem:
            torn_notes.append((n, problem))
        if not lines:
            continue
        seg = records.parse_segment(keys, archive_id, n, lines, sealed=False)
        problems += seg.problems
        opened[n] = seg
    everything = {**sealed, **opened}
    lost = _lost_segments([r for n in sorted(everything) for r in everything[n].records])
    # Which segments must exist: 0 .. the newest any head or segment names.
    highest = max(list(sealed) + list(opened) + list(image.store_segments) + list(image.local_segments) + [-1])
    for where, head in heads:
        h = int(head["segment"])
        if where == "local" and isinstance(head.get("open"), int):
            if head["open"] not in opened and head["open"] not in sealed and head["open"] not in numbers:
                problems.append(f"segment {head['open']}: the open segment the local head names is missing (deleted)")
        if h > max(list(sealed) + list(numbers) + [-1]) and h not in lost:
            problems.append(
                f"{where} head names segment {h} but the newest sealed segment found is "
                f"{max(list(numbers) + [-1])}: the newest segments were dropped (truncated)"
            )
        elif h >= 0 and h in sealed and (sealed[h].last != head["last"] or sealed[h].last_seq != int(head["last_seq"])):
            problems.append(f"{where} head does not match segment {h} (segment replaced or truncated)")
        highest = max(highest, h)
    gaps: list[dict[str, Any]] = []
    for n in range(0, highest + 1):
        if n in everything or n in numbers:
            continue
        if n in lost:
            gaps.append({"kind": "lost-segment", "segment": n, "why": "recorded as lost (spool-lost): the local spool was gone"})
        else:
            problems.append(f"segment {n}: missing (deleted)")
    order = sorted(everything)
    for a, b in zip(order, order[1:]):
        if b != a + 1:
            continue
        sa, sb = everything[a], everything[b]
        if sb.header.get("prev") != sa.last or int(sb.header.get("first_seq", -1)) != sa.last_seq + 1:
            problems.append(f"segment {b}: does not continue segment {a} (hash chain broken: a segment was replaced or reordered)")
    if 0 in everything and (everything[0].header.get("prev") != records.GENESIS or everything[0].header.get("first_seq") != 0):
        problems.append("segment 0: does not start the chain (the oldest segments were dropped)")
    for n, problem in torn_notes:
        gaps.append({"kind": "torn", "segment": n, "why": f"open segment {n}: {problem} (crash while writing; {CRASH_BOUND})"})
    all_records = [r for n in order for r in everything[n].records]
    gaps += session_gaps(all_records, live_session)
    return Report(problems, gaps, [everything[n] for n in order], len(sealed), len(all_records))


def _lost_segments(recs: list[dict[str, Any]]) -> set[int]:
    lost: set[int] = set()
    for r in recs:
        if r.get("ev") == "spool-lost" and isinstance(r.get("segments"), str):
            first, _, last = r["segments"].partition("..")
            try:
                lost.update(range(int(first), int(last or first) + 1))
            except ValueError:
                continue
    return lost


def session_gaps(recs: list[dict[str, Any]], live_session: str | None) -> list[dict[str, Any]]:
    """Sessions (mounts) that ended without their `unmounted` record: crash or kill -9."""
    gaps: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    last_time = ""

    def close_crashed(next_t: str | None) -> None:
        if current is not None:
            gaps.append({
                "kind": "crash", "session": current["session"], "mounted": current["t"], "last_record": last_time,
                "next_mount": next_t, "why": f"session ended without an unmount record; lost: {CRASH_BOUND}",
            })

    for r in recs:
        if r.get("ev") == "admin" and r.get("action") == "mount":
            close_crashed(str(r.get("t")))
            current = {"session": r.get("session"), "t": r.get("t")}
        elif r.get("ev") == "unmounted":
            current = None
        last_time = str(r.get("t", last_time))
    if current is not None and current["session"] != live_session:
        close_crashed(None)
    return gaps


# --- queries ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Query:
    patient: str | None = None
    study: str | None = None
    uid: int | None = None
    since: str | None = None  # ISO 8601 with ms, as in records (string order is time order)
    until: str | None = None


Enrich = Callable[[int], dict[str, Any] | None]


def select(report: Report, query: Query, enrich: Enrich | None = None) -> list[dict[str, Any]]:
    """The records matching the query, oldest first, plus the gaps in the time range (a
    gap may hide matching records). `enrich(ino)` fills in DICOM ids the record lacks (a
    file written before it was indexed)."""
    out: list[dict[str, Any]] = []
    for rec in report.records():
        t = str(rec.get("t", ""))
        if query.since and t < query.since or query.until and t > query.until:
            continue
        if query.uid is not None and rec.get("uid") != query.uid:
            continue
        if enrich is not None and "patient" not in rec and isinstance(rec.get("ino"), int) and rec.get("ev") != "denied":
            extra = enrich(rec["ino"])
            if extra:
                rec = {**rec, **extra, "ids_from_index": True}
        if query.patient is not None and rec.get("patient") != query.patient:
            continue
        if query.study is not None and rec.get("study") != query.study:
            continue
        out.append(rec)
    for gap in report.gaps:
        start = str(gap.get("last_record") or "")
        end = str(gap.get("next_mount") or "9999")
        if gap.get("kind") != "crash" or (query.since and end < query.since) or (query.until and start > query.until):
            continue
        out.append({"ev": "gap", **gap})
    return out
