"""The daemon's control server, on a real Unix socket: a command that fails with a bug answers
with an error line and leaves the server (and so the daemon) serving the next request."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Awaitable, Callable

import trio

from mifs.control_protocol import decode, encode
from mifs.control_server import ControlServer

Send = Callable[[dict[str, Any]], Awaitable[None]]


async def ask(path: Path, message: dict[str, Any]) -> list[dict[str, Any]]:
    stream = await trio.open_unix_socket(str(path))
    async with stream:
        await stream.send_all(encode(message))
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    return [decode(line) for line in data.split(b"\n") if line]


def test_a_failing_command_answers_an_error_and_the_server_goes_on(tmp_path: Path) -> None:
    async def broken(request: dict[str, Any], send: Send) -> None:
        raise RuntimeError("a bug")

    async def fine(request: dict[str, Any], send: Send) -> None:
        await send({"ok": True, "echo": request.get("x")})

    async def unmount(wait: bool) -> str | None:
        return "not here"

    async def main() -> None:
        path = tmp_path / "c.sock"
        server = ControlServer(path, lambda: {"up": 1}, unmount, trio.Event(), handlers={"broken": broken, "fine": fine})
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            with trio.fail_after(10):
                (reply,) = await ask(path, {"op": "broken"})
                assert reply["ok"] is False and "internal error" in reply["error"] and "'broken'" in reply["error"]
                assert await ask(path, {"op": "fine", "x": 7}) == [{"ok": True, "echo": 7}]
                assert await ask(path, {"op": "status"}) == [{"ok": True, "status": {"up": 1}}]
            nursery.cancel_scope.cancel()

    trio.run(main)
