"""The workloads: what a PACS and a viewer do with a CT study, measured the same way on every system.

Must not import mifs. A workload owns the client side (bench.study) and the timing; systems
only provide directories, cold caches and durability (bench.systems).
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import profile as pyspy
from bench.procs import cpu_seconds, machine_busy_seconds
from bench.registry import BenchError, Metric, Sample, System, Verdict, Workload, register_workload
from bench.study import IO_SIZE, ingest, read_all, read_seq, verify, write_seq
from bench.systems import Boto3System, FsSystem, MifsNoPrefetchSystem, MifsSystem, mib

GiB = 1024**3
SEQ = "seq"
"""Name of the dataset holding the sequential file (what seq-read reads)."""


def _median(summary: dict[str, dict[str, dict[str, float]]], system: str, metric: str) -> float | None:
    value = summary.get(system, {}).get(metric, {}).get("median")
    return None if value is None else float(value)


def versus(summary: dict[str, dict[str, dict[str, float]]], metric: str, label: str, peer: str, factor: float,
           *, higher_is_better: bool = True, mine: str = MifsSystem.name) -> Verdict:
    """Target: mifs at least `factor` times as good as `peer` on `metric` (medians). The value
    is the ratio mifs/peer (higher is better) or peer/mifs (lower is better, e.g. seconds)."""
    name = f"{label}: mifs ≥ {factor:g}x {peer}"
    a, b = _median(summary, mine, metric), _median(summary, peer, metric)
    if a is None or b is None:
        missing = " and ".join(n for n, v in ((mine, a), (peer, b)) if v is None)
        return Verdict(name, None, factor, None, f"not measured ({missing} not in this run)", "≥")
    if a <= 0 or b <= 0:
        return Verdict(name, None, factor, None, f"a zero median (mifs {a:g}, {peer} {b:g})", "≥")
    ratio = a / b if higher_is_better else b / a
    return Verdict(name, ratio, factor, ratio >= factor, f"mifs {a:.4g}, {peer} {b:.4g}", "≥")


def at_most(summary: dict[str, dict[str, dict[str, float]]], metric: str, label: str, limit: float,
            *, mine: str = MifsSystem.name) -> Verdict:
    """Target: mifs's median of `metric` at most `limit` (an absolute bound)."""
    value = _median(summary, mine, metric)
    if value is None:
        return Verdict(label, None, limit, None, f"not measured ({mine} not in this run)")
    return Verdict(label, value, limit, value <= limit, f"median of {mine}")


class CpuMeter:
    """CPU seconds of the client (this process: the reader/writer, or the boto3 threads) and
    of the S3 server (weed) over a timed phase; together with the daemon's CPU they show
    how much of the machine's 2 x wall seconds each part used."""

    def __init__(self, ctx: Any, system: System) -> None:
        self._server_pid = ctx.s3.pid if system.uses_s3 else None

    def __enter__(self) -> CpuMeter:
        self._machine = machine_busy_seconds()
        self._client = _own_cpu()
        self._server = cpu_seconds(self._server_pid) if self._server_pid else None
        return self

    def __exit__(self, *exc: object) -> None:
        self.client_seconds = _own_cpu() - self._client
        self.machine_seconds = machine_busy_seconds() - self._machine
        end = cpu_seconds(self._server_pid) if self._server_pid else None
        self.server_seconds = end - self._server if end is not None and self._server is not None else None

    def metrics(self, daemon_cpu: float | None = None) -> dict[str, float]:
        """Client and server CPU, and the CPU everything else on the machine used meanwhile
        (other sessions, kernel threads): a high value means a noisy measurement."""
        out = {"client_cpu_seconds": self.client_seconds}
        if self.server_seconds is not None:
            out["server_cpu_seconds"] = self.server_seconds
        ours = self.client_seconds + (self.server_seconds or 0.0) + (daemon_cpu or 0.0)
        out["other_cpu_seconds"] = max(0.0, self.machine_seconds - ours)
        return out


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _daemon_metrics(before: Any, after: Any) -> dict[str, float]:
    """Peak RSS (MiB) and CPU seconds between two ProcSamples of a daemon, where known."""
    out: dict[str, float] = {}
    if after is not None and after.peak_rss_bytes is not None:
        out["peak_rss_mib"] = float(mib(after.peak_rss_bytes) or 0.0)
    if after is not None and after.cpu_seconds is not None:
        start = before.cpu_seconds if before is not None and before.cpu_seconds is not None else 0.0
        out["cpu_seconds"] = after.cpu_seconds - start
    return out


