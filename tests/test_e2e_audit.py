"""End-to-end: the audit trail and the allow list on real mounts (local store and SeaweedFS S3),
through the CLI (`mifs audit verify|query`), with requests from several uids.

Talks to mifs only through its CLI, the mounted filesystem and the files it leaves in the store
and the cache dir (the frame layout of the spool is the documented one, docs/FORMAT.md §10).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dicom_factory import Patient, StudySpec, study_files
from mifs_e2e import Archive, describe, wait_until, write_file
from studies_e2e import read_direct, wait_indexed

EXIT_AUDIT = 13
EXIT_USAGE = 2
UID_A, UID_B = 1001, 1002
# The child runs as an unprivileged uid: it needs an interpreter outside root's home.
CHILD_PYTHON = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else (shutil.which("python3") or sys.executable)

_CHILD = r"""
import errno, json, os, sys
ops = json.loads(sys.argv[1])
out = []
for op, path, *rest in ops:
    try:
        if op == "mkdir":
            os.mkdir(path)
        elif op == "write":
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            data = bytes.fromhex(rest[0])
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.close(fd)
        elif op == "read_direct":
            import mmap
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
            buf = mmap.mmap(-1, 4 << 20)
            total = 0
            while True:
                got = os.preadv(fd, [buf], total)
                total += got
                if got < len(buf):
                    break
            os.close(fd)
        elif op == "read":
            with open(path, "rb") as fh:
                fh.read()
        elif op == "listdir":
            os.listdir(path)
        out.append(0)
    except OSError as exc:
        out.append(exc.errno)
print(json.dumps(out))
"""


def run_as(uid: int, cwd: Path, ops: list[list[Any]]) -> list[int]:
    """Run file operations in a child process with uid = gid = `uid` and no supplementary
    groups, from `cwd` (entered as root: the test's base dir is 0700); the errno of each."""
    def drop() -> None:
        os.chdir(cwd)
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)

    proc = subprocess.run(
        [CHILD_PYTHON, "-c", _CHILD, json.dumps(ops)], preexec_fn=drop, capture_output=True, text=True, timeout=120,
        cwd="/",
    )
    assert proc.returncode == 0, proc.stderr
    result: list[int] = json.loads(proc.stdout)
    return result


def audit_json(arc: Archive, *args: object) -> list[dict[str, Any]]:
    result = arc.run_cli("audit", "query", arc.mountpoint, *args, "--json")
    assert result.returncode == 0, describe(result)
    rows: list[dict[str, Any]] = json.loads(result.stdout)
    return rows


def verify(arc: Archive, *args: object) -> tuple[int, str]:
    result = arc.run_cli("audit", "verify", *(args or (arc.mountpoint,)))
    assert "Traceback" not in result.stderr + result.stdout, describe(result)
    if result.returncode:
        assert result.stderr.startswith("mifs: error: the audit trail failed verification"), describe(result)
    return result.returncode, result.stdout


def store_segments(arc: Archive) -> dict[int, Path]:
    root = arc.store / "audit" / "segments"
    return {int(p.name, 16): p for p in root.iterdir()} if root.is_dir() else {}


def make_shared(arc: Archive) -> Path:
    shared = arc.mountpoint / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    return shared


def dicom(seed: int, patient_id: str, count: int) -> list[tuple[str, bytes]]:
    spec = StudySpec(seed=seed, patient=Patient(name=f"TEST^{patient_id}", patient_id=patient_id), images_per_series=count,
                     rows=64, columns=64)
    return [(f"{patient_id}/IM{i}.dcm", f.data) for i, f in enumerate(study_files(spec))]


# --- who accessed which patient's images -------------------------------------------------------------


