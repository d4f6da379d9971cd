"""mifs as an admin sees it: the CLI (init, mount, umount, status), its daemon process, and
its cache dir, whose chunk files are wiped while unmounted to make a read cold.

Must not import mifs: the benchmark sees mifs only through its command line, its mount, its
cache dir and its store, exactly as it sees the peers it is compared with.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

from bench.procs import ProcSample, ProcWatcher, lazy_unmount, mount_fstype, pid_alive, run, wait_until
from bench.registry import BenchError
from bench.study import REPO_ROOT

CLI_TIMEOUT = 600.0  # umount waits for every upload


class MifsCli:
    """`python -m mifs` of this checkout (or of a copy of it), with the environment a daemon it
    starts inherits."""

    def __init__(self, extra_env: Mapping[str, str] | None = None, source_root: Path = REPO_ROOT) -> None:
        """source_root: the directory holding the `mifs` package to run (first on PYTHONPATH,
        so it wins over the editable install, whose finder comes after the path)."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(source_root)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env.update(extra_env or {})
        self.env = env

    def run(self, *args: object, timeout: float = CLI_TIMEOUT) -> Any:
        return run([sys.executable, "-m", "mifs", *(str(a) for a in args)], env=self.env, timeout=timeout)

    @cached_property
    def mount_help(self) -> str:
        result = self.run("mount", "--help", timeout=60)
        if result.returncode != 0:
            raise BenchError(f"`mifs mount --help` failed ({result.returncode}): {result.stderr.strip()[-500:]}")
        return str(result.stdout)

    def mount_supports(self, flag: str) -> bool:
        return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", self.mount_help) is not None

    @cached_property
    def has_sync(self) -> bool:
        """Whether this mifs has `mifs sync` (older ones: poll `mifs status` instead)."""
        return bool(self.run("sync", "--help", timeout=60).returncode == 0)

    def version(self) -> str:
        result = self.run("--version", timeout=60)
        return str(result.stdout).strip() if result.returncode == 0 else "unknown"


