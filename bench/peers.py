"""The peers: what an admin would mount instead of mifs. gocryptfs and CryFS (encrypted, on
local disk), rclone mount of a crypt remote over S3 with the full VFS cache, and s3fs-fuse
(S3, not encrypted), the last two on the run's SeaweedFS.

Must not import mifs. Each peer is an FsSystem driving the peer's own command line, as an admin
would: a fresh volume (cipher dir or S3 prefix) per ingest, one volume per dataset for the read
workloads. Every daemon runs in the foreground as our child (PR_SET_PDEATHSIG: it dies with
the harness) and is stopped in every exit path: fusermount3 -u, then SIGTERM/SIGKILL by pid,
then a lazy unmount. A peer whose program is missing is skipped with a note.
"""

from __future__ import annotations

import abc
import ctypes
import json
import os
import secrets
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from bench.procs import ProcSample, ProcWatcher, lazy_unmount, mount_fstype, pid_alive, run, wait_until
from bench.registry import BenchError, register_system
from bench.systems import FsSystem
from bench.study import drop_page_cache_tree, tree_bytes

MOUNT_TIMEOUT = 60.0
DRAIN_TIMEOUT = 900.0

_libc = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # in the child between fork and exec
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class Volume:
    """One mount of a peer: its backing store (a cipher dir, an S3 prefix), mount point,
    cache dir, and the daemon while mounted."""

    def __init__(self, name: str, base: Path) -> None:
        self.name = name
        self.base = base
        self.mountpoint = base / "mnt"
        self.backing = base / "backing"
        self.cache = base / "cache"
        self.log = base / "daemon.log"
        for path in (self.mountpoint, self.backing, self.cache):
            path.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None
        self.watcher: ProcWatcher | None = None
        self.prefix = ""
        """The S3 key prefix (S3 peers)."""
        self.extra: dict[str, Any] = {}

    @property
    def mounted(self) -> bool:
        return mount_fstype(self.mountpoint) is not None

    def daemon(self) -> ProcSample | None:
        return self.watcher.sample() if self.watcher is not None else None


