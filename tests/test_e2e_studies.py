"""End-to-end: the DICOM study index of a mounted archive (local store), through the CLI
(`mifs studies`, `mifs reindex`, `mifs cache pin/unpin/prefetch`, `mifs status --json`).

Talks to mifs only through the CLI and the mounted filesystem. Expected values come from the
files themselves, parsed with pydicom (tests/studies_e2e.py), and a few are spelled out by hand.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pytest

from conftest import fuse_available, managed_archive
from dicom_factory import Patient, StudySpec, study_files
from mifs_e2e import (
    CLI_TIMEOUT,
    Archive,
    assert_cli_error,
    describe,
    mifs_env,
    pattern,
    write_file,
)
from studies_e2e import (
    CHUNK_OVERHEAD,
    EXIT_NO_MOUNT,
    EXIT_NOT_FOUND,
    EXIT_USAGE,
    LOCAL_STORE_IGNORE,
    Expected,
    assert_index_matches_tree,
    assert_instances,
    assert_malformed,
    assert_studies,
    by_uid,
    cache_ls,
    check_instances,
    check_malformed,
    check_studies,
    expected_from_files,
    expected_from_tree,
    expected_studies,
    factory_tree,
    instances,
    malformed,
    phi_in_logs,
    parse_json,
    phi_of,
    pydicom_file,
    run_many,
    studies,
    studies_many,
    study_uid,
    verify_tree,
    wait_indexed,
    write_tree,
)

PATIENT_A = Patient("DOE^JANE_IDXTEST", "PID-IDX-A01", "19700101", "F")
PATIENT_B = Patient("ROE^RICHARD_IDXTEST", "PID-IDX-B02", "19591103", "M")
CT = StudySpec(seed=401, patient=PATIENT_A, modality="CT", images_per_series=12, accession_number="ACC-401",
               study_description="CT CHEST W/O CONTRAST", study_date="20240115")
MR = StudySpec(seed=402, patient=PATIENT_A, modality="MR", series_count=2, images_per_series=3,
               accession_number="ACC-402", study_description="MR HEAD", study_date="20230601")
CR = StudySpec(seed=403, patient=PATIENT_B, modality="CR", images_per_series=1, rows=512, columns=512,
               accession_number="ACC-403", study_description="CR CHEST PA", study_date="20220304")
PYDICOM_COPIES = ("CT_small.dcm", "MR_small_bigendian.dcm", "JPEG2000.dcm", "image_dfl.dcm", "ExplVR_BigEndNoMeta.dcm")
# Study Instance UIDs of the pydicom files (from the files; checked against the oracle below)
CT_SMALL_STUDY = "1.3.6.1.4.1.5962.1.2.1.20040119072730.12322"
MR_SMALL_STUDY = "1.3.6.1.4.1.5962.1.2.4.20040826185059.5457"
NM_STUDY = "1.3.6.1.4.1.5962.1.2.8.20040826185059.5457"
DFL_STUDY = "1.3.6.1.4.1.5962.1.2.0.977067310.6001.0"
RTPLAN_STUDY = "1.2.333.4444.5.6.7.8.9"

STATUS_KEYS = ("dicom_instances", "dicom_studies", "dicom_malformed", "index_backlog",
               "prefetch_queued_studies", "prefetched_objects", "prefetched_bytes")
SQLITE_HEADER = b"SQLite format 3\x00" + struct.pack(">HBBBBBBIIIIIIIIIIII", 4096, 1, 1, 0, 64, 32, 32, *([0] * 12))
MALFORMED = bytes(128) + b"DICM" + pattern("malformed", 20_000)
NON_DICOM = {
    "logs/pacs.log": b"".join(b"2024-01-15 08:30:%02d INFO stored instance %d\n" % (i % 60, i) for i in range(500)),
    "db/index.sqlite": SQLITE_HEADER + pattern("sqlite", 3 * 4096),
    "incoming/upload-0001.tmp": pattern("tmp upload", 70_000),
    "empty.dcm": b"",
}


def mixed_tree() -> dict[str, bytes]:
    """24 instances in 8 studies, 1 malformed file and 5 other files."""
    files = factory_tree(CT, MR, CR)
    files.update({f"misc/{name}": pydicom_file(name) for name in PYDICOM_COPIES})
    files["misc/broken.dcm"] = MALFORMED
    files["DICOMDIR"] = pydicom_file("DICOMDIR")
    files.update(NON_DICOM)
    return files


def uids(items: list[dict[str, Any]]) -> list[str]:
    return [s["study_instance_uid"] for s in items]


def assert_no_phi_in_logs(arc: Archive, exp: Expected, *extra: str) -> None:
    secrets = phi_of(exp) | set(extra)
    hits = phi_in_logs(arc, secrets)
    assert arc.log_files(), "no daemon log file found"
    assert not hits, "patient data in the daemon log:\n" + "\n".join(hits[:20])


# --- the index of a mixed tree ------------------------------------------------------------------------


def test_index_of_a_mixed_tree(archive: Archive) -> None:
    arc = archive
    arc.mount(flags=["--debug"])  # debug logging must not leak patient data either
    mp = arc.mountpoint
    files = mixed_tree()
    write_tree(mp, files)
    ct_files = [f"studies/{i.relpath}" for i in study_files(CT)]
    os.symlink(ct_files[0], mp / "latest.dcm")  # not a regular file: not indexed again

    exp = expected_from_tree(mp)
    assert (len(exp.instances), len(exp.malformed), exp.other) == (24, 1, 5), "the test tree itself"
    status = wait_indexed(arc, 24, 1)
    assert {k: status.get(k, "(missing)") for k in STATUS_KEYS} == {
        "dicom_instances": 24, "dicom_studies": 8, "dicom_malformed": 1, "index_backlog": 0,
        "prefetch_queued_studies": 0, "prefetched_objects": 0, "prefetched_bytes": 0,
    }
    want = expected_studies(exp)
    ct_uid, mr_uid, cr_uid = study_uid(CT), study_uid(MR), study_uid(CR)
    assert set(want) == {ct_uid, mr_uid, cr_uid, CT_SMALL_STUDY, MR_SMALL_STUDY, NM_STUDY, DFL_STUDY, RTPLAN_STUDY}

    # the factory CT study, spelled out (so that an oracle gone wrong cannot hide a bug)
    ct_bytes = sum(len(files[p]) for p in ct_files)
    assert want[ct_uid] == {
        "study_instance_uid": ct_uid, "patient_id": "PID-IDX-A01", "patient_name": "DOE^JANE_IDXTEST",
        "study_date": "2024-01-15", "study_time": "08:30:00", "accession_number": "ACC-401",
        "study_description": "CT CHEST W/O CONTRAST", "modalities": ["CT"], "series": 1, "instances": 12,
        "bytes": ct_bytes, "cached_bytes": ct_bytes + 12 * CHUNK_OVERHEAD, "cache": "full", "pinned": False,
    }
    assert (want[mr_uid]["series"], want[mr_uid]["instances"], want[mr_uid]["modalities"]) == (2, 6, ["MR"])
    assert (want[cr_uid]["patient_id"], want[cr_uid]["study_date"], want[cr_uid]["instances"]) == ("PID-IDX-B02", "2022-03-04", 1)
    assert (want[RTPLAN_STUDY]["study_date"], want[RTPLAN_STUDY]["modalities"]) == ("2015-05-15", ["RTPLAN"])
    assert (want[DFL_STUDY]["study_date"], want[DFL_STUDY]["study_time"], want[DFL_STUDY]["patient_id"]) == (None, None, "")

    all_studies, all_instances, bad = (parse_json(r) for r in run_many(
        arc, ("studies", mp, "--json"), ("studies", mp, "--instances", "--json"), ("studies", mp, "--malformed", "--json")))
    assert_studies(check_studies(all_studies), want, "studies --json", ignore=LOCAL_STORE_IGNORE)
    # by date, newest first; MR_small and the NM study share a date: by UID (...1.2.4... < ...1.2.8...)
    dated = [u for u in uids(all_studies) if u != DFL_STUDY]
    assert dated == [ct_uid, mr_uid, cr_uid, RTPLAN_STUDY, MR_SMALL_STUDY, NM_STUDY, CT_SMALL_STUDY], dated

    assert_instances(check_instances(all_instances), exp, "studies --instances --json")
    ct_instances = [i for i in all_instances if i["study_instance_uid"] == ct_uid]
    assert [i["path"] for i in ct_instances] == ct_files
    assert [(i["series_number"], i["instance_number"]) for i in ct_instances] == [(1, n) for n in range(1, 13)]
    assert {i["transfer_syntax"] for i in ct_instances} == {"1.2.840.10008.1.2.1"}
    mr_instances = [i for i in all_instances if i["study_instance_uid"] == mr_uid]
    assert [(i["series_number"], i["instance_number"]) for i in mr_instances] == [(s, n) for s in (1, 2) for n in (1, 2, 3)]
    syntaxes = {i["path"]: i["transfer_syntax"] for i in all_instances if i["path"].startswith("misc/")}
    assert syntaxes == {
        "misc/CT_small.dcm": "1.2.840.10008.1.2.1",
        "misc/MR_small_bigendian.dcm": "1.2.840.10008.1.2.2",
        "misc/JPEG2000.dcm": "1.2.840.10008.1.2.4.91",
        "misc/image_dfl.dcm": "1.2.840.10008.1.2.1.99",
        "misc/ExplVR_BigEndNoMeta.dcm": "1.2.840.10008.1.2.2",
    }

    assert_malformed(check_malformed(bad), exp, "studies --malformed --json")
    assert [(m["path"], m["bytes"]) for m in bad] == [("misc/broken.dcm", len(MALFORMED))]

    # filters: (filters, the study UIDs they must give, in this order)
    cases: list[tuple[tuple[str, ...], list[str]]] = [
        (("--patient", "PID-IDX-A01"), [ct_uid, mr_uid]),
        (("--patient", "PID-IDX-B02"), [cr_uid]),
        (("--patient", "1CT1"), [CT_SMALL_STUDY]),
        (("--patient", "NO-SUCH-PATIENT"), []),
        (("--study", mr_uid), [mr_uid]),
        (("--since", "2023-06-01"), [ct_uid, mr_uid]),  # on or after
        (("--since", "20230602"), [ct_uid]),
        (("--since", "2015-05-15"), [ct_uid, mr_uid, cr_uid, RTPLAN_STUDY]),
        (("--since", "2030-01-01"), []),
        (("--modality", "mr"), [mr_uid, MR_SMALL_STUDY]),  # case-insensitive
        (("--modality", "CT"), [ct_uid, CT_SMALL_STUDY]),
        (("--modality", "Nm"), [NM_STUDY]),
        (("--modality", "XA"), []),
        (("--patient", "PID-IDX-A01", "--modality", "CT"), [ct_uid]),
        (("--since", "2023-01-01", "--modality", "MR"), [mr_uid]),
    ]
    for (args, want_uids), got in zip(cases, studies_many(arc, *(args for args, _ in cases))):
        assert uids(got) == want_uids, f"studies {' '.join(args)}: {uids(got)}"
        assert got == [s for s in all_studies if s["study_instance_uid"] in want_uids], f"studies {' '.join(args)}"
    instance_cases = [
        (("--study", cr_uid), [cr_uid]),
        (("--patient", "PID-IDX-A01"), [ct_uid, mr_uid]),
        (("--since", "2024-01-01"), [ct_uid]),
    ]
    results = run_many(arc, *(("studies", mp, "--instances", *args, "--json") for args, _ in instance_cases))
    for (args, in_studies), result in zip(instance_cases, results):
        assert_instances(check_instances(parse_json(result)), exp, f"--instances {' '.join(args)}", only_studies=in_studies)

    # table output: one row per study
    result = arc.run_cli("studies", mp)
    assert result.returncode == 0 and "Traceback" not in result.stderr, describe(result)
    rows = [line for line in result.stdout.splitlines() if line.strip()]
    assert 8 <= len(rows) <= 8 + 3, f"expected one row per study (8) plus headings:\n{result.stdout}"
    assert sum("PID-IDX-A01" in r for r in rows) == 2 and sum("PID-IDX-B02" in r for r in rows) == 1, result.stdout

    # the mount named with -m, or not at all (the only live mifs mount)
    assert parse_json(arc.run_cli("studies", "-m", mp, "--json")) == all_studies
    assert parse_json(run_isolated(arc, [mp], "studies", "--json")) == all_studies

    verify_tree(mp, files, "after indexing")

    # the index survives umount/mount
    arc.remount()
    again = [parse_json(r) for r in run_many(
        arc, ("studies", mp, "--json"), ("studies", mp, "--instances", "--json"), ("studies", mp, "--malformed", "--json"))]
    assert again == [all_studies, all_instances, bad], "the index changed across umount/mount"
    status = arc.status_json()
    assert (status["dicom_instances"], status["dicom_studies"], status["dicom_malformed"], status["index_backlog"]) == (24, 8, 1, 0)
    verify_tree(mp, files, "after remount")
    arc.umount()
    assert_no_phi_in_logs(arc, exp, PATIENT_A.name, PATIENT_B.name, "DOE^JANE", "ROE^RICHARD", "CompressedSamples")


# Runs `python -m mifs ARGS` in a private mount namespace in which every fuse.mifs mount but
# the ones named in argv[1] (one per line) is detached: the commands that pick "the only live
# mifs mount" then see only this test's mounts, whatever else runs on the host.
ISOLATED = r"""
import os, subprocess, sys
keep = set(filter(None, sys.argv[1].split("\n")))
with open("/proc/self/mountinfo") as fh:
    lines = fh.readlines()
