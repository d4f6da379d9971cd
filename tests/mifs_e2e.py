"""End-to-end test helpers: drive the real `mifs` CLI, find and stop its daemon, compare trees.

Must not import mifs: these tests see mifs only through its command line, its mounted
filesystem and the files it leaves in the store and cache directories.
"""

from __future__ import annotations

import errno
import faulthandler
import hashlib
import json
import mmap
import os
import random
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, TypeVar

REPO_ROOT = Path(__file__).resolve().parent.parent
TESTS_DIR = Path(__file__).resolve().parent
CLI_TIMEOUT = float(os.environ.get("MIFS_TEST_CLI_TIMEOUT", "120"))
KiB = 1024
MiB = 1024 * 1024
DEFAULT_CHUNK_SIZE = 4 * MiB

T = TypeVar("T")

# Chunk object layout from the contract: b"MIFC" | version 0x01 | flags | 12-byte nonce | ct | tag.
CHUNK_MAGIC = b"MIFC"
CHUNK_HEADER_LEN = 4 + 1 + 1 + 12
CHUNK_TAG_LEN = 16
OBJECT_NAME_RE = re.compile(r"^[0-9a-f]{32}$")
# Wrapped data key (FORMAT.md section 4): version 0x01 | kek id (16) | nonce (12) | ct (32) | tag (16).
WRAPPED_DEK_LEN = 1 + 16 + 12 + 32 + 16

# A log line that fails a test unless the test expects it.
BAD_LOG_LINE_RE = re.compile(r"Traceback|\b(ERROR|WARNING|CRITICAL|FATAL)\b")


# --- waiting ------------------------------------------------------------------------------