class PeerSystem(FsSystem):
    """A FUSE peer: subclasses say how to create a volume, the daemon's argv, how to make a
    volume cold and how to make what was written durable."""

    program: ClassVar[str]
    package: ClassVar[str]
    role = "peer"

    def unavailable(self) -> str | None:
        if shutil.which(self.program) is None:
            return f"`{self.program}` is not installed (Debian: apt-get install {self.package})"
        return None

    version_args: ClassVar[tuple[str, ...]] = ("--version",)

    def version(self) -> str:
        result = run([self.program, *self.version_args], timeout=60)
        lines = (result.stdout or result.stderr).strip().splitlines()
        return lines[0].strip() if lines else "unknown version"

    def setup(self) -> None:
        self.base = self.ctx.tmp / self.name
        self.base.mkdir(parents=True, exist_ok=True)
        self.secret = secrets.token_hex(16)
        self.volumes: list[Volume] = []
        self.datasets: dict[str, Volume] = {}
        self.current: Volume | None = None
        self._count = 0
        self.ctx.register_cleanup(self._cleanup_all)
        self.configure()

    def configure(self) -> None:
        """Once, after setup: config and password files."""

    @abc.abstractmethod
    def create(self, volume: Volume) -> None:
        """Make an empty file system in the volume's backing store (untimed)."""

    @abc.abstractmethod
    def argv(self, volume: Volume) -> list[str]:
        """The daemon's command line, in the foreground."""

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def stdin_data(self) -> bytes | None:
        return None

    def drop_cache(self, volume: Volume) -> None:
        """While unmounted: make the next mount read from where the data lives."""

    def wait_volume_durable(self, volume: Volume) -> None:
        """While mounted, after the writes: return once everything is where it belongs
        (called before the unmount; the unmount itself is timed too). Default: sync."""
        os.sync()

    def wait_durable(self) -> None:
        assert self.current is not None
        self.wait_volume_durable(self.current)

    def stored(self, volume: Volume) -> dict[str, int]:
        """What the volume stores: objects (files) and bytes."""
        objects, size = tree_bytes(volume.backing)
        return {"stored_objects": objects, "stored_bytes": size}

    # --- mount and unmount --------------------------------------------------------------------

    def new_volume(self, tag: str) -> Volume:
        self._count += 1
        volume = Volume(tag, self.base / f"{self._count:03d}-{tag}")
        self.volumes.append(volume)
        self.create(volume)
        return volume

    def mount(self, volume: Volume) -> None:
        if volume.mounted:
            raise BenchError(f"{volume.mountpoint} is already mounted")
        stdin_data = self.stdin_data()
        with open(volume.log, "ab") as log:
            volume.proc = subprocess.Popen(
                self.argv(volume), stdin=subprocess.PIPE if stdin_data is not None else subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, env=self.env(), cwd="/",
                preexec_fn=_die_with_parent if threading.current_thread() is threading.main_thread() else None,
            )
        if stdin_data is not None:
            assert volume.proc.stdin is not None
            try:
                volume.proc.stdin.write(stdin_data)
                volume.proc.stdin.close()
            except BrokenPipeError:
                pass
        proc = volume.proc
        try:
            wait_until(lambda: volume.mounted or proc.poll() is not None, MOUNT_TIMEOUT, f"{self.name} to mount")
        except BenchError:
            self.unmount(volume, force=True)
            raise BenchError(f"{self.name} did not mount within {MOUNT_TIMEOUT:.0f} s: {self.log_tail(volume)}") from None
        if proc.poll() is not None and not volume.mounted:
            volume.proc = None
            raise BenchError(f"{self.name} exited {proc.returncode} instead of mounting: {self.log_tail(volume)}")
        volume.watcher = ProcWatcher(proc.pid)
        self.current = volume

    def unmount(self, volume: Volume, *, force: bool = False) -> ProcSample | None:
        """fusermount3 -u and wait for the daemon to exit; on failure (or force) SIGTERM,
        SIGKILL, lazy unmount. The daemon's final peak RSS and CPU."""
        proc = volume.proc
        final = volume.daemon()
        if volume.mounted and not force:
            result = run(["fusermount3", "-u", str(volume.mountpoint)], timeout=DRAIN_TIMEOUT)
            if result.returncode != 0:
                force = True
        if proc is not None:
            try:
                proc.wait(timeout=5 if force else DRAIN_TIMEOUT)
            except subprocess.TimeoutExpired:
                pass
            for sig in (signal.SIGTERM, signal.SIGKILL):
                if proc.poll() is None:
                    proc.send_signal(sig)
                    try:
                        proc.wait(timeout=15)
                    except subprocess.TimeoutExpired:
                        pass
        if volume.watcher is not None:
            final = volume.watcher.stop()
        volume.proc, volume.watcher = None, None
        lazy_unmount(volume.mountpoint)
        if self.current is volume:
            self.current = None
        if force:
            self.ctx.log(f"{self.name}: {volume.mountpoint} unmounted by force")
        return final

    def _cleanup_all(self) -> None:
        for volume in self.volumes:
            if volume.proc is not None or volume.mounted:
                self.unmount(volume)

    def close(self) -> None:
        self._cleanup_all()

    def log_tail(self, volume: Volume, lines: int = 5) -> str:
        try:
            tail = volume.log.read_text(errors="replace").strip().splitlines()[-lines:]
        except OSError:
            return "(no log)"
        return " | ".join(tail) or "(empty log)"

    # --- FsSystem --------------------------------------------------------------------------------

    def daemon(self) -> ProcSample | None:
        return self.current.daemon() if self.current is not None else None

    def daemon_pid(self) -> int | None:
        cur = self.current
        return cur.proc.pid if cur is not None and cur.proc is not None else None

    def start_ingest(self, tag: str) -> Path:
        self._unmount_others(None)
        volume = self.new_volume(f"ingest-{tag}")
        self.mount(volume)
        return volume.mountpoint

    def finish_ingest(self) -> tuple[float, ProcSample | None, dict[str, Any]]:
        volume = self.current
        assert volume is not None
        begin = time.perf_counter()
        self.wait_volume_durable(volume)
        durable = time.perf_counter() - begin
        final = self.unmount(volume)
        os.sync()
        seconds = time.perf_counter() - begin
        info: dict[str, Any] = {"durable_before_unmount_seconds": durable, **self.stored(volume)}
        self.discard(volume)
        return seconds, final, info

    def discard(self, volume: Volume) -> None:
        """Delete the volume's local files (its store objects stay)."""
        if volume.mounted or volume.proc is not None:
            raise BenchError(f"refusing to delete {volume.base}: still mounted")
        shutil.rmtree(volume.base, ignore_errors=True)

    def _unmount_others(self, keep: Volume | None) -> None:
        """One daemon of this peer at a time (as for mifs)."""
        for other in self.volumes:
            if other is not keep and (other.proc is not None or other.mounted):
                self.unmount(other)

    def prepare_dataset(self, name: str, fill: Callable[[Path], object]) -> None:
        if name in self.datasets:
            return
        self._unmount_others(None)
        volume = self.new_volume(f"data-{name}")
        self.mount(volume)
        fill(volume.mountpoint)
        self.wait_volume_durable(volume)
        self.unmount(volume)
        self.datasets[name] = volume

    def cold_dataset(self, name: str) -> Path:
        volume = self.datasets[name]
        self._unmount_others(None)
        if volume.proc is not None or volume.mounted:
            self.unmount(volume)
        self.drop_cache(volume)
        self.mount(volume)
        return volume.mountpoint


