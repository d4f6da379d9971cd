"""`mifs audit verify` and `mifs audit query`: check the audit trail and ask who accessed what.

No business logic: with a live mount the daemon answers over the control socket (so the
answer includes the last second of records); with --store the trail is read from the store
and the cache dir's spool directly.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mifs.cli.control import ask, named_or_only_mount
from mifs.cli.keys import add_key_flags, key_source_from_args
from mifs.errors import UserError
from mifs.exit_codes import EXIT_ARCHIVE, EXIT_AUDIT, EXIT_USAGE

if TYPE_CHECKING:
    from mifs.audit import verify
    from mifs.crypto.keyring import MasterKey
    from mifs.store.base import ObjectStore
    from mifs.store.url import StoreOptions
    from mifs.types import ArchiveId

# Reading the trail (trio, the store, the crypto stack) is imported where it is done: asking a
# live mount needs none of it (see cli/main.py).


def add_parsers(sub: Any, add_store_flags: Any) -> None:
    audit = sub.add_parser("audit", help="the access audit trail: verify, query")
    asub = audit.add_subparsers(dest="audit_command", metavar="COMMAND", required=True, parser_class=type(audit))
    p = asub.add_parser("verify", help="check that no record or segment was modified, deleted, reordered or truncated")
    _source_flags(p, add_store_flags)
    p.add_argument("--json", action="store_true")
    p = asub.add_parser("query", help="who accessed what, when, with what")
    _source_flags(p, add_store_flags)
    p.add_argument("--patient", metavar="ID", help="only accesses of this Patient ID's files")
    p.add_argument("--study", metavar="UID", help="only accesses of this Study Instance UID's files")
    p.add_argument("--uid", type=int, metavar="N", help="only requests of this user id")
    p.add_argument("--since", metavar="T", help="ISO 8601 time or date (UTC unless it says otherwise)")
    p.add_argument("--until", metavar="T", help="ISO 8601 time or date (UTC unless it says otherwise)")
    p.add_argument("--json", action="store_true", help="a JSON array of the records")
    p.add_argument("--format", choices=["text", "json", "syslog"], help="syslog: RFC 5424 fields as JSON, one object per line")


def _source_flags(p: argparse.ArgumentParser, add_store_flags: Any) -> None:
    p.add_argument("mountpoint", nargs="?", type=Path, help="a live mount (default: the only one)")
    p.add_argument("--store", help="read the trail from this store instead of a live mount")
    add_key_flags(p)
    p.add_argument("--cache-dir", type=Path, help="also read this cache dir's local spool (default: the archive's default cache dir)")
    add_store_flags(p)


def _mount(args: argparse.Namespace) -> Path:
    return named_or_only_mount(args.mountpoint, "name a mount point or use --store URL --key-file F")


def _offline(args: argparse.Namespace, store_options: StoreOptions, query: verify.Query | None) -> dict[str, Any]:
    import trio

    from mifs.audit import verify
    from mifs.audit.spool import SPOOL_DIR, Spool
    from mifs.audit.trail import AuditError, load_audit_keys
    from mifs.errors import ObjectNotFound
    from mifs.opening import default_cache_dir, open_archive

    async def run() -> dict[str, Any]:
        archive = await open_archive(args.store, key_source_from_args(args), options=store_options)
        assert archive.keyring is not None
        desc = archive.descriptor
        cache_dir = args.cache_dir or default_cache_dir(desc.archive_id_hex)
        spool = Spool(cache_dir / SPOOL_DIR) if (cache_dir / SPOOL_DIR).is_dir() else None
        try:
            keys = await load_audit_keys(archive.store, archive.keyring, desc.archive_id, spool, create=False)
        except (AuditError, ObjectNotFound) as exc:
            raise UserError(f"cannot read the audit trail: {exc}", EXIT_ARCHIVE) from None
        report = verify.analyse(keys, desc.archive_id, await verify.read_image(archive.store, spool))
        if query is None:
            return {"ok": True, "problems": report.problems, "gaps": report.gaps, "segments": len(report.segments),
                    "sealed_segments": report.sealed_count, "records": report.record_count}
        return {"ok": True, "records": verify.select(report, query), "problems": report.problems}

    return trio.run(run)


def cmd_verify(args: argparse.Namespace, store_options: StoreOptions) -> int:
    result = _offline(args, store_options, None) if args.store else ask(_mount(args), {"op": "audit-verify"})
    problems, gaps = list(result.get("problems") or []), list(result.get("gaps") or [])
    if args.json:
        print(json.dumps({k: result.get(k) for k in ("problems", "gaps", "segments", "sealed_segments", "records")}, indent=2))
    else:
        print(f"audit trail: {result.get('segments')} segments ({result.get('sealed_segments')} sealed), {result.get('records')} records")
        for gap in gaps:
            print(f"gap: {gap.get('why')}" + (f" (session {gap['session']}, last record {gap.get('last_record')})" if gap.get("session") else ""))
        for problem in problems:
            print(f"FAILED: {problem}")
        if not problems:
            print("verified: no record or segment was modified, deleted, reordered or truncated")
    if problems:
        raise UserError(f"the audit trail failed verification ({len(problems)} problems)", EXIT_AUDIT)
    return 0


def _syslog(rec: dict[str, Any]) -> dict[str, Any]:
    """RFC 5424 fields (as JSON): the record's fields go into structured data."""
    fields = {k: v for k, v in rec.items() if k not in ("t", "ev")}
    return {
        "version": 1, "facility": 13, "severity": 4 if rec.get("ev") in ("denied", "integrity-failure", "gap") else 6,
        "timestamp": rec.get("t"), "hostname": socket.gethostname(), "app_name": "mifs", "procid": "-",
        "msgid": rec.get("ev"), "structured_data": {"mifs-audit@32473": fields},
        "msg": f"{rec.get('ev')} {rec.get('path') or rec.get('action') or ''}".strip(),
    }


