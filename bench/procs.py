"""Processes and mounts seen from outside: a daemon's peak memory and CPU, the mount table,
commands with deadlines, conditions waited for with deadlines.

Must not import mifs and knows no particular file system.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from bench.registry import BenchError

_T = TypeVar("_T")
_CLK_TCK = os.sysconf("SC_CLK_TCK")
MiB = 1024 * 1024


def wait_until(condition: Callable[[], _T], timeout: float, what: str, interval: float = 0.05) -> _T:
    """Poll `condition` until it returns something truthy; BenchError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def run(
    argv: Sequence[str], *, env: Mapping[str, str] | None = None, timeout: float = 300.0, cwd: str = "/"
) -> subprocess.CompletedProcess[str]:
    """Run a command; its output goes to files, not pipes, so a daemon it leaves behind
    holding stdout cannot make us wait. A timeout kills it and raises BenchError."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env, cwd=cwd)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise BenchError(f"`{' '.join(argv)}` did not finish within {timeout:.0f} s") from None
        except BaseException:  # Ctrl-C: do not leave the child running
            proc.kill()
            proc.wait()
            raise
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(
            list(argv), code, out.read().decode(errors="replace"), err.read().decode(errors="replace")
        )


# --- one process -----------------------------------------------------------------------------


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def peak_rss_bytes(pid: int) -> int | None:
    """VmHWM: the largest resident set the process has had since it started."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def cpu_split(pid: int) -> tuple[float, float] | None:
    """(user, system) CPU seconds of all the process's threads so far."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return int(fields[11]) / _CLK_TCK, int(fields[12]) / _CLK_TCK  # utime, stime (fields 14, 15)
    except (OSError, IndexError, ValueError):
        return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of all the process's threads so far."""
    split = cpu_split(pid)
    return None if split is None else split[0] + split[1]


@dataclass(frozen=True)
class ProcSample:
    peak_rss_bytes: int | None
    cpu_seconds: float | None
    system_cpu_seconds: float | None = None
    """The kernel's part of cpu_seconds (syscalls, page faults, FUSE and socket copies)."""


def reset_peak_rss(pid: int) -> bool:
    """Reset the process's VmHWM to its current RSS (/proc/PID/clear_refs, "5"; Linux >= 4.0,
    root): the peak then covers the workload, not start-up (CryFS's scrypt at mount takes
    ~1 GiB for a moment). False if the kernel refused."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class ProcWatcher:
    """Follows one daemon from mount to exit: the last peak RSS and CPU time seen, so the
    values are still known after the process is gone (umount waits for its exit). The peak
    RSS counts from when the watcher starts (right after the mount)."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.peak_reset = reset_peak_rss(pid)
        self._interval = interval
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._last = ProcSample(None, None)
        self._update()
        self._thread = threading.Thread(target=self._poll, name=f"watch-{pid}", daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            if not self._update():
                return
            self._stop.wait(self._interval)

    def _update(self) -> bool:
        rss, cpu = peak_rss_bytes(self.pid), cpu_split(self.pid)
        if rss is None or cpu is None:
            return False
        with self._lock:
            self._last = ProcSample(rss, cpu[0] + cpu[1], cpu[1])
        return True

    def sample(self) -> ProcSample:
        """The values now (or the last ones seen, once the process has exited)."""
        self._update()
        with self._lock:
            return self._last

    def stop(self) -> ProcSample:
        self._stop.set()
        self._thread.join()
        return self.sample()


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs of the machine spent busy since boot (/proc/stat: everything but
    idle and iowait); differences over a phase show how much else was running."""
    with open("/proc/stat", encoding="ascii") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal (guest is included in user)
    busy = sum(fields[:8]) - fields[3] - fields[4]
    return busy / _CLK_TCK


def load_average() -> float:
    with open("/proc/loadavg", encoding="ascii") as fh:
        return float(fh.read().split()[0])


# --- the mount table -------------------------------------------------------------------------


def _mountinfo() -> list[tuple[str, str]]:
    """(mount point, fstype) of every mount, in mount order."""
    result = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            left, _, right = line.partition(" - ")
            point = left.split()[4].replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")
            result.append((point, right.split()[0]))
    return result


def mount_fstype(path: Path) -> str | None:
    """The fs type mounted exactly at `path`, or None (works for a dead FUSE mount, which
    os.path.ismount() reports as not mounted)."""
    target = os.path.realpath(path)
    fstype = None
    for point, kind in _mountinfo():
        if point == target:
            fstype = kind
    return fstype


def mounts_under(base: Path) -> list[str]:
    root = os.path.realpath(base)
    return [p for p, _ in _mountinfo() if p == root or p.startswith(root + "/")]


def lazy_unmount(mountpoint: Path) -> None:
    """`fusermount3 -u -z` and wait until the mount table no longer lists it."""
    if mount_fstype(mountpoint) is None:
        return
    subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True, timeout=60, check=False)
    wait_until(lambda: mount_fstype(mountpoint) is None, 30, f"{mountpoint} to leave the mount table")