def wait_until(condition: Callable[[], T], timeout: float, what: str, interval: float = 0.02) -> T:
    """Poll `condition` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


# --- running the CLI ----------------------------------------------------------------------


def mifs_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for `python -m mifs`: this checkout first on the import path, plus
    `extra` (for example S3 credentials; a daemon started by `mifs mount` inherits them)."""
    env = dict(os.environ)
    paths = [str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update(extra or {})
    return env


def run_mifs(
    *args: object, timeout: float = CLI_TIMEOUT, cwd: Path | str = "/", env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `python -m mifs ARGS` (from / unless told) and return its exit code and output.

    Output goes to anonymous files, not pipes, so a daemon that keeps the inherited stdout
    open cannot make us wait forever. `env`: variables added to the environment.
    """
    argv = [sys.executable, "-m", "mifs", *(str(a) for a in args)]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=mifs_env(env), cwd=cwd
        )
        try:
            returncode = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            err.seek(0)
            raise AssertionError(
                f"`mifs {' '.join(argv[3:])}` did not finish within {timeout:.0f}s; "
                f"stderr: {err.read().decode(errors='replace')[-2000:]}"
            ) from None
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(
            argv, returncode, out.read().decode(errors="replace"), err.read().decode(errors="replace")
        )


def s3_env(access_key: str, secret_key: str, region: str) -> dict[str, str]:
    """Environment for a CLI call that reaches an S3 store with these credentials (boto3's
    standard chain; `mifs mount` passes it on to its daemon)."""
    return {
        "AWS_ACCESS_KEY_ID": access_key,
        "AWS_SECRET_ACCESS_KEY": secret_key,
        "AWS_REGION": region,
        "AWS_DEFAULT_REGION": region,
        "AWS_EC2_METADATA_DISABLED": "true",  # never wait for an instance role
    }


def describe(result: subprocess.CompletedProcess[str]) -> str:
    return (
        f"`mifs {' '.join(result.args[3:])}` exited {result.returncode}\n"
        f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
    )


def assert_cli_error(result: subprocess.CompletedProcess[str], exit_code: int) -> None:
    """The contract for every CLI failure: the exit code, one stderr line, no traceback."""
    assert "Traceback" not in result.stderr + result.stdout, describe(result)
    assert result.returncode == exit_code, f"expected exit {exit_code}\n{describe(result)}"
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"expected exactly one line on stderr\n{describe(result)}"
    assert lines[0].startswith("mifs: error: "), describe(result)


def parse_size(text: str) -> int:
    match = re.fullmatch(r"(\d+)\s*([KMG]i?B?)?", text.strip(), re.IGNORECASE)
    assert match, text
    unit = (match.group(2) or "").lower()
    factor = {"": 1, "kib": KiB, "mib": MiB, "gib": 1024 * MiB, "k": 1000, "kb": 1000,
              "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3}[unit]
    return int(match.group(1)) * factor


# --- mounts and processes -----------------------------------------------------------------


def mount_fstype(path: Path) -> str | None:
    """The fs type mounted exactly at `path` (from mountinfo), or None.

    os.path.ismount() says False for a FUSE mount whose daemon died (stat fails with
    ENOTCONN), so cleanup code must look at the mount table instead.
    """
    target = os.path.realpath(path)
    fstype = None
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            left, _, right = line.partition(" - ")
            fields = left.split()
            point = fields[4].replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")
            if point == target:
                fstype = right.split()[0]  # the last entry is the one on top
    return fstype


def is_fuse_mounted(path: Path) -> bool:
    fstype = mount_fstype(path)
    return fstype is not None and fstype.startswith("fuse")


def _fd_targets(pid: int) -> list[str]:
    targets = []
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return []
    for name in names:
        try:
            targets.append(os.readlink(f"/proc/{pid}/fd/{name}"))
        except OSError:
            pass
    return targets


def daemon_pids(cache_dir: Path) -> list[int]:
    """Live daemons of this cache dir: processes that hold a file in it open, or hold
    /dev/fuse and name it on their command line (we always pass --cache-dir).

    Test child processes that merely use the mount hold neither, so they are not matched.
    """
    cache = str(cache_dir)
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        pid = int(entry)
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmdline = fh.read().decode(errors="replace")
        except OSError:
            continue
        if not cmdline:  # zombie or kernel thread
            continue
        targets = _fd_targets(pid)
        opens_cache = any(t == cache or t.startswith(cache + "/") for t in targets)
        if opens_cache or ("/dev/fuse" in targets and cache in cmdline):
            found.append(pid)
    return found


def kill_pids(pids: Iterable[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def lazy_unmount(mountpoint: Path) -> None:
    """`fusermount3 -u -z`, then wait until the mount table no longer lists it."""
    if not is_fuse_mounted(mountpoint):
        return
    subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True, timeout=60)
    wait_until(lambda: not is_fuse_mounted(mountpoint), 30, f"{mountpoint} to leave the mount table")


# --- data ---------------------------------------------------------------------------------


def pattern(seed: object, size: int) -> bytes:
    """Deterministic incompressible bytes."""
    return random.Random(str(seed)).randbytes(size)


_NO_ZERO = bytes([1]) + bytes(range(1, 256))


def nonzero_pattern(seed: object, size: int) -> bytes:
    """Deterministic bytes without 0x00, so that a zero read back can only be a hole."""
    return pattern(seed, size).translate(_NO_ZERO)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def first_difference(a: bytes, b: bytes) -> str:
    """A short description of where two byte strings differ, for assertion messages."""
    if a == b:
        return "equal"
    n = min(len(a), len(b))
    i = next((k for k in range(n) if a[k] != b[k]), n)
    return (
        f"lengths {len(a)} vs {len(b)}, first difference at offset {i}: "
        f"{a[i:i + 16].hex()} vs {b[i:i + 16].hex()}"
    )


def assert_bytes_equal(actual: bytes, expected: bytes, what: str) -> None:
    if actual != expected:
        raise AssertionError(f"{what}: {first_difference(actual, expected)}")


def write_file(path: Path, data: bytes, piece: int = 0, sync: bool = False) -> None:
    """Create/replace `path` with `data`, optionally in pieces of `piece` bytes."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        step = piece or max(len(data), 1)
        view = memoryview(data)
        for pos in range(0, len(data), step):
            chunk = view[pos:pos + step]
            while chunk:
                written = os.write(fd, chunk)
                chunk = chunk[written:]
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def read_file(path: Path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def errno_of(fn: Callable[..., object], *args: object, **kwargs: object) -> int:
    """0 if `fn` succeeds, else the errno of the OSError it raised."""
    try:
        fn(*args, **kwargs)
    except OSError as exc:
        return exc.errno or -1
    return 0


def errname(code: int) -> str:
    return "success" if code == 0 else errno.errorcode.get(code, str(code))


def assert_errno(expected: int | Sequence[int], fn: Callable[..., object], *args: object, **kwargs: object) -> None:
    wanted = (expected,) if isinstance(expected, int) else tuple(expected)
    got = errno_of(fn, *args, **kwargs)
    if got not in wanted:
        call = f"{getattr(fn, '__name__', fn)}{tuple(str(a) for a in args)}"
        raise AssertionError(f"{call}: expected {'/'.join(map(errname, wanted))}, got {errname(got)}")


def read_chunks_direct(path: Path, chunk_size: int) -> list[bytes | OSError]:
    """Read `path` one chunk per request with O_DIRECT, so the kernel neither merges nor
    reads ahead across chunks: each entry is that chunk's bytes or the error of its read."""
    size = os.stat(path).st_size
    results: list[bytes | OSError] = []
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, chunk_size)  # page-aligned buffer
        try:
            for offset in range(0, size, chunk_size):
                want = min(chunk_size, size - offset)
                try:
                    got = os.preadv(fd, [buf], offset)
                    results.append(bytes(buf[:min(got, want)]))
                except OSError as exc:
                    results.append(exc)
        finally:
            buf.close()
    finally:
        os.close(fd)
    return results


# --- trees --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    kind: str  # "dir", "file", "link", "other"
    size: int  # file size; 0 for others
    digest: str  # content digest of files, link target of symlinks
    nlink: int  # for files only; 0 for others


def snapshot(root: Path, *, with_nlink: bool = True) -> dict[str, Entry]:
    """Every entry under root (relative path -> Entry), without following symlinks."""
    result: dict[str, Entry] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            st = os.lstat(full)
            if stat.S_ISDIR(st.st_mode):
                result[rel] = Entry("dir", 0, "", 0)
            elif stat.S_ISLNK(st.st_mode):
                result[rel] = Entry("link", 0, os.readlink(full), 0)
            elif stat.S_ISREG(st.st_mode):
                data = read_file(Path(full))
                assert len(data) == st.st_size, f"{rel}: read {len(data)} bytes, st_size {st.st_size}"
                result[rel] = Entry("file", st.st_size, sha(data), st.st_nlink if with_nlink else 0)
            else:
                result[rel] = Entry("other", 0, "", 0)
    return result


def link_groups(root: Path) -> set[frozenset[str]]:
    """Sets of paths that are the same regular file (hard links), groups of two or more."""
    by_inode: dict[int, set[str]] = {}
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            if stat.S_ISREG(st.st_mode):
                by_inode.setdefault(st.st_ino, set()).add(os.path.relpath(full, root))
    return {frozenset(group) for group in by_inode.values() if len(group) > 1}


def diff_snapshots(actual: dict[str, Entry], expected: dict[str, Entry], limit: int = 20) -> list[str]:
    problems = []
    for rel in sorted(set(actual) | set(expected)):
        a, e = actual.get(rel), expected.get(rel)
        if a != e:
            problems.append(f"{rel}: mount has {a}, expected {e}")
    return problems[:limit]


def assert_same_tree(actual_root: Path, expected_root: Path, what: str) -> None:
    problems = diff_snapshots(snapshot(actual_root), snapshot(expected_root))
    assert not problems, f"{what}: trees differ:\n" + "\n".join(problems)
    a_links, e_links = link_groups(actual_root), link_groups(expected_root)
    assert a_links == e_links, f"{what}: hard-link groups differ: {a_links} vs {e_links}"


def store_chunk_objects(store: Path) -> dict[str, Path]:
    """Chunk objects in the store: key (data/xx/name) -> path; recognised by their magic."""
    objects: dict[str, Path] = {}
    data_dir = store / "data"
    if not data_dir.is_dir():
        return objects
    for path in sorted(data_dir.rglob("*")):
        if path.is_file():
            with open(path, "rb") as fh:
                if fh.read(4) == CHUNK_MAGIC:
                    objects[str(path.relative_to(store))] = path
    return objects


def file_states(root: Path) -> dict[str, tuple[int, str, int]]:
    """Every file and directory under root (itself included): relpath -> (size, digest, mtime_ns)."""
    if not root.exists():
        return {}
    states = {".": (0, "dir", root.stat().st_mtime_ns)}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        digest = "dir" if path.is_dir() else sha(path.read_bytes()) if path.is_file() else "other"
        states[str(path.relative_to(root))] = (st.st_size if digest != "dir" else 0, digest, st.st_mtime_ns)
    return states


def all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())


# --- an archive under test ----------------------------------------------------------------


class Archive:
    """A store, its key file, a cache dir and a mountpoint under one base directory.

    Every CLI call goes through `run_cli`; `mount`/`umount` assert the contract (the mount is
    live when `mifs mount` returns, the daemon is gone when `mifs umount` returns) and
    `force_cleanup` leaves no mount or daemon behind whatever state the test left.

    The store is the directory BASE/store unless `store_url` names another one (for example
    s3://bucket/prefix); `store_flags` go to every init/mount/status (for example
    --endpoint-url URL) and `env` into the environment of every CLI call (credentials).
    """

    def __init__(
        self,
        base: Path,
        *,
        store_url: str | None = None,
        store_flags: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.base = base
        self.store = base / "store"
        self.store_url: str | Path = store_url if store_url is not None else self.store
        self.store_flags: list[str] = list(store_flags)
        self.env: dict[str, str] = dict(env or {})
        self.s3_bucket: str | None = None  # for S3 stores, set by whoever made the archive
        self.s3_prefix = ""
        self.key_file = base / "key"
        self.cache_dir = base / "cache"
        self.mountpoint = base / "mnt"
        base.mkdir(parents=True, exist_ok=True)
        self.mountpoint.mkdir(exist_ok=True)
        self.cache_dir.mkdir(mode=0o700, exist_ok=True)
        self.chunk_size = DEFAULT_CHUNK_SIZE
        self.mount_options: tuple[str, ...] = ()
        self.mount_flags: tuple[str, ...] = ()  # extra `mifs mount` flags of the last mount()
        self.mount_env: dict[str, str] = {}  # extra environment of the last mount()
        self.mounts: list[tuple[Path, Path]] = []  # (mountpoint, cache_dir) of live mounts
        self.cache_dirs: list[Path] = [self.cache_dir]
        self.saved_logs: list[Path] = []  # daemon logs moved out of wiped cache dirs
        self.watchdog_fired = False
        self._watchdog: threading.Timer | None = None

    # watchdog -----------------------------------------------------------------------------

    def start_watchdog(self, timeout: float) -> None:
        """After `timeout` seconds, dump all stacks and tear the mounts down, so that a test
        blocked on a stuck mount fails (ENOTCONN/ECONNABORTED) instead of hanging."""
        def fire() -> None:
            self.watchdog_fired = True
            sys.stderr.write(f"\n*** e2e test still running after {timeout:.0f}s; stacks:\n")
            faulthandler.dump_traceback(all_threads=True)
            self.force_cleanup()

        self._watchdog = threading.Timer(timeout, fire)
        self._watchdog.daemon = True
        self._watchdog.start()

    def stop_watchdog(self) -> None:
        """Cancel the watchdog, or wait until its teardown has finished if it already fired."""
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog.join()

    # CLI ----------------------------------------------------------------------------------

    def run_cli(
        self, *args: object, timeout: float = CLI_TIMEOUT, env: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return run_mifs(*args, timeout=timeout, env={**self.env, **(env or {})})

    def init(self, chunk_size: str | None = None, *, flags: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
        extra = ["--chunk-size", chunk_size] if chunk_size else []
        result = self.run_cli("init", self.store_url, "--key-file", self.key_file, *extra, *self.store_flags, *flags)
        assert result.returncode == 0, describe(result)
        if chunk_size:
            self.chunk_size = parse_size(chunk_size)
        return result

    def mount_args(
        self,
        mountpoint: Path,
        cache_dir: Path,
        options: Sequence[str],
        key_file: Path | None,
        flags: Sequence[str] = (),
    ) -> list[object]:
        # flags naming another key source (--key-env, --passphrase-file, --kms-key-id, ...) replace --key-file
        other_source = any(str(f).startswith(("--key-", "--passphrase", "--kms-key-id")) for f in flags)
        key_args: list[object] = [] if other_source else ["--key-file", key_file or self.key_file]
        args: list[object] = ["mount", self.store_url, mountpoint, *key_args,
                              "--cache-dir", cache_dir, *self.store_flags, *flags]
        if options:
            args += ["-o", ",".join(options)]
        return args

    def try_mount(
        self,
        *,
        options: Sequence[str] = (),
        mountpoint: Path | None = None,
        cache_dir: Path | None = None,
        key_file: Path | None = None,
        flags: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run `mifs mount` and return the result; records a live mount for cleanup.

        flags: extra command-line flags (--cache-size 8MiB, --sync-uploads, ...); env: extra
        environment for the CLI and so for the daemon it starts."""
        mountpoint = mountpoint or self.mountpoint
        cache_dir = cache_dir or self.cache_dir
        if cache_dir not in self.cache_dirs:
            self.cache_dirs.append(cache_dir)
        result = self.run_cli(*self.mount_args(mountpoint, cache_dir, options, key_file, flags), env=env)
        if is_fuse_mounted(mountpoint) and (mountpoint, cache_dir) not in self.mounts:
            self.mounts.append((mountpoint, cache_dir))
        return result

    def mount(
        self,
        *,
        options: Sequence[str] = (),
        flags: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        **kwargs: Path,
    ) -> None:
        """Mount and assert that the mount is live as soon as `mifs mount` has returned.
        remount() repeats the options, flags and env of the last call."""
        mountpoint = kwargs.get("mountpoint") or self.mountpoint
        result = self.try_mount(options=options, flags=flags, env=env, **kwargs)
        assert "Traceback" not in result.stderr, describe(result)
        assert result.returncode == 0, describe(result)
        assert is_fuse_mounted(mountpoint), f"mount returned 0 but {mountpoint} is not a FUSE mount\n{describe(result)}"
        assert os.path.ismount(mountpoint), f"{mountpoint} is not usable after mount returned"
        self.mount_options = tuple(options)
        self.mount_flags = tuple(flags)
        self.mount_env = dict(env or {})

    def umount(self, mountpoint: Path | None = None) -> None:
        """`mifs umount`; assert exit 0, the mount gone and the daemon exited."""
        mountpoint = mountpoint or self.mountpoint
        cache_dir = next((c for m, c in self.mounts if m == mountpoint), self.cache_dir)
        result = self.run_cli("umount", mountpoint)
        try:
            assert result.returncode == 0, describe(result)
            assert not is_fuse_mounted(mountpoint), f"umount returned 0 but {mountpoint} is still mounted"
            wait_until(lambda: not daemon_pids(cache_dir), 5,
                       "the daemon to exit (umount must return only after it has)")
        except AssertionError:
            self.force_cleanup()
            raise
        self.mounts = [(m, c) for m, c in self.mounts if m != mountpoint]

    def remount(self) -> None:
        self.umount()
        self.mount(options=self.mount_options, flags=self.mount_flags, env=self.mount_env)

    def check_across_remount(self, check: Callable[[], None]) -> None:
        """Run `check` on the live mount, remount, and run it again."""
        check()
        self.remount()
        check()

    def status(self, target: Path | None = None) -> subprocess.CompletedProcess[str]:
        return self.run_cli("status", target or self.mountpoint, "--json")

    def status_json(self, target: Path | None = None) -> dict[str, Any]:
        """`mifs status MP --json` of a live mount, parsed; asserts that it succeeded."""
        result = self.status(target)
        assert result.returncode == 0, describe(result)
        try:
            value = json.loads(result.stdout)
        except ValueError:
            raise AssertionError(f"status --json printed no JSON\n{describe(result)}") from None
        assert isinstance(value, dict) and value.get("mounted") is True, f"not a live mount:\n{describe(result)}"
        return value

    def wait_status(
        self, condition: Callable[[dict[str, Any]], bool], timeout: float, what: str, interval: float = 0.2
    ) -> dict[str, Any]:
        """Poll `mifs status --json` until `condition(status)`; the status that satisfied it.
        A timeout reports the last status seen."""
        seen: list[dict[str, Any]] = []

        def check() -> dict[str, Any] | None:
            status = self.status_json()
            seen[:] = [status]
            return status if condition(status) else None

        try:
            status: dict[str, Any] | None = wait_until(check, timeout, what, interval)
        except AssertionError as exc:
            last = json.dumps(seen[0], sort_keys=True) if seen else "(none)"
            raise AssertionError(f"{exc}; last status: {last}") from None
        assert status is not None
        return status

    # processes and crashes ----------------------------------------------------------------

    def daemon_pids(self, cache_dir: Path | None = None) -> list[int]:
        return daemon_pids(cache_dir or self.cache_dir)

    def kill_daemon(self, *, detach: bool = True) -> list[int]:
        """SIGKILL the daemon, wait until it is gone, lazily unmount the dead mount (detach)."""
        pids = self.daemon_pids()
        assert pids, "found no daemon process to kill"
        kill_pids(pids)
        wait_until(lambda: not any(pid_alive(p) for p in pids), 30, "the killed daemon to die")
        if detach:
            lazy_unmount(self.mountpoint)
            self.mounts = [(m, c) for m, c in self.mounts if m != self.mountpoint]
        return pids

    def force_cleanup(self) -> list[str]:
        """Kill this archive's daemons, then lazy-unmount its mounts; what was done.

        Killing first aborts the FUSE connection, so neither a blocked test nor fusermount3
        (which stats the mountpoint) can hang on a stopped or deadlocked daemon.
        """
        done = []
        for cache_dir in self.cache_dirs:
            pids = daemon_pids(cache_dir)
            if pids:
                kill_pids(pids)
                wait_until(lambda: not any(pid_alive(p) for p in pids), 30, "daemons to die")
                done.append(f"killed daemon {pids}")
        for mountpoint in {m for m, _ in self.mounts} | {self.mountpoint}:
            if is_fuse_mounted(mountpoint):
                lazy_unmount(mountpoint)
                done.append(f"lazily unmounted {mountpoint}")
        self.mounts = []
        return done

    # logs ---------------------------------------------------------------------------------

    def log_files(self) -> list[Path]:
        return self.saved_logs + [c / "mifs.log" for c in self.cache_dirs if (c / "mifs.log").exists()]

    def wipe_cache(self, cache_dir: Path | None = None) -> None:
        """Delete a cache dir of an unmounted archive (lost or replaced disk). Its daemon log
        is kept aside first, so the end-of-test log check still sees it."""
        cache_dir = cache_dir or self.cache_dir
        assert not any(c == cache_dir for _, c in self.mounts), f"{cache_dir} is in use by a mount"
        assert not daemon_pids(cache_dir), f"a daemon still uses {cache_dir}"
        log = cache_dir / "mifs.log"
        if log.exists():
            kept = self.base / "logs" / f"mifs-{len(self.saved_logs)}.log"
            kept.parent.mkdir(exist_ok=True)
            os.replace(log, kept)
            self.saved_logs.append(kept)
        shutil.rmtree(cache_dir)

    def unexpected_log_lines(self, allowed: Sequence[re.Pattern[str]]) -> list[str]:
        """Traceback/ERROR/WARNING lines no `allowed` pattern matches (with traceback context)."""
        found = []
        for log in self.log_files():
            lines = log.read_text(errors="replace").splitlines()
            for i, line in enumerate(lines):
                if BAD_LOG_LINE_RE.search(line) and not any(p.search(line) for p in allowed):
                    context = lines[i:i + 40] if "Traceback" in line else [line]
                    found.append(f"{log}:{i + 1}: " + "\n    ".join(context))
        return found

    # store and cache ----------------------------------------------------------------------

    def chunk_objects(self) -> dict[str, Path]:
        return store_chunk_objects(self.store)

    def cached_copy(self, key: str) -> Path | None:
        """The cache dir's copy of store object `key` (CACHE/chunks/xx/name), if there is one."""
        name = key.rsplit("/", 1)[-1]
        path = self.cache_dir / "chunks" / name[:2] / name
        return path if path.exists() else None

    def write_in_own_session(self, name: str, data: bytes) -> dict[str, bytes]:
        """Mount, write one file, unmount: the chunk objects that appeared (key -> bytes)."""
        before = set(self.chunk_objects())
        self.mount()
        write_file(self.mountpoint / name, data)
        # Indexed before the unmount: a backlog would be worked through by the next mount,
        # which may meet objects a test has tampered with meanwhile.
        self.wait_status(lambda s: s["index_backlog"] == 0, 30, "the indexer to catch up")
        self.umount()
        after = self.chunk_objects()
        return {key: after[key].read_bytes() for key in set(after) - before}

    def replace_object(self, key: str, data: bytes | None, *, also_cache: bool) -> None:
        """Overwrite (None: delete) a store object while unmounted, as an attacker with write
        access to the store would. The cache dir's copy, if any, gets the same bytes
        (also_cache) or is deleted, so the next read must go to the tampered object."""
        targets = [self.store / key]
        cached = self.cached_copy(key)
        if cached is not None:
            if also_cache:
                targets.append(cached)
            else:
                cached.unlink()
        for path in targets:
            if data is None:
                path.unlink()
            else:
                path.write_bytes(data)
