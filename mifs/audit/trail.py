"""The audit trail service: takes records on the trio thread, group-commits them to the local
spool every second, seals segments, ships them to the store and keeps the head current.

Must not know about FUSE, files or DICOM: callers hand it finished events (audit/events.py
builds them). Concurrency: `record` and `admin` run on the trio thread and never block;
encryption and file I/O run in worker threads under one lock (one writer of the spool); the
shipper is a task of its own. A crash loses at most the records of the last flush interval
(1 s by default) plus the time of one fdatasync; the next mount seals what reached the disk
and records the gap (docs/FORMAT.md, section 10).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from dataclasses import dataclass
from typing import Any

import trio

from mifs.audit import records
from mifs.audit.records import AuditKeys, Chain
from mifs.audit.spool import HEAD_FILE, KEY_FILE, Spool, open_name, sealed_name
from mifs.crypto import envelope
from mifs.crypto.keyring import KeyRing
from mifs.errors import IntegrityError, MifsError, ObjectNotFound, StorePermissionDenied, StoreUnavailable, WrongKey
from mifs.store.base import ObjectStore
from mifs.types import KEY_LEN, ArchiveId, ObjectKey

log = logging.getLogger(__name__)

STORE_KEY = ObjectKey(envelope.AUDIT_KEY_OBJECT)
STORE_HEAD = ObjectKey("audit/head")
SEGMENT_PREFIX = "audit/segments/"


class AuditError(MifsError):
    """The audit trail cannot be opened (no key, a key this KEK cannot unwrap)."""


def segment_key(segment: int) -> ObjectKey:
    return ObjectKey(f"{SEGMENT_PREFIX}{segment:016x}")


def segment_of_key(key: str) -> int | None:
    try:
        return int(key[len(SEGMENT_PREFIX):], 16) if key.startswith(SEGMENT_PREFIX) else None
    except ValueError:
        return None


@dataclass(frozen=True)
class Actor:
    """Who asked for an admin action (from SO_PEERCRED on the control socket, or the process)."""

    uid: int | None
    gid: int | None = None
    pid: int | None = None

    def fields(self) -> dict[str, Any]:
        return {"uid": self.uid, "gid": self.gid, "pid": self.pid}


# --- the audit key -------------------------------------------------------------------------------


async def load_audit_keys(
    store: ObjectStore, keyring: KeyRing, archive_id: ArchiveId, spool: Spool | None, *, create: bool
) -> AuditKeys:
    """The archive's audit key: `audit/key` in the store (a random key wrapped under the KEK
    like a file's data key; key rotation re-wraps it, see keystore.WRAPPED_KEY_OBJECTS), else
    the spool's copy, else (create) a new one wrapped under the current KEK. Any KEK the
    keyring holds unwraps it. Without `create` nothing is written anywhere."""
    local = spool.read(KEY_FILE) if spool is not None else None
    remote: bytes | None = None
    try:
        remote = await store.get(STORE_KEY)
    except ObjectNotFound:
        remote = None
    except (StoreUnavailable, StorePermissionDenied):
        if local is None:
            raise
    for blob in (remote, local):
        if blob is None:
            continue
        try:
            secret = records.unwrap_audit_key(keyring.get(envelope.wrapped_key_kek_id(blob)), archive_id, blob)
        except (IntegrityError, WrongKey):
            log.error("a copy of the audit key cannot be unwrapped with this master key")
            continue
        if create and spool is not None and blob != local:
            spool.write_atomic(KEY_FILE, blob)
        if remote is None and create:
            await store.put_if_absent(STORE_KEY, blob)
        return AuditKeys.from_secret(secret, archive_id)
    if remote is not None or local is not None:
        raise AuditError("the audit key of this archive cannot be unwrapped with this master key")
    if not create:
        raise AuditError("this archive has no audit trail yet (it was never mounted)")
    blob = records.wrap_audit_key(keyring.current, archive_id, secrets.token_bytes(KEY_LEN))
    if not await store.put_if_absent(STORE_KEY, blob):
        return await load_audit_keys(store, keyring, archive_id, spool, create=False)
    if spool is not None:
        spool.write_atomic(KEY_FILE, blob)
    return AuditKeys.from_secret(records.unwrap_audit_key(keyring.current, archive_id, blob), archive_id)


async def read_store_head(store: ObjectStore, keys: AuditKeys, archive_id: ArchiveId) -> tuple[dict[str, Any] | None, str]:
    """The store's head (None if there is none) and a problem ('' if none)."""
    try:
        return records.parse_head(keys, archive_id, await store.get(STORE_HEAD)), ""
    except ObjectNotFound:
        return None, ""
    except IntegrityError as exc:
        return None, f"the store's audit head: {exc}"


