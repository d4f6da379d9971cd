"""The control channel between the CLI and a running daemon: where its socket lives, and the
JSON-lines messages on it. Includes the blocking client the CLI uses.

Must not know about the filesystem: it moves small JSON documents. The socket is a Unix
stream socket, mode 0600, in a root-only runtime directory, named by a hash of the mount
point so the path carries no file or patient names.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator

Send = Callable[[dict[str, Any]], Awaitable[None]]
"""How a daemon-side handler answers: each call sends one reply line (progress, then final)."""
Handler = Callable[[dict[str, Any], Send], Awaitable[None]]
"""A daemon-side request handler: the request, and how to answer it."""


def runtime_dir() -> Path:
    override = os.environ.get("MIFS_RUNTIME_DIR")
    if override:
        return Path(override)
    if os.geteuid() == 0:
        return Path("/run/mifs")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    return Path(xdg) / "mifs" if xdg else Path(f"/tmp/mifs-{os.geteuid()}")


def socket_path(mountpoint: Path) -> Path:
    digest = hashlib.sha256(os.fsencode(os.path.realpath(mountpoint))).hexdigest()[:32]
    return runtime_dir() / f"{digest}.sock"


def encode(message: dict[str, Any]) -> bytes:
    return (json.dumps(message, separators=(",", ":")) + "\n").encode("utf-8")


def decode(line: bytes) -> dict[str, Any]:
    doc = json.loads(line.decode("utf-8"))
    if not isinstance(doc, dict):
        raise ValueError("control message is not an object")
    return doc


class ControlUnavailable(Exception):
    """No daemon answers on the mount point's control socket."""


def request(mountpoint: Path, message: dict[str, Any], timeout: float | None = 30.0) -> Iterator[dict[str, Any]]:
    """Send one request and yield the replies until the daemon closes the connection."""
    path = socket_path(mountpoint)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError, socket.timeout) as exc:
        sock.close()
        raise ControlUnavailable(str(exc)) from None
    with sock:
        sock.sendall(encode(message))
        buffered = b""
        while True:
            try:
                data = sock.recv(65536)
            except socket.timeout:
                raise ControlUnavailable("the daemon did not answer in time") from None
            if not data:
                break
            buffered += data
            while b"\n" in buffered:
                line, buffered = buffered.split(b"\n", 1)
                if line:
                    yield decode(line)
