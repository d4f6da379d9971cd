"""One benchmark run: set the systems up, prepare each workload once, run the repeats with the
systems interleaved (rotated each repeat), profile if asked, report, and always clean up.

Must not import mifs. Ctrl-C or SIGTERM stops the run, reports what was measured so far and
still unmounts everything and stops SeaweedFS.
"""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
import time
import traceback
from types import FrameType
from typing import Any

from bench import profile as pyspy
from bench.context import Context, Options
from bench.registry import SYSTEMS, WORKLOADS, BenchError, Sample, System, Verdict, Workload
from bench.procs import load_average
from bench.report import markdown, ratios, summarize, write_json
from bench.study import REPO_ROOT

EXIT_OK, EXIT_ERROR, EXIT_TARGET_MISSED, EXIT_INTERRUPTED = 0, 1, 3, 130


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _git_describe() -> str:
    try:
        rev = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", "mifs"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return rev + (" + uncommitted changes in mifs/" if dirty else "")


def _weed_version(ctx: Context) -> str:
    try:
        out = subprocess.run([str(ctx.s3.server.weed), "version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.strip().splitlines()[0] if out.strip() else "unknown"


def _wait_idle(ctx: Context) -> None:
    limit, threshold = ctx.options.wait_idle, ctx.options.idle_load
    if limit <= 0 or load_average() < threshold:
        return
    ctx.log(f"waiting up to {limit:.0f} s for the load average ({load_average():.1f}) to drop below {threshold}")
    deadline = time.monotonic() + limit
    while load_average() >= threshold and time.monotonic() < deadline:
        time.sleep(5)
    ctx.log(f"load average now {load_average():.1f}")


def _machine_line(m: dict[str, Any]) -> str:
    return (f"{m['cpus']} CPUs ({m['cpu_model']}), {m['memory_gib']} GiB RAM, {m['os']}, kernel {m['kernel']}, "
            f"Python {m['python']}")


def _brief(sample: Sample, workload: Workload) -> str:
    shown = []
    for m in workload.metrics:
        if m.key in sample.metrics:
            shown.append(f"{m.label} {sample.metrics[m.key]:.{m.digits}f}")
    return ", ".join(shown[:4])


def _profile(ctx: Context, workloads: list[Workload], systems: list[System], stamp: str) -> dict[str, Any]:
    """One extra run of each workload on each mifs system, under py-spy (the peers are not
    Python programs: py-spy cannot read them)."""
    out: dict[str, Any] = {}
    for workload in workloads:
        for system in systems:
            if system.role != "mifs" or not workload.supports(system):
                continue
            raw = ctx.options.results_dir / f"{stamp}-pyspy-{workload.name}-{system.name}.txt"
            raw.parent.mkdir(parents=True, exist_ok=True)
            ctx.log(f"profiling {workload.name} on {system.name} with py-spy")
            summary = workload.profile(system, raw)
            if summary is not None:
                summary["raw_file"] = str(raw)
                out[f"{workload.name} on {system.name}"] = summary
    return out


def run(options: Options) -> int:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    ctx = Context(options)
    # Ctrl-C, kill and a closed terminal all end in the same cleanup (also when started from a
    # shell that ignores SIGINT in background jobs).
    previous = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    samples: list[Sample] = []
    systems: list[System] = []
    workloads: list[Workload] = []
    profiles: dict[str, Any] = {}
    status, error = "complete", ""
    header: list[str] = []
    try:
        workloads = [WORKLOADS[name](ctx) for name in options.workloads]
        for name in options.systems:
            system = SYSTEMS[name](ctx)
            if not any(w.supports(system) for w in workloads):
                continue
            reason = system.unavailable()
            if reason:
                ctx.note(f"{name} skipped: {reason}")
                continue
            systems.append(system)
        if not systems:
            raise BenchError("no selected system supports the selected workloads")
        study = ctx.study
        for system in systems:
            system.setup()
            for n in system.notes:
                ctx.note(f"{system.name}: {n}")
        header = [
            f"machine: {_machine_line(ctx.describe_machine())}",
            f"mifs: {ctx.mifs.version()}, git {_git_describe()}, run from a copy of mifs/ taken at the start "
            f"(content hash {ctx.mifs_source}); "
            f"S3: SeaweedFS {_weed_version(ctx)} on 127.0.0.1",
            f"study: {len(study.files)} CT files ({study.series} series x {study.slices_per_series} slices, "
            f"512x512 16-bit), {study.total_bytes / 1e6:.1f} MB",
            f"repeats: {options.repeats} (median, min–max), systems interleaved (order rotated each repeat); "
            f"sequential file {options.seq_mib} MiB; metadata {options.meta_files} files",
        ]
        peers = [f"{s.name}: {s.version()}" for s in systems if hasattr(s, "version")]
        if peers:
            header.append("peers: " + "; ".join(peers))
        for workload in workloads:
            for system in systems:
                if workload.supports(system):
                    ctx.log(f"preparing {workload.name} on {system.name}")
                    workload.prepare(system)
        if ctx.read_archive_ingest is not None:
            t = ctx.read_archive_ingest
            ctx.log(f"(untimed) read archive ingested at {t.files_per_second:.0f} files/s")
        loads = [load_average()]
        for repeat in range(options.repeats):
            _wait_idle(ctx)
            loads.append(load_average())
            for workload in workloads:
                runnable = [s for s in systems if workload.supports(s)]
                shift = repeat % len(runnable) if runnable else 0
                for system in runnable[shift:] + runnable[:shift]:
                    ctx.log(f"repeat {repeat + 1}/{options.repeats}: {workload.name} on {system.name}")
                    load = load_average()
                    sample = workload.run(system, repeat)
                    sample.info["load_average_before"] = load
                    samples.append(sample)
                    ctx.log(f"  {_brief(sample, workload)}")
        loads.append(load_average())
        header.append(f"1-minute load average at the start and before each repeat and at the end: "
                      f"{', '.join(f'{x:.1f}' for x in loads)} ({os.cpu_count()} CPUs; well above 0 means other work ran)")
        if max(loads) > options.idle_load:
            ctx.note(f"the machine was busy with other work during the run (load average up to {max(loads):.1f}): "
                     "figures are noisy; see 'other CPU s'")
        if options.profile:
            profiles = _profile(ctx, workloads, systems, stamp)
    except KeyboardInterrupt:
        status = "interrupted"
        ctx.log("interrupted: cleaning up, then reporting what was measured")
    except BenchError as exc:
        status, error = "failed", str(exc)
        ctx.log(f"error: {exc}")
    except Exception as exc:  # a bug in the harness: say where, still clean up and report
        status, error = "failed", f"internal error: {exc!r}"
        traceback.print_exc()
    finally:
        for sig in previous:  # a second Ctrl-C must not skip the unmounts
            signal.signal(sig, signal.SIG_IGN)
        try:
            for system in systems:
                try:
                    system.close()
                except Exception as exc:  # noqa: BLE001 - keep cleaning up
                    ctx.log(f"closing {system.name} failed: {exc}")
            ctx.close()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return _report(ctx, stamp, status, error, header, workloads, systems, samples, profiles)


def _report(
    ctx: Context, stamp: str, status: str, error: str, header: list[str],
    workloads: list[Workload], systems: list[System], samples: list[Sample], profiles: dict[str, Any],
) -> int:
    options = ctx.options
    summary = summarize(samples)
    verdicts: list[Verdict] = []
    for workload in workloads:
        verdicts += workload.verdicts(summary.get(workload.name, {}), [s for s in samples if s.workload == workload.name])
    if status != "complete":
        ctx.note(f"run {status}" + (f": {error}" if error else "") + "; figures are partial")
    extra: list[str] = []
    for name, prof in profiles.items():
        extra += [f"### py-spy: {name}, {prof['what']} (profiled run: {prof['profiled_seconds']:.2f} s, "
                  f"not in the statistics; raw stacks in {prof['raw_file']})", ""]
        extra += pyspy.summary_markdown(prof) + [""]
    text = markdown(
        title=f"mifs benchmark {stamp}" + ("" if status == "complete" else f" ({status})"),
        header=header,
        workloads=workloads,
        systems=[s.name for s in systems],
        summary=summary,
        verdicts=verdicts,
        notes=ctx.notes,
        extra=extra,
        roles={s.name: s.role for s in systems},
    )
    document = {
        "started": stamp,
        "status": status,
        "error": error,
        "machine": ctx.describe_machine(),
        "header": header,
        "mifs_source": ctx.mifs_source,
        "options": {k: (str(v) if k == "results_dir" else v) for k, v in vars(options).items()},
        "study": ctx._study.describe() if ctx._study is not None else None,
        "systems": {s.name: s.description for s in systems},
        "roles": {s.name: s.role for s in systems},
        "ratios": ratios(summary, workloads, {s.name: s.role for s in systems}),
        "workloads": {w.name: w.description for w in workloads},
        "notes": ctx.notes,
        "summary": summary,
        "verdicts": [vars(v) for v in verdicts],
        "samples": [vars(s) for s in samples],
        "profiles": profiles,
    }
    if samples or status == "complete":
        path = options.results_dir / f"{stamp}.json"
        write_json(path, document)
        (options.results_dir / f"{stamp}.md").write_text(text)
        print(text)
        print(f"results: {path}", file=sys.stderr)
    if status == "interrupted":
        return EXIT_INTERRUPTED
    if status == "failed":
        print(f"bench: error: {error}", file=sys.stderr)
        return EXIT_ERROR
    if options.check and any(v.passed is False for v in verdicts):
        return EXIT_TARGET_MISSED
    return EXIT_OK