@dataclass
class WriteRun:
    """One timed write phase on a file system, then its drain (finish_ingest)."""

    timing: Any
    drain: float
    info: dict[str, Any]
    during: dict[str, float]
    """The daemon's peak RSS and CPU over the writes alone."""
    whole: dict[str, float]
    """The same over the writes and the drain."""
    cpu: CpuMeter
    """Client, server and other CPU over the writes alone."""


def timed_writes(ctx: Any, system: FsSystem, tag: str, write: Callable[[Path], Any]) -> WriteRun:
    """Mount a fresh ingest tree, time write(root) under a CpuMeter, then drain and unmount it."""
    root = system.start_ingest(tag)
    before = system.daemon()
    with CpuMeter(ctx, system) as cpu:  # the writes only: umount runs CLI processes
        timing = write(root)
    written = system.daemon()
    drain, final, info = system.finish_ingest()
    return WriteRun(timing, drain, info, _daemon_metrics(before, written), _daemon_metrics(before, final), cpu)


class WriteWorkload(Workload):
    """A workload that writes: every system that takes an ingest, and raw boto3's PUTs."""

    def supports(self, system: System) -> bool:
        return (isinstance(system, FsSystem) and system.does_ingest) or isinstance(system, Boto3System)


@register_workload
class StudyIngest(WriteWorkload):
    name = "study-ingest"
    description = (
        "a PACS stores one CT study: each file written in 1 MiB writes under a temporary name, "
        "closed, renamed into Patient/Study/Series dirs; then made durable where it belongs "
        "(mifs: `mifs umount`, which waits for every upload; disk: sync)"
    )
    io_size = IO_SIZE
    fsync = False
    metrics = (
        Metric("files_per_s", "ingest files/s", True, 0, primary=True),
        Metric("seconds", "ingest s", False, 2),
        Metric("drain_seconds", "drain s (umount/sync)", False, 2),
        Metric("total_seconds", "ingest+drain s", False, 2),
        Metric("peak_rss_mib", "daemon peak RSS MiB", False, 0),
        Metric("cpu_seconds", "daemon CPU s (writes+drain)", False, 2),
        # Steadier than files/s on a shared machine: other tenants stretch the wall clock,
        # much less the CPU the daemon spends per file (compare builds by this).
        Metric("cpu_ms_per_file", "daemon CPU ms/file (writes)", False, 2),
        Metric("client_cpu_seconds", "client CPU s (writes)", False, 2),
        Metric("server_cpu_seconds", "S3 server CPU s (writes)", False, 2),
        Metric("other_cpu_seconds", "other CPU s (writes, noise)", False, 2),
    )

    def run(self, system: System, repeat: int) -> Sample:
        study = self.ctx.study
        if isinstance(system, Boto3System):
            with CpuMeter(self.ctx, system) as cpu:
                timing = system.put_study(repeat)
            metrics = {"files_per_s": timing.files_per_second, "seconds": timing.seconds,
                       "total_seconds": timing.seconds, **cpu.metrics()}
            return Sample(system.name, self.name, repeat, metrics, {"what": f"{system.threads} threads PUT the files"})
        assert isinstance(system, FsSystem)
        run = timed_writes(self.ctx, system, f"{self.name}-r{repeat}",
                           lambda root: ingest(root, study, fsync=self.fsync, io_size=self.io_size))
        metrics = {
            "files_per_s": run.timing.files_per_second,
            "seconds": run.timing.seconds,
            "drain_seconds": run.drain,
            "total_seconds": run.timing.seconds + run.drain,
            **run.whole,
            **run.cpu.metrics(run.during.get("cpu_seconds")),
        }
        if "cpu_seconds" in run.during and run.timing.files:
            metrics["cpu_ms_per_file"] = run.during["cpu_seconds"] * 1000 / run.timing.files
        return Sample(system.name, self.name, repeat, metrics, run.info)

    def profile(self, system: System, output: Path) -> dict[str, Any] | None:
        if not isinstance(system, FsSystem) or not system.does_ingest:
            return None
        root = system.start_ingest("profile")
        pid = system.daemon_pid()
        if pid is None:
            system.finish_ingest()
            return None
        with pyspy.PySpyRecord(pid, output):
            timing = ingest(root, self.ctx.study, fsync=self.fsync, io_size=self.io_size)
        system.finish_ingest()
        return {"what": "the writes (not the umount)", "profiled_seconds": timing.seconds, **pyspy.summarize(output)}

    def verdicts(self, summary: dict[str, dict[str, dict[str, float]]], samples: Sequence[Sample]) -> list[Verdict]:
        label = f"{self.name} files/s"
        return [versus(summary, "files_per_s", label, "gocryptfs", 1.0), versus(summary, "files_per_s", label, "rclone", 2.0)]