def _text(rec: dict[str, Any]) -> str:
    parts = [str(rec.get("t", "-")), str(rec.get("ev"))]
    if rec.get("ev") == "gap":
        return f"{rec.get('last_record') or '-'} GAP {rec.get('why')}"
    if rec.get("action"):
        parts.append(str(rec["action"]))
    if rec.get("op"):
        parts.append(f"op={rec['op']}")
    parts.append(f"uid={rec.get('uid')} gid={rec.get('gid')} pid={rec.get('pid')}")
    if rec.get("comm") or rec.get("exe"):
        parts.append(f"{rec.get('comm')}({rec.get('exe')})")
    if rec.get("path"):
        parts.append(str(rec["path"]) + (f" -> {rec['new_path']}" if rec.get("new_path") else ""))
    for key in ("patient", "study", "sop", "bytes_read", "bytes_written"):
        if rec.get(key) not in (None, ""):
            parts.append(f"{key}={rec[key]}")
    return "  ".join(parts)


def cmd_query(args: argparse.Namespace, store_options: StoreOptions) -> int:
    message = {"op": "audit-query", "patient": args.patient, "study": args.study, "uid": args.uid,
               "since": args.since, "until": args.until}
    message = {k: v for k, v in message.items() if v is not None}
    from mifs.audit.commands import query_from_request

    try:
        query = query_from_request(message)
    except ValueError as exc:
        raise UserError(str(exc), EXIT_USAGE) from None
    result = _offline(args, store_options, query) if args.store else ask(_mount(args), message)
    rows: list[dict[str, Any]] = list(result.get("records") or [])
    fmt = args.format or ("json" if args.json else "text")
    if fmt == "json":
        print(json.dumps(rows, indent=2))
    elif fmt == "syslog":
        for rec in rows:
            print(json.dumps(_syslog(rec), separators=(",", ":")))
    else:
        for rec in rows:
            print(_text(rec))
    problems = result.get("problems") or []
    if problems:
        print(f"mifs: warning: the audit trail failed verification ({len(problems)} problems; see mifs audit verify)", file=sys.stderr)
    return 0


async def record_init(store: ObjectStore, kek: MasterKey, archive_id: ArchiveId, **details: Any) -> bool:
    """Open the new archive's audit trail with its first record, `init` by this process's
    user, and store it at once (a short-lived spool in a temporary directory: the mount's
    cache dir is not known yet). False if the record could not be stored."""
    from mifs.audit.spool import SPOOL_DIR, Spool
    from mifs.audit.trail import Actor, AuditError, open_trail
    from mifs.crypto.keyring import KeyRing
    from mifs.errors import StorePermissionDenied, StoreUnavailable

    with tempfile.TemporaryDirectory(prefix="mifs-init-audit-") as tmp:
        spool = Spool(Path(tmp) / SPOOL_DIR)
        try:
            trail, _notes = await open_trail(store, KeyRing(kek), archive_id, spool)
            trail.admin("init", Actor(os.getuid(), os.getgid(), os.getpid()), **details)
            await trail.close(ship_timeout=30)
        except (AuditError, StoreUnavailable, StorePermissionDenied, OSError):
            return False
        return not spool.sealed_segments() and not spool.open_segments()