for line in reversed(lines):
    left, _, right = line.partition(" - ")
    if right.split()[0] == "fuse.mifs":
        point = left.split()[4].replace("\\040", " ")
        if point not in keep:
            subprocess.run(["umount", "-l", point], check=True)
os.execv(sys.executable, [sys.executable, "-m", "mifs", *sys.argv[2:]])
"""


def run_isolated(arc: Archive, keep: list[Path], *args: object) -> subprocess.CompletedProcess[str]:
    """`mifs ARGS` seeing only the mifs mounts `keep` (a private mount namespace)."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is needed to hide the host's other mifs mounts")
    argv = ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", ISOLATED,
            "\n".join(os.path.realpath(p) for p in keep), *(str(a) for a in args)]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=mifs_env(arc.env),
                              cwd="/", timeout=CLI_TIMEOUT)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(
            ["python", "-m", "mifs", *map(str, args)], proc.returncode,
            out.read().decode(errors="replace"), err.read().decode(errors="replace"))


# --- renames, links, unlinks and overwrites -------------------------------------------------------------

S1 = StudySpec(seed=411, patient=PATIENT_A, modality="CT", images_per_series=6, rows=64, columns=64,
               accession_number="ACC-411", study_description="CT ABDOMEN", study_date="20240301")
S2 = StudySpec(seed=412, patient=PATIENT_A, modality="MR", images_per_series=2, rows=64, columns=64,
               accession_number="ACC-412", study_description="MR KNEE", study_date="20230301")
