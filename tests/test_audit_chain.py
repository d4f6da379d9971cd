"""The audit trail's record and segment logic (mifs.audit.records, .verify, .trail) with real
crypto and a real local-directory store: every kind of tampering is detected and named."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mifs.audit import records, verify
from mifs.audit.records import AuditKeys, Chain
from mifs.audit.spool import Spool, open_name, sealed_name
from mifs.audit.trail import AuditError, SEGMENT_PREFIX, STORE_HEAD, AuditTrail, load_audit_keys, open_trail, segment_key
from mifs.crypto.keyring import KeyRing, MasterKey
from mifs.store.localdir import LocalDirStore
from mifs.types import ArchiveId

ARCHIVE = ArchiveId(bytes(range(16)))
KEYS = AuditKeys.from_secret(b"k" * 32, ARCHIVE)


def make_segments(count: int, per: int = 3) -> tuple[dict[int, bytes], dict[int, list[bytes]], bytes]:
    """`count` sealed segments of `per` records; (blobs, plaintext lines, head)."""
    chain = Chain()
    blobs: dict[int, bytes] = {}
    lines_by: dict[int, list[bytes]] = {}
    last_seq, last = -1, records.GENESIS
    for n in range(count):
        lines = [records.segment_header(ARCHIVE, n, chain, KEYS, "s1")]
        if n == 0:
            lines.append(chain.append("admin", {"action": "mount", "session": "s1", "uid": 0}))
        while len(lines) < per + 1:
            lines.append(chain.append("open-read", {"uid": 1000, "path": f"/p{n}/{len(lines)}", "patient": "PID1"}))
        if n == count - 1:
            lines.append(chain.append("unmounted", {"session": "s1"}))
        plain, last_seq, last = records.build_segment(KEYS, lines)
        blobs[n] = records.seal_segment(KEYS, ARCHIVE, n, plain)
        lines_by[n] = plain.splitlines()
    return blobs, lines_by, records.make_head(KEYS, ARCHIVE, count - 1, last_seq, last, None)


def analyse(blobs: dict[int, bytes], head: bytes | None) -> verify.Report:
    return verify.analyse(KEYS, ARCHIVE, verify.TrailImage(store_segments=blobs, store_head=head))


def reseal(n: int, lines: list[bytes]) -> bytes:
    """What an attacker holding the key could do: re-encrypt edited plaintext (the HMAC seal
    and the chain still give the edit away unless the MAC key is also used)."""
    return records.seal_segment(KEYS, ARCHIVE, n, b"".join(l + b"\n" for l in lines))


def test_intact_trail_verifies() -> None:
    blobs, _, head = make_segments(3)
    report = analyse(blobs, head)
    assert report.problems == []
    assert report.gaps == []
    assert report.record_count == 3 * 3 + 1
    assert [r["seq"] for r in report.records()] == list(range(10))


def test_canonical_records_chain_by_hash() -> None:
    chain = Chain()
    a = chain.append("x", {"b": 1, "a": "é"}, ms=0)
    b = chain.append("y", {}, ms=1)
    assert a == b'{"a":"\\u00e9","b":1,"ev":"x","prev":"' + b"0" * 64 + b'","seq":0,"t":"1970-01-01T00:00:00.000Z"}'
    assert json.loads(b)["prev"] == records.line_hash(a)


def test_edited_byte_in_a_store_object_is_named() -> None:
    blobs, _, head = make_segments(3)
    edited = bytearray(blobs[1])
    edited[40] ^= 0x01
    blobs[1] = bytes(edited)
    assert analyse(blobs, head).problems == ["segment 1: fails authentication (modified, truncated or not ours)"]


def test_edited_record_with_the_key_breaks_seal_and_chain() -> None:
    blobs, lines, head = make_segments(2)
    edited = [l.replace(b'"/p1/2"', b'"/p1/X"') for l in lines[1]]
    blobs[1] = reseal(1, edited)
    problems = analyse(blobs, head).problems
    assert "segment 1: HMAC seal does not match (content modified)" in problems
    assert any("segment 1: record seq 5: hash chain broken" in p for p in problems), problems


def test_deleted_record_is_named() -> None:
    blobs, lines, head = make_segments(2)
    del lines[1][2]  # header, seq 3, seq 4 (deleted), seq 5, ...
    blobs[1] = reseal(1, lines[1])
    problems = analyse(blobs, head).problems
    assert "segment 1: HMAC seal does not match (content modified)" in problems
    assert "segment 1: record seq 4 missing (deleted), next is 5" in problems


def test_reordered_records_are_named() -> None:
    blobs, lines, head = make_segments(2)
    lines[1][1], lines[1][2] = lines[1][2], lines[1][1]
    blobs[1] = reseal(1, lines[1])
    problems = analyse(blobs, head).problems
    assert any("record seq 3 out of order" in p or "record seq 3 missing" in p for p in problems), problems
    assert any("hash chain broken" in p for p in problems), problems


def test_truncated_segment_end_is_named() -> None:
    blobs, lines, head = make_segments(2)
    blobs[1] = reseal(1, lines[1][:-2])  # last record and the end line gone
    problems = analyse(blobs, head).problems
    assert any(p.startswith("segment 1: end line") for p in problems), problems


def test_dropped_segment_is_named() -> None:
    blobs, _, head = make_segments(4)
    del blobs[1]
    assert analyse(blobs, head).problems == ["segment 1: missing (deleted)"]


def test_reordered_segments_are_named() -> None:
    blobs, _, head = make_segments(4)
    blobs[1], blobs[2] = blobs[2], blobs[1]
    problems = analyse(blobs, head).problems
    assert "segment 1: the object holds segment 2 (segments reordered or renamed)" in problems
    assert "segment 2: the object holds segment 1 (segments reordered or renamed)" in problems


def test_truncation_of_the_newest_segments_is_named() -> None:
    blobs, _, head = make_segments(4)
    del blobs[3], blobs[2]
    problems = analyse(blobs, head).problems
    assert any("store head names segment 3 but the newest sealed segment found is 1" in p for p in problems), problems


def test_forged_or_replayed_head_is_named() -> None:
    blobs, _, head = make_segments(3)
    doc = json.loads(head)
    doc["head"]["segment"] = 1
    assert "store head: audit head fails its HMAC (modified)" in analyse(blobs, records.canonical(doc)).problems
    other = records.make_head(KEYS, ARCHIVE, 2, 9, "f" * 64, None)  # validly MACed, other content
    assert analyse(blobs, other).problems == ["store head does not match segment 2 (segment replaced or truncated)"]


def test_session_without_unmount_is_a_gap() -> None:
    recs = [
        {"ev": "admin", "action": "mount", "session": "a", "t": "2024-01-01T00:00:00.000Z"},
        {"ev": "open-read", "t": "2024-01-01T00:00:01.000Z"},
        {"ev": "admin", "action": "mount", "session": "b", "t": "2024-01-01T00:10:00.000Z"},
        {"ev": "unmounted", "session": "b", "t": "2024-01-01T00:11:00.000Z"},
        {"ev": "admin", "action": "mount", "session": "c", "t": "2024-01-01T00:12:00.000Z"},
    ]
    gaps = verify.session_gaps(recs, live_session="c")
    assert [(g["session"], g["last_record"], g["next_mount"]) for g in gaps] == [
        ("a", "2024-01-01T00:00:01.000Z", "2024-01-01T00:10:00.000Z")
    ]
    assert [g["session"] for g in verify.session_gaps(recs, live_session=None)] == ["a", "c"]


def test_torn_and_tampered_frames() -> None:
    frames = records.seal_frame(KEYS, ARCHIVE, 7, 0, [b"h"]) + records.seal_frame(KEYS, ARCHIVE, 7, 1, [b"r1", b"r2"])
    assert records.open_frames(KEYS, ARCHIVE, 7, frames) == ([b"h", b"r1", b"r2"], 2, "")
    lines, count, problem = records.open_frames(KEYS, ARCHIVE, 7, frames[:-3])
    assert (lines, count) == ([b"h"], 1) and problem.startswith("torn frame 1")
    assert records.open_frames(KEYS, ARCHIVE, 8, frames)[2].startswith("frame 0 fails authentication")


# --- the trail service on a real local store -------------------------------------------------------


async def test_trail_rotates_ships_recovers_after_a_crash(tmp_path: Path) -> None:
    store = LocalDirStore(tmp_path / "store", create=True)
    kek = KeyRing(MasterKey.generate())
    spool = Spool(tmp_path / "cache" / "audit")
    trail, notes = await open_trail(store, kek, ARCHIVE, spool)
    assert notes == []
    trail.admin("mount", None, session=trail.session)
    trail.record("open-read", uid=1000, path="/a", patient="P1")
    await trail.rotate()
    await trail.ship()
    trail.record("open-read", uid=1001, path="/b", patient="P2")
    await trail.flush()
    assert sorted(await store.list(SEGMENT_PREFIX)) == [segment_key(0)]
    assert spool.open_segments() == [1]
    # "crash": the trail is abandoned without close; a new one recovers the open segment.
    trail2, notes2 = await open_trail(store, kek, ARCHIVE, spool)
    assert [n[0] for n in notes2] == ["crash-recovered"] and notes2[0][1]["records"] == 1
    trail2.admin("mount", None, session=trail2.session)
    trail2.record("unmounted", session=trail2.session)
    await trail2.close(ship_timeout=10)
    assert sorted(await store.list(SEGMENT_PREFIX)) == [segment_key(n) for n in range(3)]
    assert spool.sealed_segments() == [] and spool.open_segments() == []
    keys = await load_audit_keys(store, kek, ARCHIVE, None, create=False)
    report = verify.analyse(keys, ARCHIVE, await verify.read_image(store, spool))
    assert report.problems == []
    assert [g["session"] for g in report.gaps] == [trail.session]
    assert [r["ev"] for r in report.records()] == ["admin", "open-read", "open-read", "admin", "unmounted"]
    hits = verify.select(report, verify.Query(patient="P2"))
    assert [(r.get("ev"), r.get("path")) for r in hits] == [("open-read", "/b"), ("gap", None)]
    # deleting the local open segment of a live trail is named too
    trail3, _ = await open_trail(store, kek, ARCHIVE, spool)
    trail3.record("x")
    await trail3.flush()
    os.unlink(spool.root / open_name(3))
    problems = verify.analyse(keys, ARCHIVE, await verify.read_image(store, spool)).problems
    assert problems == ["segment 3: the open segment the local head names is missing (deleted)"]


async def test_store_segment_names_and_objects_hold_no_plaintext(tmp_path: Path) -> None:
    store = LocalDirStore(tmp_path / "store", create=True)
    kek = KeyRing(MasterKey.generate())
    spool = Spool(tmp_path / "audit")
    trail, _ = await open_trail(store, kek, ARCHIVE, spool)
    trail.record("open-read", path="/SECRET-NAME.dcm", patient="PATIENT-XYZ")
    await trail.flush()
    for path in spool.root.iterdir():
        assert b"PATIENT-XYZ" not in path.read_bytes() and b"SECRET-NAME" not in path.read_bytes()
    await trail.close(ship_timeout=10)
    for key in await store.list("audit/"):
        data = await store.get(key)
        assert b"PATIENT-XYZ" not in data and b"SECRET-NAME" not in data
    assert STORE_HEAD in await store.list("audit/")
    assert not (spool.root / sealed_name(0)).exists()


async def test_audit_key_opens_with_any_held_kek_and_is_registered_for_rotation(tmp_path: Path) -> None:
    from mifs.crypto import envelope
    from mifs.errors import IntegrityError
    from mifs.keystore import WRAPPED_KEY_OBJECTS
    from mifs.audit.trail import STORE_KEY

    assert [(o.key, o.file_id) for o in WRAPPED_KEY_OBJECTS] == [(STORE_KEY, records.AUDIT_KEY_FILE_ID)]
    store = LocalDirStore(tmp_path / "store", create=True)
    old, new = MasterKey.generate(), MasterKey.generate()
    first = await load_audit_keys(store, KeyRing(old), ARCHIVE, None, create=True)
    # what key rotation does to a registered object: re-wrap under the new KEK
    blob = await store.get(STORE_KEY)
    secret = envelope.unwrap_data_key(old, ARCHIVE, records.AUDIT_KEY_FILE_ID, blob)
    await store.put(STORE_KEY, envelope.wrap_data_key(new, ARCHIVE, records.AUDIT_KEY_FILE_ID, secret))
    again = await load_audit_keys(store, KeyRing(new), ARCHIVE, None, create=False)
    assert (again.mac_key, again.enc_key, again.key_id) == (first.mac_key, first.enc_key, first.key_id)
    with pytest.raises((AuditError, IntegrityError)):
        await load_audit_keys(store, KeyRing(old), ARCHIVE, None, create=False)


def test_audit_key_id_is_fixed_and_16_bytes() -> None:
    assert len(records.AUDIT_KEY_FILE_ID) == 16
    kek = MasterKey.generate()
    blob = records.wrap_audit_key(kek, ARCHIVE, b"s" * 32)
    assert records.unwrap_audit_key(kek, ARCHIVE, blob) == b"s" * 32
    with pytest.raises(Exception):
        records.unwrap_audit_key(MasterKey.generate(), ARCHIVE, blob)
