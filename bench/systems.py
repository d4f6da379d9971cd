"""The systems a workload runs on: mifs on SeaweedFS (with and without study prefetch), plain
local disk, and raw boto3 against the same SeaweedFS as the limit of what S3 can deliver.

Must not import mifs. A file-system system only hands out directories and makes them cold or
durable; what the client does in them is the workload's business (bench.workloads), so peers
(gocryptfs, CryFS, rclone, s3fs) are added as more FsSystem subclasses.
"""

from __future__ import annotations

import abc
import concurrent.futures
import io
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.mifs_driver import MifsArchive
from bench.procs import MiB, ProcSample, wait_until
from bench.registry import BenchError, System, register_system
from bench.study import Timing, drop_page_cache_tree, ingest, tree_bytes

STUDY = "study"
"""Name of the dataset holding the CT study (what study-read reads)."""


class FsSystem(System):
    """A directory tree the client uses with ordinary file I/O."""

    does_ingest = True
    does_read = True

    @abc.abstractmethod
    def start_ingest(self, tag: str) -> Path:
        """An empty directory to ingest into (a fresh mount, for a daemon)."""

    @abc.abstractmethod
    def finish_ingest(self) -> tuple[float, ProcSample | None, dict[str, Any]]:
        """Make what was ingested durable where it belongs (unmount: upload; disk: sync):
        the seconds that took, the daemon's final peak RSS/CPU, details for the results."""

    @abc.abstractmethod
    def prepare_dataset(self, name: str, fill: Callable[[Path], object]) -> None:
        """Once, untimed: a tree named `name` filled by `fill(root)` and made durable where
        it belongs (for a daemon: unmounted, everything uploaded or written back)."""

    @abc.abstractmethod
    def cold_dataset(self, name: str) -> Path:
        """Drop every cache between the client and where dataset `name` lives (unmount,
        wipe the local cache, mount again; local disk: drop its pages); its root."""

    def prepare_read(self) -> None:
        """Store the study once, untimed, for study-read."""
        study = self.ctx.study
        self.prepare_dataset(STUDY, lambda root: ingest(root, study))

    def make_cold(self) -> Path:
        """The study's root, cold."""
        return self.cold_dataset(STUDY)

    def wait_durable(self) -> None:
        """While the ingest tree is mounted, after the writes: return once everything written
        is where it belongs (default: sync, for trees on local disk)."""
        os.sync()

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
    role = "mifs"

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
        self.datasets: dict[str, MifsArchive] = {}

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

    def wait_durable(self) -> None:
        """`mifs sync`: every closed file's chunks and the metadata naming them are in S3. An
        older mifs: until `mifs status` shows no upload pending (a process per poll)."""
        archive = self.current
        assert archive is not None
        if archive.cli.has_sync:
            archive.sync()
            return
        wait_until(lambda: archive.status().get("pending_uploads") == 0, 900, "mifs's uploads to finish", 0.02)

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
        info.update(self.ctx.stored(archive.prefix))
        archive.discard()
        return seconds, final, info

    # read: one archive per dataset (the study: the shared read archive), cache wiped before each cold read
    def _dataset(self, name: str) -> MifsArchive:
        if name == STUDY:
            return self.ctx.read_archive()
        return self.ctx.dataset_archive(name)

    def prepare_dataset(self, name: str, fill: Callable[[Path], object]) -> None:
        self.datasets[name] = self._dataset(name) if name == STUDY else self.ctx.dataset_archive(name, fill)

    def read_flags(self) -> list[str]:
        return list(self.flags)

    def cold_dataset(self, name: str) -> Path:
        archive = self._dataset(name)
        for other in {id(a): a for a in [*self.datasets.values(), self.ctx.read_archive_if_made()] if a}.values():
            if other is not archive and other.mounted:  # one daemon at a time
                other.umount()
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
class MifsSyncCloseSystem(MifsSystem):
    name = "mifs-sync-close"
    description = "mifs on SeaweedFS S3 mounted with --sync-close (close waits until the file survives power loss)"
    does_read = False

    def setup(self) -> None:
        super().setup()
        if self.ctx.mifs.mount_supports("--sync-close"):
            self.flags.append("--sync-close")
        else:
            self.notes.append("`mifs mount` has no --sync-close (every close synced): mounted without it, same as mifs")


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
        self._datasets: dict[str, Path] = {}

    def start_ingest(self, tag: str) -> Path:
        self._ingest_dir = self.base / f"ingest-{tag}"
        self._ingest_dir.mkdir()
        return self._ingest_dir

    def finish_ingest(self) -> tuple[float, ProcSample | None, dict[str, Any]]:
        begin = time.perf_counter()
        os.sync()
        seconds = time.perf_counter() - begin
        info: dict[str, Any] = {}
        if self._ingest_dir is not None:
            info["stored_objects"], info["stored_bytes"] = tree_bytes(self._ingest_dir)
            shutil.rmtree(self._ingest_dir)
        return seconds, None, info

    def prepare_dataset(self, name: str, fill: Callable[[Path], object]) -> None:
        if name not in self._datasets:
            root = self.base / f"data-{name}"
            root.mkdir()
            fill(root)
            os.sync()
            self._datasets[name] = root

    def cold_dataset(self, name: str) -> Path:
        root = self._datasets[name]
        drop_page_cache_tree(root)
        return root


