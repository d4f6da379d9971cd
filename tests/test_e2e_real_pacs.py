"""End-to-end with real PACS software on the mount: Orthanc (storage area and SQLite index on
mifs) fed over DICOM by DCMTK's storescu, and DCMTK's storescp receiving into mifs. Studies
must come back from a cold cache intact, a patient deleted through Orthanc must leave the
archive, and a kill -9 of the mifs daemon mid-ingest must leave Orthanc a consistent index
whose every instance reads back intact.

The PACS processes run in a private network namespace (`unshare --net`, only loopback up):
Orthanc and storescp cannot be told to listen on 127.0.0.1 only, and there nothing else can
reach them. Skipped where Orthanc or DCMTK are not installed (.ci/setup installs them for CI).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from dicom_factory import Patient, StudySpec, write_study
from mifs_e2e import Archive, all_files, describe, file_states, kill_pids, lazy_unmount, wait_until

DRIVER = Path(__file__).with_name("pacs_driver.py")


def _missing_tools() -> str:
    for tool in ("unshare", "ip", "storescu", "storescp"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            return f"{tool} is not installed"
    if shutil.which("Orthanc") is None and not Path("/usr/sbin/Orthanc").exists():
        return "Orthanc is not installed (apt-get install orthanc)"
    return ""


pytestmark = pytest.mark.skipif(bool(_missing_tools()), reason=_missing_tools() or "tools present")


def run_driver(*args: object, workdir: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """The driver in a network namespace of its own, loopback up."""
    command = ["unshare", "--net", "--", "sh", "-c", 'ip link set lo up && exec "$0" "$@"',
               sys.executable, str(DRIVER), *map(str, args), "--workdir", str(workdir)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def driver_result(*args: object, workdir: Path) -> dict[str, Any]:
    result = run_driver(*args, workdir=workdir)
    assert result.returncode == 0, describe(result)
    value: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return value


@pytest.fixture
def studies(tmp_path: Path) -> dict[str, Path]:
    made = {
        "ct": StudySpec(seed=41, series_count=2, images_per_series=15),
        "mr": StudySpec(seed=42, modality="MR", images_per_series=25, patient=Patient("ROE^JOHN", "PID00002")),
        "cr": StudySpec(seed=43, modality="CR", images_per_series=2, patient=Patient("POE^ANN", "PID00003")),
    }
    dirs = {}
    for name, spec in made.items():
        dirs[name] = tmp_path / "src" / name
        write_study(dirs[name], spec)
    return dirs


def test_orthanc_on_mifs_ingests_serves_cold_and_deletes(s3_archive: Archive, studies: dict[str, Path], tmp_path: Path) -> None:
    arc = s3_archive
    arc.mount()
    root = arc.mountpoint / "orthanc"
    every = [studies["ct"], studies["mr"], studies["cr"]]
    result = driver_result("orthanc", "--root", root, *[a for d in every for a in ("--send", d)],
                           "--check", *every, workdir=tmp_path)
    assert result == {"received": 57, "differ": 0, "missing": 0, "orthanc_instances": 57, "orthanc_exit": 0}, result

    # Cold: the cache wiped, Orthanc reads its index and every instance back from the store.
    arc.umount()
    arc.wipe_cache()
    arc.mount()
    result = driver_result("orthanc", "--root", root, "--delete-patient", "PID00002",
                           "--check", studies["ct"], studies["cr"], workdir=tmp_path)
    assert result == {"received": 32, "differ": 0, "missing": 0, "orthanc_instances": 32, "orthanc_exit": 0}, result

    # mifs found the studies in Orthanc's storage area (hashed names, no extension) and saw
    # the deleted patient's files go.
    arc.wait_status(lambda s: s.get("index_backlog") == 0, 60, "the study index to catch up")
    listing = arc.run_cli("studies", "--json", arc.mountpoint)
    assert listing.returncode == 0, describe(listing)
    by_patient = {s["patient_id"]: s["instances"] for s in json.loads(listing.stdout)}
    assert by_patient.get("PID00001") == 30 and by_patient.get("PID00003") == 2, by_patient
    assert not by_patient.get("PID00002"), by_patient


def test_kill_9_of_mifs_mid_ingest_keeps_what_orthanc_made_durable(
    archive: Archive, studies: dict[str, Path], tmp_path: Path,
) -> None:
    """Orthanc fdatasyncs each instance file but flushes its SQLite index only every 10 s: a
    daemon crash, like a power loss on a local disk, may take the instances of the last
    seconds out of its index, never those of a flush before, and never leaves it corrupt."""
    archive.mount()
    root = archive.mountpoint / "orthanc"
    command = ["unshare", "--net", "--", "sh", "-c", 'ip link set lo up && exec "$0" "$@"', sys.executable,
               str(DRIVER), "orthanc", "--root", str(root), "--send", str(studies["mr"]), "--settle", "12",
               "--send", str(studies["ct"]), "--workdir", str(tmp_path)]
    ingest = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        # The MR study (25) is in and flushed; the CT study is coming in when the daemon dies.
        wait_until(lambda: (root / "storage").exists() and len(all_files(root / "storage")) >= 25 + 8,
                   120, "Orthanc to store the MR study and part of the CT study", interval=0.1)
        kill_pids(archive.daemon_pids())
        time.sleep(1)  # Orthanc and storescu meet the dead mount
    finally:
        os.killpg(ingest.pid, signal.SIGKILL)  # then they go too (Orthanc would wait on it)
        ingest.communicate()
    lazy_unmount(archive.mountpoint)
    archive.mounts = []

    archive.mount()
    result = driver_result("orthanc", "--root", root, "--check", studies["mr"], studies["ct"], workdir=tmp_path)
    assert result["differ"] == 0 and result["orthanc_exit"] == 0, result
    assert result["orthanc_instances"] == result["received"], result
    assert 25 <= result["received"] < 55, result  # the whole MR study, not the whole CT study
    mr_only = driver_result("orthanc", "--root", root, "--delete-patient", "PID00001", "--check", studies["mr"],
                            workdir=tmp_path)
    assert mr_only == {"received": 25, "differ": 0, "missing": 0, "orthanc_instances": 25, "orthanc_exit": 0}, mr_only


def test_storescp_receives_into_mifs_and_the_files_survive_a_cold_remount(
    archive: Archive, studies: dict[str, Path], tmp_path: Path,
) -> None:
    archive.mount()
    incoming = archive.mountpoint / "incoming"
    every = [studies["ct"], studies["mr"], studies["cr"]]
    result = driver_result("storescp", "--out", incoming, *[a for d in every for a in ("--send", d)],
                           "--check", *every, workdir=tmp_path)
    assert result == {"received": 57, "differ": 0, "missing": 0}, result
    before = file_states(incoming)
    assert len(all_files(incoming)) == 57
    archive.umount()
    archive.wipe_cache()
    started = time.monotonic()
    archive.mount()
    assert file_states(incoming) == before, f"files changed across a cold remount ({time.monotonic() - started:.1f}s)"
