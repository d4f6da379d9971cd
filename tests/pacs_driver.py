"""Drives real PACS software against a directory (the mifs mount, in the tests): Orthanc with
its storage and SQLite index there, fed by DCMTK's storescu over DICOM; or DCMTK's storescp
receiving into it. Prints one JSON object with what it found.

Run it inside a private network namespace (test_e2e_real_pacs.py: `unshare --net`): Orthanc
and storescp have no option to listen on loopback only, and there they can only be reached
on 127.0.0.1. Standalone, no mifs import; pydicom reads the datasets back.

  pacs_driver.py orthanc --root DIR [--send SRC [--settle S]]... [--delete-patient ID] --check SRC...
  pacs_driver.py storescp --out DIR --send SRC... --check SRC...
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pydicom

HTTP_PORT = 8042
DICOM_PORT = 4242
AET = "MIFSTEST"


def source_pixels(dirs: list[str]) -> dict[str, tuple[str, bytes]]:
    """SOP Instance UID -> (Patient ID, pixel data) of every file under the source dirs."""
    found = {}
    for d in dirs:
        for path in glob.glob(f"{d}/**/*.dcm", recursive=True):
            ds = pydicom.dcmread(path)
            found[str(ds.SOPInstanceUID)] = (str(ds.PatientID), bytes(ds.PixelData))
    return found


def storescu(*dirs: str) -> None:
    result = subprocess.run(["storescu", "-aec", AET, "+sd", "+r", "127.0.0.1", str(DICOM_PORT), *dirs],
                            capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise SystemExit(f"storescu failed ({result.returncode}): {result.stderr.strip()[-2000:]}")


def wait_for(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.1)


def http(method: str, path: str) -> bytes:
    request = urllib.request.Request(f"http://127.0.0.1:{HTTP_PORT}{path}", method=method)
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.read()


def compare(received: dict[str, tuple[str, bytes]], expected: dict[str, tuple[str, bytes]]) -> dict[str, int]:
    differ = sum(1 for uid, item in received.items() if expected.get(uid) != item)
    return {"received": len(received), "differ": differ, "missing": len(set(expected) - set(received))}


def run_orthanc(args: argparse.Namespace) -> dict[str, object]:
    root = Path(args.root)
    config = Path(args.workdir) / "orthanc.json"
    config.write_text(json.dumps({
        "Name": "mifs-test", "StorageDirectory": str(root / "storage"), "IndexDirectory": str(root / "index"),
        "HttpPort": HTTP_PORT, "DicomPort": DICOM_PORT, "DicomAet": AET, "DicomCheckCalledAet": False,
        "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "StorageCompression": False,
        "Plugins": [],
    }))
    log = open(Path(args.workdir) / f"orthanc-{time.time_ns()}.log", "w")
    orthanc = subprocess.Popen([shutil.which("Orthanc") or "/usr/sbin/Orthanc", str(config)], stdout=log, stderr=log)
    try:
        wait_for(lambda: orthanc.poll() is None and bool(http("GET", "/system")), 60, "Orthanc to start")
        for n, source in enumerate(args.send):
            if n and args.settle:
                time.sleep(args.settle)  # let Orthanc flush its index (every 10 s) in between
            storescu(source)
        if args.delete_patient:
            for pid in json.loads(http("GET", "/patients")):
                info = json.loads(http("GET", f"/patients/{pid}"))
                if info["MainDicomTags"].get("PatientID") == args.delete_patient:
                    http("DELETE", f"/patients/{pid}")
        received = {}
        for iid in json.loads(http("GET", "/instances")):
            ds = pydicom.dcmread(io.BytesIO(http("GET", f"/instances/{iid}/file")))
            received[str(ds.SOPInstanceUID)] = (str(ds.PatientID), bytes(ds.PixelData))
        stats = json.loads(http("GET", "/statistics"))
    finally:
        orthanc.send_signal(signal.SIGTERM)
        try:
            orthanc.wait(60)
        except subprocess.TimeoutExpired:
            orthanc.kill()
            orthanc.wait()
        log.close()
    return {**compare(received, source_pixels(args.check)), "orthanc_instances": stats["CountInstances"],
            "orthanc_exit": orthanc.returncode}


def run_storescp(args: argparse.Namespace) -> dict[str, object]:
    os.makedirs(args.out, exist_ok=True)
    log = open(Path(args.workdir) / "storescp.log", "w")
    scp = subprocess.Popen(["storescp", "-aet", AET, "-od", args.out, "-su", "study", "-fe", ".dcm", str(DICOM_PORT)],
                           stdout=log, stderr=log)
    try:
        time.sleep(0.5)
        if scp.poll() is not None:
            raise SystemExit(f"storescp exited at once ({scp.returncode})")
        storescu(*args.send)
    finally:
        scp.terminate()
        scp.wait(30)
        log.close()
    received = {}
    for path in glob.glob(f"{args.out}/**/*.dcm", recursive=True):
        ds = pydicom.dcmread(path)
        received[str(ds.SOPInstanceUID)] = (str(ds.PatientID), bytes(ds.PixelData))
    return compare(received, source_pixels(args.check))


def main() -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="what", required=True)
    o = sub.add_parser("orthanc")
    o.add_argument("--root", required=True)
    o.add_argument("--delete-patient")
    o.add_argument("--settle", type=float, default=0.0, help="seconds to wait between two --send")
    s = sub.add_parser("storescp")
    s.add_argument("--out", required=True)
    for p in (o, s):
        p.add_argument("--workdir", required=True)
        p.add_argument("--send", action="append", default=[])
        p.add_argument("--check", nargs="*", default=[])
    args = parser.parse_args()
    result = run_orthanc(args) if args.what == "orthanc" else run_storescp(args)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