class _LocalPeer(PeerSystem):
    """An encrypted overlay on local disk: cold = unmounted, the cipher files' pages dropped."""

    def configure(self) -> None:
        self.passfile = self.base / "password"
        self.passfile.write_text(self.secret + "\n")
        self.passfile.chmod(0o600)

    def drop_cache(self, volume: Volume) -> None:
        drop_page_cache_tree(volume.backing)


@register_system
class GocryptfsSystem(_LocalPeer):
    name = "gocryptfs"
    description = "gocryptfs on local disk (`-init`, then mounted in the foreground; password file)"
    program = "gocryptfs"
    package = "gocryptfs"
    version_args = ("-version",)

    def create(self, volume: Volume) -> None:
        result = run([self.program, "-init", "-q", "-passfile", str(self.passfile), str(volume.backing)], timeout=120)
        if result.returncode != 0:
            raise BenchError(f"gocryptfs -init exited {result.returncode}: {result.stderr.strip()[-300:]}")

    def argv(self, volume: Volume) -> list[str]:
        return [self.program, "-fg", "-q", "-nosyslog", "-passfile", str(self.passfile),
                str(volume.backing), str(volume.mountpoint)]


@register_system
class CryfsSystem(_LocalPeer):
    name = "cryfs"
    description = "CryFS on local disk (noninteractive frontend, password on stdin, created on first mount)"
    program = "cryfs"
    package = "cryfs"

    def configure(self) -> None:
        super().configure()
        self.config_dir = self.base / "home"  # CryFS keeps local state under $HOME/.cryfs
        self.config_dir.mkdir(exist_ok=True)

    def create(self, volume: Volume) -> None:
        """The first mount creates the file system (the noninteractive frontend does not ask)."""

    def env(self) -> dict[str, str]:
        return {**os.environ, "CRYFS_FRONTEND": "noninteractive", "CRYFS_NO_UPDATE_CHECK": "true",
                "HOME": str(self.config_dir)}

    def stdin_data(self) -> bytes:
        return (self.secret + "\n").encode()

    def argv(self, volume: Volume) -> list[str]:
        return [self.program, "-f", str(volume.backing), str(volume.mountpoint)]


class _S3Peer(PeerSystem):
    uses_s3 = True

    def stored(self, volume: Volume) -> dict[str, int]:
        return self.ctx.stored(volume.prefix)


