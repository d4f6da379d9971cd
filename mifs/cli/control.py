"""The CLI's side of the control socket: which live mount a command means, and asking its daemon.

Must hold no command logic: the command modules build the messages and print the answers.
Every way the daemon can fail to answer becomes one UserError line with the right exit code.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable, Iterator

from mifs.control_protocol import ControlUnavailable, request
from mifs.errors import UserError
from mifs.mounttable import live_mifs_mounts, mount_fstype
from mifs.exit_codes import EXIT_DAEMON, EXIT_NOT_FOUND, EXIT_REFUSED, EXIT_STORE, EXIT_USAGE

_KIND_EXIT = {"not-found": EXIT_NOT_FOUND, "usage": EXIT_USAGE, "refused": EXIT_REFUSED, "store": EXIT_STORE}
"""Exit codes of the error kinds a daemon's reply names (control_server)."""


def only_live_mount(otherwise: str = "mount one or name its mount point") -> Path:
    """The mount point of the one live mifs mount; a UserError when there are none or several.
    otherwise: what the admin can do when none is live."""
    mounts = live_mifs_mounts()
    if not mounts:
        raise UserError(f"no mifs mount is live; {otherwise}", EXIT_DAEMON)
    if len(mounts) > 1:
        raise UserError(f"several mifs mounts are live ({', '.join(map(str, mounts))}): name one", EXIT_USAGE)
    return Path(mounts[0])


def named_or_only_mount(given: Path | None, otherwise: str = "mount one or name its mount point") -> Path:
    """The mount point the admin named, else the only live one."""
    return Path(given).absolute() if given is not None else only_live_mount(otherwise)


def add_mountpoint_arg(p: argparse.ArgumentParser, *, positional: bool) -> None:
    """The mount a command means: a positional MOUNTPOINT (-m also accepted) for commands
    whose only argument it is, else -m/--mountpoint (after a positional such as a study UID,
    argparse cannot tell an optional positional apart)."""
    if positional:
        p.add_argument("mountpoint", nargs="?", type=Path, help="the mount (default: the only live mifs mount)")
        p.add_argument("-m", "--mountpoint", dest="mountpoint_flag", type=Path, help=argparse.SUPPRESS)
    else:
        p.add_argument("-m", "--mountpoint", dest="mountpoint_flag", type=Path, help="the mount (default: the only live mifs mount)")


def mountpoint_of(args: argparse.Namespace) -> Path:
    """The mount add_mountpoint_arg's arguments name, else the only live one."""
    given = getattr(args, "mountpoint", None) or getattr(args, "mountpoint_flag", None)
    return named_or_only_mount(given)


def replies(mountpoint: Path, message: dict[str, Any], *, timeout: float | None = None, not_mifs: str = "") -> Iterator[dict[str, Any]]:
    """The daemon's replies to one request (progress lines, then the final one). not_mifs: said
    after "... is not a mifs mount" when nothing answers at a path that is not one."""
    try:
        yield from request(mountpoint, message, timeout=timeout)
    except ControlUnavailable:
        if mount_fstype(mountpoint) == "fuse.mifs":
            raise UserError(f"the mifs daemon for {mountpoint} is not responding", EXIT_DAEMON) from None
        raise UserError(f"{mountpoint} is not a mifs mount{not_mifs}", EXIT_DAEMON) from None


def ask(
    mountpoint: Path, message: dict[str, Any], on_progress: Callable[[dict[str, Any]], None] | None = None, *,
    not_mifs: str = "", timeout: float | None = None,
) -> dict[str, Any]:
    """Send one request; hand progress lines to on_progress (which may raise to give up); the
    final reply, or its error raised. timeout: longest silence of the socket (None: wait)."""
    final: dict[str, Any] | None = None
    for reply in replies(mountpoint, message, not_mifs=not_mifs, timeout=timeout):
        if "progress" in reply:
            if on_progress is not None:
                on_progress(reply["progress"])
        else:
            final = reply
    if final is None:
        raise UserError(f"the mifs daemon for {mountpoint} closed the connection without an answer", EXIT_DAEMON)
    if not final.get("ok"):
        error = str(final.get("error", "the request failed"))
        if error.startswith("unknown request"):
            raise UserError(f"the mifs daemon for {mountpoint} is too old for this command; remount it", EXIT_DAEMON)
        raise UserError(error, _KIND_EXIT.get(str(final.get("kind")), EXIT_DAEMON))
    return final
