"""The systems a workload runs on: mifs on SeaweedFS (with and without study prefetch), plain
local disk, and raw boto3 against the same SeaweedFS as the limit of what S3 can deliver.

Must not import mifs. A file-system system only hands out directories and makes them cold or
durable; what the client does in them is the workload's business (bench.workloads), so peers
(gocryptfs, CryFS, rclone, s3fs) are added as more FsSystem subclasses.
"""

from __future__ import annotations

import abc
import concurrent.futures
import os
import shutil
import time
from pathlib import Path
from typing import Any

from bench.mifs_driver import MifsArchive
from bench.procs import MiB, ProcSample
from bench.registry import BenchError, System, register_system
from bench.study import Timing, drop_page_cache, ingest


class FsSystem(System):
    """A directory tree the client uses with ordinary file I/O."""

    does_ingest = True

    @abc.abstractmethod
    def start_ingest(self, tag: str) -> Path:
        """An empty directory to ingest into (a fresh mount, for a daemon)."""

    @abc.abstractmethod
    def finish_ingest(self) -> tuple[float, ProcSample | None, dict[str, Any]]:
        """Make what was ingested durable where it belongs (unmount: upload; disk: sync):
        the seconds that took, the daemon's final peak RSS/CPU, details for the results."""

    @abc.abstractmethod
    def prepare_read(self) -> None:
        """Store the study once, untimed, for the read workloads."""

    @abc.abstractmethod
    def make_cold(self) -> Path:
        """Drop every cache between the client and where the data lives; the study's root."""

    def daemon(self) -> ProcSample | None:
        """Peak RSS and CPU so far of the daemon serving the tree (None: no daemon)."""
        return None

    def daemon_pid(self) -> int | None:
        """The daemon serving the tree now (None: no daemon)."""
        return None

    def read_info(self) -> dict[str, Any]:
        return {}


@register_system
class MifsSystem(FsSystem):
    name = "mifs"
    description = "mifs on SeaweedFS S3 (default mount: study prefetch on where this mifs has it)"
    uses_s3 = True
    prefetch = True

    def setup(self) -> None:
        cli = self.ctx.mifs
        self.has_prefetch = cli.mount_supports("--no-prefetch")
        self.flags: list[str] = []
        parallel = self.ctx.options.prefetch_parallel
        if parallel is not None and self.prefetch:
            if cli.mount_supports("--prefetch-parallel"):
                self.flags += ["--prefetch-parallel", str(parallel)]
            else:
                self.ctx.note("`mifs mount` has no --prefetch-parallel: the option was ignored")
        if not self.has_prefetch:
            self.notes.append("this mifs has no study prefetch (`mifs mount --help` lists no --no-prefetch)")
        self.current: MifsArchive | None = None
        """The archive mounted for the workload running now."""

    def daemon(self) -> ProcSample | None:
        return self.current.daemon() if self.current is not None else None

    def daemon_pid(self) -> int | None:
        return self.current.pid if self.current is not None else None

    # ingest: a fresh archive per repeat, so no repeat reads or writes another's data
    def start_ingest(self, tag: str) -> Path:
        archive = self.ctx.new_archive(f"ingest-{self.name}-{tag}")
        archive.mount(self.flags)
        self.current = archive
        return archive.mountpoint

    def finish_ingest(self) -> tuple[float, ProcSample | None, dict[str, Any]]:
        archive = self.current
        assert archive is not None
        status = archive.status()
        seconds, final = archive.umount()
        self.current = None
        info = {k: status.get(k) for k in ("pending_uploads", "pending_bytes", "uploaded_objects", "index_backlog")}
        info = {f"at_end_of_writes_{k}": v for k, v in info.items() if v is not None}
        after = archive.offline_status()
        info.update({k: after.get(k) for k in ("objects", "stored_bytes", "bytes", "files") if k in after})
        return seconds, final, info

    # read: the shared read archive, cache wiped before each cold read
    def prepare_read(self) -> None:
        self.ctx.read_archive()

    def read_flags(self) -> list[str]:
        return list(self.flags)

    def make_cold(self) -> Path:
        archive = self.ctx.read_archive()
        if archive.mounted:
            archive.umount()
        count, size = archive.wipe_chunks()
        self.last_wiped = (count, size)
        archive.mount(self.read_flags())
        self.current = archive
        return archive.mountpoint

    def read_info(self) -> dict[str, Any]:
        status = self.ctx.read_archive().status()
        keys = ("cache_hits", "cache_misses", "cache_bytes", "objects", "stored_bytes", "prefetch_queued_studies",
                "prefetched_objects", "prefetched_bytes", "dicom_instances", "dicom_studies")
        info = {k: status[k] for k in keys if k in status}
        info["wiped_chunk_files"], info["wiped_chunk_bytes"] = self.last_wiped
        info["mount_flags"] = " ".join(self.ctx.read_archive().mount_flags)
        return info