class MifsArchive:
    """One archive: store URL, key file, cache dir and mount point under `base`; at most one live mount."""

    def __init__(self, cli: MifsCli, base: Path, store_url: str, store_flags: Sequence[str], prefix: str = "") -> None:
        self.cli = cli
        self.prefix = prefix
        """Key prefix of the archive in its bucket."""
        self.base = base
        self.store_url = store_url
        self.store_flags = list(store_flags)
        self.key_file = base / "key"
        self.cache_dir = base / "cache"
        self.mountpoint = base / "mnt"
        base.mkdir(parents=True, exist_ok=True)
        self.mountpoint.mkdir(exist_ok=True)
        self.cache_dir.mkdir(mode=0o700, exist_ok=True)
        self.pid: int | None = None
        self.watcher: ProcWatcher | None = None
        self.mount_flags: tuple[str, ...] = ()

    def _fail(self, what: str, result: Any) -> BenchError:
        lines = (result.stderr.strip() or result.stdout.strip() or "(no output)").splitlines()
        return BenchError(f"`mifs {what}` exited {result.returncode}: {lines[-1] if lines else ''}")

    def init(self) -> None:
        result = self.cli.run("init", self.store_url, "--key-file", self.key_file, *self.store_flags)
        if result.returncode != 0:
            raise self._fail("init", result)

    @property
    def mounted(self) -> bool:
        return mount_fstype(self.mountpoint) is not None

    def mount(self, flags: Sequence[str] = ()) -> None:
        if self.mounted:
            raise BenchError(f"{self.mountpoint} is already mounted")
        result = self.cli.run(
            "mount", self.store_url, self.mountpoint, "--key-file", self.key_file,
            "--cache-dir", self.cache_dir, *self.store_flags, *flags,
        )
        if result.returncode != 0:
            self.force_cleanup()
            raise BenchError(f"{self._fail('mount ' + ' '.join(flags), result)}\n{self.log_tail()}")
        self.mount_flags = tuple(flags)
        pid = self.status().get("pid")
        if not isinstance(pid, int):
            raise BenchError("`mifs status --json` gave no daemon pid")
        self.pid = pid
        self.watcher = ProcWatcher(pid)

    def status(self) -> dict[str, Any]:
        """`mifs status MOUNTPOINT --json` of the live mount."""
        result = self.cli.run("status", self.mountpoint, "--json", timeout=120)
        if result.returncode != 0:
            raise self._fail("status", result)
        value = json.loads(result.stdout)
        if not isinstance(value, dict):
            raise BenchError("`mifs status --json` printed no object")
        return value

    def sync(self) -> None:
        """`mifs sync MOUNTPOINT`: returns once every file closed so far is in the store."""
        result = self.cli.run("sync", self.mountpoint, "--quiet")
        if result.returncode != 0:
            raise self._fail("sync", result)

    def offline_status(self) -> dict[str, Any]:
        """`mifs status STORE --json` with this cache dir, while unmounted."""
        result = self.cli.run(
            "status", self.store_url, "--json", "--key-file", self.key_file, "--cache-dir", self.cache_dir,
            *self.store_flags, timeout=120,
        )
        if result.returncode != 0:
            raise self._fail("status STORE", result)
        value = json.loads(result.stdout)
        return value if isinstance(value, dict) else {}

    def daemon(self) -> ProcSample:
        if self.watcher is None:
            return ProcSample(None, None)
        return self.watcher.sample()

    def umount(self) -> tuple[float, ProcSample]:
        """`mifs umount` (flush, upload everything, daemon exits): its seconds and the
        daemon's final peak RSS and CPU time."""
        begin = time.perf_counter()
        result = self.cli.run("umount", self.mountpoint)
        seconds = time.perf_counter() - begin
        if result.returncode != 0:
            self.force_cleanup()
            raise BenchError(f"{self._fail('umount', result)}\n{self.log_tail()}")
        pid = self.pid
        if pid is not None:
            wait_until(lambda: not pid_alive(pid), 30, "the mifs daemon to exit after umount")
        final = self.watcher.stop() if self.watcher is not None else ProcSample(None, None)
        self.pid, self.watcher = None, None
        return seconds, final

    def wipe_chunks(self) -> tuple[int, int]:
        """Delete the cache dir's chunk files (keep meta.db), so every read must go to the
        store. Refused while mounted or with uploads pending (those chunks exist nowhere else)."""
        if self.mounted or (self.pid is not None and pid_alive(self.pid)):
            raise BenchError("refusing to wipe the chunk cache of a mounted archive")
        pending = self.offline_status().get("pending_uploads")
        if pending:
            raise BenchError(f"refusing to wipe the chunk cache: {pending} uploads pending")
        count = size = 0
        chunks = self.cache_dir / "chunks"
        for dirpath, _dirs, files in os.walk(chunks):
            for name in files:
                path = os.path.join(dirpath, name)
                size += os.path.getsize(path)
                os.unlink(path)
                count += 1
        return count, size

    def force_cleanup(self) -> None:
        """Leave no mount and no daemon: a clean umount if possible, else kill and detach."""
        if self.mounted and self.pid is None:  # interrupted between `mifs mount` and status
            try:
                pid = self.status().get("pid")
                self.pid = pid if isinstance(pid, int) else None
            except (BenchError, ValueError):
                pass
        if self.mounted and self.pid is not None and pid_alive(self.pid):
            try:
                result = self.cli.run("umount", self.mountpoint, timeout=120)
                if result.returncode == 0:
                    wait_until(lambda: self.pid is None or not pid_alive(self.pid), 30, "the mifs daemon to exit")
            except BenchError:
                pass
        if self.pid is not None and pid_alive(self.pid):
            os.kill(self.pid, signal.SIGKILL)
            wait_until(lambda: self.pid is None or not pid_alive(self.pid), 30, "the killed mifs daemon to exit")
        lazy_unmount(self.mountpoint)
        if self.watcher is not None:
            self.watcher.stop()
        self.pid, self.watcher = None, None

    def discard(self) -> None:
        """After the last umount: delete the local cache dir (the run's temp dir must not
        fill the disk with every repeat's copy); the store keeps the objects."""
        if self.mounted or (self.pid is not None and pid_alive(self.pid)):
            raise BenchError("refusing to discard the cache of a mounted archive")
        shutil.rmtree(self.cache_dir, ignore_errors=True)

    def log_tail(self, lines: int = 15) -> str:
        log = self.cache_dir / "mifs.log"
        try:
            tail = log.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return "(no daemon log)"
        return f"last lines of {log}:\n" + "\n".join("  " + line for line in tail)
