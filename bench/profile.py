"""Sampling a daemon with py-spy while a workload runs, and condensing its raw stacks into the
frames that take the time.

Must not import mifs. A profiled run is slower than an unprofiled one (py-spy pauses the
process to sample it), so its timings never enter the statistics.
"""

from __future__ import annotations

import collections
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import TracebackType
from typing import Any

from bench.procs import wait_until
from bench.registry import BenchError


def py_spy_path() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


class PySpyRecord:
    """`py-spy record --format raw` on `pid` for the duration of a with-block."""

    def __init__(self, pid: int, output: Path, *, rate: int = 200, gil: bool = True) -> None:
        """gil: sample only the thread holding the GIL. The daemon's Python work is serialised
        by the GIL, so these samples show what the daemon spends its one effective core on;
        without it py-spy also counts threads blocked in lock waits and socket reads as busy.
        --nonblocking: the target is not paused per sample (pausing a dozen threads 200 times
        a second slowed a cold read from 2.7 to 10 s)."""
        exe = py_spy_path()
        if exe is None:
            raise BenchError("py-spy is not installed (pip install py-spy)")
        self.argv = [exe, "record", "--pid", str(pid), "--format", "raw", "--output", str(output),
                     "--rate", str(rate), "--threads", "--nonblocking"] + (["--gil"] if gil else [])
        self.gil = gil
        self.output = output
        self.log = output.with_suffix(".log")
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> PySpyRecord:
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: "Sampling process" in self.log.read_text(errors="replace") or self.proc.poll() is not None,  # type: ignore[union-attr]
                       30, "py-spy to attach")
        except BaseException:
            self._stop()
            raise
        if self.proc.poll() is not None:
            raise BenchError(f"py-spy failed: {self.log.read_text(errors='replace').strip()[-300:]}")
        return self

    def _stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._stop()


_THREAD_RE = re.compile(r"^thread \((?:0x)?[0-9a-fA-F]+\): ")
_NUMBERED = re.compile(r"\d+")
_IDLE_LEAVES = (
    # Waiting, not working: py-spy does not always recognise these blocking calls as idle.
    "WorkerThread._work (trio/_core/_thread_cache.py",  # an idle trio worker thread (lock acquire)
    "EpollIOManager.get_events (trio/_core/_io_epoll.py",  # the trio loop in epoll_wait
    "Condition.wait (threading.py", "Event.wait (threading.py", "_wait_for_tstate_lock (threading.py",
    "select (selectors.py",
)
_ENTRY_FRAMES = re.compile(r"\((mifs/__main__\.py|mifs/cli/|mifs/mount\.py)")


def _function(frame: str) -> str:
    return re.sub(r":\d+\)$", ")", frame)


def summarize(raw: Path, top: int = 12, rate: int = 200) -> dict[str, Any]:
    """From py-spy's raw (collapsed) stacks: how many samples were busy (not waiting), busy
    samples per thread, the hottest leaf frames (self time), mifs functions by inclusive time
    (entry points left out), and the hottest stack tails. Percentages are of busy samples."""
    threads: collections.Counter[str] = collections.Counter()
    leaf: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    tails: collections.Counter[str] = collections.Counter()
    total = idle = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        thread = "?"
        if _THREAD_RE.match(stack):
            head, _, stack = _THREAD_RE.sub("", stack).partition(";")
            thread = _NUMBERED.sub("N", head)
        frames = [f for f in stack.split(";") if f]
        if not frames or frames[-1].startswith(_IDLE_LEAVES):
            idle += count
            continue
        threads[thread] += count
        leaf[frames[-1]] += count
        for function in {_function(f) for f in frames if "(mifs/" in f and not _ENTRY_FRAMES.search(f)}:
            inclusive[function] += count
        tails[" <- ".join(reversed(frames[-5:]))] += count
    busy = total - idle

    def share(counter: collections.Counter[str], limit: int = top) -> list[dict[str, Any]]:
        return [{"frame": k, "samples": v, "percent": round(100 * v / busy, 1) if busy else 0.0}
                for k, v in counter.most_common(limit)]

    return {"rate": rate, "samples": total, "idle_samples": idle, "busy_samples": busy, "threads": share(threads, 6),
            "self": share(leaf), "mifs_inclusive": share(inclusive), "stacks": share(tails, 8)}


def summary_markdown(summary: dict[str, Any]) -> list[str]:
    def block(title: str, key: str) -> list[str]:
        return ["", title, ""] + [f"- {t['percent']:5.1f}%  {t['frame']}" for t in summary[key]]

    rate = summary.get("rate") or 0
    seconds = summary.get("profiled_seconds") or 0
    held = f", the GIL held {100 * summary['samples'] / (rate * seconds):.0f}% of the time" if rate and seconds else ""
    lines = [f"py-spy --gil: {summary['samples']} samples of the thread holding the GIL{held}; "
             f"percentages below are of these samples ({summary['idle_samples']} of them, in a known wait, are left out)"]
    lines += block("GIL holder by thread (trio worker threads carry the name of their last job):", "threads")
    lines += block("Hottest frames (self time):", "self")
    lines += block("mifs functions by inclusive time:", "mifs_inclusive")
    lines += block("Hottest stack tails (leaf first):", "stacks")
    return lines