@register_workload
class IngestFsync(StudyIngest):
    name = "ingest-4k-fsync"
    description = (
        "study ingest as Orthanc does it: like study-ingest, but each file written in 4 KiB "
        "writes and fdatasync'ed before close"
    )
    io_size = 4096
    fsync = True


@register_workload
class StudyRead(Workload):
    name = "study-read"
    description = (
        "a viewer opens a CT study: every file in instance order, one reader, open / read to EOF "
        "in 1 MiB reads / close. Cold: mifs unmounted, its cache dir's chunks/ wiped (meta.db "
        "kept), mounted again, so every byte comes from S3; disk: page cache dropped. Hot: the "
        "same read again without remount. boto3: the study as one object per file (PUT once, "
        "untimed), listed, then GET with 8 threads (cold = the GETs, listing reported apart)"
    )
    metrics = (
        Metric("cold_seconds", "cold s", False, 2),
        Metric("cold_files_per_s", "cold files/s", True, 0, primary=True),
        Metric("hot_seconds", "hot s", False, 3),
        Metric("hot_files_per_s", "hot files/s", True, 0, primary=True),
        Metric("peak_rss_mib", "daemon peak RSS MiB", False, 0),
        Metric("cpu_seconds", "daemon CPU s (cold)", False, 2),
        Metric("client_cpu_seconds", "client CPU s (cold)", False, 2),
        Metric("server_cpu_seconds", "S3 server CPU s (cold)", False, 2),
        Metric("other_cpu_seconds", "other CPU s (cold, noise)", False, 2),
    )

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self._verified: set[str] = set()

    def supports(self, system: System) -> bool:
        return isinstance(system, Boto3System) or (isinstance(system, FsSystem) and system.does_read)

    def prepare(self, system: System) -> None:
        if isinstance(system, (FsSystem, Boto3System)):
            system.prepare_read()

    def run(self, system: System, repeat: int) -> Sample:
        study = self.ctx.study
        if isinstance(system, Boto3System):
            list_seconds, keys = system.list_objects()
            with CpuMeter(self.ctx, system) as cpu:
                timing = system.get_objects(keys)
            seconds = timing.seconds
            metrics = {"cold_seconds": seconds, "cold_files_per_s": len(study.files) / seconds, **cpu.metrics()}
            info = {"list_seconds": list_seconds, "objects": len(keys), "bytes": timing.bytes,
                    "list_plus_get_seconds": list_seconds + seconds}
            if len(keys) != len(study.files):
                raise BenchError(f"raw boto3's copy of the study has {len(keys)} objects for {len(study.files)} files")
            return Sample(system.name, self.name, repeat, metrics, info)
        assert isinstance(system, FsSystem)
        root = system.make_cold()
        before = system.daemon()
        with CpuMeter(self.ctx, system) as cpu:
            cold = read_all(root, study)
        after_cold = system.daemon()
        hot = read_all(root, study)
        after_hot = system.daemon()
        metrics = {
            "cold_seconds": cold.seconds,
            "cold_files_per_s": cold.files_per_second,
            "hot_seconds": hot.seconds,
            "hot_files_per_s": hot.files_per_second,
        }
        daemon = _daemon_metrics(before, after_cold)
        if "cpu_seconds" in daemon:
            metrics["cpu_seconds"] = daemon["cpu_seconds"]
        metrics.update(cpu.metrics(daemon.get("cpu_seconds")))
        if after_hot is not None and after_hot.peak_rss_bytes is not None:
            metrics["peak_rss_mib"] = float(mib(after_hot.peak_rss_bytes) or 0.0)
        info = system.read_info()
        sys_before = before.system_cpu_seconds if before is not None else None
        sys_after = after_cold.system_cpu_seconds if after_cold is not None else None
        if sys_before is not None and sys_after is not None:  # the kernel's share of the daemon's CPU
            info["daemon_system_cpu_seconds_cold"] = sys_after - sys_before
        if system.name not in self._verified:  # once per system, untimed
            verify(root, study)
            self._verified.add(system.name)
            info["verified"] = True
        return Sample(system.name, self.name, repeat, metrics, info)

    def profile(self, system: System, output: Path) -> dict[str, Any] | None:
        if not isinstance(system, FsSystem):
            return None
        root = system.make_cold()
        pid = system.daemon_pid()
        if pid is None:
            return None
        with pyspy.PySpyRecord(pid, output):
            timing = read_all(root, self.ctx.study)
        return {"what": "the cold read", "profiled_seconds": timing.seconds, **pyspy.summarize(output)}

    def verdicts(self, summary: dict[str, dict[str, dict[str, float]]], samples: Sequence[Sample]) -> list[Verdict]:
        """mifs cold read / boto3 GETs, on the medians; the detail adds the ratio within each
        repeat (the systems ran minutes apart at most, so a busy spell hits both less unevenly)."""
        limit = self.ctx.options.ratio_limit
        raw_by_repeat = {s.repeat: s.metrics["cold_seconds"] for s in samples if s.system == Boto3System.name}
        raw = summary.get(Boto3System.name, {}).get("cold_seconds", {}).get("median")
        out = []
        for system, label in ((MifsSystem.name, "with prefetch"), (MifsNoPrefetchSystem.name, "without prefetch")):
            mine = summary.get(system, {}).get("cold_seconds", {}).get("median")
            name = f"cold study read, mifs {label} / raw boto3 8 GETs (time ratio)"
            if mine is None or raw is None or raw <= 0:
                if system == MifsSystem.name:
                    out.append(Verdict(name, None, limit, None, "not measured (needs systems mifs and boto3)"))
                continue
            ratio = mine / raw
            paired = [s.metrics["cold_seconds"] / raw_by_repeat[s.repeat] for s in samples
                      if s.system == system and s.repeat in raw_by_repeat]
            detail = f"medians {mine:.2f} s / {raw:.2f} s"
            if len(paired) > 1:
                detail += f"; per repeat {', '.join(f'{p:.2f}' for p in paired)}, median {statistics.median(paired):.2f}"
            if system == MifsSystem.name:
                out.append(Verdict(name, ratio, limit, ratio <= limit, detail))
            else:
                out.append(Verdict(name, ratio, limit, None, detail + " (reference, no target)"))
        out.append(versus(summary, "cold_files_per_s", "cold study read files/s (prefetch)", "s3fs", 2.0))
        out.append(versus(summary, "cold_files_per_s", "cold study read files/s (prefetch)", "rclone", 3.0))
        out.append(versus(summary, "hot_files_per_s", "hot study read files/s", "gocryptfs", 1.0))
        return out


