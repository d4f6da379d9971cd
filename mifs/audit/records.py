"""Audit record and segment formats: canonical records, the hash chain, sealing and opening.

Pure functions over bytes (no I/O, no trio): the trail writes what these build and `verify`
reads it back with the same code. Layouts are documented in docs/FORMAT.md, section 10.

- A record is one line of canonical JSON (keys sorted, no spaces, ASCII): ``seq`` (from 0,
  never reused across segments), ``t`` (UTC, ISO 8601 with milliseconds), ``prev`` (SHA-256,
  hex, of the previous record's canonical bytes; 64 zeros for the first record ever), ``ev``
  and the event's own fields.
- A segment is a header line, its records and an end line; the end line carries an HMAC-SHA256
  under the audit MAC key over every byte before it plus the canonical ``end`` object.
  In the store it is compressed and sealed as a metadata blob of kind 3 (AES-256-GCM under the
  audit encryption key, AAD binding the archive id and the segment number).
- The open segment lives in the local spool as frames (each a batch of lines sealed as a blob of
  kind 4 whose AAD binds archive, segment and frame number), so nothing in the cache dir is
  plaintext.
- The head names the newest sealed segment and its last record hash, authenticated with HMAC.
"""

from __future__ import annotations

import hashlib
import json
import struct
import time
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from mifs.crypto import envelope
from mifs.crypto.keyring import MasterKey
from mifs.errors import IntegrityError
from mifs.types import ArchiveId

FORMAT_VERSION = 1
GENESIS = "0" * 64
KIND_SEGMENT = 3
KIND_FRAME = 4
AUDIT_KEY_FILE_ID = envelope.AUDIT_KEY_FILE_ID
"""The file id the audit key is wrapped under (envelope.wrap_data_key), like a file's data key."""
assert len(AUDIT_KEY_FILE_ID) == 16
FRAME_LEN = struct.Struct(">I")


