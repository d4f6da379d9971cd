"""`mifs sweep` and `mifs writers`: the orphan sweep and the writer registry, asked of a live mount.

Must hold no business logic: the daemon of the mount does the work (sweep/). Prints counts,
session ids and times; nothing here names a file or a patient.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from mifs.cli.control import add_mountpoint_arg, ask, mountpoint_of
from mifs.errors import UserError
from mifs.exit_codes import EXIT_REFUSED, EXIT_USAGE

def add_parsers(sub: Any) -> None:
    p = sub.add_parser("sweep", help="run one pass of the orphan sweep now (store objects no metadata names)")
    add_mountpoint_arg(p, positional=True)
    p.add_argument("--json", action="store_true")

    writers = sub.add_parser("writers", help="the writable mounts registered in the store: ls, rm")
    wsub = writers.add_subparsers(dest="writers_command", metavar="COMMAND", required=True, parser_class=type(writers))
    p = wsub.add_parser("ls", help="every registered writable mount of the archive, this one marked")
    add_mountpoint_arg(p, positional=True)
    p.add_argument("--json", action="store_true")
    p = wsub.add_parser("rm", help="remove the registration of a host that will never write this archive again")
    p.add_argument("session", metavar="SESSION", help="the session id `mifs writers ls` shows")
    add_mountpoint_arg(p, positional=False)
    p.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")


def cmd_sweep(args: argparse.Namespace) -> int:
    mountpoint = mountpoint_of(args)
    result = ask(mountpoint, {"op": "sweep"})
    if args.json:
        print(json.dumps({k: result[k] for k in ("purged", "candidates", "grace_seconds")}))
        return 0
    print(f"orphan sweep: {result['purged']} unnamed store objects deleted")
    if result["candidates"]:
        print(
            f"{result['candidates']} unnamed objects found; a pass at least {_duration(float(result['grace_seconds']))} "
            "after the one that first found them deletes them (tuning.orphan_grace)"
        )
    return 0


def cmd_writers(args: argparse.Namespace) -> int:
    mountpoint = mountpoint_of(args)
    if args.writers_command == "ls":
        writers: list[dict[str, Any]] = ask(mountpoint, {"op": "writers-ls"})["writers"]
        if args.json:
            print(json.dumps(writers, indent=2))
            return 0
        print(f"{'SESSION':32}  {'REGISTERED (UTC)':20}  MOUNT")
        for w in writers:
            print(f"{w['session']:32}  {w['registered'] or '(unknown)':20}  {'this mount' if w['this_mount'] else 'another mount or host'}")
        return 0
    if not args.yes:
        warning = (
            f"remove writer registration {args.session}? Only if the host that mounted it will never write this "
            "archive again: the sweep here could otherwise delete data only that host's metadata names."
        )
        if not sys.stdin.isatty():
            raise UserError(f"{warning} Confirm with --yes (stdin is not a terminal)", EXIT_USAGE)
        if input(f"mifs: {warning} Type 'yes': ").strip().lower() != "yes":
            raise UserError("writers rm cancelled; nothing was removed", EXIT_REFUSED)
    ask(mountpoint, {"op": "writers-rm", "session": args.session})
    print(f"removed writer registration {args.session}")
    return 0


def _duration(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:g} h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g} min"
    return f"{seconds:g} s"


COMMANDS = {"sweep": cmd_sweep, "writers": cmd_writers}
