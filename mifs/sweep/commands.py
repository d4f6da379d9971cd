"""The sweep and writers commands of the control channel.

Must not know how the channel works: each handler gets the request and an async `send` for
its replies (one final {"ok": ...}). Replies carry counts, session ids and times: nothing in
the registry or the sweep names a file or a patient.
"""

from __future__ import annotations

from typing import Any, Callable

from mifs.control_protocol import Handler, Send
from mifs.errors import StorePermissionDenied, StoreUnavailable
from mifs.sweep.service import OrphanSweeper, RegistrationRefused


class SweepCommands:
    def __init__(self, sweeper: OrphanSweeper, read_only: Callable[[], bool], grace: float) -> None:
        self._sweeper = sweeper
        self._read_only = read_only
        self._grace = grace

    def handlers(self) -> dict[str, Handler]:
        return {"sweep": self._sweep, "writers-ls": self._writers_ls, "writers-rm": self._writers_rm}

    async def _refuse_read_only(self, send: Send) -> bool:
        if self._read_only():
            await send({"ok": False, "error": "the mount is read-only: it never deletes from the store", "kind": "refused"})
            return True
        return False

    async def _sweep(self, request: dict[str, Any], send: Send) -> None:
        if await self._refuse_read_only(send):
            return
        try:
            outcome = await self._sweeper.sweep_now()
        except (StoreUnavailable, StorePermissionDenied) as exc:
            await send({"ok": False, "error": f"the orphan sweep could not read the store: {exc}"})
            return
        if outcome.skipped is not None:
            await send({"ok": False, "error": f"orphan sweep skipped: {outcome.skipped}", "kind": "refused"})
            return
        await send({"ok": True, "purged": outcome.purged, "candidates": outcome.candidates, "grace_seconds": self._grace})

    async def _writers_ls(self, request: dict[str, Any], send: Send) -> None:
        try:
            found = await self._sweeper.registrations()
        except (StoreUnavailable, StorePermissionDenied) as exc:
            await send({"ok": False, "error": f"cannot list the writer registrations: {exc}"})
            return
        await send({"ok": True, "writers": [
            {"session": r.session, "registered": r.registered, "this_mount": r.this_mount} for r in found
        ]})

    async def _writers_rm(self, request: dict[str, Any], send: Send) -> None:
        if await self._refuse_read_only(send):
            return
        session = request.get("session")
        if not isinstance(session, str):
            await send({"ok": False, "error": "writers rm needs a SESSION id", "kind": "usage"})
            return
        try:
            removed = await self._sweeper.remove_registration(session)
        except RegistrationRefused as exc:
            await send({"ok": False, "error": str(exc), "kind": "usage"})
            return
        except (StoreUnavailable, StorePermissionDenied) as exc:
            await send({"ok": False, "error": f"cannot remove the writer registration: {exc}"})
            return
        if not removed:
            await send({"ok": False, "error": f"no writer registration {session} in the store", "kind": "not-found"})
            return
        await send({"ok": True, "session": session})
