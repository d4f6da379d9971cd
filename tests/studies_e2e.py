"""Helpers for the end-to-end tests of the DICOM study index and the study cache: the CLI
calls (`mifs studies`, `mifs cache ...`), waiting for the indexer, and the expected index
computed from the files themselves with pydicom as the oracle (docs: notes/issue4-spec.md).

Must not import mifs: the e2e tests see mifs only through its CLI and the mounted filesystem.
"""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import pydicom
import pydicom.uid
from pydicom.data import get_testdata_file

from dicom_factory import StudySpec, study_files
from mifs_e2e import (
    CHUNK_HEADER_LEN,
    CHUNK_TAG_LEN,
    DEFAULT_CHUNK_SIZE,
    Archive,
    assert_bytes_equal,
    describe,
    read_chunks_direct,
    read_file,
    wait_until,
    write_file,
)

CHUNK_OVERHEAD = CHUNK_HEADER_LEN + CHUNK_TAG_LEN  # a stored chunk object = plaintext + this
EXIT_USAGE, EXIT_NO_MOUNT, EXIT_NOT_FOUND = 2, 8, 9
INDEX_TIMEOUT = 60.0  # seconds for the indexer (or a prefetch) to catch up with a few MB

# The keys the spec names; the objects may carry more (extra keys are not compared).
STUDY_KEYS = {
    "study_instance_uid", "patient_id", "patient_name", "study_date", "study_time", "accession_number",
    "study_description", "modalities", "series", "instances", "bytes", "cached_bytes", "cache", "pinned",
}
INSTANCE_KEYS = {
    "path", "study_instance_uid", "series_instance_uid", "sop_instance_uid", "sop_class_uid", "modality",
    "series_number", "instance_number", "transfer_syntax", "patient_id", "patient_name", "study_date",
    "study_time", "accession_number", "bytes",
}


def pydicom_file(name: str) -> bytes:
    path = get_testdata_file(name)
    assert path is not None, f"pydicom test file {name} is missing"
    return Path(path).read_bytes()


# --- the CLI ----------------------------------------------------------------------------------------


def cli_json(arc: Archive, *args: object) -> Any:
    return parse_json(arc.run_cli(*args))


