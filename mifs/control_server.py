"""The daemon's side of the control channel: answers status and umount requests from the CLI.

Must not change the filesystem itself: it reports statistics and asks the mount (through the
callbacks it was built with) to unmount. Runs on the trio thread.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
from pathlib import Path
from typing import Any, Awaitable, Callable

import trio

from mifs.control_protocol import Handler, decode, encode

log = logging.getLogger(__name__)

StatusFn = Callable[[], dict[str, Any]]
UnmountFn = Callable[[bool], Awaitable[str | None]]
"""Starts the unmount (wait: for uploads first); why it cannot, or None once it is under way."""
Peer = tuple[int, int, int]
"""(pid, uid, gid) of the process at the other end of the socket (SO_PEERCRED)."""
OnRequest = Callable[[str, dict[str, Any], Peer | None], None]
"""Told of every request but status before it runs (mount records admin actions with it)."""
_UCRED = struct.Struct("3i")


class ControlServer:
    def __init__(
        self, path: Path, status: StatusFn, unmount: UnmountFn, finished: trio.Event,
        handlers: dict[str, Handler] | None = None, on_request: OnRequest | None = None,
    ) -> None:
        self._handlers = handlers or {}
        self._on_request = on_request
        self._path = path
        self._status = status
        self._unmount = unmount
        self._finished = finished
        self.final_result: dict[str, Any] = {}
        self._umount_requests = 0
        self._replied = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            self._path.unlink()
        except FileNotFoundError:
            pass
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            await sock.bind(str(self._path))
        finally:
            os.umask(old_umask)
        sock.listen(16)
        listener = trio.SocketListener(sock)
        try:
            task_status.started()
            await trio.serve_listeners(self._handle, [listener])
        finally:
            try:
                self._path.unlink()
            except FileNotFoundError:
                pass

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                line = b""
                with trio.fail_after(10):
                    while b"\n" not in line:
                        data = await stream.receive_some(4096)
                        if not data:
                            return
                        line += data
                request = decode(line.split(b"\n", 1)[0])
                op = request.get("op")
                if isinstance(op, str) and op != "status" and self._on_request is not None:
                    self._on_request(op, request, _peer(stream))
                if op == "status":
                    await stream.send_all(encode({"ok": True, "status": self._status()}))
                elif op == "umount":
                    await self._handle_umount(stream, bool(request.get("wait", True)))
                elif isinstance(op, str) and op in self._handlers:

                    async def send(message: dict[str, Any]) -> None:
                        await stream.send_all(encode(message))

                    try:
                        await self._handlers[op](request, send)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        raise
                    except Exception:
                        # A bug in one command must not end the daemon serving the mount.
                        log.exception("control request %r failed", op)
                        await stream.send_all(encode({"ok": False, "error": f"internal error in the daemon while handling {op!r}; see its log"}))
                else:
                    await stream.send_all(encode({"ok": False, "error": f"unknown request {op!r}"}))
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, ValueError) as exc:
                log.debug("control connection ended: %s", exc)

    async def wait_replied(self) -> None:
        """Return once every umount requester has had its final answer (call after `finished`)."""
        while self._umount_requests:
            await self._replied.wait()
            self._replied = trio.Event()

    async def _handle_umount(self, stream: trio.SocketStream, wait: bool) -> None:
        self._umount_requests += 1
        try:
            await self._umount_and_report(stream, wait)
        finally:
            self._umount_requests -= 1
            self._replied.set()

    async def _umount_and_report(self, stream: trio.SocketStream, wait: bool) -> None:
        problem = await self._unmount(wait)
        if problem is not None:
            await stream.send_all(encode({"ok": False, "error": problem}))
            return
        while not self._finished.is_set():
            with trio.move_on_after(1.0):
                await self._finished.wait()
            if not self._finished.is_set():
                status = self._status()
                await stream.send_all(encode({"progress": {k: status.get(k) for k in ("pending_uploads", "pending_bytes")}}))
        await stream.send_all(encode({"ok": True, **self.final_result}))


def _peer(stream: trio.SocketStream) -> Peer | None:
    try:
        raw = stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError:
        return None
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid
