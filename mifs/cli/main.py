"""The `mifs` command: argument parsing, exit codes and printing. No business logic here.

Every failure is one line on stderr ("mifs: error: ...") and a non-zero exit code from the
table in README.md; a traceback is a bug.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Sequence

from mifs import __version__
from mifs.cli import audit as audit_commands
from mifs.cli import keys as key_commands
from mifs.cli import shred as shred_commands
from mifs.cli import studies as study_commands
from mifs.cli import sweep as sweep_commands
from mifs.cli import sync as sync_commands
from mifs.config import (
    DEFAULT_CACHE_SIZE,
    KNOWN_FUSE_OPTIONS,
    MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    MountConfig,
    check_pack_size,
    format_size,
    load_config_file,
    parse_compress,
    parse_size,
)
from mifs.cli.control import only_live_mount
from mifs.control_protocol import ControlUnavailable, request
from mifs.errors import MifsError, UserError
from mifs.mounttable import mount_fstype, run_fusermount

if TYPE_CHECKING:
    from mifs.store.url import StoreOptions

# Commands that open an archive import what that needs (trio, boto3, the crypto stack, the
# daemon) inside their functions: a command that only asks a running daemon starts in ~0.1 s
# instead of most of a second.
from mifs.exit_codes import EXIT_DAEMON, EXIT_INTERNAL, EXIT_MOUNTPOINT, EXIT_USAGE


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (see mifs {self.prog.split()[-1]} --help)" if " " in self.prog else message, EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mifs", description="mifs: the medical image filesystem gateway")
    parser.add_argument("--version", action="version", version=f"mifs {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("init", help="create a new archive in a store")
    p.add_argument("store", help="a directory, file:///path or s3://bucket/prefix")
    key_commands.add_key_flags(p)
    p.add_argument("--chunk-size", default="4MiB", help="chunk size (default 4MiB)")
    p.add_argument("--create-bucket", action="store_true", help="create the S3 bucket if it does not exist")
    _add_store_flags(p)

    p = sub.add_parser("mount", help="mount an archive")
    p.add_argument("store", nargs="?", help="the store (or 'store' in --config)")
    p.add_argument("mountpoint", nargs="?", type=Path, help="the mount point (or 'mountpoint' in --config)")
    p.add_argument("--config", type=Path, help="TOML config file (docs/CONFIG.md); flags override it")
    key_commands.add_key_flags(p)
    p.add_argument("--cache-dir", type=Path)
    p.add_argument("--cache-size", default=None, help=f"local cache limit (default {format_size(DEFAULT_CACHE_SIZE)})")
    p.add_argument("--foreground", "-f", action="store_true", help="stay in the foreground and log to stderr")
    p.add_argument("--log-file", type=Path)
    p.add_argument("--debug", action="store_true")
    p.add_argument("-o", dest="options", action="append", default=[], help="mount options: allow_other, ro, ...")
    p.add_argument("--sync-uploads", action="store_true", help="close() and fsync() wait until the data is in the store")
    xattr_group = p.add_mutually_exclusive_group()
    xattr_group.add_argument("--xattrs", dest="xattrs", action="store_const", const=True, default=None,
                             help="support extended attributes (default: only if the archive already has some; "
                                  "costs a round trip to the daemon per write(2) call)")
    xattr_group.add_argument("--no-xattrs", dest="xattrs", action="store_const", const=False,
                             help="no extended attributes (EOPNOTSUPP), even if the archive has some")
    p.add_argument("--sync-close", action="store_true",
                   help="close() returns only once the file would survive power loss, as fsync() does "
                        "(default: at once safe from a daemon crash, from power loss within 5 s)")
    p.add_argument("--upload-delay", type=float, metavar="SECONDS",
                   help="a newly written chunk waits up to SECONDS for writing to pause before it is uploaded (default 5; 0: at once)")
    p.add_argument("--pack-size", metavar="SIZE",
                   help="upload small chunks together as store objects of up to SIZE (e.g. 4MiB; 0: one object per chunk; "
                        "default 4MiB on S3, 0 on a local directory store)")
    p.add_argument("--fetch-timeout", type=float, help="seconds before a read of data the store cannot deliver fails with EIO (default 60)")
    p.add_argument("--compress", metavar="zstd[:LEVEL]|off",
                   help="compress chunks with zstd before encrypting them (level 1-9, default 1), or off (the default)")
    group = p.add_argument_group("access control")
    group.add_argument("--allow-uid", type=int, action="append", metavar="N", help="only root and this uid may use the mount (repeatable; implies -o allow_other)")
    group.add_argument("--allow-gid", type=int, action="append", metavar="N", help="only root and this primary gid may use the mount (repeatable; implies -o allow_other)")
    group.add_argument("--read-only", action="store_true", help="mount read-only (same as -o ro): every change fails with EROFS")
    group = p.add_argument_group("DICOM")
    group.add_argument("--no-index", action="store_true", help="do not index written files (mifs reindex does it later)")
    group.add_argument("--no-prefetch", action="store_true", help="fetch only what is read: not the rest of a study when one of its files is opened, "
                            "nor the other chunks of a pack")
    group.add_argument("--prefetch-priors", type=int, metavar="N", help="also prefetch the N most recent other studies of the patient (default 0)")
    group.add_argument("--prefetch-parallel", type=int, metavar="N", help="parallel store requests of study prefetch (default 8)")
    group = p.add_argument_group("retention")
    group.add_argument("--retention-days", type=float, metavar="DAYS",
                       help="keep deleted files recoverable (mifs undelete) for DAYS, then destroy them (default 0: at once)")
    group.add_argument("--worm", dest="worm_days", type=float, metavar="DAYS",
                       help="refuse unlink, truncate and overwrite of files younger than DAYS with EPERM (default 0: off)")
    _add_store_flags(p)

    p = sub.add_parser("umount", help="flush, upload and unmount")
    p.add_argument("mountpoint", type=Path)
    p.add_argument("--no-wait", action="store_true", help="do not wait for pending uploads")

    p = sub.add_parser("status", help="show an archive's state")
    p.add_argument("target", nargs="?", help="a mount point or a store (default: the only live mifs mount)")
    p.add_argument("--json", action="store_true")
    key_commands.add_key_flags(p)
    p.add_argument("--cache-dir", type=Path)
    _add_store_flags(p)

    study_commands.add_parsers(sub)
    key_commands.add_parsers(sub, _add_store_flags)
    audit_commands.add_parsers(sub, _add_store_flags)
    shred_commands.add_parsers(sub)
    sweep_commands.add_parsers(sub)
    sync_commands.add_parsers(sub)
    return parser


def _add_store_flags(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("S3 stores (credentials come from the standard AWS chain)")
    group.add_argument("--endpoint-url", help="S3 endpoint (default: AWS, or $AWS_ENDPOINT_URL)")
    group.add_argument("--region")
    group.add_argument("--addressing-style", choices=["auto", "path", "virtual"])
    group.add_argument("--ca-bundle", type=Path, help="CA bundle for TLS verification")
    group.add_argument("--profile", help="AWS profile name")


def _store_options(args: argparse.Namespace) -> StoreOptions:
    from mifs.store.url import StoreOptions

    return StoreOptions(
        endpoint_url=args.endpoint_url, region=args.region, addressing_style=args.addressing_style or "auto",
        ca_bundle=args.ca_bundle.absolute() if args.ca_bundle else None, profile=args.profile,
    )


# --- init --------------------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    import trio

    from mifs.archive import check_no_archive, create_archive, new_descriptor
    from mifs.crypto.keyring import MasterKey, load_key_file, write_key_file
    from mifs.crypto.keysource import KIND_FILE
    from mifs.opening import default_key_file
    from mifs.store.url import open_store, parse_store_url

    chunk_size = parse_size(args.chunk_size, "chunk size")
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE or chunk_size % 4096:
        raise UserError(
            f"chunk size must be a multiple of 4KiB between {format_size(MIN_CHUNK_SIZE)} and {format_size(MAX_CHUNK_SIZE)}", EXIT_USAGE
        )
    location = parse_store_url(args.store)
    source = key_commands.key_source_from_args(args, new=True)
    if source is not None and source.kind != KIND_FILE:
        return _init_with_source(args, location, chunk_size, source)
    key_file: Path | None = args.key_file
    existing_key = key_file is not None and key_file.exists()
    kek = load_key_file(key_file) if existing_key and key_file else MasterKey.generate()

    async def run() -> tuple[str, Path]:
        store = await open_store(location, create=True, options=_store_options(args), create_bucket=args.create_bucket)
        await check_no_archive(store)
        desc = new_descriptor(kek, chunk_size)
        target = key_file or default_key_file(desc.archive_id_hex)
        created_key = False
        if not existing_key:
            target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_key_file(target, kek)
            created_key = True
        try:
            await create_archive(store, desc, kek)
        except BaseException:
            if created_key:
                target.unlink(missing_ok=True)
            raise
        if not await audit_commands.record_init(store, kek, desc.archive_id, chunk_size=chunk_size, kek_id=kek.kek_id.hex()):
            print("mifs: warning: the archive was created but its audit record of the init could not be stored", file=sys.stderr)
        return desc.archive_id_hex, target

    archive_id, target = trio.run(run)  # domain errors become exit codes in main (translate)
    print(f"created archive {archive_id} in {location}")
    print(f"chunk size: {format_size(chunk_size)}")
    if existing_key:
        print(f"master key: {target} (existing)")
    else:
        print(f"master key: {target} (new; back it up: without it the archive cannot be read)")
    return 0


def _init_with_source(args: argparse.Namespace, location: Any, chunk_size: int, source: Any) -> int:
    """init with a key that is not a key file mifs may generate: a systemd credential or
    environment variable (read), a passphrase (derived with a fresh salt) or KMS (a generated
    KEK, wrapped by KMS). The key objects go to the store before the descriptor."""
    import trio

    from mifs.archive import check_no_archive, create_archive, new_descriptor
    from mifs.keystore import new_source_key, publish_source_key
    from mifs.store.url import open_store


    async def run() -> str:
        store = await open_store(location, create=True, options=_store_options(args), create_bucket=args.create_bucket)
        await check_no_archive(store)
        kek, params = await new_source_key(source)
        desc = new_descriptor(kek, chunk_size)
        await publish_source_key(source, store, desc.archive_id, kek, params)
        await create_archive(store, desc, kek)
        details = {"chunk_size": chunk_size, "kek_id": kek.kek_id.hex(), "key_source": source.kind}
        if not await audit_commands.record_init(store, kek, desc.archive_id, **details):
            print("mifs: warning: the archive was created but its audit record of the init could not be stored", file=sys.stderr)
        return desc.archive_id_hex

    archive_id = trio.run(run)
    print(f"created archive {archive_id} in {location}")
    print(f"chunk size: {format_size(chunk_size)}")
    print(f"master key: {source.describe()}")
    return 0


# --- mount / umount ----------------------------------------------------------------------------


def _fuse_options(raw: Sequence[str]) -> list[str]:
    options: list[str] = []
    for group in raw:
        for option in filter(None, (o.strip() for o in group.split(","))):
            if option not in KNOWN_FUSE_OPTIONS:
                raise UserError(f"unknown mount option {option!r} (known: {', '.join(sorted(KNOWN_FUSE_OPTIONS))})", EXIT_USAGE)
            options.append(option)
    return options


def _count(value: int | None, flag: str, minimum: int) -> int | None:
    if value is not None and value < minimum:
        raise UserError(f"{flag} must be at least {minimum}", EXIT_USAGE)
    return value


def _days(value: float | None, flag: str) -> float | None:
    if value is not None and not (value >= 0 and value != float("inf")):
        raise UserError(f"{flag} must be a number of days >= 0", EXIT_USAGE)
    return value


def _seconds(value: float | None, flag: str) -> float | None:
    if value is not None and not (value >= 0 and value != float("inf")):
        raise UserError(f"{flag} must be a number of seconds >= 0", EXIT_USAGE)
    return value


def cmd_mount(args: argparse.Namespace) -> int:
    from mifs.launch import mount

    values = load_config_file(args.config.absolute()) if args.config else {}
    flags: dict[str, Any] = {
        "store_url": args.store,
        "mountpoint": args.mountpoint,
        "cache_dir": args.cache_dir,
        "log_file": args.log_file,
        "cache_size": parse_size(args.cache_size, "cache size") if args.cache_size else None,
        "fetch_timeout": args.fetch_timeout,
        "upload_delay": _seconds(args.upload_delay, "--upload-delay"),
        "pack_size": check_pack_size(parse_size(args.pack_size, "--pack-size"), "--pack-size") if args.pack_size else None,
        "prefetch_priors": _count(args.prefetch_priors, "--prefetch-priors", 0),
        "prefetch_parallel": _count(args.prefetch_parallel, "--prefetch-parallel", 1),
        "retention_days": _days(args.retention_days, "--retention-days"),
        "worm_days": _days(args.worm_days, "--worm"),
        "endpoint_url": args.endpoint_url,
        "region": args.region,
        "addressing_style": args.addressing_style,
        "ca_bundle": args.ca_bundle,
        "profile": args.profile,
        "xattrs": args.xattrs,
    }
    values.update({k: v for k, v in flags.items() if v is not None})
    values.update(key_commands.mount_key_values(args))
    for flag, name in ((args.foreground, "foreground"), (args.debug, "debug"), (args.sync_uploads, "sync_uploads"),
                       (args.sync_close, "sync_close")):
        if flag:
            values[name] = True
    for flag, name in ((args.no_index, "index"), (args.no_prefetch, "prefetch")):
        if flag:
            values[name] = False
    if args.compress is not None:
        values["compress_level"] = parse_compress(args.compress)  # None (off) overrides the file too
    if args.options:
        values["fuse_options"] = list(values.get("fuse_options", [])) + _fuse_options(args.options)
    if args.read_only and "ro" not in values.get("fuse_options", []):
        values["fuse_options"] = list(values.get("fuse_options", [])) + ["ro"]
    for flag, name in ((args.allow_uid, "allow_uids"), (args.allow_gid, "allow_gids")):
        if flag:
            if any(n < 0 or n >= 2**32 for n in flag):
                raise UserError(f"--{name[:-1].replace('_', '-')} must be a numeric id", EXIT_USAGE)
            values[name] = list(values.get(name, [])) + list(flag)
    if not values.get("store_url") or not values.get("mountpoint"):
        raise UserError("mount needs a store and a mount point (arguments or 'store'/'mountpoint' in --config)", EXIT_USAGE)
    for name in ("mountpoint", "key_file", "passphrase_file", "cache_dir", "log_file", "ca_bundle"):
        if values.get(name) is not None:
            values[name] = Path(values[name]).absolute()
    mount(MountConfig(**values))
    return 0


def _pid_running(pid: int) -> bool:
    """True while pid is a live process (a zombie has finished: its parent just did not reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def _wait_pid_gone(pid: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _pid_running(pid):
        time.sleep(0.02)


def cmd_umount(args: argparse.Namespace) -> int:
    mountpoint = args.mountpoint.absolute()
    final: dict[str, Any] | None = None
    try:
        for reply in request(mountpoint, {"op": "umount", "wait": not args.no_wait}, timeout=None):
            if "progress" in reply:
                if args.no_wait:
                    continue
                progress = reply["progress"]
                print(f"mifs: waiting for {progress.get('pending_uploads')} uploads ({format_size(progress.get('pending_bytes') or 0)})", file=sys.stderr)
            else:
                final = reply
    except ControlUnavailable:
        fstype = mount_fstype(mountpoint)
        if fstype == "fuse.mifs":
            problem = run_fusermount(mountpoint, lazy=True)
            if problem:
                raise UserError(f"the mifs daemon for {mountpoint} is not running and detaching failed: {problem}", EXIT_DAEMON) from None
            raise UserError(
                f"the mifs daemon for {mountpoint} was not running; detached the dead mount (mount again to recover)", EXIT_DAEMON
            ) from None
        raise UserError(f"{mountpoint} is not a mifs mount", EXIT_DAEMON) from None
    if final is None:
        raise UserError(f"the mifs daemon for {mountpoint} closed the connection without confirming the unmount", EXIT_DAEMON)
    if not final.get("ok"):
        message = str(final.get("error", "unmount failed"))
        raise UserError(message, EXIT_MOUNTPOINT if "busy" in message else EXIT_DAEMON)
    if isinstance(final.get("pid"), int):
        _wait_pid_gone(final["pid"])
    pending = final.get("pending_uploads") or 0
    if pending:
        print(f"unmounted {mountpoint}; {pending} chunks ({format_size(final.get('pending_bytes') or 0)}) are staged locally and upload at the next mount")
    unsaved = final.get("unsaved_files") or 0
    if unsaved:
        raise UserError(
            f"unmounted {mountpoint}, but the last writes of {unsaved} file(s) could not be saved "
            f"({final.get('unsaved_reason') or 'see the daemon log'}); the daemon log names their inodes",
            EXIT_DAEMON,
        )
    return 0


# --- status ------------------------------------------------------------------------------------


def _store_line(status: dict[str, Any]) -> str:
    if not status["store_reachable"]:
        return "no"
    retrying = status.get("store_retrying") or 0
    if retrying:
        return f"yes, but {retrying} operation(s) are being retried ({status.get('store_last_error')})"
    return "yes"


def _cache_line(status: dict[str, Any]) -> str:
    line = f"{format_size(status['cache_bytes'])} of {format_size(status['cache_limit'])}"
    limit_now = status.get("cache_limit_now")
    if isinstance(limit_now, int) and limit_now < status["cache_limit"]:
        line += f" (the disk's free space allows {format_size(limit_now)} now)"
    return line + f", {status['cache_hits']} hits, {status['cache_misses']} misses"


def _offline_status(args: argparse.Namespace) -> dict[str, Any]:
    import trio

    from mifs.metadb import tables
    from mifs.opening import default_cache_dir, open_archive, open_cache_db

    source = key_commands.key_source_from_args(args)
    archive = trio.run(lambda: open_archive(args.target, source, need_key=False, options=_store_options(args)))
    desc = archive.descriptor
    status: dict[str, Any] = {
        "mounted": False,
        "archive_id": desc.archive_id_hex,
        "store": str(archive.location),
        "chunk_size": desc.chunk_size,
        "created": desc.created,
        "kek_id": desc.kek_id.hex(),
    }
    cache_dir = args.cache_dir or default_cache_dir(desc.archive_id_hex)
    if archive.kek is not None and (cache_dir / "meta.db").exists():
        db = open_cache_db(cache_dir, archive)
        try:
            counts = tables.counts(db)
        finally:
            db.close()
        status.update(
            files=counts.files, directories=counts.directories, symlinks=counts.symlinks, bytes=counts.bytes,
            objects=counts.objects, chunks=counts.chunks, packs=counts.packs, stored_bytes=counts.stored_bytes, pending_uploads=counts.pending_uploads,
            pending_bytes=counts.pending_bytes, cache_dir=str(cache_dir),
        )
    return status


def cmd_status(args: argparse.Namespace) -> int:
    if args.target is None:
        args.target = str(only_live_mount())
    target = Path(args.target)
    status: dict[str, Any] | None = None
    if "://" not in args.target and target.is_dir():
        try:
            for reply in request(target.absolute(), {"op": "status"}, timeout=10):
                if reply.get("ok"):
                    status = reply["status"]
        except ControlUnavailable:
            if mount_fstype(target) == "fuse.mifs":
                raise UserError(f"the mifs daemon for {target} is not responding", EXIT_DAEMON) from None
    if status is None:
        status = _offline_status(args)
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
    else:
        _print_status(status)
    return 0


def _print_status(status: dict[str, Any]) -> None:
    rows = [
        ("archive", status.get("archive_id")),
        ("store", status.get("store")),
        ("mounted", f"yes, at {status['mountpoint']} (pid {status['pid']})" if status.get("mounted") else "no"),
    ]
    if "files" in status:
        rows += [
            ("files", f"{status['files']} in {status['directories']} directories, {format_size(status['bytes'])}"),
            ("objects", f"{status['objects']} ({format_size(status['stored_bytes'])} stored)"),
            ("pending uploads", f"{status['pending_uploads']} ({format_size(status['pending_bytes'])})"),
        ]
    if status.get("mounted"):
        rows += [
            ("cache", _cache_line(status)),
            ("store reachable", _store_line(status)),
        ]
        if status.get("compression", "off") != "off":
            rows.append((
                "compression",
                f"{status['compression']}: {status['compressed_chunks']} chunks since mount, "
                f"{format_size(status['compressed_plain_bytes'])} -> {format_size(status['compressed_stored_bytes'])}",
            ))
        if status.get("orphans_purged") or status.get("orphan_candidates"):
            rows.append((
                "orphan sweep",
                f"{status['orphans_purged']} unnamed store objects deleted, {status['orphan_candidates']} in their grace period",
            ))
        if status.get("last_error"):
            rows.append(("last error", status["last_error"]))
        if status.get("failsafe"):
            rows.append(("FAILSAFE", f"read-only after an internal error: {status['failsafe']}"))
    elif "chunk_size" in status:
        rows.append(("chunk size", format_size(status["chunk_size"])))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def cmd_audit(args: argparse.Namespace) -> int:
    if args.audit_command == "verify":
        return audit_commands.cmd_verify(args, _store_options(args))
    return audit_commands.cmd_query(args, _store_options(args))


COMMANDS = {
    "audit": cmd_audit, "init": cmd_init, "mount": cmd_mount, "umount": cmd_umount, "status": cmd_status,
    **study_commands.COMMANDS, **key_commands.COMMANDS, **shred_commands.COMMANDS,
    **sweep_commands.COMMANDS, **sync_commands.COMMANDS,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return COMMANDS[args.command](args)
    except UserError as exc:
        print(f"mifs: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except MifsError as exc:
        from mifs.opening import translate

        err = translate(exc)
        print(f"mifs: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("mifs: error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `mifs studies | head`: the reader is gone, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as exc:  # a bug: still one line, details in the log
        print(f"mifs: error: internal error ({exc.__class__.__name__}: {exc}); please report it", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