@register_system
class MifsNoPrefetchSystem(MifsSystem):
    name = "mifs-no-prefetch"
    description = "mifs on SeaweedFS S3 mounted with --no-prefetch (study reads only)"
    prefetch = False
    does_ingest = False

    def read_flags(self) -> list[str]:
        if self.has_prefetch:
            return self.flags + ["--no-prefetch"]
        return list(self.flags)

    def setup(self) -> None:
        super().setup()
        if not self.has_prefetch:
            self.notes[:] = ["`mifs mount` rejects --no-prefetch (no study prefetch yet): mounted without it, same as mifs"]


@register_system
class DiskSystem(FsSystem):
    name = "disk"
    description = "plain local disk (the temp dir's file system), page cache dropped per file for cold reads"

    def setup(self) -> None:
        self.base = self.ctx.tmp / "disk"
        self.base.mkdir(parents=True, exist_ok=True)
        self._ingest_dir: Path | None = None
        self._read_dir: Path | None = None

    def start_ingest(self, tag: str) -> Path:
        self._ingest_dir = self.base / f"ingest-{tag}"
        self._ingest_dir.mkdir()
        return self._ingest_dir

    def finish_ingest(self) -> tuple[float, ProcSample | None, dict[str, Any]]:
        begin = time.perf_counter()
        os.sync()
        seconds = time.perf_counter() - begin
        if self._ingest_dir is not None:
            shutil.rmtree(self._ingest_dir)
        return seconds, None, {}

    def prepare_read(self) -> None:
        if self._read_dir is None:
            root = self.base / "read"
            root.mkdir()
            ingest(root, self.ctx.study)
            os.sync()
            self._read_dir = root

    def make_cold(self) -> Path:
        assert self._read_dir is not None
        drop_page_cache(self._read_dir, self.ctx.study)
        return self._read_dir


@register_system
class Boto3System(System):
    """The limit: the same bytes moved by boto3 directly, 8 threads sharing one client."""

    name = "boto3"
    description = "raw boto3 on the same SeaweedFS: 8 threads, one client (8+ pooled connections)"
    threads = 8
    uses_s3 = True

    def setup(self) -> None:
        self.client = self.ctx.s3.client(pool=max(self.threads, 10))
        self.pool = concurrent.futures.ThreadPoolExecutor(self.threads, thread_name_prefix="bench-boto3")
        self._keys: list[tuple[str, int]] | None = None

    def close(self) -> None:
        pool = getattr(self, "pool", None)
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def put_study(self, repeat: int) -> Timing:
        """PUT every file of the study as one object (the same bytes a PACS hands mifs)."""
        bucket = self.ctx.s3.bucket
        study = self.ctx.study

        def put(number: int) -> int:
            data = study.files[number].data
            self.client.put_object(Bucket=bucket, Key=f"raw-put/r{repeat}/{number:06d}", Body=data)
            return len(data)

        begin = time.perf_counter()
        total = sum(self.pool.map(put, range(len(study.files))))
        return Timing(time.perf_counter() - begin, len(study.files), total)

    def prepare_read(self) -> None:
        self.ctx.read_archive()

    def list_objects(self) -> tuple[float, list[tuple[str, int]]]:
        """The read archive's chunk objects (keys under READ_PREFIX/data/): seconds, (key, size)."""
        from bench.context import READ_PREFIX

        begin = time.perf_counter()
        keys = self.ctx.s3.list_keys(self.client, f"{READ_PREFIX}/data/")
        return time.perf_counter() - begin, keys

    def get_objects(self, keys: list[tuple[str, int]]) -> Timing:
        """GET every object and read its body to the end, 8 at a time."""
        bucket = self.ctx.s3.bucket

        def get(item: tuple[str, int]) -> int:
            body = self.client.get_object(Bucket=bucket, Key=item[0])["Body"]
            size = len(body.read())
            if size != item[1]:
                raise BenchError(f"GET {item[0]}: {size} bytes, listed as {item[1]}")
            return size

        begin = time.perf_counter()
        total = sum(self.pool.map(get, keys))
        return Timing(time.perf_counter() - begin, len(keys), total)


def mib(value: int | None) -> float | None:
    return None if value is None else value / MiB
