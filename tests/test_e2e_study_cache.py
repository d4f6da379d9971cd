"""End-to-end: the study-level cache on an S3 store (SeaweedFS): study prefetch when a file is
opened, prior studies, `mifs cache prefetch/pin/unpin/ls`, and eviction by whole studies.

Talks to mifs only through the CLI and the mounted filesystem. Every test ingests its studies,
unmounts, and mounts again with an empty cache dir: the metadata and the study index come back
from the store, and every chunk is only in the bucket ("cold"). Reads that must reach the
daemon (to count as a use of a study) are O_DIRECT; the page cache would hide them.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from dicom_factory import Patient, StudySpec
from mifs_e2e import Archive, assert_bytes_equal, assert_cli_error, describe, read_file
from studies_e2e import (
    CHUNK_OVERHEAD,
    EXIT_USAGE,
    Expected,
    assert_studies,
    by_uid,
    cache_ls,
    expected_from_files,
    expected_studies,
    factory_tree,
    phi_in_logs,
    phi_of,
    read_direct,
    studies,
    study_uid,
    verify_tree_direct,
    wait_indexed,
    wait_studies,
    write_tree,
)

PREFETCH_TIMEOUT = 60.0
PATIENT_P = Patient("PRIOR^PAULA_CACHETEST", "PID-CACHE-P", "19600202", "F")
PATIENT_Q = Patient("OTHER^OTTO_CACHETEST", "PID-CACHE-Q", "19700303", "M")
PREFETCH_LINE = re.compile(
    r"^prefetched (\d+) stud(?:y|ies): (\d+) objects \(([\d.]+ ?(?:B|KiB|MiB|GiB))\) fetched, (\d+) already cached$"
)


# --- helpers -----------------------------------------------------------------------------------------


def stored(data: bytes) -> int:
    """Bytes of the chunk object(s) of a file smaller than one 4 MiB chunk."""
    assert len(data) < 4 * 1024 * 1024
    return len(data) + CHUNK_OVERHEAD


def spec_files(spec: StudySpec) -> dict[str, bytes]:
    return factory_tree(spec)


def ingest_then_cold_mount(arc: Archive, files: Mapping[str, bytes], flags: list[str]) -> Expected:
    """Write the files, wait until they are indexed and uploaded, unmount, wipe the cache dir
    and mount again with `flags`: the index must be back (from the store), every study cold."""
    exp = expected_from_files(files)
    arc.mount()
    write_tree(arc.mountpoint, files)
    wait_indexed(arc, len(exp.instances), len(exp.malformed))
    arc.umount()
    arc.wipe_cache()
    arc.mount(flags=flags)
    status = wait_indexed(arc, len(exp.instances), len(exp.malformed))
    assert status["dicom_studies"] == len(expected_studies(exp)), status
    assert_studies(studies(arc), expected_studies(exp, cache="cold"), "after mounting with an empty cache dir")
    return exp


def expected_states(exp: Expected, states: Mapping[str, str], *, pinned: tuple[str, ...] = (),
                    partial_bytes: Mapping[str, int] | None = None) -> dict[str, dict[str, Any]]:
    """studies --json by UID, each study in the given state ("full", "cold" or "partial", the
    latter with its cached bytes from partial_bytes)."""
    full = expected_studies(exp, cache="full", pinned=pinned)
    cold = expected_studies(exp, cache="cold", pinned=pinned)
    assert set(states) == set(full), f"states for {sorted(states)}, studies {sorted(full)}"
    result = {}
    for uid, state in states.items():
        if state == "partial":
            assert partial_bytes is not None
            result[uid] = {**cold[uid], "cache": "partial", "cached_bytes": partial_bytes[uid]}
        else:
            result[uid] = full[uid] if state == "full" else cold[uid]
    return result


def settled(arc: Archive) -> dict[str, Any]:
    """Wait until no study prefetch is queued or running; the status then."""
    return arc.wait_status(lambda s: s["prefetch_queued_studies"] == 0, PREFETCH_TIMEOUT, "the prefetches to finish")


def wait_full(arc: Archive, *uids: str) -> dict[str, dict[str, Any]]:
    found = wait_studies(arc, lambda st: all(st[u]["cache"] == "full" for u in uids),
                         f"{len(uids)} studies to be fully cached", PREFETCH_TIMEOUT)
    settled(arc)
    return found


def prefetch(arc: Archive, *args: object) -> tuple[int, int, int]:
    """`mifs cache prefetch ARGS -m MP`: (studies, objects fetched, objects already cached)."""
    result = arc.run_cli("cache", "prefetch", *args, "-m", arc.mountpoint)
    assert result.returncode == 0 and "Traceback" not in result.stderr, describe(result)
    lines = result.stdout.strip().splitlines()
    assert lines, describe(result)
    match = PREFETCH_LINE.match(lines[-1])
    assert match, f"unexpected summary line {lines[-1]!r}\n{describe(result)}"
    others = [line for line in result.stderr.splitlines() if not line.startswith("mifs: prefetching: ")]
    assert not others, f"stderr has more than progress lines: {others}\n{describe(result)}"
    return int(match.group(1)), int(match.group(2)), int(match.group(4))


def cache_misses(arc: Archive) -> int:
    return int(arc.status_json()["cache_misses"])


def assert_no_phi_in_logs(arc: Archive, exp: Expected) -> None:
    secrets = phi_of(exp) | {p.name for p in (PATIENT_P, PATIENT_Q)} | {p.patient_id for p in (PATIENT_P, PATIENT_Q)}
    hits = phi_in_logs(arc, secrets)
    assert not hits, "patient data in the daemon log:\n" + "\n".join(hits[:20])


# --- prefetch on open, and without it --------------------------------------------------------------------

X = StudySpec(seed=501, patient=PATIENT_P, modality="CT", images_per_series=12, accession_number="ACC-501",
              study_description="CT CHEST", study_date="20240110")
Y = StudySpec(seed=502, patient=PATIENT_P, modality="MR", images_per_series=6, accession_number="ACC-502",
              study_description="MR HEAD", study_date="20230110")
Z = StudySpec(seed=503, patient=PATIENT_Q, modality="CR", images_per_series=1, rows=512, columns=512,
              accession_number="ACC-503", study_description="CR CHEST", study_date="20220110")


def test_opening_a_file_prefetches_its_study_and_no_prefetch_does_not(s3_archive: Archive) -> None:
    arc = s3_archive
    mp = arc.mountpoint
    x_files, y_files, z_files = spec_files(X), spec_files(Y), spec_files(Z)
    files = {**x_files, **y_files, **z_files}
    x, y, z = study_uid(X), study_uid(Y), study_uid(Z)
    x_paths = sorted(x_files)
    slice5 = x_paths[5]

    # default: opening one slice of X brings the whole of X, and nothing else
    exp = ingest_then_cold_mount(arc, files, [])
    assert_bytes_equal(read_file(mp / slice5), files[slice5], "cold read of one slice")
    wait_full(arc, x)
    assert_studies(studies(arc), expected_states(exp, {x: "full", y: "cold", z: "cold"}), "after opening one slice of X")
    status = arc.status_json()
    x_stored = sum(stored(d) for d in x_files.values())
    # the slice read itself may or may not have gone through the prefetcher
    assert (status["prefetched_objects"], status["prefetched_bytes"]) in (
        (11, x_stored - stored(files[slice5])), (12, x_stored)), status
    misses = cache_misses(arc)
    verify_tree_direct(mp, x_files, "X after its prefetch")
    assert cache_misses(arc) == misses, "reading a fully prefetched study missed the cache"
    assert_studies(studies(arc), expected_states(exp, {x: "full", y: "cold", z: "cold"}), "after reading all of X")
    arc.umount()

    # --no-prefetch: the same read caches that slice only
    arc.wipe_cache()
    arc.mount(flags=["--no-prefetch"])
    assert_bytes_equal(read_direct(mp / slice5), files[slice5], "cold read of one slice, --no-prefetch")
    partial = {x: stored(files[slice5])}
    wait_studies(arc, lambda st: st[x]["cached_bytes"] == partial[x], "the slice to be cached")
    (z_path,) = z_files
    assert_bytes_equal(read_direct(mp / z_path), files[z_path], "the CR image")
    wait_full(arc, z)
    assert_studies(studies(arc), expected_states(exp, {x: "partial", y: "cold", z: "full"}, partial_bytes=partial),
                   "--no-prefetch: after reading one slice of X and all of Z")
    status = arc.status_json()
    assert (status["prefetched_objects"], status["prefetched_bytes"], status["prefetch_queued_studies"]) == (0, 0, 0), status

    # an explicit prefetch works all the same: the rest of X, then the patient's other study
    assert prefetch(arc, x) == (1, 11, 1)
    assert_studies(studies(arc), expected_states(exp, {x: "full", y: "cold", z: "full"}), "after cache prefetch X")
    assert prefetch(arc, "--patient", PATIENT_P.patient_id) == (2, 6, 12)
    assert_studies(studies(arc), expected_states(exp, {x: "full", y: "full", z: "full"}), "after cache prefetch --patient")
    assert_studies(cache_ls(arc), expected_states(exp, {x: "full", y: "full", z: "full"}), "cache ls")
    misses = cache_misses(arc)
    verify_tree_direct(mp, files, "everything, prefetched")
    assert cache_misses(arc) == misses, "reading prefetched studies missed the cache"
    arc.umount()
    assert_no_phi_in_logs(arc, exp)


# --- priors ----------------------------------------------------------------------------------------------

PRIOR_DATES = ("20210315", "20220315", "20230315", "20240315")
PRIORS = [StudySpec(seed=510 + n, patient=PATIENT_P, modality="MR", images_per_series=3, rows=128, columns=128,
                    accession_number=f"ACC-51{n}", study_description=f"MR FOLLOW-UP {n}", study_date=date)
          for n, date in enumerate(PRIOR_DATES)]
OTHER = StudySpec(seed=520, patient=PATIENT_Q, modality="MR", images_per_series=3, rows=128, columns=128,
                  accession_number="ACC-520", study_description="MR OTHER", study_date="20240315")


def test_prefetch_priors_brings_the_most_recent_other_studies(s3_archive: Archive) -> None:
    arc = s3_archive
    mp = arc.mountpoint
    files = factory_tree(*PRIORS, OTHER)
    oldest, older, previous, newest = (study_uid(s) for s in PRIORS)
    other = study_uid(OTHER)
    exp = ingest_then_cold_mount(arc, files, ["--prefetch-priors", "2", "--prefetch-parallel", "2"])

    newest_files = factory_tree(PRIORS[3])
    first = sorted(newest_files)[0]
    assert_bytes_equal(read_direct(mp / first), files[first], "one image of the newest study")
    wait_full(arc, newest, previous, older)
    want = {newest: "full", previous: "full", older: "full", oldest: "cold", other: "cold"}
    assert_studies(studies(arc), expected_states(exp, want), "2 priors of the newest study")

    # the oldest on request, without waiting for it
    result = arc.run_cli("cache", "prefetch", oldest, "-m", mp, "--no-wait")
    assert result.returncode == 0 and "Traceback" not in result.stderr, describe(result)
    wait_full(arc, oldest)
    want[oldest] = "full"
    assert_studies(studies(arc), expected_states(exp, want), "after cache prefetch --no-wait of the oldest")
    verify_tree_direct(mp, files, "all studies")
    arc.umount()
    assert_no_phi_in_logs(arc, exp)


# --- pins and eviction by whole study ------------------------------------------------------------------------

PATIENT_R = Patient("PINNED^PETRA_CACHETEST", "PID-CACHE-R", "19800404", "F")
FIVE = [StudySpec(seed=530 + n, patient=PATIENT_R, modality="MR", images_per_series=6, rows=256, columns=256,
                  accession_number=f"ACC-53{n}", study_description=f"MR STUDY {n}", study_date=f"202{n}0601")
        for n in range(5)]


def test_pinned_study_stays_and_eviction_takes_whole_studies(s3_archive: Archive) -> None:
    arc = s3_archive
    mp = arc.mountpoint
    per_study = [factory_tree(spec) for spec in FIVE]
    files = {rel: data for tree in per_study for rel, data in tree.items()}
    a, b, c, d, e = (study_uid(s) for s in FIVE)
    sizes = [sum(stored(v) for v in tree.values()) for tree in per_study]
    # room for the pinned study and one and a half others: a third study evicts the LRU one
    limit = sizes[0] + sizes[1] + sizes[2] // 2
    exp = ingest_then_cold_mount(arc, files, ["--cache-size", str(limit)])

    def states(**kw: str) -> dict[str, str]:
        names = dict(zip("abcde", (a, b, c, d, e)))
        return {names[k]: v for k, v in kw.items()}

    def read_study(n: int) -> None:
        verify_tree_direct(mp, per_study[n], f"study {'ABCDE'[n]}")
        wait_full(arc, study_uid(FIVE[n]))
        status = settled(arc)
        assert status["cache_bytes"] <= limit, f"cache holds {status['cache_bytes']} bytes, limit {limit}"
        held = sum(s["cached_bytes"] for s in studies(arc))
        assert held == status["cache_bytes"], f"studies hold {held} cached bytes, the cache {status['cache_bytes']}"

    result = arc.run_cli("cache", "pin", a, "-m", mp)
    assert result.returncode == 0, describe(result)
    count, fetched, cached = prefetch(arc, a)
    assert (count, fetched + cached) == (1, 6), (count, fetched, cached)
    wait_full(arc, a)
    pinned_a = expected_states(exp, states(a="full", b="cold", c="cold", d="cold", e="cold"), pinned=(a,))
    assert_studies(studies(arc), pinned_a, "A pinned and prefetched")
    assert_studies(cache_ls(arc), {a: pinned_a[a]}, "cache ls with A pinned")

    read_study(1)
    assert_studies(studies(arc), expected_states(exp, states(a="full", b="full", c="cold", d="cold", e="cold"), pinned=(a,)),
                   "after reading B")
    read_study(2)
    assert_studies(studies(arc), expected_states(exp, states(a="full", b="cold", c="full", d="cold", e="cold"), pinned=(a,)),
                   "after reading C: B (least recently used) evicted as a whole, pinned A kept")
    read_study(3)
    after_d = expected_states(exp, states(a="full", b="cold", c="cold", d="full", e="cold"), pinned=(a,))
    assert_studies(studies(arc), after_d, "after reading D: C evicted, pinned A kept")
    assert_studies(cache_ls(arc), {a: after_d[a], d: after_d[d]}, "cache ls after reading D")

    # pins persist across a remount (same cache dir)
    arc.remount()
    assert_studies(studies(arc), after_d, "after remount")

    # unpinned, A is the least recently used study: the next one read evicts it
    result = arc.run_cli("cache", "unpin", a, "-m", mp)
    assert result.returncode == 0, describe(result)
    assert_studies(studies(arc), expected_states(exp, states(a="full", b="cold", c="cold", d="full", e="cold")),
                   "A unpinned, no pressure yet")
    read_study(4)
    assert_studies(studies(arc), expected_states(exp, states(a="cold", b="cold", c="cold", d="full", e="full")),
                   "after reading E: the unpinned A evicted")

    # more than the cache can hold
    result = arc.run_cli("cache", "prefetch", "--patient", PATIENT_R.patient_id, "-m", mp)
    assert_cli_error(result, EXIT_USAGE)

    verify_tree_direct(mp, files, "every study, through a small cache")
    status = settled(arc)
    assert status["cache_bytes"] <= limit, status
    current = by_uid(studies(arc))
    assert all(s["cache"] in ("full", "cold") for s in current.values()), {u: s["cache"] for u, s in current.items()}
    arc.umount()
    assert_no_phi_in_logs(arc, exp)
