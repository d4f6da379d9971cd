"""Command line of `python -m bench`: options, the list of workloads and systems, exit codes.

Must not import mifs nor measure anything itself (bench.runner does).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import bench.peers  # noqa: F401 - registers the peers
import bench.systems  # noqa: F401 - registers the systems
import bench.workloads  # noqa: F401 - registers the workloads
from bench.context import Options
from bench.registry import SYSTEMS, WORKLOADS
from bench.runner import run

DEFAULT_RESULTS = Path(__file__).resolve().parent / "results"


def _names(text: str, known: dict[str, object], what: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown {what}: {', '.join(unknown) or '(none)'}; known: {', '.join(known)}")
    return names


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark mifs on a local SeaweedFS S3 server against its peers (gocryptfs, "
        "CryFS, rclone crypt, s3fs: where installed), plain disk and raw boto3 (docs/PERFORMANCE.md). Needs root and /dev/fuse. Prints a markdown report; writes "
        "JSON and markdown to the results dir.",
        epilog="exit codes: 0 ok, 1 error, 2 usage, 3 a target missed (with --check), 130 interrupted",
    )
    p.add_argument("--workloads", "-w", default=",".join(WORKLOADS),
                   type=lambda t: _names(t, WORKLOADS, "workload"),  # type: ignore[arg-type]
                   help=f"comma-separated (default: all: {','.join(WORKLOADS)})")
    defaults = [n for n, c in SYSTEMS.items() if c.default]
    p.add_argument("--systems", "-s", default=",".join(defaults),
                   type=lambda t: _names(t, SYSTEMS, "system"),  # type: ignore[arg-type]
                   help=f"comma-separated (default: {','.join(defaults)})")
    p.add_argument("--quick", action="store_true",
                   help="small and fast (CI smoke run): 40 slices, 16 MiB file, 200 files, 1 repeat unless given")
    p.add_argument("--repeats", "-n", type=int, help="repeats per workload and system (default 3; --quick 1)")
    p.add_argument("--slices", type=int, help="CT slices per series (default 400; --quick 40)")
    p.add_argument("--series", type=int, default=1, help="series in the study (default 1)")
    p.add_argument("--seq-mib", type=int, help="size of the seq-write/seq-read file in MiB (default 1024; --quick 16)")
    p.add_argument("--meta-files", type=int, help="files the metadata workload creates (default 10000; --quick 200)")
    p.add_argument("--prefetch-parallel", type=int, metavar="N",
                   help="pass --prefetch-parallel N to `mifs mount` (if this mifs has it)")
    p.add_argument("--profile", action="store_true",
                   help="after the repeats, one extra cold study read per mifs system under py-spy (not in the statistics)")
    p.add_argument("--ratio-limit", type=float, default=1.5,
                   help="target: cold study read with prefetch / raw boto3 time (default 1.5)")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                   help="before each repeat, wait up to SECONDS for the 1-minute load average to drop "
                   "below --idle-load (other work on the machine makes figures noisy)")
    p.add_argument("--idle-load", type=float, default=1.0, help="load average counted as idle (default 1.0)")
    p.add_argument("--check", action="store_true", help="exit 3 if a target is missed")
    p.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS, help=f"default {DEFAULT_RESULTS}")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (/tmp/mifs-bench-*) for inspection")
    p.add_argument("--list", action="store_true", help="list workloads and systems and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.list:
        print("workloads:")
        for name, cls in WORKLOADS.items():
            print(f"  {name:18} {cls.description}")
        print("systems:")
        for name, scls in SYSTEMS.items():
            print(f"  {name:18} {scls.description}{'' if scls.default else ' (not by default)'}")
        return 0
    if os.geteuid() != 0:
        print("bench: error: run as root (FUSE mounts, dropping caches)", file=sys.stderr)
        return 2
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    slices = args.slices if args.slices is not None else (40 if args.quick else 400)
    seq_mib = args.seq_mib if args.seq_mib is not None else (16 if args.quick else 1024)
    meta_files = args.meta_files if args.meta_files is not None else (200 if args.quick else 10000)
    if min(repeats, slices, args.series, seq_mib, meta_files) < 1:
        print("bench: error: --repeats, --slices, --series, --seq-mib and --meta-files must be at least 1", file=sys.stderr)
        return 2
    options = Options(
        workloads=args.workloads,
        systems=args.systems,
        repeats=repeats,
        slices=slices,
        series=args.series,
        quick=args.quick,
        prefetch_parallel=args.prefetch_parallel,
        profile=args.profile,
        results_dir=args.results_dir.resolve(),
        keep=args.keep,
        ratio_limit=args.ratio_limit,
        check=args.check,
        wait_idle=args.wait_idle,
        idle_load=args.idle_load,
        seq_mib=seq_mib,
        meta_files=meta_files,
    )
    return run(options)
