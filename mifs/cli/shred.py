"""`mifs shred` and `mifs undelete`: crypto-shredding and retention, asked of a live mount.

Must hold no business logic: the daemon of the mount does the work (shred/). Prints counts,
never file names, except the undelete listing (paths the admin asked to see).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from mifs.cli.control import ask, named_or_only_mount
from mifs.config import format_size
from mifs.errors import UserError
from mifs.mounttable import live_mifs_mounts
from mifs.exit_codes import EXIT_REFUSED, EXIT_USAGE


def add_parsers(sub: Any) -> None:
    p = sub.add_parser(
        "shred", help="destroy files for good: their keys, chunks and every metadata copy holding the keys",
    )
    p.add_argument("paths", metavar="PATH", nargs="*", type=Path, help="files in a live mifs mount")
    p.add_argument("--study", metavar="UID", help="every file of this Study Instance UID (also deleted, retained ones)")
    p.add_argument("--patient", metavar="ID", help="every file of this Patient ID (also deleted, retained ones)")
    p.add_argument("-m", "--mountpoint", type=Path, help="the mount (with --study/--patient; default: the only live one)")
    p.add_argument("--override-worm", action="store_true", help="also shred files still inside the --worm window")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")

    p = sub.add_parser("undelete", help="bring back a file deleted within the --retention-days window")
    p.add_argument("path", metavar="PATH", nargs="?", type=Path, help="where the file was (in a live mifs mount)")
    p.add_argument("--id", type=int, metavar="N", help="the retained file with this id (from --list)")
    p.add_argument("--to", type=Path, metavar="NEWPATH", help="restore under this path instead")
    p.add_argument("--list", action="store_true", help="list the deleted files that can still be restored")
    p.add_argument("--json", action="store_true", help="with --list: JSON")
    p.add_argument("-m", "--mountpoint", type=Path, help="the mount (with --list/--id; default: the only live one)")


def _mount_of(path: Path) -> tuple[Path, str]:
    """The live mifs mount holding `path` (which need not exist) and the path inside it."""
    real = Path(os.path.realpath(path.absolute()))
    for mount in sorted(live_mifs_mounts(), key=lambda m: len(str(m)), reverse=True):
        root = Path(os.path.realpath(mount))
        if real == root or root in real.parents:
            return mount, str(real.relative_to(root))
    raise UserError(f"{path} is not inside a live mifs mount", EXIT_USAGE)


def _ask(mountpoint: Path, message: dict[str, Any], progress: bool = False) -> dict[str, Any]:
    def report(p: dict[str, Any]) -> None:
        if "left" in p:
            print(f"mifs: shred: {p.get('objects', 0) - p.get('left', 0)}/{p.get('objects')} objects deleted", file=sys.stderr)
        else:
            print(f"mifs: shred: {p.get('step')}" + (f" (waiting: {p['error']})" if p.get("error") else ""), file=sys.stderr)

    return ask(mountpoint, message, on_progress=report if progress else None)


def cmd_shred(args: argparse.Namespace) -> int:
    chosen = [bool(args.paths), bool(args.study), bool(args.patient)]
    if sum(chosen) != 1:
        raise UserError("shred needs PATH..., --study UID or --patient ID (one of them)", EXIT_USAGE)
    message: dict[str, Any] = {"op": "shred", "override_worm": args.override_worm}
    if args.paths:
        places = [_mount_of(p) for p in args.paths]
        mounts = {m for m, _ in places}
        if len(mounts) != 1:
            raise UserError("all PATHs must be in the same mifs mount", EXIT_USAGE)
        mountpoint = places[0][0]
        message["paths"] = [rel for _, rel in places]
    else:
        mountpoint = named_or_only_mount(args.mountpoint)
        message["study" if args.study else "patient"] = args.study or args.patient
    preview = _ask(mountpoint, {**message, "dry_run": True})
    what = f"{preview['files']} files ({format_size(int(preview['bytes']))}, {preview['objects']} objects" + (
        f", {preview['retained']} of them deleted but retained)" if preview.get("retained") else ")"
    )
    if not args.yes:
        if not sys.stdin.isatty():
            raise UserError(f"shred would destroy {what}; confirm with --yes (stdin is not a terminal)", EXIT_USAGE)
        answer = input(f"mifs: destroy {what} for good? This cannot be undone. Type 'yes': ")
        if answer.strip().lower() != "yes":
            raise UserError("shred cancelled; nothing was destroyed", EXIT_REFUSED)
    result = _ask(mountpoint, message, progress=True)
    print(
        f"shredded {result['files']} files ({format_size(int(result['bytes']))}): keys destroyed, "
        f"{result['objects']} chunk objects and every older metadata copy deleted from the store"
    )
    return 0


def cmd_undelete(args: argparse.Namespace) -> int:
    if args.list:
        if args.path or args.id is not None or args.to:
            raise UserError("undelete --list takes no PATH, --id or --to", EXIT_USAGE)
        mountpoint = named_or_only_mount(args.mountpoint)
        items: list[dict[str, Any]] = ask(mountpoint, {"op": "undelete-list"}).get("items", [])
        if args.json:
            print(json.dumps(items, indent=2))
        elif not items:
            print("(none)")
        else:
            print(f"{'ID':>8}  {'SIZE':>10}  {'DELETED':20}  {'EXPIRES':20}  PATH")
            for item in items:
                path = item.get("path") or "(directory gone)"
                print(f"{item['id']:>8}  {format_size(int(item['bytes'])):>10}  {item['deleted']:20}  {item['expires']:20}  {path}")
        return 0
    if (args.path is None) == (args.id is None):
        raise UserError("undelete needs a PATH or --id N (or --list)", EXIT_USAGE)
    message: dict[str, Any] = {"op": "undelete"}
    if args.path is not None:
        mountpoint, rel = _mount_of(args.path)
        message["path"] = rel
    else:
        mountpoint = named_or_only_mount(args.mountpoint)
        message["id"] = args.id
    if args.to is not None:
        to_mount, to_rel = _mount_of(args.to)
        if os.path.realpath(to_mount) != os.path.realpath(mountpoint):
            raise UserError("--to must be in the same mifs mount", EXIT_USAGE)
        message["to"] = to_rel
    result = ask(mountpoint, message)
    print(f"restored file {result.get('id')} ({format_size(int(result.get('bytes') or 0))})")
    return 0


COMMANDS = {"shred": cmd_shred, "undelete": cmd_undelete}