def read_local_head(spool: Spool, keys: AuditKeys, archive_id: ArchiveId) -> tuple[dict[str, Any] | None, str]:
    data = spool.read(HEAD_FILE)
    if data is None:
        return None, ""
    try:
        return records.parse_head(keys, archive_id, data), ""
    except IntegrityError as exc:
        return None, f"the local audit head: {exc}"


# --- the service ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrailStatistics:
    segment: int
    records: int
    pending: int
    unshipped_segments: int
    shipped_segment: int
    last_error: str


class AuditTrail:
    def __init__(
        self, spool: Spool, store: ObjectStore, keys: AuditKeys, archive_id: ArchiveId, *,
        flush_interval: float = 1.0, segment_seconds: float = 300.0, segment_records: int = 10_000,
    ) -> None:
        self.spool = spool
        self.store = store
        self.keys = keys
        self.archive_id = archive_id
        self.session = secrets.token_hex(8)
        self._flush_interval = flush_interval
        self._segment_seconds = segment_seconds
        self._segment_records = segment_records
        self._chain = Chain()
        self._pending: list[bytes] = []
        self._segment = -1
        self._frame = 0
        self._fd = -1
        self._offset = 0
        self._seg_records = 0
        self._seg_started = 0.0
        self._sealed_meta: dict[int, tuple[int, str]] = {}
        self._seg_lines: list[bytes] = []
        """The open segment's header and records as written to the spool: the segment is
        sealed from this copy, so an edit of the spool file while open cannot slip in."""
        self._lock = trio.Lock()
        self._ship_wakeup = trio.Event()
        self._flush_wakeup = trio.Event()
        self._closed = False
        self.records_total = 0
        self.shipped_segment = -1
        self.last_error = ""

    # --- opening -------------------------------------------------------------------------------

    def open_sync(self, store_head: dict[str, Any] | None) -> list[tuple[str, dict[str, Any]]]:
        """Recover the spool left by the previous run and open a new segment (blocking; at
        mount, before serving). Returns events to record after the mount record."""
        self.spool.ensure()
        notes: list[tuple[str, dict[str, Any]]] = []
        local_head, problem = read_local_head(self.spool, self.keys, self.archive_id)
        if problem:
            notes.append(("audit-state-invalid", {"problem": problem}))
        sealed = set(self.spool.sealed_segments())
        for n in self.spool.open_segments():
            if n in sealed:
                self.spool.remove(open_name(n))
                continue
            data = self.spool.read(open_name(n)) or b""
            lines, _frames, torn = records.open_frames(self.keys, self.archive_id, n, data)
            if not lines:
                notes.append(("crash-recovered", {"segment": n, "records": 0, "problem": torn or "empty"}))
                self.spool.remove(open_name(n))
                continue
            plain, last_seq, last = records.build_segment(self.keys, lines, recovered=True, torn=torn or None)
            self.spool.write_atomic(sealed_name(n), records.seal_segment(self.keys, self.archive_id, n, plain))
            self.spool.remove(open_name(n))
            sealed.add(n)
            self._sealed_meta[n] = (last_seq, last)
            notes.append(("crash-recovered", {"segment": n, "records": len(lines) - 1, "problem": torn or None}))
        # Where the chain continues: the newest sealed segment we know of.
        known: list[tuple[int, int, str]] = []
        for head in (local_head, store_head):
            if head is not None and int(head["segment"]) >= 0:
                known.append((int(head["segment"]), int(head["last_seq"]), str(head["last"])))
        for n in sealed:
            if n not in self._sealed_meta:
                blob = self.spool.read(sealed_name(n)) or b""
                seg = records.parse_segment(
                    self.keys, self.archive_id, n, records.open_segment(self.keys, self.archive_id, n, blob).splitlines(), sealed=True
                )
                self._sealed_meta[n] = (seg.last_seq, seg.last)
            known.append((n, *self._sealed_meta[n]))
        if known:
            n, last_seq, last = max(known)
            self._chain = Chain(last_seq + 1, last)
        highest = max([k[0] for k in known] + [-1])
        for head in (local_head, store_head):
            opened = head.get("open") if head is not None else None
            if isinstance(opened, int) and opened > highest:
                notes.append(("spool-lost", {"segments": f"{highest + 1}..{opened}", "problem": "the open or unshipped segments of an earlier session are gone"}))
                highest = opened
        if local_head is None and store_head is not None and not sealed:
            pass  # a new cache dir: nothing local to lose beyond what spool-lost says
        self._open_segment_sync(highest + 1)
        return notes

    def _open_segment_sync(self, segment: int) -> None:
        header = records.segment_header(self.archive_id, segment, self._chain, self.keys, self.session)
        self._start_segment_sync(segment, header)

    def _start_segment_sync(self, segment: int, header: bytes) -> None:
        """Create the open file of `segment`, then the head naming it (its last sealed
        segment is the one before, whose end the header continues)."""
        frame = records.seal_frame(self.keys, self.archive_id, segment, 0, [header])
        fd = self.spool.create_open(segment, frame)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd, self._segment, self._frame, self._offset = fd, segment, 1, len(frame)
        self._seg_lines = [header]
        doc = json.loads(header)
        self.spool.write_atomic(
            HEAD_FILE,
            records.make_head(self.keys, self.archive_id, segment - 1, int(doc["first_seq"]) - 1, str(doc["prev"]), segment),
        )

    def started(self) -> None:
        """Call on the trio thread once the first segment is open."""
        self._seg_started = trio.current_time()

    # --- recording (trio thread, never blocks) -------------------------------------------------

    def record(self, event: str, **fields: Any) -> None:
        if self._closed:
            log.warning("audit event %s after the trail was closed was not recorded", event)
            return
        self._pending.append(self._chain.append(event, fields))
        self._seg_records += 1
        self.records_total += 1
        if len(self._pending) >= 5000:
            self._flush_wakeup.set()

    def admin(self, action: str, actor: Actor | None, **details: Any) -> None:
        """An admin action (mount, umount, cache pin, key rotate, shred, share, ...): the API
        other features call. `actor` None means the daemon itself."""
        self.record("admin", action=action, **(actor.fields() if actor else {"uid": os.getuid()}), **details)

    # --- the writer ----------------------------------------------------------------------------

    def _append_sync(self, batch: list[bytes]) -> None:
        frame = records.seal_frame(self.keys, self.archive_id, self._segment, self._frame, batch)
        try:
            Spool.append(self._fd, frame)
        except OSError:
            os.ftruncate(self._fd, self._offset)  # never leave a torn frame before later ones
            raise
        self._frame += 1
        self._offset += len(frame)
        self._seg_lines.extend(batch)

    async def flush(self) -> None:
        """Make every record so far durable in the spool. On a disk error the records stay
        queued (and are retried) and the error is logged; cancellation leaves them queued."""
        async with self._lock:
            await self._flush_locked()

    async def _flush_locked(self) -> None:
        batch, self._pending = self._pending, []
        if not batch:
            return
        try:
            await trio.to_thread.run_sync(self._append_sync, batch)
        except OSError as exc:
            self._pending[:0] = batch
            self.last_error = f"writing the audit spool failed: {exc.strerror}"
            log.error("%s; %d records wait in memory", self.last_error, len(self._pending))
        except BaseException:
            self._pending[:0] = batch
            raise

    def _seal_sync(self, open_next: bytes | None) -> None:
        """Seal the open segment into the spool's sealed-N and (open_next: its header) open the
        next one. The order on disk makes every crash point recoverable: sealed-N is written
        before open-N is removed, and the new open file before the head names it."""
        n = self._segment
        data = self.spool.read(open_name(n)) or b""
        on_disk, _frames, problem = records.open_frames(self.keys, self.archive_id, n, data)
        modified = bool(problem) or on_disk != self._seg_lines
        if modified:
            log.error("the local spool file of audit segment %d was modified while open; sealing the records written", n)
        plain, last_seq, last = records.build_segment(self.keys, self._seg_lines, spool_modified=True if modified else None)
        self.spool.write_atomic(sealed_name(n), records.seal_segment(self.keys, self.archive_id, n, plain))
        self._sealed_meta[n] = (last_seq, last)
        if open_next is not None:
            self._start_segment_sync(n + 1, open_next)
        else:
            os.close(self._fd)
            self._fd = -1
            self.spool.write_atomic(HEAD_FILE, records.make_head(self.keys, self.archive_id, n, last_seq, last, None))
        self.spool.remove(open_name(n))

    async def rotate(self, *, final: bool = False) -> None:
        async with self._lock:
            await self._flush_locked()
            if self._pending or self._fd < 0:
                return  # the flush failed; try again later
            # No checkpoint between reading the chain and handing the header over: every
            # record taken so far is in the old segment, every later one in the new.
            header = None if final else records.segment_header(self.archive_id, self._segment + 1, self._chain, self.keys, self.session)
            self._seg_records = 0
            self._seg_started = trio.current_time()
            try:
                await trio.to_thread.run_sync(self._seal_sync, header)
            except OSError as exc:
                self.last_error = f"sealing audit segment {self._segment} failed: {exc}"
                log.error("%s", self.last_error)
                return
            self._ship_wakeup.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._ship_loop)
            task_status.started()
            while True:
                with trio.move_on_after(self._flush_interval):
                    await self._flush_wakeup.wait()
                self._flush_wakeup = trio.Event()
                if self._closed:
                    continue
                due = trio.current_time() - self._seg_started >= self._segment_seconds
                if self._seg_records and (due or self._seg_records >= self._segment_records):
                    await self.rotate()
                else:
                    await self.flush()

    async def close(self, ship_timeout: float) -> None:
        """Seal the open segment and try to ship everything for `ship_timeout` seconds; what
        does not reach the store stays in the spool for the next mount."""
        await self.rotate(final=True)
        self._closed = True
        with trio.move_on_after(ship_timeout):
            try:
                await self.ship()
            except (StoreUnavailable, StorePermissionDenied, ObjectNotFound, OSError) as exc:
                # The store refuses (outage, revoked write access): the sealed segments stay in
                # the spool, and the next mount ships them. Never a reason to fail the unmount.
                self.last_error = f"shipping audit segments failed: {exc}"
                log.warning("%s; they stay in the local spool until the next mount", self.last_error)

    # --- shipping ------------------------------------------------------------------------------

    async def ship(self) -> None:
        """Put every sealed segment of the spool into the store, in order, each followed by
        the head; a segment leaves the spool only once the store has it."""
        for n in await trio.to_thread.run_sync(self.spool.sealed_segments):
            blob = await trio.to_thread.run_sync(self.spool.read, sealed_name(n))
            if blob is None:
                continue
            if not await self.store.put_if_absent(segment_key(n), blob):
                if await self.store.get(segment_key(n)) != blob:
                    self.last_error = f"the store already holds a different audit segment {n}; the local copy stays"
                    log.error("%s", self.last_error)
                    return
            if n not in self._sealed_meta:
                seg = records.open_segment(self.keys, self.archive_id, n, blob)
                parsed = records.parse_segment(self.keys, self.archive_id, n, seg.splitlines(), sealed=True)
                self._sealed_meta[n] = (parsed.last_seq, parsed.last)
            last_seq, last = self._sealed_meta[n]
            open_now = self._segment if self._fd >= 0 else None
            await self.store.put(STORE_HEAD, records.make_head(self.keys, self.archive_id, n, last_seq, last, open_now))
            await trio.to_thread.run_sync(self.spool.remove, sealed_name(n))
            self.shipped_segment = n

    async def _ship_loop(self) -> None:
        delay = 1.0
        while True:
            try:
                await self.ship()
                delay = 1.0
                await self._ship_wakeup.wait()
                self._ship_wakeup = trio.Event()
            except (StoreUnavailable, StorePermissionDenied, OSError) as exc:
                self.last_error = f"shipping audit segments failed: {exc}"
                log.warning("%s; retrying in %.0fs", self.last_error, delay)
                await trio.sleep(delay)
                delay = min(delay * 2, 60.0)

    def open_state(self) -> tuple[int, int] | None:
        """(open segment, records written to its spool file), None when closed."""
        return (self._segment, len(self._seg_lines) - 1) if self._fd >= 0 else None

    def statistics(self) -> TrailStatistics:
        return TrailStatistics(
            self._segment, self.records_total, len(self._pending), len(self.spool.sealed_segments()),
            self.shipped_segment, self.last_error,
        )


async def open_trail(
    store: ObjectStore, keyring: KeyRing, archive_id: ArchiveId, spool: Spool, **options: Any
) -> tuple[AuditTrail, list[tuple[str, dict[str, Any]]]]:
    """Load (or create) the audit key, read the store's head, recover the spool and open a new
    segment; the trail and the events to record after the mount record."""
    spool.ensure()
    keys = await load_audit_keys(store, keyring, archive_id, spool, create=True)
    notes: list[tuple[str, dict[str, Any]]] = []
    try:
        store_head, problem = await read_store_head(store, keys, archive_id)
    except (StoreUnavailable, StorePermissionDenied) as exc:
        store_head, problem = None, f"the store's audit head could not be read: {exc}"
    if problem:
        notes.append(("audit-state-invalid", {"problem": problem}))
    trail = AuditTrail(spool, store, keys, archive_id, **options)
    notes += await trio.to_thread.run_sync(trail.open_sync, store_head)
    trail.started()
    return trail, notes
