"""The workloads: what a PACS and a viewer do with a CT study, measured the same way on every system.

Must not import mifs. A workload owns the client side (bench.study) and the timing; systems
only provide directories, cold caches and durability (bench.systems).
"""

from __future__ import annotations

import resource
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import profile as pyspy
from bench.procs import cpu_seconds, machine_busy_seconds
from bench.registry import Metric, Sample, System, Verdict, Workload, register_workload
from bench.study import ingest, read_all, verify
from bench.systems import Boto3System, FsSystem, MifsNoPrefetchSystem, MifsSystem, mib


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


@register_workload
class StudyIngest(Workload):
    name = "study-ingest"
    description = (
        "a PACS stores one CT study: each file written in 1 MiB writes under a temporary name, "
        "closed, renamed into Patient/Study/Series dirs; then made durable where it belongs "
        "(mifs: `mifs umount`, which waits for every upload; disk: sync)"
    )
    metrics = (
        Metric("files_per_s", "ingest files/s", True, 0),
        Metric("seconds", "ingest s", False, 2),
        Metric("drain_seconds", "drain s (umount/sync)", False, 2),
        Metric("total_seconds", "ingest+drain s", False, 2),
        Metric("peak_rss_mib", "daemon peak RSS MiB", False, 0),
        Metric("cpu_seconds", "daemon CPU s (writes+drain)", False, 2),
        Metric("client_cpu_seconds", "client CPU s (writes)", False, 2),
        Metric("server_cpu_seconds", "S3 server CPU s (writes)", False, 2),
        Metric("other_cpu_seconds", "other CPU s (writes, noise)", False, 2),
    )

    def supports(self, system: System) -> bool:
        return (isinstance(system, FsSystem) and system.does_ingest) or isinstance(system, Boto3System)

    def run(self, system: System, repeat: int) -> Sample:
        study = self.ctx.study
        if isinstance(system, Boto3System):
            with CpuMeter(self.ctx, system) as cpu:
                timing = system.put_study(repeat)
            metrics = {"files_per_s": timing.files_per_second, "seconds": timing.seconds,
                       "total_seconds": timing.seconds, **cpu.metrics()}
            return Sample(system.name, self.name, repeat, metrics, {"what": f"{system.threads} threads PUT the files"})
        assert isinstance(system, FsSystem)
        root = system.start_ingest(f"r{repeat}")
        before = system.daemon()
        with CpuMeter(self.ctx, system) as cpu:  # the writes only: umount runs CLI processes
            timing = ingest(root, study)
        written = system.daemon()
        drain, final, info = system.finish_ingest()
        metrics = {
            "files_per_s": timing.files_per_second,
            "seconds": timing.seconds,
            "drain_seconds": drain,
            "total_seconds": timing.seconds + drain,
            **_daemon_metrics(before, final),
            **cpu.metrics(_daemon_metrics(before, written).get("cpu_seconds")),
        }
        return Sample(system.name, self.name, repeat, metrics, info)

    def profile(self, system: System, output: Path) -> dict[str, Any] | None:
        if not isinstance(system, FsSystem) or not system.does_ingest:
            return None
        root = system.start_ingest("profile")
        pid = system.daemon_pid()
        if pid is None:
            system.finish_ingest()
            return None
        with pyspy.PySpyRecord(pid, output):
            timing = ingest(root, self.ctx.study)
        system.finish_ingest()
        return {"what": "the writes (not the umount)", "profiled_seconds": timing.seconds, **pyspy.summarize(output)}


@register_workload
class StudyRead(Workload):
    name = "study-read"
    description = (
        "a viewer opens a CT study: every file in instance order, one reader, open / read to EOF "
        "in 1 MiB reads / close. Cold: mifs unmounted, its cache dir's chunks/ wiped (meta.db "
        "kept), mounted again, so every byte comes from S3; disk: page cache dropped. Hot: the "
        "same read again without remount. boto3: list the archive's data/ objects, GET all of "
        "them with 8 threads (cold = the GETs, listing reported apart)"
    )
    metrics = (
        Metric("cold_seconds", "cold s", False, 2),
        Metric("cold_files_per_s", "cold files/s", True, 0),
        Metric("hot_seconds", "hot s", False, 3),
        Metric("hot_files_per_s", "hot files/s", True, 0),
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
        return isinstance(system, (FsSystem, Boto3System))

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
                self.ctx.note(f"the read archive has {len(keys)} data objects for {len(study.files)} files")
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
        return out
