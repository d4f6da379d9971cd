"""Ingest cost of the audit trail: N files of S bytes written through a mount on a local store.

Usage: python -m bench.audit_ingest [--files 400] [--size 512KiB] [--base-tree DIR] [--rounds 3]
Runs the CLI of this tree (with the audit trail) and, with --base-tree, of another checkout
(without it), alternating rounds, and prints the median seconds and MB/s of each.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TREE = Path(__file__).resolve().parent.parent


def cli(tree: Path, *args: object) -> None:
    env = dict(os.environ, PYTHONPATH=str(tree), MIFS_RUNTIME_DIR=str(Path(tempfile.gettempdir()) / "mifs-bench-rt"))
    subprocess.run([sys.executable, "-m", "mifs", *map(str, args)], check=True, env=env, stdout=subprocess.DEVNULL)


def one_round(tree: Path, files: int, size: int) -> float:
    base = Path(tempfile.mkdtemp(prefix="mifs-audit-bench-"))
    try:
        (base / "mnt").mkdir()
        cli(tree, "init", base / "store", "--key-file", base / "key")
        cli(tree, "mount", base / "store", base / "mnt", "--key-file", base / "key", "--cache-dir", base / "cache", "--no-index")
        payload = os.urandom(size)
        start = time.perf_counter()
        for i in range(files):
            d = base / "mnt" / f"d{i // 100}"
            d.mkdir(exist_ok=True)
            with open(d / f"f{i}.dcm", "wb") as fh:
                fh.write(payload)
        elapsed = time.perf_counter() - start
        cli(tree, "umount", base / "mnt")
        return elapsed
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(base / "mnt")], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--files", type=int, default=400)
    p.add_argument("--size", type=int, default=512 * 1024)
    p.add_argument("--base-tree", type=Path)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    trees = {"audit": TREE} | ({"base": args.base_tree} if args.base_tree else {})
    times: dict[str, list[float]] = {name: [] for name in trees}
    for _ in range(args.rounds):
        for name, tree in trees.items():
            times[name].append(one_round(tree, args.files, args.size))
    mb = args.files * args.size / 1e6
    for name, values in times.items():
        med = statistics.median(values)
        print(f"{name}: median {med:.2f}s ({mb / med:.0f} MB/s) over {values}")
    if "base" in times:
        cost = statistics.median(times["audit"]) / statistics.median(times["base"]) - 1
        print(f"audit cost: {cost * 100:+.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