S3 = StudySpec(seed=413, patient=PATIENT_B, modality="CR", images_per_series=1, rows=64, columns=64,
               accession_number="ACC-413", study_description="CR HAND", study_date="20220301")
S4 = StudySpec(seed=414, patient=PATIENT_B, modality="MR", images_per_series=2, rows=64, columns=64,
               accession_number="ACC-414", study_description="MR SPINE", study_date="20210301")
S5 = StudySpec(seed=415, patient=PATIENT_B, modality="CT", images_per_series=1, rows=64, columns=64,
               accession_number="ACC-415", study_description="CT HEAD", study_date="20200301")


def test_index_follows_renames_links_unlinks_and_overwrites(mounted: Archive) -> None:
    arc = mounted
    mp = arc.mountpoint
    s1 = [i.data for i in study_files(S1)]
    s1_sops = [i.sop_instance_uid for i in study_files(S1)]
    s2 = [i.data for i in study_files(S2)]
    s3 = next(study_files(S3)).data
    s4 = [i.data for i in study_files(S4)]
    s5 = next(study_files(S5)).data
    s1_uid, s2_uid, s3_uid, s4_uid, s5_uid = (study_uid(s) for s in (S1, S2, S3, S4, S5))
    model: dict[str, bytes] = {f"s1/IM{n + 1:04d}.dcm": d for n, d in enumerate(s1)}
    model.update({"s2/a.dcm": s2[0], "s2/b.dcm": s2[1], "notes.txt": b"report pending\n"})
    write_tree(mp, model)
    current: list[dict[str, Any]] = []

    def check(what: str, *, full: bool = False) -> Expected:
        """The index matches the tree now (full: malformed files and studies too)."""
        exp, got = assert_index_matches_tree(arc, what, full=full)
        current[:] = got
        return exp

    def paths(uid: str) -> list[str]:
        return sorted(i["path"] for i in current if i["study_instance_uid"] == uid)

    def path_of(n: int) -> str:
        """Where the index says slice n of S1 is."""
        found = [i["path"] for i in current if i["sop_instance_uid"] == s1_sops[n]]
        assert len(found) == 1, found
        return str(found[0])

    def move(src: str, dst: str) -> None:
        os.rename(mp / src, mp / dst)
        for rel in [r for r in model if r == src or r.startswith(src + "/")]:
            model[dst + rel[len(src):]] = model.pop(rel)

    def write(rel: str, data: bytes) -> None:
        write_file(mp / rel, data)
        model[rel] = data

    exp = check("initial tree", full=True)
    assert len(exp.instances) == 8 and len(paths(s1_uid)) == 6

    # 1. rename within a directory, across directories, and of a whole directory
    move("s1/IM0001.dcm", "s1/first.dcm")
    (mp / "other").mkdir()
    move("s1/IM0002.dcm", "other/IM0002.dcm")
    move("s1", "s1-renamed")
    check("after renames")
    assert (path_of(0), path_of(1), path_of(2)) == ("s1-renamed/first.dcm", "other/IM0002.dcm", "s1-renamed/IM0003.dcm")

    # 2. written under a .tmp name, then renamed to .dcm (after and before it was indexed)
    (mp / "incoming").mkdir()
    write("incoming/t1.tmp", s4[0])
    check("a DICOM file named .tmp")
    assert paths(s4_uid) == ["incoming/t1.tmp"]
    move("incoming/t1.tmp", "incoming/t1.dcm")
    write("incoming/t2.tmp", s4[1])
    move("incoming/t2.tmp", "incoming/t2.dcm")
    check("after .tmp -> .dcm renames")
    assert paths(s4_uid) == ["incoming/t1.dcm", "incoming/t2.dcm"]

    # 3. rename replacing an existing instance: the replaced one leaves the index; 4. unlink one
    move("s1-renamed/IM0003.dcm", "s1-renamed/IM0004.dcm")
    os.unlink(mp / "s1-renamed/IM0005.dcm")
    del model["s1-renamed/IM0005.dcm"]
    check("after a rename over an instance and an unlink")
    assert paths(s1_uid) == ["other/IM0002.dcm", "s1-renamed/IM0004.dcm", "s1-renamed/IM0006.dcm", "s1-renamed/first.dcm"]
    assert path_of(2) == "s1-renamed/IM0004.dcm"

    # 5. a hard link counts once; unlinking the first name keeps the instance under the second
    (mp / "links").mkdir()
    os.link(mp / "s1-renamed/IM0006.dcm", mp / "links/six.dcm")
    model["links/six.dcm"] = model["s1-renamed/IM0006.dcm"]
    check("after a hard link", full=True)  # full: the study's instances and bytes count it once
    assert len(paths(s1_uid)) == 4
    os.unlink(mp / "s1-renamed/IM0006.dcm")
    del model["s1-renamed/IM0006.dcm"]
    check("after unlinking the first name of a hard-linked file")
    assert path_of(5) == "links/six.dcm"

    # 6. overwrite an instance with text: it leaves the index;
    # 7. with another study's instance: indexed under that study;
    # 8. a text file with an instance: indexed
    write("other/IM0002.dcm", b"not an image any more\n")
    write("s1-renamed/first.dcm", s3)
    write("notes.txt", s5)
    check("after overwrites", full=True)
    assert paths(s1_uid) == ["links/six.dcm", "s1-renamed/IM0004.dcm"]
    assert (paths(s3_uid), paths(s5_uid)) == (["s1-renamed/first.dcm"], ["notes.txt"])

    # 9. overwrite an instance with a malformed file; 10. unlink the rest of that study
    write("s2/a.dcm", MALFORMED)
    check("after overwriting an instance with a malformed file")
    assert [m["path"] for m in malformed(arc)] == ["s2/a.dcm"]
    assert paths(s2_uid) == ["s2/b.dcm"]
    for rel in ("s2/a.dcm", "s2/b.dcm"):
        os.unlink(mp / rel)
        del model[rel]
    check("after unlinking every file of a study")
    everything, only_s2 = studies_many(arc, (), ("--study", s2_uid))
    assert s2_uid not in by_uid(everything) and only_s2 == [], "a study without instances is still listed"

    # 11. truncating an instance to nothing (open with O_TRUNC, close)
    write("links/six.dcm", b"")
    exp = check("after truncating an instance to 0 bytes", full=True)
    assert paths(s1_uid) == ["s1-renamed/IM0004.dcm"]

    verify_tree(mp, model, "after the changes")
    index_calls = (("studies", mp, "--json"), ("studies", mp, "--instances", "--json"), ("studies", mp, "--malformed", "--json"))
    final = [parse_json(r) for r in run_many(arc, *index_calls)]
    arc.remount()
    assert [parse_json(r) for r in run_many(arc, *index_calls)] == final, "the index changed across umount/mount"
    verify_tree(mp, model, "after remount")
    arc.umount()
    all_specs = [S1, S2, S3, S4, S5]
    extra = {i.sop_instance_uid for spec in all_specs for i in study_files(spec)} | {study_uid(s) for s in all_specs}
    assert_no_phi_in_logs(arc, exp, PATIENT_A.name, PATIENT_B.name, PATIENT_A.patient_id, PATIENT_B.patient_id, *extra)


