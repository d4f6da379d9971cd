"""Key-source flags of init/mount/status and the `mifs key` commands (rotate, status).

Parsing and printing only: rotation runs in the daemon (keyrotation), reached through the
control socket; keys never travel on it (the daemon loads the new key from its source).
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mifs.cli.control import named_or_only_mount, only_live_mount, replies
from mifs.errors import KeyFileError, UserError
from mifs.mounttable import mount_fstype
from mifs.exit_codes import EXIT_DAEMON, EXIT_KEY, EXIT_ROTATION, EXIT_USAGE

if TYPE_CHECKING:
    from mifs.crypto.keysource import KeySource

# What opening an archive or a key source needs (trio, the crypto stack, boto3) is imported
# by the functions that do it: `mifs key rotate`, `status` of a live mount and the other
# commands that only ask a daemon start without it.

ROTATION_IN_DAEMON = " (key rotation runs in the daemon of a live mount)"

_KIND_EXIT = {"usage": EXIT_ROTATION, "key": EXIT_KEY, "failed": EXIT_ROTATION}


def add_key_flags(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("master key (one source; default: the archive's key file)")
    group.add_argument("--key-file", type=Path, help="key file (MIFS-KEK-1 format, mode 0600)")
    group.add_argument("--key-credential", metavar="NAME", help="systemd credential NAME ($CREDENTIALS_DIRECTORY/NAME, LoadCredential=)")
    group.add_argument("--key-env", metavar="VAR", help="environment variable holding the key-file line (tests)")
    group.add_argument("--passphrase-file", type=Path, help="file (0600) holding a passphrase (Argon2id)")
    group.add_argument("--passphrase", action="store_true", help="ask for the passphrase on the terminal")
    group.add_argument("--kms-key-id", metavar="ID", help="KMS key (id, ARN or alias) wrapping the master key")
    group.add_argument("--kms-endpoint", metavar="URL", help="KMS endpoint (default: AWS)")
    group.add_argument("--kms-region", metavar="REGION", help="KMS region (default: the AWS chain's)")


def prompt_passphrase(confirm: bool) -> bytes:
    """Read a passphrase from the terminal (never from argv); confirm: ask twice."""
    if not sys.stdin.isatty():
        raise UserError("--passphrase needs a terminal to ask on; use --passphrase-file", EXIT_USAGE)
    first = getpass.getpass("mifs passphrase: ").encode("utf-8")
    if confirm:
        if getpass.getpass("mifs passphrase (again): ").encode("utf-8") != first:
            raise UserError("the passphrases do not match", EXIT_KEY)
    return first


def key_source_from_args(args: argparse.Namespace, *, new: bool = False) -> KeySource | None:
    """The one key source the flags name, or None; new: a passphrase is being chosen."""
    from mifs.crypto.keysource import (
        KIND_CREDENTIAL, KIND_ENV, KIND_FILE, KIND_KMS, KIND_PASSPHRASE, KeySource, check_new_passphrase,
    )

    chosen = [
        flag for flag, value in (
            ("--key-file", args.key_file), ("--key-credential", args.key_credential), ("--key-env", args.key_env),
            ("--passphrase-file", args.passphrase_file), ("--passphrase", args.passphrase), ("--kms-key-id", args.kms_key_id),
        ) if value
    ]
    if len(chosen) > 1:
        raise UserError(f"give one key source, not {' and '.join(chosen)}", EXIT_USAGE)
    if (args.kms_endpoint or args.kms_region) and not args.kms_key_id:
        raise UserError("--kms-endpoint and --kms-region need --kms-key-id", EXIT_USAGE)
    if args.key_file:
        return KeySource(KIND_FILE, path=args.key_file.absolute())
    if args.key_credential:
        return KeySource(KIND_CREDENTIAL, name=args.key_credential)
    if args.key_env:
        return KeySource(KIND_ENV, name=args.key_env)
    if args.passphrase_file:
        return KeySource(KIND_PASSPHRASE, path=args.passphrase_file.absolute())
    if args.passphrase:
        passphrase = prompt_passphrase(confirm=new)
        if new:
            try:
                check_new_passphrase(passphrase)
            except KeyFileError as exc:
                raise UserError(str(exc), EXIT_KEY) from None
        return KeySource(KIND_PASSPHRASE, passphrase=passphrase)
    if args.kms_key_id:
        return KeySource(KIND_KMS, name=args.kms_key_id, endpoint=args.kms_endpoint, region=args.kms_region)
    return None


def mount_key_values(args: argparse.Namespace) -> dict[str, Any]:
    """MountConfig values of the key flags given (any one replaces every key source of --config)."""
    from mifs.crypto.keysource import KIND_CREDENTIAL, KIND_ENV, KIND_FILE, KIND_PASSPHRASE

    source = key_source_from_args(args)
    if source is None:
        return {}
    values: dict[str, Any] = dict.fromkeys(
        ("key_file", "key_credential", "key_env", "passphrase_file", "passphrase", "kms_key_id", "kms_endpoint", "kms_region")
    )
    if source.kind == KIND_FILE:
        values["key_file"] = source.path
    elif source.kind == KIND_CREDENTIAL:
        values["key_credential"] = source.name
    elif source.kind == KIND_ENV:
        values["key_env"] = source.name
    elif source.kind == KIND_PASSPHRASE:
        values["passphrase_file"], values["passphrase"] = source.path, source.passphrase
    else:
        values.update(kms_key_id=source.name, kms_endpoint=source.endpoint, kms_region=source.region)
    return values


# --- mifs key ----------------------------------------------------------------------------------


def add_parsers(sub: Any, add_store_flags: Any) -> None:
    key = sub.add_parser("key", help="master key rotation and status")
    key_sub = key.add_subparsers(dest="key_command", metavar="COMMAND", required=True, parser_class=type(key))

    p = key_sub.add_parser("rotate", help="re-wrap every data key under a new master key, online")
    p.add_argument("mountpoint", nargs="?", type=Path, help="the mount (default: the only live mifs mount)")
    group = p.add_argument_group("the new master key (one source; none: resume or wait for a rotation in progress)")
    group.add_argument("--new-key-file", type=Path, help="key file holding the new key")
    group.add_argument("--generate", action="store_true", help="create --new-key-file (0600) with a fresh random key")
    group.add_argument("--new-key-credential", metavar="NAME", help="systemd credential of the daemon holding the new key")
    group.add_argument("--new-passphrase-file", type=Path, help="file (0600) with the new passphrase")
    group.add_argument("--new-kms-key-id", metavar="ID", help="KMS key to wrap a new generated master key")
    group.add_argument("--new-kms-endpoint", metavar="URL")
    group.add_argument("--new-kms-region", metavar="REGION")
    p.add_argument("--no-wait", action="store_true", help="start (or resume) the rotation and return")
    p.add_argument("--batch-size", type=int, default=None, help="data keys re-wrapped per transaction (default 256)")
    p.add_argument("--throttle", type=float, default=None, metavar="SECONDS", help="pause between batches (default 0)")
    p.add_argument("--json", action="store_true")

    p = key_sub.add_parser("status", help="master keys, how many keys each wraps, rotation state")
    p.add_argument("target", nargs="?", help="a mount point or a store (default: the only live mifs mount)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--cache-dir", type=Path)
    add_key_flags(p)
    add_store_flags(p)


def _new_source(args: argparse.Namespace) -> KeySource | None:
    from mifs.crypto.keyring import MasterKey, write_key_file
    from mifs.crypto.keysource import KIND_CREDENTIAL, KIND_FILE, KIND_KMS, KIND_PASSPHRASE, KeySource

    chosen = [
        flag for flag, value in (
            ("--new-key-file", args.new_key_file), ("--new-key-credential", args.new_key_credential),
            ("--new-passphrase-file", args.new_passphrase_file), ("--new-kms-key-id", args.new_kms_key_id),
        ) if value
    ]
    if len(chosen) > 1:
        raise UserError(f"give one new key source, not {' and '.join(chosen)}", EXIT_USAGE)
    if args.generate and not args.new_key_file:
        raise UserError("--generate needs --new-key-file (the path of the key file to create)", EXIT_USAGE)
    if (args.new_kms_endpoint or args.new_kms_region) and not args.new_kms_key_id:
        raise UserError("--new-kms-endpoint and --new-kms-region need --new-kms-key-id", EXIT_USAGE)
    if args.new_key_file:
        path = args.new_key_file.absolute()
        if args.generate:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            try:
                write_key_file(path, MasterKey.generate())
            except KeyFileError as exc:
                raise UserError(str(exc), EXIT_KEY) from None
            print(f"mifs: wrote a new master key to {path} (back it up)", file=sys.stderr)
        return KeySource(KIND_FILE, path=path)
    if args.new_key_credential:
        return KeySource(KIND_CREDENTIAL, name=args.new_key_credential)
    if args.new_passphrase_file:
        return KeySource(KIND_PASSPHRASE, path=args.new_passphrase_file.absolute())
    if args.new_kms_key_id:
        return KeySource(KIND_KMS, name=args.new_kms_key_id, endpoint=args.new_kms_endpoint, region=args.new_kms_region)
    return None


def cmd_key_rotate(args: argparse.Namespace) -> int:
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError("--batch-size must be at least 1", EXIT_USAGE)
    if args.throttle is not None and not 0 <= args.throttle <= 60:
        raise UserError("--throttle must be between 0 and 60 seconds", EXIT_USAGE)
    mountpoint = named_or_only_mount(args.mountpoint)
    if mount_fstype(mountpoint) != "fuse.mifs":  # before --generate writes a key file
        raise UserError(f"{mountpoint} is not a mifs mount{ROTATION_IN_DAEMON}", EXIT_DAEMON)
    source = _new_source(args)
    message: dict[str, Any] = {
        "op": "key-rotate", "source": source.to_record() if source else None, "wait": not args.no_wait,
        "batch": args.batch_size, "throttle": args.throttle,
    }
    final: dict[str, Any] | None = None
    for reply in replies(mountpoint, message, not_mifs=ROTATION_IN_DAEMON):
        if "progress" in reply:
            p = reply["progress"]
            if not args.json:
                print(f"mifs: {p.get('state')}: {p.get('files_done')}/{p.get('files_total')} file keys", file=sys.stderr)
        else:
            final = reply
    if final is None:
        raise UserError(f"the mifs daemon for {mountpoint} closed the connection without an answer", EXIT_DAEMON)
    if not final.get("ok"):
        raise UserError(str(final.get("error", "key rotation failed")), _KIND_EXIT.get(str(final.get("kind")), EXIT_ROTATION))
    if args.json:
        print(json.dumps(final, indent=2, sort_keys=True))
    elif not final.get("waited"):
        print(f"key rotation to master key {final.get('new_kek_id')}: {final.get('state')} (see mifs key status)")
    else:
        print(f"key rotation complete: master key {final.get('new_kek_id')} is current")
        if final.get("retired_kek_id"):
            print(
                f"master key {final['retired_kek_id']} is retired: {final.get('retired_source')} is no longer needed by "
                "this archive (mifs does not delete it; destroy it once no backup of the store made before now needs it), "
                "and mounts given it are refused. Point the mount's key source at the new key."
            )
    return 0


def _offline_key_status(args: argparse.Namespace) -> dict[str, Any]:
    import trio

    from mifs.keyrotation import key_status
    from mifs.keystore import read_rotation
    from mifs.opening import default_cache_dir, open_archive, open_cache_db, translate
    from mifs.store.url import StoreOptions

    options = StoreOptions(
        endpoint_url=args.endpoint_url, region=args.region, addressing_style=args.addressing_style or "auto",
        ca_bundle=args.ca_bundle.absolute() if args.ca_bundle else None, profile=args.profile,
    )
    source = key_source_from_args(args)

    async def run() -> dict[str, Any]:
        archive = await open_archive(args.target, source, need_key=False, options=options)
        record = archive.rotation if archive.keyring is not None else await read_rotation(archive.store)
        cache_dir = args.cache_dir or default_cache_dir(archive.descriptor.archive_id_hex)
        db = open_cache_db(cache_dir, archive) if archive.keyring is not None and (cache_dir / "meta.db").exists() else None
        try:
            current = archive.kek.kek_id if archive.kek is not None else None
            status = await key_status(db, archive.store, current, archive.descriptor, record)
        finally:
            if db is not None:
                db.close()
        status["mounted"] = False
        return status

    try:
        return trio.run(run)
    except Exception as exc:
        raise translate(exc) from None


def cmd_key_status(args: argparse.Namespace) -> int:
    target = args.target
    if target is None:
        target = str(only_live_mount())
    status: dict[str, Any] | None = None
    if "://" not in target and Path(target).is_dir() and mount_fstype(Path(target)) == "fuse.mifs":
        for reply in replies(Path(target).absolute(), {"op": "key-status"}, timeout=30, not_mifs=ROTATION_IN_DAEMON):
            if reply.get("ok"):
                status = {**reply["keys"], "mounted": True}
            else:
                raise UserError(str(reply.get("error")), EXIT_DAEMON)
    if status is None:
        args.target = target
        status = _offline_key_status(args)
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
        return 0
    for key in status["keys"]:
        files = "?" if key["files"] is None else key["files"]
        wraps = "?" if key["wrapped_keys"] is None else key["wrapped_keys"]
        extra = f", retired {key['retired']}, replaced by {key['replaced_by']}" if key.get("retired") else ""
        print(f"{key['kek_id']}  {key['role']:<27}  wraps {wraps} keys ({files} files, {key['objects']} objects){extra}")
    rotation = status.get("rotation")
    if rotation:
        print(
            f"rotation {rotation.get('old_kek_id')} -> {rotation.get('new_kek_id')}: {rotation.get('state', 'in progress')}"
            + (f", {rotation['files_done']}/{rotation['files_total']} file keys" if "files_done" in rotation else "")
            + (f" (error: {rotation['error']})" if rotation.get("error") else "")
        )
    else:
        print("no key rotation in progress")
    return 0


def cmd_key(args: argparse.Namespace) -> int:
    return cmd_key_rotate(args) if args.key_command == "rotate" else cmd_key_status(args)


COMMANDS = {"key": cmd_key}