RAW_READ_PREFIX = "raw-read"
"""Where the boto3 system keeps the study for its cold reads (one object per file)."""


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
        self._raw_read_ready = False

    def close(self) -> None:
        pool = getattr(self, "pool", None)
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def put_objects(self, prefix: str, sizes: list[int]) -> Timing:
        """PUT objects of the given sizes (random bytes) under `prefix`, 8 at a time: raw
        boto3 uploading the same bytes another system stored."""
        bucket = self.ctx.s3.bucket
        data = os.urandom(max(sizes, default=0))

        def put(item: tuple[int, int]) -> int:
            number, size = item
            self.client.put_object(Bucket=bucket, Key=f"{prefix}/{number:06d}", Body=data[:size])
            return size

        begin = time.perf_counter()
        total = sum(self.pool.map(put, enumerate(sizes)))
        return Timing(time.perf_counter() - begin, len(sizes), total)

    def transfer_config(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(multipart_threshold=8 * MiB, multipart_chunksize=8 * MiB,
                              max_concurrency=self.threads, use_threads=True)

    def put_seq(self, key: str, size: int) -> Timing:
        """The sequential file as one object: multipart upload, 8 MiB parts, 8 threads."""
        from bench.study import IO_SIZE

        blocks = size // IO_SIZE
        reader = _SeqReader(blocks)
        begin = time.perf_counter()
        self.client.upload_fileobj(reader, self.ctx.s3.bucket, key, Config=self.transfer_config())
        return Timing(time.perf_counter() - begin, 1, blocks * IO_SIZE)

    def get_seq(self, key: str, size: int) -> Timing:
        """GET the sequential object: ranged GETs of 8 MiB, 8 threads, into a sink."""
        sink = _Sink()
        begin = time.perf_counter()
        self.client.download_fileobj(self.ctx.s3.bucket, key, sink, Config=self.transfer_config())
        seconds = time.perf_counter() - begin
        if sink.size != size:
            raise BenchError(f"GET {key}: {sink.size} bytes, expected {size}")
        return Timing(seconds, 1, sink.size)

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
        """The study as one object per file under RAW_READ_PREFIX, PUT once (untimed): what a
        plain S3 tool stores, and so the request count a reader of it pays (mifs packs small
        files, docs/FORMAT.md section 5b: GETting its objects would not be the same work)."""
        if self._raw_read_ready:
            return
        bucket = self.ctx.s3.bucket
        files = self.ctx.study.files

        def put(number: int) -> None:
            self.client.put_object(Bucket=bucket, Key=f"{RAW_READ_PREFIX}/{number:06d}", Body=files[number].data)

        list(self.pool.map(put, range(len(files))))
        self._raw_read_ready = True

    def list_objects(self) -> tuple[float, list[tuple[str, int]]]:
        """The study's objects (one per file, prepare_read): seconds, (key, size)."""
        begin = time.perf_counter()
        keys = self.ctx.s3.list_keys(self.client, f"{RAW_READ_PREFIX}/")
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


class _SeqReader(io.RawIOBase):
    """The sequential file's bytes as a readable stream (never all in memory)."""

    def __init__(self, blocks: int) -> None:
        from bench.study import IO_SIZE

        self.size = blocks * IO_SIZE
        self.pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        from bench.study import IO_SIZE, seq_block

        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view) and self.pos < self.size:
            block, offset = divmod(self.pos, IO_SIZE)
            piece = seq_block(block)[offset:offset + min(len(view) - done, self.size - self.pos)]
            view[done:done + len(piece)] = piece
            done += len(piece)
            self.pos += len(piece)
        return done


class _Sink(io.RawIOBase):
    """A seekable writable file that keeps only the highest offset written (ranged GETs
    arrive out of order)."""

    def __init__(self) -> None:
        self.size = 0
        self.pos = 0

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = offset if whence == 0 else (self.pos + offset if whence == 1 else self.size + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def write(self, data: Any) -> int:
        n = len(memoryview(data).cast("B"))
        self.pos += n
        self.size = max(self.size, self.pos)
        return n


def mib(value: int | None) -> float | None:
    return None if value is None else value / MiB
