"""`mifs mount` as processes: the checks made in the CLI's process (so a bad argument is one
error line, not a daemon that dies), daemonizing with a readiness pipe, the daemon's logging,
and interpreter and malloc tuning. Serving itself is mount.run_daemon.
"""

from __future__ import annotations

import ctypes
import logging
import logging.handlers
import os
import sys
from pathlib import Path

import trio

from mifs.config import MountConfig
from mifs.errors import UserError
from mifs.exit_codes import EXIT_DAEMON, EXIT_INTERNAL, EXIT_USAGE
from mifs.mount import run_daemon
from mifs.opening import (
    LOG_FILE,
    check_fuse_available,
    check_mountpoint,
    default_cache_dir,
    key_source_of,
    open_archive,
    prepare_cache_dir,
    store_options,
)

log = logging.getLogger(__name__)


def setup_logging(log_file: Path | None, debug: bool) -> None:
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    handler: logging.Handler = (
        logging.StreamHandler(sys.stderr)
        if log_file is None
        else logging.handlers.RotatingFileHandler(log_file, maxBytes=64 * 1024 * 1024, backupCount=3)
    )
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    logging.getLogger("pydicom").setLevel(logging.ERROR)


def check_log_file(path: Path) -> None:
    """Fail before daemonizing when --log-file cannot be written: the daemon could not say why."""
    try:
        with open(path, "a"):
            pass
    except OSError as exc:
        raise UserError(f"cannot write the log file {path}: {exc.strerror}", EXIT_USAGE) from None


def log_path_of(cfg: MountConfig) -> Path:
    """Where the daemon's log goes (named in startup errors)."""
    return cfg.log_file or (cfg.cache_dir or Path(".")) / LOG_FILE


def tune_interpreter() -> None:
    """A FUSE request waiting for the GIL behind worker threads (boto3, cache I/O) waits up to
    the switch interval; 5 ms by default is longer than a whole cached read. 1 ms keeps the
    event loop responsive while prefetch and uploads run."""
    sys.setswitchinterval(0.001)


def tune_malloc() -> None:
    """Keep chunk-sized buffers on the heap and reuse them (see FUSE-NOTES: fresh pages are slow)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024 * 1024)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 256 * 1024 * 1024)  # M_TRIM_THRESHOLD
        # Few arenas: a chunk buffer freed by one worker thread is reused by the next one
        # instead of every thread's arena keeping its own (peak RSS of a 1 GiB write with 8
        # upload workers: ~385 MiB with one arena per thread, see docs/PERFORMANCE.md).
        libc.mallopt(-8, 2)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass



# --- launching ---------------------------------------------------------------------------------


def mount(cfg: MountConfig) -> None:
    """`mifs mount`: validate in this process, then serve in the foreground or in a daemon
    that reports back through a pipe once the mount is live."""
    check_fuse_available()
    check_mountpoint(cfg.mountpoint)
    source = key_source_of(cfg)
    archive = trio.run(lambda: open_archive(cfg.store_url, source, options=store_options(cfg)))
    cfg.store_url = str(archive.location)  # absolute: the daemon runs in /
    if source is None and archive.key_source is not None:
        cfg.key_file = archive.key_source.path  # the default key file, found here
    cache_dir = cfg.cache_dir or default_cache_dir(archive.descriptor.archive_id_hex)
    os.close(prepare_cache_dir(cache_dir))  # fail now if another daemon holds it
    cfg.cache_dir = cache_dir
    if cfg.log_file is not None:
        check_log_file(cfg.log_file)
    tune_malloc()
    tune_interpreter()
    if cfg.foreground:
        setup_logging(cfg.log_file, cfg.debug)  # stderr unless --log-file
        run_daemon(cfg, lambda: None)
        return
    _daemonize(cfg)


def _daemonize(cfg: MountConfig) -> None:
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: detach, then fork the daemon proper
        os.close(read_fd)
        os.setsid()
        if os.fork() != 0:
            os._exit(0)
        _daemon_main(cfg, write_fd)
    os.close(write_fd)
    os.waitpid(pid, 0)
    with os.fdopen(read_fd, "rb") as pipe:
        message = pipe.read().decode("utf-8", "replace").strip()
    if message == "OK":
        return
    if message.startswith("ERR "):
        code, _, text = message[4:].partition(" ")
        raise UserError(text, int(code))
    raise UserError(f"the mount daemon exited during startup; see {log_path_of(cfg)}", EXIT_DAEMON)


def _daemon_main(cfg: MountConfig, write_fd: int) -> None:
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.chdir("/")
    setup_logging(log_path_of(cfg), cfg.debug)  # the cache dir exists: mount() prepared it

    def ready() -> None:
        nonlocal write_fd
        if write_fd >= 0:
            os.write(write_fd, b"OK\n")
            os.close(write_fd)
            write_fd = -1

    code = 0
    try:
        run_daemon(cfg, ready)
    except UserError as exc:
        code = exc.exit_code
        if write_fd >= 0:
            os.write(write_fd, f"ERR {exc.exit_code} {exc}\n".encode())
        log.error("%s", exc)
    except BaseException:
        code = EXIT_INTERNAL
        log.exception("mount daemon failed")
        if write_fd >= 0:
            os.write(write_fd, f"ERR {EXIT_DAEMON} the mount daemon failed during startup; see {log_path_of(cfg)}\n".encode())
    finally:
        logging.shutdown()
        os._exit(code)