def run_many(arc: Archive, *calls: tuple[object, ...]) -> list[subprocess.CompletedProcess[str]]:
    """Several CLI calls at once (each is a process start: this keeps the tests quick)."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(lambda args: arc.run_cli(*args), calls))


def parse_json(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode == 0, describe(result)
    assert "Traceback" not in result.stderr, describe(result)
    try:
        return json.loads(result.stdout)
    except ValueError:
        raise AssertionError(f"no JSON on stdout\n{describe(result)}") from None


def studies_many(arc: Archive, *filters: tuple[object, ...], mountpoint: Path | None = None) -> list[list[dict[str, Any]]]:
    """`mifs studies MP FILTERS --json` for several sets of filters at once."""
    results = run_many(arc, *(("studies", mountpoint or arc.mountpoint, *f, "--json") for f in filters))
    return [check_studies(parse_json(r)) for r in results]


def check_studies(value: Any) -> list[dict[str, Any]]:
    assert isinstance(value, list), value
    for study in value:
        assert STUDY_KEYS <= set(study), f"study keys: {sorted(study)}"
    return value


def check_instances(value: Any) -> list[dict[str, Any]]:
    assert isinstance(value, list), value
    for inst in value:
        assert INSTANCE_KEYS <= set(inst), f"instance keys: {sorted(inst)}"
    return value


def check_malformed(value: Any) -> list[dict[str, Any]]:
    assert isinstance(value, list), value
    for item in value:
        assert {"path", "bytes", "error"} <= set(item), f"malformed keys: {sorted(item)}"
    return value


def studies(arc: Archive, *filters: object, mountpoint: Path | None = None) -> list[dict[str, Any]]:
    return check_studies(cli_json(arc, "studies", mountpoint or arc.mountpoint, *filters, "--json"))


def instances(arc: Archive, *filters: object, mountpoint: Path | None = None) -> list[dict[str, Any]]:
    return check_instances(cli_json(arc, "studies", mountpoint or arc.mountpoint, "--instances", *filters, "--json"))


def malformed(arc: Archive, mountpoint: Path | None = None) -> list[dict[str, Any]]:
    return check_malformed(cli_json(arc, "studies", mountpoint or arc.mountpoint, "--malformed", "--json"))


def cache_ls(arc: Archive, mountpoint: Path | None = None) -> list[dict[str, Any]]:
    return check_studies(cli_json(arc, "cache", "ls", mountpoint or arc.mountpoint, "--json"))


def by_uid(items: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    return {str(s["study_instance_uid"]): dict(s) for s in items}


def wait_indexed(arc: Archive, instances_: int, malformed_: int = 0, *, uploaded: bool = True,
                 mountpoint: Path | None = None) -> dict[str, Any]:
    """Wait until the indexer has caught up (index_backlog 0) with exactly this many indexed
    and malformed files, and (uploaded) nothing waits for the store; the status then."""
    def ready(s: dict[str, Any]) -> bool:
        return bool(
            s["index_backlog"] == 0 and s["dicom_instances"] == instances_ and s["dicom_malformed"] == malformed_
            and (not uploaded or s["pending_uploads"] == 0)
        )

    seen: list[dict[str, Any]] = []

    def check() -> dict[str, Any] | None:
        status = arc.status_json(mountpoint)
        seen[:] = [status]
        return status if ready(status) else None

    try:
        status: dict[str, Any] | None = wait_until(
            check, INDEX_TIMEOUT, f"{instances_} indexed instances, {malformed_} malformed", 0.1)
    except AssertionError as exc:
        keys = ("index_backlog", "dicom_instances", "dicom_studies", "dicom_malformed", "pending_uploads")
        last = {k: seen[0].get(k, "(missing)") for k in keys} if seen else "(none)"
        raise AssertionError(f"{exc}; last status: {last}") from None
    assert status is not None
    return status


def wait_studies(arc: Archive, condition: Any, what: str, timeout: float = INDEX_TIMEOUT,
                 mountpoint: Path | None = None) -> dict[str, dict[str, Any]]:
    """Poll `mifs studies --json` until condition(studies by uid) holds; those studies."""
    seen: list[dict[str, dict[str, Any]]] = []

    def check() -> dict[str, dict[str, Any]] | None:
        current = by_uid(studies(arc, mountpoint=mountpoint))
        seen[:] = [current]
        return current if condition(current) else None

    try:
        found: dict[str, dict[str, Any]] | None = wait_until(check, timeout, what, 0.1)
    except AssertionError as exc:
        summary = {uid: (s["cache"], s["cached_bytes"], s["bytes"]) for uid, s in (seen[0] if seen else {}).items()}
        raise AssertionError(f"{exc}; last (cache, cached_bytes, bytes) by study: {summary}") from None
    assert found is not None
    return found


def live_mifs_mounts() -> list[str]:
    """Mount points of every live fuse.mifs mount in this mount namespace."""
    points = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            left, _, right = line.partition(" - ")
            if right.split()[0] == "fuse.mifs":
                points.append(left.split()[4].replace("\\040", " "))
    return points


# --- test trees ------------------------------------------------------------------------------------


def factory_tree(*specs: StudySpec, prefix: str = "studies") -> dict[str, bytes]:
    """Every file of these synthetic studies: PREFIX/patient/study/series/IMxxxxx.dcm -> bytes."""
    return {f"{prefix}/{item.relpath}": item.data for spec in specs for item in study_files(spec)}


def write_tree(root: Path, files: Mapping[str, bytes]) -> None:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        write_file(path, data)


def verify_tree(root: Path, files: Mapping[str, bytes], when: str) -> None:
    """Every file byte-exact, through the page cache."""
    for rel, data in sorted(files.items()):
        assert_bytes_equal(read_file(root / rel), data, f"{rel} {when}")


def read_direct(path: Path) -> bytes:
    """The file read with O_DIRECT, one 4 MiB request at a time: every request reaches the
    daemon (no page cache), so this is what mifs itself serves, and what it counts as a use."""
    parts = read_chunks_direct(path, DEFAULT_CHUNK_SIZE)
    errors = [p for p in parts if isinstance(p, OSError)]
    assert not errors, f"{path.name}: O_DIRECT read failed: {errors[0]!r}"
    return b"".join(p for p in parts if isinstance(p, bytes))


def verify_tree_direct(root: Path, files: Mapping[str, bytes], when: str) -> None:
    for rel, data in sorted(files.items()):
        assert_bytes_equal(read_direct(root / rel), data, f"{rel} {when} (O_DIRECT)")


def study_uid(spec: StudySpec) -> str:
    return next(study_files(spec)).study_instance_uid


# --- the oracle ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Expected:
    """What the index must say about a tree: instances (by SOP Instance UID, the set of paths
    the inode has) and malformed files (path -> size)."""

    instances: dict[str, tuple[frozenset[str], dict[str, Any]]]
    malformed: dict[str, int]
    other: int  # regular files (inodes) that are neither


def _text(ds: Any, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, pydicom.multival.MultiValue):
        value = "\\".join(str(v) for v in value)
    return str(value).strip()


def _iso_date(text: str) -> str | None:
    if len(text) != 8 or not text.isdigit():
        return None
    return f"{text[0:4]}-{text[4:6]}-{text[6:8]}"


def _iso_time(text: str) -> str | None:
    text = text.split(".")[0]
    return f"{text[0:2]}:{text[2:4]}:{text[4:6]}" if len(text) == 6 and text.isdigit() else None


def classify(data: bytes) -> dict[str, Any] | str:
    """"other", "malformed", or the instance fields (without path and bytes) of one file."""
    part10 = data[128:132] == b"DICM"
    if not part10 and data[:2] not in (b"\x02\x00", b"\x08\x00", b"\x00\x08"):
        return "other"
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True, stop_before_pixels=True)
        meta = getattr(ds, "file_meta", None)
        if meta is not None and str(meta.get("MediaStorageSOPClassUID", "")) == "1.2.840.10008.1.3.10":
            return "other"  # DICOMDIR
        study, series, sop = (_text(ds, k) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"))
    except Exception:  # noqa: BLE001 - pydicom raises many kinds on garbage
        return "malformed" if part10 else "other"
    if not (study and series and sop):
        return "malformed" if part10 else "other"
    syntax = str(meta.TransferSyntaxUID) if meta is not None and "TransferSyntaxUID" in meta else None
    if syntax is None:
        syntax = {
            (True, True): pydicom.uid.ImplicitVRLittleEndian,
            (False, True): pydicom.uid.ExplicitVRLittleEndian,
            (False, False): pydicom.uid.ExplicitVRBigEndian,
        }[(bool(ds.original_encoding[0]), bool(ds.original_encoding[1]))]
    number = {k: int(_text(ds, k)) if _text(ds, k) else None for k in ("SeriesNumber", "InstanceNumber")}
    return {
        "study_instance_uid": study,
        "series_instance_uid": series,
        "sop_instance_uid": sop,
        "sop_class_uid": _text(ds, "SOPClassUID"),
        "modality": _text(ds, "Modality"),
        "series_number": number["SeriesNumber"],
        "instance_number": number["InstanceNumber"],
        "transfer_syntax": str(syntax),
        "patient_id": _text(ds, "PatientID"),
        "patient_name": _text(ds, "PatientName"),
        "study_date": _iso_date(_text(ds, "StudyDate")),
        "study_time": _iso_time(_text(ds, "StudyTime")),
        "accession_number": _text(ds, "AccessionNumber"),
        "study_description": _text(ds, "StudyDescription"),  # study level only
    }


def expected_from_tree(root: Path) -> Expected:
    """The index the tree under `root` must have: every regular file once per inode."""
    by_inode: dict[int, list[str]] = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            if stat.S_ISREG(st.st_mode):
                by_inode.setdefault(st.st_ino, []).append(os.path.relpath(full, root))
    found: dict[str, tuple[frozenset[str], dict[str, Any]]] = {}
    bad: dict[str, int] = {}
    other = 0
    for paths in by_inode.values():
        data = (root / paths[0]).read_bytes()
        kind = classify(data)
        if kind == "other":
            other += 1
        elif kind == "malformed":
            assert len(paths) == 1, "test trees have no hard-linked malformed files"
            bad[paths[0]] = len(data)
        else:
            assert isinstance(kind, dict)
            sop = kind["sop_instance_uid"]
            assert sop not in found, f"test trees have unique SOP Instance UIDs: {sop} twice"
            found[sop] = (frozenset(paths), {**kind, "bytes": len(data)})
    return Expected(found, bad, other)


def expected_from_files(files: Mapping[str, bytes]) -> Expected:
    """The index a tree of these files (relative path -> content, no hard links) must have;
    for trees that must not be read through the mount (that would fill the cache)."""
    found: dict[str, tuple[frozenset[str], dict[str, Any]]] = {}
    bad: dict[str, int] = {}
    other = 0
    for rel, data in files.items():
        kind = classify(data)
        if kind == "other":
            other += 1
        elif kind == "malformed":
            bad[rel] = len(data)
        else:
            assert isinstance(kind, dict)
            found[kind["sop_instance_uid"]] = (frozenset([rel]), {**kind, "bytes": len(data)})
    return Expected(found, bad, other)


def stored_bytes(size: int, chunk_size: int = DEFAULT_CHUNK_SIZE) -> int:
    """Bytes of the chunk objects of a file of `size` bytes (no holes)."""
    chunks = -(-size // chunk_size)
    return size + chunks * CHUNK_OVERHEAD


def expected_studies(exp: Expected, *, cache: str = "full", chunk_size: int = DEFAULT_CHUNK_SIZE,
                     pinned: Iterable[str] = ()) -> dict[str, dict[str, Any]]:
    """studies --json objects by Study Instance UID; cached_bytes as for a study whose chunks
    are all local ("full") or none ("cold")."""
    pinned = set(pinned)
    grouped: dict[str, list[dict[str, Any]]] = {}
    for _paths, inst in exp.instances.values():
        grouped.setdefault(inst["study_instance_uid"], []).append(inst)
    result = {}
    for uid, members in grouped.items():
        first = members[0]
        total = sum(m["bytes"] for m in members)
        result[uid] = {
            "study_instance_uid": uid,
            "patient_id": first["patient_id"],
            "patient_name": first["patient_name"],
            "study_date": first["study_date"],
            "study_time": first["study_time"],
            "accession_number": first["accession_number"],
            "study_description": first["study_description"],
            "modalities": sorted({m["modality"] for m in members}),
            "series": len({m["series_instance_uid"] for m in members}),
            "instances": len(members),
            "bytes": total,
            "cached_bytes": sum(stored_bytes(m["bytes"], chunk_size) for m in members) if cache == "full" else 0,
            "cache": cache,
            "pinned": uid in pinned,
        }
    return result


def assert_study_order(actual: list[dict[str, Any]]) -> None:
    """Sorted by study_date descending, then by UID; studies without a date come all first or
    all last (the spec does not say where)."""
    dated = [s for s in actual if s["study_date"] is not None]
    undated = [s for s in actual if s["study_date"] is None]
    want = sorted(dated, key=lambda s: s["study_instance_uid"])
    want.sort(key=lambda s: s["study_date"], reverse=True)
    want_undated = sorted(undated, key=lambda s: s["study_instance_uid"])
    uids = [s["study_instance_uid"] for s in actual]
    options = ([s["study_instance_uid"] for s in want + want_undated], [s["study_instance_uid"] for s in want_undated + want])
    assert uids in options, f"studies are not sorted by date (descending) then UID:\n{uids}\nexpected {options[0]}"


def assert_studies(actual: list[dict[str, Any]], expected: Mapping[str, Mapping[str, Any]], what: str,
                   ignore: Iterable[str] = ()) -> None:
    """Exactly the expected studies with exactly the expected values (but for the keys in
    `ignore`), sorted as the spec says."""
    keys = sorted(STUDY_KEYS - set(ignore))
    got = by_uid(actual)
    assert len(got) == len(actual), f"{what}: a study is listed twice"
    problems = []
    for uid in sorted(set(got) | set(expected)):
        if uid not in got:
            problems.append(f"missing study {uid}: {dict(expected[uid])}")
        elif uid not in expected:
            problems.append(f"unexpected study {uid}: {got[uid]}")
        else:
            for key in keys:
                if got[uid][key] != expected[uid][key]:
                    problems.append(f"study {uid}: {key} is {got[uid][key]!r}, expected {expected[uid][key]!r}")
    assert not problems, f"{what}:\n" + "\n".join(problems[:30])
    assert_study_order(actual)


def instance_sort_key(inst: Mapping[str, Any]) -> tuple[Any, ...]:
    def num(value: Any) -> tuple[int, int]:
        return (1, 0) if value is None else (0, int(value))
    return (num(inst["series_number"]), inst["series_instance_uid"], num(inst["instance_number"]))


def assert_instances(actual: list[dict[str, Any]], exp: Expected, what: str,
                     only_studies: Iterable[str] | None = None) -> None:
    """Exactly the expected instances (a hard-linked one under any of its names), in viewing
    order: each study's instances together, by series number, series UID, instance number."""
    wanted = {sop: v for sop, v in exp.instances.items()
              if only_studies is None or v[1]["study_instance_uid"] in set(only_studies)}
    problems = []
    seen: set[str] = set()
    for inst in actual:
        sop = inst["sop_instance_uid"]
        if sop in seen:
            problems.append(f"{sop} listed twice")
            continue
        seen.add(sop)
        if sop not in wanted:
            problems.append(f"unexpected instance {inst}")
            continue
        paths, fields = wanted[sop]
        if inst["path"] not in paths:
            problems.append(f"{sop}: path {inst['path']!r}, expected one of {sorted(paths)}")
        for key, value in fields.items():
            if key == "study_description":
                continue  # not an instance field
            if inst[key] != value:
                problems.append(f"{sorted(paths)[0]}: {key} is {inst[key]!r}, expected {value!r}")
    for sop in sorted(set(wanted) - seen):
        problems.append(f"missing instance {sorted(wanted[sop][0])} ({sop})")
    assert not problems, f"{what}:\n" + "\n".join(problems[:30])
    # viewing order
    order = [i["study_instance_uid"] for i in actual]
    blocks = [uid for k, uid in enumerate(order) if k == 0 or order[k - 1] != uid]
    assert len(blocks) == len(set(blocks)), f"{what}: the instances of a study are not listed together: {blocks}"
    for uid in set(blocks):
        members = [i for i in actual if i["study_instance_uid"] == uid]
        assert members == sorted(members, key=instance_sort_key), (
            f"{what}: study {uid} not in viewing order: "
            + str([(i["series_number"], i["instance_number"], i["path"]) for i in members])
        )