@register_system
class RcloneSystem(_S3Peer):
    name = "rclone"
    description = ("rclone mount of a crypt remote over an S3 remote on the same SeaweedFS, "
                   "--vfs-cache-mode full (own cache dir; cold = unmounted, cache wiped)")
    program = "rclone"
    package = "rclone"

    def configure(self) -> None:
        s3 = self.ctx.s3
        self.conf = self.base / "rclone.conf"
        obscured = run([self.program, "obscure", self.secret], timeout=60)
        if obscured.returncode != 0:
            raise BenchError(f"rclone obscure exited {obscured.returncode}: {obscured.stderr.strip()[-300:]}")
        self.obscured = obscured.stdout.strip()
        self.sections = [
            "[s3]", "type = s3", "provider = Other", f"access_key_id = {s3.server.access_key}",
            f"secret_access_key = {s3.server.secret_key}", f"endpoint = {s3.endpoint_url}",
            f"region = {s3.region}", "force_path_style = true", "no_check_bucket = true", "",
        ]
        self._write_conf()

    def _write_conf(self) -> None:
        self.conf.write_text("\n".join(self.sections) + "\n")
        self.conf.chmod(0o600)

    def create(self, volume: Volume) -> None:
        volume.prefix = f"rclone-{self._count:03d}-{volume.name}"
        remote = f"crypt{self._count:03d}"
        self.sections += [f"[{remote}]", "type = crypt", f"remote = s3:{self.ctx.s3.bucket}/{volume.prefix}",
                          f"password = {self.obscured}", ""]
        self._write_conf()
        volume.extra["remote"] = remote
        volume.extra["rc_port"] = _free_port()

    def argv(self, volume: Volume) -> list[str]:
        return [
            self.program, "mount", f"{volume.extra['remote']}:", str(volume.mountpoint),
            "--config", str(self.conf), "--vfs-cache-mode", "full", "--cache-dir", str(volume.cache),
            "--rc", "--rc-addr", f"127.0.0.1:{volume.extra['rc_port']}", "--rc-no-auth",
            "--log-level", "NOTICE", "--log-file", str(volume.log),
        ]

    def env(self) -> dict[str, str]:
        # rclone's S3 backend rejects AWS_CA_BUNDLE with its own HTTP transport; the server is plain HTTP
        return {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}

    def _vfs_stats(self, volume: Volume) -> dict[str, Any]:
        request = urllib.request.Request(f"http://127.0.0.1:{volume.extra['rc_port']}/vfs/stats", data=b"{}",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as resp:
            value = json.loads(resp.read())
        return value if isinstance(value, dict) else {}

    def wait_volume_durable(self, volume: Volume) -> None:
        """Until the VFS cache has nothing queued or in flight (rclone uploads a closed file
        after --vfs-write-back, default 5 s; unmounting earlier would leave it in the cache)."""

        def idle() -> bool:
            cache = self._vfs_stats(volume).get("diskCache", {})
            return int(cache.get("uploadsInProgress", 0)) == 0 and int(cache.get("uploadsQueued", 0)) == 0

        wait_until(idle, DRAIN_TIMEOUT, "rclone's uploads to finish", 0.1)

    def drop_cache(self, volume: Volume) -> None:
        shutil.rmtree(volume.cache, ignore_errors=True)
        volume.cache.mkdir()


@register_system
class S3fsSystem(_S3Peer):
    name = "s3fs"
    description = "s3fs-fuse on the same SeaweedFS (not encrypted; no local cache, so cold = remounted)"
    program = "s3fs"
    package = "s3fs"

    def configure(self) -> None:
        s3 = self.ctx.s3
        self.passwd = self.base / "passwd-s3fs"
        self.passwd.write_text(f"{s3.server.access_key}:{s3.server.secret_key}\n")
        self.passwd.chmod(0o600)

    def create(self, volume: Volume) -> None:
        volume.prefix = f"s3fs-{self._count:03d}-{volume.name}"
        client = self.ctx.s3.client()
        client.put_object(Bucket=self.ctx.s3.bucket, Key=volume.prefix + "/", Body=b"")  # the mounted "directory"

    def argv(self, volume: Volume) -> list[str]:
        s3 = self.ctx.s3
        return [
            self.program, f"{s3.bucket}:/{volume.prefix}", str(volume.mountpoint), "-f",
            "-o", f"passwd_file={self.passwd}", "-o", f"url={s3.endpoint_url}", "-o", "use_path_request_style",
            "-o", f"endpoint={s3.region}", "-o", "dbglevel=warn",
        ]


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