def _seq_size(ctx: Any) -> int:
    return int(ctx.options.seq_mib) * IO_SIZE


def _per_gib(cpu: float | None, size: int) -> float | None:
    return None if cpu is None or size <= 0 else cpu / (size / GiB)


@register_workload
class SeqWrite(WriteWorkload):
    name = "seq-write"
    description = (
        "one large file (1 GiB; --seq-mib) written in 1 MiB writes and closed, MiB/s create to "
        "close (no fsync); then made durable as in study-ingest (drain). The daemon's peak RSS "
        "is its high-water mark at the end of the writes. boto3: one multipart upload, 8 MiB "
        "parts, 8 threads"
    )
    metrics = (
        Metric("mib_per_s", "write MiB/s", True, 0, primary=True),
        Metric("seconds", "write s", False, 2),
        Metric("drain_seconds", "drain s", False, 2),
        Metric("total_mib_per_s", "write+drain MiB/s", True, 0, primary=True),
        Metric("peak_rss_mib", "daemon peak RSS MiB (write)", False, 0),
        Metric("cpu_s_per_gib", "daemon CPU s/GiB (write+drain)", False, 2),
        Metric("client_cpu_seconds", "client CPU s (write)", False, 2),
        Metric("server_cpu_seconds", "S3 server CPU s (write)", False, 2),
        Metric("other_cpu_seconds", "other CPU s (write, noise)", False, 2),
    )

    def run(self, system: System, repeat: int) -> Sample:
        size = _seq_size(self.ctx)
        if isinstance(system, Boto3System):
            with CpuMeter(self.ctx, system) as cpu:
                timing = system.put_seq(f"raw-seq-write/r{repeat}", size)
            raw = {"mib_per_s": timing.mib_per_second, "seconds": timing.seconds,
                   "total_mib_per_s": timing.mib_per_second, **cpu.metrics()}
            return Sample(system.name, self.name, repeat, raw, {"what": "multipart upload, 8 MiB parts, 8 threads"})
        assert isinstance(system, FsSystem)
        run = timed_writes(self.ctx, system, f"{self.name}-r{repeat}", lambda root: write_seq(root, size))
        timing = run.timing
        metrics: dict[str, float] = {
            "mib_per_s": timing.mib_per_second,
            "seconds": timing.seconds,
            "drain_seconds": run.drain,
            "total_mib_per_s": timing.bytes / (1024 * 1024) / (timing.seconds + run.drain),
        }
        if "peak_rss_mib" in run.during:
            metrics["peak_rss_mib"] = run.during["peak_rss_mib"]
        per_gib = _per_gib(run.whole.get("cpu_seconds"), timing.bytes)
        if per_gib is not None:
            metrics["cpu_s_per_gib"] = per_gib
        metrics.update(run.cpu.metrics(run.during.get("cpu_seconds")))
        if "peak_rss_mib" in run.whole:
            run.info["peak_rss_mib_with_drain"] = run.whole["peak_rss_mib"]
        return Sample(system.name, self.name, repeat, metrics, run.info)

    def verdicts(self, summary: dict[str, dict[str, dict[str, float]]], samples: Sequence[Sample]) -> list[Verdict]:
        label = "1 GiB sequential write MiB/s"
        return [
            versus(summary, "mib_per_s", label, "gocryptfs", 1.2),
            versus(summary, "mib_per_s", label, "rclone", 0.8),
            at_most(summary, "peak_rss_mib", "mifs daemon peak RSS MiB during the sequential write", 300.0),
        ]


