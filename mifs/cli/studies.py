"""`mifs studies`, `mifs cache ls|pin|unpin|prefetch` and `mifs reindex`: the study commands.

Must hold no business logic: each command asks the daemon of a live mount over the control
socket and prints its answer. Progress goes to stderr, results to stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from mifs.cli.control import add_mountpoint_arg, ask, mountpoint_of
from mifs.config import format_size
from mifs.errors import UserError
from mifs.exit_codes import EXIT_USAGE


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("studies", help="list the DICOM studies of a mounted archive")
    add_mountpoint_arg(p, positional=True)
    p.add_argument("--patient", metavar="ID", help="only this Patient ID")
    p.add_argument("--study", metavar="UID", help="only this Study Instance UID")
    p.add_argument("--since", metavar="DATE", help="only studies on or after DATE (YYYY-MM-DD)")
    p.add_argument("--modality", metavar="M", help="only studies with an instance of modality M (CT, MR, ...)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--instances", action="store_true", help="list instances (files) instead of studies")
    what.add_argument("--malformed", action="store_true", help="list files that look like DICOM but cannot be indexed")
    p.add_argument("--json", action="store_true")

    cache = sub.add_parser("cache", help="what the local cache holds: ls, pin, unpin, prefetch")
    csub = cache.add_subparsers(dest="cache_command", metavar="COMMAND", required=True, parser_class=type(cache))
    p = csub.add_parser("ls", help="studies with data in the cache, and pinned studies")
    add_mountpoint_arg(p, positional=True)
    p.add_argument("--json", action="store_true")
    for name, text in (("pin", "keep a study in the cache (fetching it now); never evicted"), ("unpin", "let a pinned study be evicted again")):
        p = csub.add_parser(name, help=text)
        p.add_argument("study", metavar="STUDY_UID")
        add_mountpoint_arg(p, positional=False)
    p = csub.add_parser("prefetch", help="fetch a study, or every study of a patient, into the cache")
    p.add_argument("study", metavar="STUDY_UID", nargs="?")
    p.add_argument("--patient", metavar="ID")
    p.add_argument("--no-wait", action="store_true", help="queue the prefetch and return")
    add_mountpoint_arg(p, positional=False)

    p = sub.add_parser("reindex", help="rebuild the study index from the files themselves")
    add_mountpoint_arg(p, positional=True)




# --- studies -----------------------------------------------------------------------------------


def cmd_studies(args: argparse.Namespace) -> int:
    mode = "instances" if args.instances else "malformed" if args.malformed else "studies"
    message = {
        "op": "studies", "mode": mode, "patient": args.patient, "study": args.study, "since": args.since,
        "modality": args.modality,
    }
    reply = ask(mountpoint_of(args), message)
    items: list[dict[str, Any]] = reply.get("items", [])
    if args.json:
        print(json.dumps(items, indent=2))
    elif mode == "instances":
        _table(items, [("series_number", "SERIES"), ("instance_number", "INSTANCE"), ("modality", "MODALITY"),
                       ("bytes", "SIZE"), ("path", "PATH")])
    elif mode == "malformed":
        _table(items, [("bytes", "SIZE"), ("path", "PATH"), ("error", "PROBLEM")])
    else:
        _print_studies(items)
    if not reply.get("indexing", True) and not args.json:
        print("mifs: note: this mount does not index written files (--no-index); run `mifs reindex`", file=sys.stderr)
    return 0


def _print_studies(items: list[dict[str, Any]]) -> None:
    rows = [
        {**s, "modalities": ",".join(s["modalities"]), "cache": s["cache"] + (" pinned" if s["pinned"] else "")}
        for s in items
    ]
    _table(rows, [("study_date", "DATE"), ("patient_id", "PATIENT ID"), ("modalities", "MODALITY"), ("series", "SERIES"),
                  ("instances", "IMAGES"), ("bytes", "SIZE"), ("cache", "CACHE"), ("study_instance_uid", "STUDY UID")])


def _table(items: list[dict[str, Any]], columns: list[tuple[str, str]]) -> None:
    if not items:
        print("(none)")
        return

    def cell(item: dict[str, Any], key: str) -> str:
        value = item.get(key)
        if value is None:
            return "-"
        if key == "bytes":
            return format_size(int(value))
        return str(value)

    cells = [[cell(item, key) for key, _ in columns] for item in items]
    widths = [max(len(title), *(len(row[i]) for row in cells)) for i, (_, title) in enumerate(columns)]
    print("  ".join(title.ljust(w) for (_, title), w in zip(columns, widths)).rstrip())
    for row in cells:
        print("  ".join(value.ljust(w) for value, w in zip(row, widths)).rstrip())


# --- cache -------------------------------------------------------------------------------------


def cmd_cache(args: argparse.Namespace) -> int:
    mountpoint = mountpoint_of(args)
    command = args.cache_command
    if command == "ls":
        items = ask(mountpoint, {"op": "cache-ls"}).get("items", [])
        if args.json:
            print(json.dumps(items, indent=2))
        else:
            _print_studies(items)
        return 0
    if command in ("pin", "unpin"):
        reply = ask(mountpoint, {"op": command, "study": args.study})
        if command == "pin":
            fetching = int(reply.get("fetching") or 0)
            print(f"pinned {args.study}" + (f"; fetching {fetching} objects into the cache" if fetching else ""))
        else:
            print(f"unpinned {args.study}")
        return 0
    if bool(args.study) == bool(args.patient):
        raise UserError("cache prefetch needs a STUDY_UID or --patient ID (one of them)", EXIT_USAGE)
    reply = ask(
        mountpoint, {"op": "prefetch", "study": args.study, "patient": args.patient, "wait": not args.no_wait},
        on_progress=_print_prefetch_progress,
    )
    if args.no_wait:
        print(f"queued {reply.get('studies')} studies ({reply.get('objects')} objects) for prefetch")
        return 0
    print(
        f"prefetched {reply.get('studies')} studies: {reply.get('fetched')} objects "
        f"({format_size(int(reply.get('fetched_bytes') or 0))}) fetched, {reply.get('already_cached')} already cached"
        + (f", {reply.get('failed')} failed" if reply.get("failed") else "")
    )
    return 1 if reply.get("failed") else 0


def _print_prefetch_progress(progress: dict[str, Any]) -> None:
    print(
        f"mifs: prefetching: {progress.get('done')}/{progress.get('objects')} objects, "
        f"{format_size(int(progress.get('fetched_bytes') or 0))} fetched",
        file=sys.stderr,
    )


# --- reindex -----------------------------------------------------------------------------------


def cmd_reindex(args: argparse.Namespace) -> int:
    def progress(p: dict[str, Any]) -> None:
        files, left = int(p.get("files") or 0), int(p.get("left") or 0)
        print(f"mifs: reindexing: {files - left}/{files} files", file=sys.stderr)

    reply = ask(mountpoint_of(args), {"op": "reindex"}, on_progress=progress)
    print(
        f"reindexed {reply.get('files')} files: {reply.get('instances')} DICOM instances in {reply.get('studies')} studies, "
        f"{reply.get('malformed')} malformed, {reply.get('other')} other"
        + (f"; {reply.get('failed')} could not be read" if reply.get("failed") else "")
    )
    return 1 if reply.get("failed") else 0


COMMANDS = {"studies": cmd_studies, "cache": cmd_cache, "reindex": cmd_reindex}