# --- reindex and the choice of mount ---------------------------------------------------------------------


@pytest.fixture
def second_archive(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Archive]:
    """Another fresh local archive, under the same e2e guarantees as `archive`."""
    reason = fuse_available()
    if reason:
        pytest.skip(reason)
    arc = Archive(tmp_path / "second")
    arc.init()
    yield from managed_archive(arc, request)


REINDEX_LINE = re.compile(
    r"^reindexed (\d+) files: (\d+) DICOM instances in (\d+) studies, (\d+) malformed, (\d+) other$"
)


def reindex(arc: Archive, *args: object) -> tuple[int, ...]:
    """`mifs reindex ARGS`: the numbers of its final stdout line; progress only on stderr."""
    result = arc.run_cli("reindex", *args)
    assert result.returncode == 0 and "Traceback" not in result.stderr, describe(result)
    lines = result.stdout.strip().splitlines()
    assert lines, describe(result)
    match = REINDEX_LINE.match(lines[-1])
    assert match, f"unexpected summary line {lines[-1]!r}\n{describe(result)}"
    return tuple(int(g) for g in match.groups())


def test_reindex_builds_the_same_index(mounted: Archive, second_archive: Archive) -> None:
    normal, late = mounted, second_archive
    files = mixed_tree()
    write_tree(normal.mountpoint, files)
    late.mount(flags=["--no-index"])
    write_tree(late.mountpoint, files)
    exp = expected_from_tree(normal.mountpoint)
    wait_indexed(normal, 24, 1)
    want = expected_studies(exp)

    # --no-index: nothing indexed, nothing queued
    status = late.wait_status(lambda s: s["pending_uploads"] == 0, 60, "the uploads")
    assert (status["dicom_instances"], status["dicom_studies"], status["dicom_malformed"], status["index_backlog"]) == (0, 0, 0, 0), status
    assert studies(late) == [] and instances(late) == [] and malformed(late) == []

    assert reindex(late, late.mountpoint) == (30, 24, 8, 1, 5)
    status = wait_indexed(late, 24, 1)
    assert status["dicom_studies"] == 8
    reindexed = (studies(late), instances(late), malformed(late))
    assert_studies(reindexed[0], want, "studies after reindex", ignore=LOCAL_STORE_IGNORE)
    assert_instances(reindexed[1], exp, "instances after reindex")
    assert_malformed(reindexed[2], exp, "malformed after reindex")
    indexed = (studies(normal), instances(normal), malformed(normal))
    assert reindexed == indexed, "reindex built another index than indexing at close did"

    # reindexing an indexed mount changes nothing (-m form)
    assert reindex(normal, "-m", normal.mountpoint) == (30, 24, 8, 1, 5)
    assert (studies(normal), instances(normal), malformed(normal)) == indexed

    # which mount (in a private mount namespace that shows only this test's mounts):
    # several live -> exit 2; exactly one -> that one; none -> exit 8
    both = [normal.mountpoint, late.mountpoint]
    for args in (("studies", "--json"), ("reindex",), ("cache", "ls", "--json"), ("cache", "pin", NM_STUDY)):
        result = run_isolated(normal, both, *args)
        assert_cli_error(result, EXIT_USAGE)
        assert "several mifs mounts are live" in result.stderr, describe(result)
    assert parse_json(run_isolated(normal, [normal.mountpoint], "studies", "--json")) == indexed[0]
    assert parse_json(run_isolated(late, [late.mountpoint], "studies", "--instances", "--json")) == indexed[1]
    result = run_isolated(normal, [normal.mountpoint], "reindex")
    assert result.returncode == 0, describe(result)
    assert REINDEX_LINE.match(result.stdout.strip().splitlines()[-1]), describe(result)
    for args in (("studies", "--json"), ("reindex",), ("cache", "ls"), ("cache", "prefetch", NM_STUDY)):
        result = run_isolated(normal, [], *args)
        assert_cli_error(result, EXIT_NO_MOUNT)
        assert "no mifs mount is live" in result.stderr, describe(result)