@register_workload
class SeqRead(Workload):
    name = "seq-read"
    description = (
        "the large file of seq-write (stored once, untimed) read in 1 MiB reads: cold (mifs: "
        "unmounted, cache wiped, mounted; rclone: the same with its VFS cache; s3fs: remounted; "
        "gocryptfs, CryFS, disk: pages of the stored files dropped) and hot (again at once). "
        "boto3: ranged GETs of 8 MiB, 8 threads"
    )
    metrics = (
        Metric("cold_mib_per_s", "cold MiB/s", True, 0, primary=True),
        Metric("hot_mib_per_s", "hot MiB/s", True, 0, primary=True),
        Metric("cold_seconds", "cold s", False, 2),
        Metric("peak_rss_mib", "daemon peak RSS MiB", False, 0),
        Metric("cpu_s_per_gib", "daemon CPU s/GiB (cold)", False, 2),
        Metric("client_cpu_seconds", "client CPU s (cold)", False, 2),
        Metric("server_cpu_seconds", "S3 server CPU s (cold)", False, 2),
        Metric("other_cpu_seconds", "other CPU s (cold, noise)", False, 2),
    )

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self._verified: set[str] = set()

    def supports(self, system: System) -> bool:
        return (isinstance(system, FsSystem) and system.does_ingest and system.does_read) or isinstance(system, Boto3System)

    def prepare(self, system: System) -> None:
        size = _seq_size(self.ctx)
        if isinstance(system, Boto3System):
            system.put_seq("raw-seq-read/file", size)
        elif isinstance(system, FsSystem):
            system.prepare_dataset(SEQ, lambda root: write_seq(root, size))

    def run(self, system: System, repeat: int) -> Sample:
        size = _seq_size(self.ctx)
        if isinstance(system, Boto3System):
            with CpuMeter(self.ctx, system) as cpu:
                timing = system.get_seq("raw-seq-read/file", size)
            metrics = {"cold_mib_per_s": timing.mib_per_second, "cold_seconds": timing.seconds, **cpu.metrics()}
            return Sample(system.name, self.name, repeat, metrics, {"what": "ranged GETs, 8 MiB, 8 threads"})
        assert isinstance(system, FsSystem)
        root = system.cold_dataset(SEQ)
        before = system.daemon()
        with CpuMeter(self.ctx, system) as cpu:
            cold = read_seq(root, size)
        after_cold = system.daemon()
        hot = read_seq(root, size)
        after_hot = system.daemon()
        metrics = {"cold_mib_per_s": cold.mib_per_second, "hot_mib_per_s": hot.mib_per_second,
                   "cold_seconds": cold.seconds}
        daemon = _daemon_metrics(before, after_cold)
        per_gib = _per_gib(daemon.get("cpu_seconds"), cold.bytes)
        if per_gib is not None:
            metrics["cpu_s_per_gib"] = per_gib
        metrics.update(cpu.metrics(daemon.get("cpu_seconds")))
        if after_hot is not None and after_hot.peak_rss_bytes is not None:
            metrics["peak_rss_mib"] = float(mib(after_hot.peak_rss_bytes) or 0.0)
        info: dict[str, Any] = {}
        if system.name not in self._verified:  # once per system, untimed
            read_seq(root, size, check=True)
            self._verified.add(system.name)
            info["verified"] = True
        return Sample(system.name, self.name, repeat, metrics, info)

    def verdicts(self, summary: dict[str, dict[str, dict[str, float]]], samples: Sequence[Sample]) -> list[Verdict]:
        return [versus(summary, "hot_mib_per_s", "hot sequential read MiB/s", "gocryptfs", 1.0)]