def test_two_uids_attributed_and_query_by_patient_is_exact(s3_archive: Archive) -> None:
    arc = s3_archive
    arc.mount(options=["allow_other"])
    make_shared(arc)
    p1, p2 = dicom(1, "AUDPAT1", 3), dicom(2, "AUDPAT2", 2)
    cwd = arc.mountpoint / "shared"
    assert run_as(UID_A, cwd, [["mkdir", "AUDPAT1"]] + [["write", rel, data.hex()] for rel, data in p1]) == [0] * 4
    assert run_as(UID_B, cwd, [["mkdir", "AUDPAT2"]] + [["write", rel, data.hex()] for rel, data in p2]) == [0] * 3
    wait_indexed(arc, 5, uploaded=False)
    assert run_as(UID_B, cwd, [["read_direct", p1[0][0]]]) == [0]
    assert run_as(UID_A, cwd, [["read_direct", p2[1][0]]]) == [0]

    rows = audit_json(arc, "--patient", "AUDPAT1")
    got = sorted((r["ev"], r["uid"], r["gid"], r["path"], r["bytes_read"], r["bytes_written"]) for r in rows)
    want = sorted(
        [("create", UID_A, UID_A, f"/shared/{rel}", 0, len(data)) for rel, data in p1]
        + [("open-read", UID_B, UID_B, f"/shared/{p1[0][0]}", len(p1[0][1]), 0)]
    )
    assert got == want
    for r in rows:
        assert r["patient"] == "AUDPAT1" and r["study"] and r["sop"], r
        assert r["comm"] and r["exe"] and os.path.basename(r["exe"]).startswith("python"), r
        assert r["pid"] > 0 and r["t"].endswith("Z")

    rows_b = audit_json(arc, "--uid", str(UID_B))
    got_b = sorted((r["ev"], r.get("path"), r.get("patient")) for r in rows_b)
    want_b = sorted(
        [("mkdir", "/shared/AUDPAT2", None)]
        + [("create", f"/shared/{rel}", "AUDPAT2") for rel, _ in p2]
        + [("open-read", f"/shared/{p1[0][0]}", "AUDPAT1")]
    )
    assert got_b == want_b
    study = rows[0]["study"]
    assert len(audit_json(arc, "--study", study)) == 4
    assert audit_json(arc, "--patient", "AUDPAT1", "--since", "2999-01-01") == []
    bad = arc.run_cli("audit", "query", arc.mountpoint, "--since", "yesterday")
    assert bad.returncode == EXIT_USAGE and bad.stderr.count("\n") == 1, describe(bad)
    code, out = verify(arc)
    assert code == 0, out
    arc.umount()
    # the same answer from the store alone once unmounted (the local spool has been shipped)
    result = arc.run_cli("audit", "query", "--store", arc.store_url, "--key-file", arc.key_file, *arc.store_flags,
                         "--patient", "AUDPAT1", "--json", "--cache-dir", arc.cache_dir)
    assert result.returncode == 0, describe(result)
    offline = json.loads(result.stdout)
    # offline there is no index to fill in the ids of files created before they were indexed
    assert [(r["ev"], r["uid"]) for r in offline] == [("open-read", UID_B)]
    result = arc.run_cli("audit", "verify", "--store", arc.store_url, "--key-file", arc.key_file, *arc.store_flags)
    assert result.returncode == 0, describe(result)
    admin = [r for r in json.loads(arc.run_cli(
        "audit", "query", "--store", arc.store_url, "--key-file", arc.key_file, *arc.store_flags, "--json").stdout)
        if r["ev"] == "admin"]
    actions = [r.get("action") for r in admin]
    assert actions == ["init", "mount", "audit query", "audit query", "audit query", "audit query", "audit verify", "umount"]
    # `mifs init` opened the trail: its record names who created the archive
    assert admin[0]["uid"] == os.getuid() and admin[0]["seq"] == 0 and admin[0]["kek_id"], admin[0]


# --- tampering -----------------------------------------------------------------------------------------


def _frames(data: bytes) -> list[tuple[int, int]]:
    out, pos = [], 0
    while pos < len(data):
        (size,) = struct.unpack_from(">I", data, pos)
        out.append((pos, 4 + size))
        pos += 4 + size
    return out


