"""Everything one run shares: options, the temp dir, the study, the S3 server, the mifs CLI,
and the one mifs archive holding the study that every study-read system reads.

Must not import mifs. close() leaves no mount, daemon or server behind, whatever happened.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.mifs_driver import MifsArchive, MifsCli
from bench.procs import mounts_under, wait_until
from bench.registry import BenchError
from bench.seaweed import S3Env
from bench.study import REPO_ROOT, Study, Timing, ingest, make_study


@dataclass(frozen=True)
class Options:
    workloads: tuple[str, ...]
    systems: tuple[str, ...]
    repeats: int
    slices: int
    series: int
    quick: bool
    prefetch_parallel: int | None
    profile: bool
    results_dir: Path
    keep: bool
    ratio_limit: float
    check: bool
    wait_idle: float = 0.0
    idle_load: float = 1.0
    seq_mib: int = 1024
    """Size of the sequential file of seq-write / seq-read."""
    meta_files: int = 10000
    """Files created in one directory by the metadata workload."""


READ_PREFIX = "read"
"""Key prefix of the archive the study-read workload reads (its chunks: READ_PREFIX/data/)."""


class Context:
    def __init__(self, options: Options) -> None:
        self.options = options
        self.tmp = Path(tempfile.mkdtemp(prefix="mifs-bench-", dir="/tmp"))
        self.notes: list[str] = []
        self.started = time.monotonic()
        self._study: Study | None = None
        self._s3: S3Env | None = None
        self._cli: MifsCli | None = None
        self._archives: list[MifsArchive] = []
        self._read_archive: MifsArchive | None = None
        self._datasets: dict[str, MifsArchive] = {}
        self._cleanups: list[Callable[[], None]] = []
        self.read_archive_ingest: Timing | None = None
        self.mifs_source = ""
        """Content hash of the copy of mifs/ the run uses (see `mifs`)."""

    # --- messages ------------------------------------------------------------------------

    def log(self, message: str) -> None:
        print(f"[{time.monotonic() - self.started:7.1f}s] {message}", file=sys.stderr, flush=True)

    def note(self, message: str) -> None:
        """A caveat that belongs in the results (printed now and reported with the tables)."""
        if message not in self.notes:
            self.notes.append(message)
            self.log(f"note: {message}")

    # --- shared resources, made on first use -------------------------------------------------

    @property
    def study(self) -> Study:
        if self._study is None:
            self.log(f"generating a synthetic CT study: {self.options.series} x {self.options.slices} slices")
            self._study = make_study(self.options.slices, self.options.series)
        return self._study

    @property
    def s3(self) -> S3Env:
        if self._s3 is None:
            self.log("starting SeaweedFS (weed server -s3) on 127.0.0.1")
            s3 = S3Env(self.tmp / "weed")
            self._s3 = s3
            s3.start()
            self.log(f"SeaweedFS ready at {s3.endpoint_url} in {s3.startup_seconds:.1f} s")
        return self._s3

    @property
    def mifs(self) -> MifsCli:
        """The mifs CLI, run from a copy of mifs/ taken when first needed: every mount starts a
        new daemon, and edits to the checkout during a run must not mix versions."""
        if self._cli is None:
            source = self.tmp / "mifs-src"
            shutil.copytree(REPO_ROOT / "mifs", source / "mifs", ignore=shutil.ignore_patterns("__pycache__"))
            self.mifs_source = source_fingerprint(source / "mifs")
            self._cli = MifsCli(self.s3.env(), source_root=source)
        return self._cli

    def new_archive(self, name: str) -> MifsArchive:
        """A fresh mifs archive at s3://BUCKET/name on the run's server (initialised, not mounted)."""
        archive = MifsArchive(self.mifs, self.tmp / "mifs" / name, f"s3://{self.s3.bucket}/{name}", self.s3.store_flags(), name)
        self._archives.append(archive)
        archive.init()
        return archive

    def _filled_archive(self, prefix: str, fill: Callable[[Path], object]) -> MifsArchive:
        archive = self.new_archive(prefix)
        archive.mount()
        fill(archive.mountpoint)
        status = archive.status()
        if "index_backlog" in status:  # the DICOM index: let it finish before unmounting
            wait_until(lambda: archive.status().get("index_backlog") == 0, 300, "the DICOM index backlog to drain", 0.2)
        archive.umount()
        return archive

    def dataset_archive(self, name: str, fill: Callable[[Path], object] | None = None) -> MifsArchive:
        """The archive holding dataset `name` (not the study), unmounted, everything uploaded:
        made by the first call, which must give `fill`."""
        if name not in self._datasets:
            if fill is None:
                raise BenchError(f"dataset {name} was not prepared")
            self.log(f"preparing the {name} archive (written through mifs, then umount)")
            self._datasets[name] = self._filled_archive(f"data-{name}", fill)
        return self._datasets[name]

    def read_archive_if_made(self) -> MifsArchive | None:
        return self._read_archive

    def stored(self, prefix: str) -> dict[str, int]:
        """Objects and bytes under `prefix` in the run's bucket (what a system stored)."""
        keys = self.s3.list_keys(self.s3.client(), prefix.rstrip("/") + "/")
        return {"stored_objects": len(keys), "stored_bytes": sum(size for _, size in keys)}

    def read_archive(self) -> MifsArchive:
        """The archive holding the study, unmounted, every chunk uploaded (prepared once)."""
        if self._read_archive is None:
            self.log("preparing the study-read archive (ingest through mifs, then umount)")
            study = self.study
            timings: list[Timing] = []
            archive = self._filled_archive(READ_PREFIX, lambda root: timings.append(ingest(root, study)))
            self.read_archive_ingest = timings[0]
            if not self.s3.list_keys(self.s3.client(), f"{READ_PREFIX}/data/"):
                raise BenchError("the read archive has no data objects in the store after its unmount")
            self._read_archive = archive
        return self._read_archive

    def describe_machine(self) -> dict[str, Any]:
        import os
        import platform

        cpu = ""
        try:
            with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
                cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "")
        except OSError:
            pass
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        return {
            "cpus": os.cpu_count(),
            "cpu_model": cpu,
            "memory_gib": round(mem_gib, 1),
            "kernel": platform.release(),
            "os": _os_release(),
            "python": platform.python_version(),
        }

    # --- teardown ----------------------------------------------------------------------------

    def register_cleanup(self, cleanup: Callable[[], None]) -> None:
        """Run `cleanup` in close(), before SeaweedFS stops (a peer's unmount and kill)."""
        self._cleanups.append(cleanup)

    def close(self) -> None:
        """Unmount every mount (mifs and peers), stop SeaweedFS, delete the temp dir (unless
        --keep). Each step runs even if an earlier one failed."""
        for cleanup in reversed(self._cleanups):
            try:
                cleanup()
            except Exception as exc:  # noqa: BLE001 - keep cleaning up
                self.log(f"cleanup failed: {exc}")
        for archive in self._archives:
            try:
                archive.force_cleanup()
            except Exception as exc:  # noqa: BLE001 - keep cleaning up
                self.log(f"cleanup of {archive.mountpoint} failed: {exc}")
        if self._s3 is not None:
            try:
                self._s3.close()
            except Exception as exc:  # noqa: BLE001
                self.log(f"stopping SeaweedFS failed: {exc}")
        left = mounts_under(self.tmp)
        if left:
            self.log(f"not deleting {self.tmp}: still mounted: {', '.join(left)}")
        elif self.options.keep:
            self.log(f"kept {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


def source_fingerprint(package: Path) -> str:
    """A short content hash of a package's Python files (names and bytes)."""
    digest = hashlib.sha1()
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def _os_release() -> str:
    try:
        with open("/etc/os-release", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return ""