# --- CLI errors and pins on a local store ------------------------------------------------------------------


def test_cli_errors_and_pins_on_a_local_store(mounted: Archive, tmp_path: Path) -> None:
    arc = mounted
    mp = arc.mountpoint
    files = factory_tree(CR, S3)
    write_tree(mp, files)
    exp = expected_from_tree(mp)
    wait_indexed(arc, 2)
    cr_uid = study_uid(CR)

    unknown = "1.2.826.0.1.3680043.8.498.999999"
    plain = tmp_path / "not-a-mount"
    plain.mkdir()
    bad_dates = ("2024-13-01", "20241301", "yesterday", "2024/01/15", "2024-1-5", "2024-01-15T00:00", "")
    cases: list[tuple[tuple[object, ...], int, str]] = [
        (("studies", mp, "--since", bad, "--json"), EXIT_USAGE, "") for bad in bad_dates
    ] + [
        (("cache", "pin", unknown, "-m", mp), EXIT_NOT_FOUND, f"no study {unknown} in this archive"),
        (("cache", "unpin", unknown, "-m", mp), EXIT_NOT_FOUND, f"no study {unknown} in this archive"),
        (("cache", "prefetch", unknown, "-m", mp), EXIT_NOT_FOUND, f"no study {unknown} in this archive"),
        (("cache", "prefetch", "--patient", "NO-SUCH-PATIENT", "-m", mp), EXIT_NOT_FOUND, ""),
        (("studies", plain, "--json"), EXIT_NO_MOUNT, ""),
        (("reindex", plain), EXIT_NO_MOUNT, ""),
        (("cache", "ls", plain), EXIT_NO_MOUNT, ""),
        (("cache", "pin", cr_uid, "-m", plain), EXIT_NO_MOUNT, ""),
    ]
    problems = []  # all of them, not only the first
    for (args, code, message), result in zip(cases, run_many(arc, *(c[0] for c in cases))):
        try:
            assert_cli_error(result, code)
            assert message in result.stderr, f"stderr lacks {message!r}\n{describe(result)}"
        except AssertionError as exc:
            problems.append(str(exc)[:1500])

    # pin and unpin a known study; pins show in studies and cache ls, and survive a remount
    want = expected_studies(exp)
    assert_studies(studies(arc), want, "before pinning", ignore=LOCAL_STORE_IGNORE)
    result = arc.run_cli("cache", "pin", cr_uid, "-m", mp)
    assert result.returncode == 0, describe(result)
    pinned = expected_studies(exp, pinned=[cr_uid])
    assert_studies(studies(arc), pinned, "after pinning", ignore=LOCAL_STORE_IGNORE)
    listed = by_uid(cache_ls(arc))
    assert cr_uid in listed and listed[cr_uid]["pinned"] is True, f"cache ls must list the pinned study: {listed}"
    arc.remount()
    assert_studies(studies(arc), pinned, "pinned after remount", ignore=LOCAL_STORE_IGNORE)
    result = arc.run_cli("cache", "unpin", cr_uid, "-m", mp)
    assert result.returncode == 0, describe(result)
    assert_studies(studies(arc), want, "after unpinning", ignore=LOCAL_STORE_IGNORE)

    # prefetch on a local store: everything is local already
    result = arc.run_cli("cache", "prefetch", cr_uid, "-m", mp)
    assert result.returncode == 0, describe(result)
    assert re.fullmatch(r"prefetched 1 stud(y|ies): 0 objects \([^)]*\) fetched, 1 already cached",
                        result.stdout.strip().splitlines()[-1]), describe(result)
    # the [dicom] section of the config file: index = false works like --no-index
    arc.umount()
    config = tmp_path / "mifs.toml"
    config.write_text("[dicom]\nindex = false\nprefetch = false\nprefetch_priors = 1\nprefetch_parallel = 2\n")
    arc.mount(flags=["--config", str(config)])
    s5 = next(study_files(S5))
    write_file(mp / "late.dcm", s5.data)
    files["late.dcm"] = s5.data
    status = arc.wait_status(lambda st: st["pending_uploads"] == 0, 30, "the upload of late.dcm")
    assert (status["dicom_instances"], status["index_backlog"]) == (2, 0), "index = false in [dicom] indexed a file"
    assert reindex(arc, mp) == (3, 3, 3, 0, 0)
    assert [i["path"] for i in instances(arc, "--study", study_uid(S5))] == ["late.dcm"]

    verify_tree(mp, files, "at the end")
    assert not problems, "\n".join(problems)