def assert_malformed(actual: list[dict[str, Any]], exp: Expected, what: str) -> None:
    got = {m["path"]: m["bytes"] for m in actual}
    assert len(got) == len(actual), f"{what}: a malformed file is listed twice: {actual}"
    assert got == exp.malformed, f"{what}: malformed files {got}, expected {exp.malformed}"
    for item in actual:
        assert isinstance(item["error"], str) and item["error"], f"{what}: no error for {item['path']}"


# On a local (file) store the tests of everything else leave cached_bytes out: what it must be
# there has a test of its own (test_e2e_studies.py::test_local_store_counts_every_uploaded_chunk_as_cached).
LOCAL_STORE_IGNORE = ("cached_bytes",)


def assert_index_matches_tree(arc: Archive, what: str, *, full: bool = True,
                              mountpoint: Path | None = None) -> tuple[Expected, list[dict[str, Any]]]:
    """The index agrees with the tree: the instances (polled until they do, with a deadline:
    a file closed just now may not be queued yet) and, if `full`, the malformed files, the
    study aggregates and the status counts. Returns the expectation and the instances."""
    mp = mountpoint or arc.mountpoint
    exp = expected_from_tree(mp)
    wait_indexed(arc, len(exp.instances), len(exp.malformed), mountpoint=mp)
    calls: list[tuple[object, ...]] = [("studies", mp, "--instances", "--json")]
    if full:
        calls += [("studies", mp, "--malformed", "--json"), ("studies", mp, "--json"), ("status", mp, "--json")]
    last: list[Any] = []

    def matches() -> list[Any] | None:
        results = [parse_json(r) for r in run_many(arc, *calls)]
        try:
            assert_instances(check_instances(results[0]), exp, what)
        except AssertionError as exc:
            last[:] = [exc]
            return None
        return results

    try:
        results: list[Any] | None = wait_until(matches, INDEX_TIMEOUT / 4, f"the instances to match the tree ({what})", 0.1)
    except AssertionError:
        raise last[0] if last else AssertionError(what) from None
    assert results is not None
    if full:
        assert_malformed(check_malformed(results[1]), exp, what)
        assert_studies(check_studies(results[2]), expected_studies(exp, chunk_size=arc.chunk_size), what,
                       ignore=LOCAL_STORE_IGNORE if arc.s3_bucket is None else ())
        assert results[3]["dicom_studies"] == len(expected_studies(exp)), f"{what}: status {results[3]['dicom_studies']} studies"
    return exp, results[0]


def phi_in_logs(arc: Archive, secrets: Iterable[str]) -> list[str]:
    """Lines of the daemon logs that contain one of `secrets` (nothing may)."""
    wanted = sorted({s for s in secrets if s and len(s) >= 4})
    hits = []
    for log in arc.log_files():
        for number, line in enumerate(log.read_text(errors="replace").splitlines(), 1):
            for secret in wanted:
                if secret in line:
                    hits.append(f"{log.name}:{number}: contains {secret!r}: {line[:200]}")
    return hits


def phi_of(exp: Expected) -> set[str]:
    values: set[str] = set()
    for _paths, inst in exp.instances.values():
        for key in ("patient_id", "patient_name", "study_instance_uid", "series_instance_uid",
                    "sop_instance_uid", "accession_number"):
            values.add(str(inst[key]))
    return values