@register_workload
class MetadataOps(Workload):
    name = "metadata"
    description = (
        "10k (--meta-files) empty files created in one directory (open O_CREAT|O_EXCL, close), "
        "listed with os.scandir + stat of every entry, unlinked; ops/s of each phase, on a fresh "
        "mount. RSS growth: the daemon's high-water mark after all creates minus after half"
    )
    metrics = (
        Metric("create_ops", "create ops/s", True, 0, primary=True),
        Metric("list_ops", "list+stat entries/s", True, 0, primary=True),
        Metric("delete_ops", "unlink ops/s", True, 0, primary=True),
        Metric("drain_seconds", "drain s", False, 2),
        Metric("peak_rss_mib", "daemon peak RSS MiB", False, 0),
        Metric("rss_growth_mib", "RSS growth MiB (2nd half of creates)", False, 1),
        Metric("cpu_seconds", "daemon CPU s", False, 2),
    )

    def supports(self, system: System) -> bool:
        return isinstance(system, FsSystem) and system.does_ingest

    def run(self, system: System, repeat: int) -> Sample:
        assert isinstance(system, FsSystem)
        count = int(self.ctx.options.meta_files)
        root = system.start_ingest(f"{self.name}-r{repeat}")
        folder = os.path.join(root, "many")
        os.mkdir(folder)
        names = [os.path.join(folder, f"IM{i:06d}.dcm") for i in range(count)]
        before = system.daemon()
        half_sample = None
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        begin = time.perf_counter()
        for i, path in enumerate(names):
            os.close(os.open(path, flags, 0o644))
            if i == count // 2:
                half_sample = system.daemon()
        created = time.perf_counter()
        full_sample = system.daemon()
        seen = 0
        with os.scandir(folder) as entries:
            for entry in entries:
                entry.stat(follow_symlinks=False)
                seen += 1
        listed = time.perf_counter()
        if seen != count:
            raise BenchError(f"{system.name}: listed {seen} entries, created {count}")
        for path in names:
            os.unlink(path)
        deleted = time.perf_counter()
        if os.listdir(folder):
            raise BenchError(f"{system.name}: the directory is not empty after the unlinks")
        drain, final, info = system.finish_ingest()
        metrics = {
            "create_ops": count / (created - begin),
            "list_ops": count / (listed - created),
            "delete_ops": count / (deleted - listed),
            "drain_seconds": drain,
            **_daemon_metrics(before, final),
        }
        if half_sample is not None and full_sample is not None and half_sample.peak_rss_bytes and full_sample.peak_rss_bytes:
            metrics["rss_growth_mib"] = (full_sample.peak_rss_bytes - half_sample.peak_rss_bytes) / (1024 * 1024)
        return Sample(system.name, self.name, repeat, metrics, info)

    def verdicts(self, summary: dict[str, dict[str, dict[str, float]]], samples: Sequence[Sample]) -> list[Verdict]:
        return [
            versus(summary, "create_ops", "metadata creates/s", "gocryptfs", 0.5),
            versus(summary, "list_ops", "metadata list+stat entries/s", "gocryptfs", 0.5),
            versus(summary, "delete_ops", "metadata unlinks/s", "gocryptfs", 0.5),
            at_most(summary, "rss_growth_mib", "mifs memory does not grow with files written: RSS growth MiB "
                    "over the 2nd half of the creates", RSS_GROWTH_LIMIT_MIB),
        ]