def test_local_store_counts_every_uploaded_chunk_as_cached(mounted: Archive) -> None:
    """Spec: cached_bytes is the stored bytes of the study's chunks in the local cache, and
    "for a file:// store every uploaded chunk counts as local, so studies there are full":
    a full study has all its stored bytes cached, and `cache ls` (studies with cached_bytes > 0
    or pinned) lists every uploaded study."""
    arc = mounted
    write_tree(arc.mountpoint, factory_tree(CR, S3, S4))
    exp = expected_from_tree(arc.mountpoint)
    wait_indexed(arc, 4)
    want = expected_studies(exp)
    assert [s["cached_bytes"] for s in want.values()] == [s["bytes"] + s["instances"] * CHUNK_OVERHEAD for s in want.values()]
    assert_studies(studies(arc), want, "studies --json on a local store")
    assert_studies(cache_ls(arc), want, "cache ls --json on a local store")


def test_an_unmount_right_after_the_writes_keeps_the_whole_index(archive: Archive) -> None:
    """`mifs umount` at once after a PACS wrote a series: the unmount lets the indexer work off
    its backlog first, so the index comes back complete from the store into an empty cache
    dir (where the indexer could not read the files' headers any more)."""
    files = factory_tree(StudySpec(seed=31, series_count=2, images_per_series=150))
    exp = expected_from_files(files)
    archive.mount()
    write_tree(archive.mountpoint, files)
    archive.umount()
    archive.wipe_cache()
    archive.mount(flags=["--no-prefetch"])
    status = archive.status_json()
    assert (status["dicom_instances"], status["index_backlog"], status["index_deferred"]) == (len(exp.instances), 0, 0), status