@pytest.mark.expect_log(r"was modified while open")
def test_verify_names_edited_dropped_reordered_and_truncated_segments(archive: Archive) -> None:
    arc = archive
    for i in range(3):
        arc.mount()
        write_file(arc.mountpoint / f"f{i}", b"x" * 1000)
        arc.umount()
    assert sorted(store_segments(arc)) == [0, 1, 2, 3]  # 0: `mifs init`, then one per mount
    arc.mount()
    code, out = verify(arc)
    assert code == 0 and "verified" in out, out
    segs = store_segments(arc)
    original = {n: p.read_bytes() for n, p in segs.items()}

    def restore() -> None:
        for n, data in original.items():
            segs[n].write_bytes(data)

    edited = bytearray(original[1])
    edited[len(edited) // 2] ^= 0x20
    segs[1].write_bytes(bytes(edited))
    code, out = verify(arc)
    assert code == EXIT_AUDIT and "FAILED: segment 1: fails authentication" in out, out
    restore()

    segs[1].write_bytes(original[2])
    segs[2].write_bytes(original[1])
    code, out = verify(arc)
    assert code == EXIT_AUDIT, out
    assert "FAILED: segment 1: the object holds segment 2 (segments reordered or renamed)" in out
    assert "FAILED: segment 2: the object holds segment 1 (segments reordered or renamed)" in out
    restore()

    segs[1].unlink()
    code, out = verify(arc)
    assert code == EXIT_AUDIT and "FAILED: segment 1: missing (deleted)" in out, out
    restore()

    segs[3].unlink()  # the newest sealed segment: truncation, caught by the heads
    code, out = verify(arc)
    assert code == EXIT_AUDIT and "head names segment 3 but the newest sealed segment found is 2" in out, out
    restore()
    assert verify(arc)[0] == 0

    # the open segment in the local spool: drop its last frame (the newest records)
    write_file(arc.mountpoint / "g", b"y")
    wait_until(lambda: arc.status_json()["audit_pending"] == 0, 10, "the audit spool flush")
    spool = arc.cache_dir / "audit"
    open_file = next(spool.glob("open-*"))
    data = open_file.read_bytes()
    start, _size = _frames(data)[-1]
    assert start > 0
    with open(open_file, "r+b") as fh:
        fh.truncate(start)
    code, out = verify(arc)
    assert code == EXIT_AUDIT and "records are missing from the local spool (deleted or truncated)" in out, out
    arc.umount()  # seals the segment from the daemon's own copy and says so
    arc.mount()
    code, out = verify(arc)
    assert code == EXIT_AUDIT and "local spool file was modified or truncated while the segment was open" in out, out


@pytest.mark.expect_log(r"\bWARNING\b")
def test_crash_shows_as_gap_and_a_deleted_local_segment_is_named(archive: Archive) -> None:
    arc = archive
    arc.mount()
    write_file(arc.mountpoint / "before-crash", b"z" * 100)
    wait_until(lambda: arc.status_json()["audit_pending"] == 0, 10, "the audit spool flush")
    arc.kill_daemon()
    offline = ["audit", "verify", "--store", arc.store, "--key-file", arc.key_file, "--cache-dir", arc.cache_dir]
    result = arc.run_cli(*offline)
    assert result.returncode == 0, describe(result)
    assert "gap: session ended without an unmount record; lost: records of up to about 1 s" in result.stdout
    arc.mount()
    code, out = verify(arc)
    assert code == 0 and "gap: session ended without an unmount record" in out, out
    rows = audit_json(arc)
    assert [r["path"] for r in rows if r["ev"] == "create"] == ["/before-crash"]
    assert [r["ev"] for r in rows].count("gap") == 1
    assert [r["ev"] for r in rows if r["ev"] == "crash-recovered"] == ["crash-recovered"]
    arc.kill_daemon()
    open_files = list((arc.cache_dir / "audit").glob("open-*"))
    assert len(open_files) == 1
    open_files[0].unlink()
    result = arc.run_cli(*offline)
    assert result.returncode == EXIT_AUDIT, describe(result)
    number = int(open_files[0].name[len("open-"):], 16)
    assert f"FAILED: segment {number}: the open segment the local head names is missing (deleted)" in result.stdout


# --- access control ------------------------------------------------------------------------------------


def test_uid_outside_the_allow_list_gets_eacces_and_is_audited(archive: Archive) -> None:
    arc = archive
    arc.mount(flags=["--allow-uid", str(UID_A)])
    shared = make_shared(arc)
    write_file(shared / "f", b"data" * 100)
    cwd = arc.mountpoint
    assert run_as(UID_A, cwd, [["read", "shared/f"], ["listdir", "shared"], ["write", "shared/a", "00"]]) == [0, 0, 0]
    assert run_as(UID_B, cwd, [["read", "shared/f"], ["listdir", "shared"], ["write", "shared/b", "00"]]) == [errno.EACCES] * 3
    assert not (shared / "b").exists()
    denied = audit_json(arc, "--uid", str(UID_B))
    assert denied and all(r["ev"] == "denied" and r["errno"] == "EACCES" for r in denied), denied
    assert len(denied) >= 3 and {r["op"] for r in denied} <= {"open", "lookup", "getattr", "opendir", "create"}, denied
    assert any(r.get("path") in ("/shared/f", "/shared") for r in denied), denied
    allowed = audit_json(arc, "--uid", str(UID_A))
    assert sorted(r["ev"] for r in allowed) == ["create", "open-read"]
    mount_rec = [r for r in audit_json(arc) if r.get("action") == "mount"][-1]
    assert mount_rec["allow_uids"] == [UID_A]


def test_read_only_mount_refuses_changes_with_erofs(archive: Archive) -> None:
    arc = archive
    arc.mount()
    write_file(arc.mountpoint / "keep", b"k" * 10)
    arc.umount()
    arc.mount(flags=["--read-only"])
    assert (arc.mountpoint / "keep").read_bytes() == b"k" * 10
    for action in (lambda: write_file(arc.mountpoint / "new", b"n"), lambda: (arc.mountpoint / "d").mkdir(),
                   lambda: (arc.mountpoint / "keep").unlink(), lambda: os.chmod(arc.mountpoint / "keep", 0o600),
                   lambda: write_file(arc.mountpoint / "keep", b"changed")):
        with pytest.raises(OSError) as info:
            action()
        assert info.value.errno == errno.EROFS
    assert arc.status_json()["read_only"] is True
    rows = audit_json(arc)
    last_mount = max(i for i, r in enumerate(rows) if r.get("action") == "mount")
    assert rows[last_mount]["read_only"] is True and "ro" in rows[last_mount]["options"]
    session = rows[last_mount + 1:]
    assert [r["path"] for r in session if r["ev"] == "open-read"] == ["/keep"]
    assert not [r for r in session if r["ev"] in ("create", "open-write", "unlink", "chmod", "mkdir")]
    assert [r["path"] for r in rows[:last_mount] if r["ev"] == "create"] == ["/keep"]


@pytest.mark.expect_log(r"integrity failure", r"failed authentication")
def test_integrity_failure_is_audited(archive: Archive) -> None:
    arc = archive
    arc.mount()
    write_file(arc.mountpoint / "victim", b"v" * 5000)
    arc.umount()
    (key, path), = arc.chunk_objects().items()
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    arc.replace_object(key, bytes(data), also_cache=True)
    arc.mount()
    with pytest.raises(OSError) as info:
        (arc.mountpoint / "victim").read_bytes()
    assert info.value.errno == errno.EIO
    failures = [r for r in audit_json(arc) if r["ev"] == "integrity-failure"]
    assert failures and {r["path"] for r in failures} == {"/victim"} and failures[0]["chunk"] == 0, failures


def test_audit_cli_errors_are_one_line(archive: Archive, tmp_path: Path) -> None:
    arc = archive
    from mifs_e2e import assert_cli_error

    assert_cli_error(arc.run_cli("audit", "verify", tmp_path), 8)  # not a mifs mount
    assert_cli_error(arc.run_cli("audit", "query", "--store", arc.store, "--key-file", arc.key_file,
                                 "--until", "soon"), EXIT_USAGE)
    # never mounted: `mifs init` opened the trail with its own record
    fresh = arc.run_cli("audit", "verify", "--store", arc.store, "--key-file", arc.key_file)
    assert fresh.returncode == 0 and "1 records" in fresh.stdout, describe(fresh)
    other_key = tmp_path / "other.key"
    assert arc.run_cli("init", tmp_path / "other-store", "--key-file", other_key).returncode == 0
    assert_cli_error(arc.run_cli("audit", "verify", "--store", arc.store, "--key-file", other_key), 4)  # wrong key
    assert_cli_error(arc.run_cli("mount", arc.store, arc.mountpoint, "--allow-uid", "x"), EXIT_USAGE)