RSS_GROWTH_LIMIT_MIB = 16.0


@register_workload
class Drain(WriteWorkload):
    name = "drain"
    description = (
        "time until everything written is in the store: the study ingested as in study-ingest, "
        "then waited for until the system reports nothing pending (mifs: `mifs sync`, which returns "
        "once the chunks and the metadata naming them are in the store; a mifs without it: `mifs status` "
        "pending_uploads 0, polled; rclone: `vfs/stats` no upload queued or in flight; s3fs: "
        "writes are synchronous; local systems: sync), then unmounted. *in store s* = first "
        "write until nothing pending; raw boto3: 8 threads PUT the same bytes. Cost per study: "
        "S3 requests counted by SeaweedFS (all types, writes+drain+unmount) and bytes stored"
    )
    metrics = (
        Metric("store_seconds", "in store s (writes+drain)", False, 2, primary=True),
        Metric("write_seconds", "writes s", False, 2),
        Metric("drain_seconds", "drain s (after writes)", False, 2),
        Metric("unmount_seconds", "unmount s", False, 2),
        Metric("requests", "S3 requests/study", False, 0),
        Metric("put_requests", "S3 PUTs/study", False, 0),
        Metric("stored_mib", "stored MiB/study", False, 1),
        Metric("stored_objects", "stored objects/study", False, 0),
        Metric("cpu_seconds", "daemon CPU s", False, 2),
    )

    def _requests(self, system: System) -> dict[str, float] | None:
        return self.ctx.s3.request_counts() if system.uses_s3 else None

    def run(self, system: System, repeat: int) -> Sample:
        study = self.ctx.study
        info: dict[str, Any] = {}
        metrics: dict[str, float] = {}
        if isinstance(system, Boto3System):
            counts_before = self._requests(system)
            timing = system.put_study(repeat)
            metrics.update(store_seconds=timing.seconds, write_seconds=timing.seconds,
                           stored_mib=timing.bytes / (1024 * 1024), stored_objects=float(timing.files))
        else:
            assert isinstance(system, FsSystem)
            root = system.start_ingest(f"{self.name}-r{repeat}")
            counts_before = self._requests(system)  # after the mount: per study, not per volume
            before = system.daemon()
            timing = ingest(root, study)
            end_of_writes = time.perf_counter()
            system.wait_durable()
            drain = time.perf_counter() - end_of_writes
            unmount, final, info = system.finish_ingest()
            metrics.update(store_seconds=timing.seconds + drain, write_seconds=timing.seconds,
                           drain_seconds=drain, unmount_seconds=unmount, **_daemon_metrics(before, final))
            metrics.pop("peak_rss_mib", None)
            if "stored_bytes" in info:
                metrics["stored_mib"] = float(info["stored_bytes"]) / (1024 * 1024)
            if "stored_objects" in info:
                metrics["stored_objects"] = float(info["stored_objects"])
        counts_after = self._requests(system)
        if counts_before is not None and counts_after is not None:
            delta = {k: counts_after.get(k, 0.0) - counts_before.get(k, 0.0) for k in counts_after}
            delta = {k: v for k, v in delta.items() if v}
            info["requests_by_type"] = delta
            metrics["requests"] = sum(delta.values())
            metrics["put_requests"] = delta.get("PUT", 0.0)
        return Sample(system.name, self.name, repeat, metrics, info)

    def verdicts(self, summary: dict[str, dict[str, dict[str, float]]], samples: Sequence[Sample]) -> list[Verdict]:
        mine = _median(summary, MifsSystem.name, "store_seconds")
        raw = _median(summary, Boto3System.name, "store_seconds")
        name = "time until the study is in the store: mifs (writes+drain) / raw boto3 8 PUTs"
        if mine is None or raw is None or raw <= 0:
            return [Verdict(name, None, 1.2, None, "not measured (needs systems mifs and boto3)")]
        drain = _median(summary, MifsSystem.name, "drain_seconds")
        detail = f"medians {mine:.2f} s / {raw:.2f} s" + (f"; drain after the writes alone {drain:.2f} s" if drain is not None else "")
        return [Verdict(name, mine / raw, 1.2, mine / raw <= 1.2, detail)]
