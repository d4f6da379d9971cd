"""`mifs sync`: wait until every file closed so far is in the store, asked of a live mount.

Must hold no business logic: the daemon does the work (store_sync.py). Prints counts and
sizes, never names.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from mifs.cli.control import add_mountpoint_arg, ask, mountpoint_of
from mifs.config import format_size
from mifs.errors import UserError
from mifs.exit_codes import EXIT_STORE, EXIT_USAGE


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("sync", help="wait until every file closed so far is in the store (data and metadata)")
    add_mountpoint_arg(p, positional=True)
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="give up after this long (exit 3); default: wait")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress lines (shown only on a terminal anyway)")


def cmd_sync(args: argparse.Namespace) -> int:
    if args.timeout is not None and not args.timeout > 0:
        raise UserError("--timeout must be a positive number of seconds", EXIT_USAGE)
    deadline = None if args.timeout is None else time.monotonic() + args.timeout

    def on_progress(progress: dict[str, Any]) -> None:
        error = f" (last error: {progress['error']})" if progress.get("error") else ""
        if not args.quiet and sys.stderr.isatty():  # a script gets one line, the error, or none
            print(f"mifs: sync: {progress.get('left')} of {progress.get('objects')} objects still to upload{error}",
                  file=sys.stderr)
        if deadline is not None and time.monotonic() >= deadline:
            raise UserError(f"{progress.get('left')} of {progress.get('objects')} objects were still not in the store "
                            f"after {args.timeout:g} s{error}", EXIT_STORE)

    # Progress comes every second: a socket this quiet for longer means a stuck daemon.
    final = ask(mountpoint_of(args), {"op": "sync"}, on_progress,
                timeout=None if args.timeout is None else args.timeout + 5)
    if args.json:
        print(json.dumps({k: final.get(k) for k in ("objects", "bytes", "metadata_seq", "seconds")}))
    else:
        print(f"in the store: {final['objects']} objects ({format_size(int(final['bytes']))}) uploaded by this sync, "
              f"metadata up to commit {final['metadata_seq']} ({final['seconds']:.1f} s)")
    return 0


COMMANDS = {"sync": cmd_sync}