def canonical(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def line_hash(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


_last_second: tuple[int, str] = (-1, "")
"""The last whole second iso_ms formatted: every record of a busy second reuses it."""


def iso_ms(ms: int) -> str:
    global _last_second
    second, millis = divmod(ms, 1000)
    cached, text = _last_second  # one read of a tuple: safe from any thread
    if cached != second:
        text = datetime.fromtimestamp(second, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
        _last_second = (second, text)
    return f"{text}.{millis:03d}Z"


def parse_time(text: str) -> int:
    """An ISO 8601 time (or date) as ms since the epoch; naive times are UTC. ValueError if bad."""
    value = text.strip()
    if value.endswith("Z"):
        value = value[:-1] + "+00:00"
    dt = datetime.fromisoformat(value)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return int(dt.timestamp() * 1000)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


# --- keys ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditKeys:
    """The MAC and encryption subkeys of an archive's audit key, and its public id."""

    mac_key: bytes = field(repr=False)
    enc_key: bytes = field(repr=False)
    key_id: str

    @classmethod
    def from_secret(cls, secret: bytes, archive_id: ArchiveId) -> AuditKeys:
        # HKDF-SHA256(ikm=audit key, salt=archive id, info="mifs/v1/audit-mac" | "mifs/v1/audit-enc")
        root = MasterKey.from_secret(secret)
        return cls(root.derive(archive_id, "audit-mac"), root.derive(archive_id, "audit-enc"), root.kek_id.hex())


def wrap_audit_key(kek: MasterKey, archive_id: ArchiveId, secret: bytes) -> bytes:
    return envelope.wrap_data_key(kek, archive_id, AUDIT_KEY_FILE_ID, secret)


def unwrap_audit_key(kek: MasterKey, archive_id: ArchiveId, blob: bytes) -> bytes:
    """IntegrityError if altered, WrongKey if wrapped by another KEK."""
    return envelope.unwrap_data_key(kek, archive_id, AUDIT_KEY_FILE_ID, blob)


# --- the chain -----------------------------------------------------------------------------------


@dataclass
class Chain:
    """Where the next record goes: its seq and the hash of the record before it."""

    next_seq: int = 0
    prev: str = GENESIS

    def append(self, event: str, fields: dict[str, Any], ms: int | None = None) -> bytes:
        doc = {k: v for k, v in fields.items() if v is not None}
        doc.update(seq=self.next_seq, t=iso_ms(now_ms() if ms is None else ms), prev=self.prev, ev=event)
        line = canonical(doc)
        self.prev = line_hash(line)
        self.next_seq += 1
        return line


# --- segments ------------------------------------------------------------------------------------


def segment_header(archive_id: ArchiveId, segment: int, chain: Chain, keys: AuditKeys, session: str) -> bytes:
    return canonical({
        "mifs_audit": FORMAT_VERSION, "archive": bytes(archive_id).hex(), "segment": segment,
        "first_seq": chain.next_seq, "prev": chain.prev, "key_id": keys.key_id, "session": session,
        "opened": iso_ms(now_ms()),
    })


def _context(label: bytes, archive_id: ArchiveId, *numbers: int) -> bytes:
    return b"mifs/v1/audit-" + label + bytes(archive_id) + b"".join(struct.pack(">Q", n) for n in numbers)


def seal_frame(keys: AuditKeys, archive_id: ArchiveId, segment: int, frame: int, lines: list[bytes]) -> bytes:
    """One batch of lines of the open segment, as appended to the spool file (length-prefixed)."""
    blob = envelope.seal_blob(keys.enc_key, KIND_FRAME, _context(b"frame", archive_id, segment, frame), b"".join(l + b"\n" for l in lines))
    return FRAME_LEN.pack(len(blob)) + blob


def open_frames(keys: AuditKeys, archive_id: ArchiveId, segment: int, data: bytes) -> tuple[list[bytes], int, str]:
    """The lines of an open segment's spool file, the number of whole frames, and a problem
    ('' if none): a torn last frame (crash while appending) or one that fails authentication.
    Lines of frames before the problem are returned."""
    lines: list[bytes] = []
    pos = frame = 0
    while pos < len(data):
        if pos + FRAME_LEN.size > len(data):
            return lines, frame, f"torn frame {frame} (incomplete length)"
        (size,) = FRAME_LEN.unpack_from(data, pos)
        if pos + FRAME_LEN.size + size > len(data):
            return lines, frame, f"torn frame {frame} (incomplete)"
        blob = data[pos + FRAME_LEN.size : pos + FRAME_LEN.size + size]
        try:
            plain = envelope.open_blob(keys.enc_key, KIND_FRAME, _context(b"frame", archive_id, segment, frame), blob)
        except IntegrityError:
            return lines, frame, f"frame {frame} fails authentication (modified, moved or truncated)"
        lines.extend(plain.splitlines())
        pos += FRAME_LEN.size + size
        frame += 1
    return lines, frame, ""


def end_line(keys: AuditKeys, body: bytes, records: int, last_seq: int, last: str, **extra: Any) -> bytes:
    end = {"records": records, "last_seq": last_seq, "last": last, **{k: v for k, v in extra.items() if v is not None}}
    tag = envelope.mac(keys.mac_key, body + canonical(end))
    return canonical({"end": end, "hmac": tag.hex()})


def seal_segment(keys: AuditKeys, archive_id: ArchiveId, segment: int, plaintext: bytes) -> bytes:
    return envelope.seal_blob(keys.enc_key, KIND_SEGMENT, _context(b"segment", archive_id, segment), zlib.compress(plaintext, 6))


def open_segment(keys: AuditKeys, archive_id: ArchiveId, segment: int, blob: bytes) -> bytes:
    """IntegrityError if the object is not segment `segment` of this archive, unaltered."""
    raw = envelope.open_blob(keys.enc_key, KIND_SEGMENT, _context(b"segment", archive_id, segment), blob)
    try:
        return zlib.decompress(raw)
    except zlib.error:
        raise IntegrityError("audit segment does not decompress") from None


def build_segment(keys: AuditKeys, lines: list[bytes], **extra: Any) -> tuple[bytes, int, str]:
    """Header + records (lines) -> the sealed plaintext, with its last seq and last hash."""
    header = json.loads(lines[0])
    records = lines[1:]
    body = b"".join(l + b"\n" for l in lines)
    last_seq = int(header["first_seq"]) + len(records) - 1
    last = line_hash(records[-1]) if records else str(header["prev"])
    return body + end_line(keys, body, len(records), last_seq, last, **extra) + b"\n", last_seq, last


# --- parsed segments (verify, query) ------------------------------------------------------------


@dataclass
class Segment:
    number: int
    header: dict[str, Any]
    records: list[dict[str, Any]]
    hashes: list[str]
    end: dict[str, Any] | None
    problems: list[str]

    @property
    def last(self) -> str:
        return self.hashes[-1] if self.hashes else str(self.header.get("prev", ""))

    @property
    def last_seq(self) -> int:
        return int(self.header.get("first_seq", 0)) + len(self.records) - 1


def parse_segment(keys: AuditKeys, archive_id: ArchiveId, number: int, lines: list[bytes], *, sealed: bool) -> Segment:
    """Check one segment's own integrity: header, seal (HMAC), seq order and the hash chain
    inside it. Problems name the segment and the record seq."""
    problems: list[str] = []
    where = f"segment {number}"
    try:
        header = json.loads(lines[0])
        assert isinstance(header, dict)
    except (ValueError, IndexError, AssertionError):
        return Segment(number, {}, [], [], None, [f"{where}: unreadable header"])
    if header.get("segment") != number:
        problems.append(f"{where}: header says segment {header.get('segment')} (moved or reordered)")
    if header.get("archive") != bytes(archive_id).hex():
        problems.append(f"{where}: belongs to another archive")
    body_lines = lines[1:]
    end: dict[str, Any] | None = None
    if sealed:
        if not body_lines:
            return Segment(number, header, [], [], None, problems + [f"{where}: has no end line (truncated)"])
        try:
            end_doc = json.loads(body_lines[-1])
            end = end_doc["end"]
            tag = bytes.fromhex(end_doc["hmac"])
        except (ValueError, KeyError, TypeError):
            return Segment(number, header, [], [], None, problems + [f"{where}: end line is missing or unreadable (truncated)"])
        body_lines = body_lines[:-1]
        body = b"".join(l + b"\n" for l in lines[: len(body_lines) + 1])
        if not envelope.verify_mac(keys.mac_key, body + canonical(end), tag):
            problems.append(f"{where}: HMAC seal does not match (content modified)")
    records: list[dict[str, Any]] = []
    hashes: list[str] = []
    expect_seq = int(header.get("first_seq", 0))
    prev = str(header.get("prev", ""))
    for line in body_lines:
        try:
            rec = json.loads(line)
            assert isinstance(rec, dict)
        except (ValueError, AssertionError):
            problems.append(f"{where}: unreadable record after seq {expect_seq - 1}")
            continue
        seq = rec.get("seq")
        if seq != expect_seq:
            if isinstance(seq, int) and seq > expect_seq:
                missing = f"{expect_seq}" if seq == expect_seq + 1 else f"{expect_seq}..{seq - 1}"
                problems.append(f"{where}: record seq {missing} missing (deleted), next is {seq}")
            else:
                problems.append(f"{where}: record seq {seq} out of order after {expect_seq - 1} (reordered)")
        if rec.get("prev") != prev:
            problems.append(f"{where}: record seq {seq}: hash chain broken (the record before it was modified, deleted or reordered)")
        if canonical(rec) != line:
            problems.append(f"{where}: record seq {seq} is not canonical (modified)")
        prev = line_hash(line)
        hashes.append(prev)
        records.append(rec)
        expect_seq = (seq if isinstance(seq, int) else expect_seq) + 1
    if end is not None and end.get("spool_modified"):
        problems.append(f"{where}: its local spool file was modified or truncated while the segment was open (sealed from the daemon's copy)")
    if end is not None:
        if end.get("records") != len(records) or (records and end.get("last") != hashes[-1]):
            problems.append(f"{where}: end line does not match its records ({end.get('records')} announced, {len(records)} present: truncated or extended)")
    return Segment(number, header, records, hashes, end, problems)


# --- the head -------------------------------------------------------------------------------------


def make_head(keys: AuditKeys, archive_id: ArchiveId, segment: int, last_seq: int, last: str, open_segment: int | None) -> bytes:
    doc = {"archive": bytes(archive_id).hex(), "segment": segment, "last_seq": last_seq, "last": last,
           "open": open_segment, "key_id": keys.key_id, "written": iso_ms(now_ms())}
    return canonical({"head": doc, "hmac": envelope.mac(keys.mac_key, b"mifs/v1/audit-head" + canonical(doc)).hex()})


def parse_head(keys: AuditKeys, archive_id: ArchiveId, data: bytes) -> dict[str, Any]:
    """The head's fields; IntegrityError if it was modified or belongs elsewhere."""
    try:
        outer = json.loads(data)
        doc = outer["head"]
        tag = bytes.fromhex(outer["hmac"])
    except (ValueError, KeyError, TypeError):
        raise IntegrityError("audit head is unreadable") from None
    if not envelope.verify_mac(keys.mac_key, b"mifs/v1/audit-head" + canonical(doc), tag):
        raise IntegrityError("audit head fails its HMAC (modified)")
    if doc.get("archive") != bytes(archive_id).hex():
        raise IntegrityError("audit head belongs to another archive")
    return dict(doc)
