"""The shred and undelete commands of the control channel.

Must not know how the channel works: each handler gets the request and an async `send` for
its replies (progress lines, then one final {"ok": ...}). Replies carry counts and ids; paths
only in the undelete listing the admin asked for, never in logs.
"""

from __future__ import annotations

from typing import Any, Callable

from mifs.control_protocol import Handler, Send
from mifs.shred.service import KIND_USAGE, Shredder, ShredRefused
from mifs.types import InodeId


class ShredCommands:
    def __init__(self, shredder: Shredder, retention_ns: int, read_only: Callable[[], bool]) -> None:
        self._shredder = shredder
        self._retention_ns = retention_ns
        self._read_only = read_only

    def handlers(self) -> dict[str, Handler]:
        return {"shred": self._shred, "undelete": self._undelete, "undelete-list": self._list}

    async def _refuse_read_only(self, send: Send) -> bool:
        if self._read_only():
            await send({"ok": False, "error": "the mount is read-only", "kind": "refused"})
            return True
        return False

    async def _shred(self, request: dict[str, Any], send: Send) -> None:
        if await self._refuse_read_only(send):
            return
        try:
            inodes = self._targets(request)
            override = bool(request.get("override_worm"))
            if request.get("dry_run"):
                result = self._shredder.preview(inodes, override_worm=override)
            else:
                result = await self._shredder.shred(inodes, override_worm=override, progress=send)
        except ShredRefused as exc:
            await send({"ok": False, "error": str(exc), "kind": exc.kind})
            return
        await send({"ok": True, "files": result.files, "bytes": result.bytes, "objects": result.objects,
                    "retained": result.retained})

    def _targets(self, request: dict[str, Any]) -> list[InodeId]:
        given = [k for k in ("paths", "study", "patient") if request.get(k)]
        if len(given) != 1:
            raise ShredRefused("shred needs PATH..., --study UID or --patient ID (one of them)", KIND_USAGE)
        if request.get("study"):
            return self._shredder.files_of_study(str(request["study"]))
        if request.get("patient"):
            return self._shredder.files_of_patient(str(request["patient"]))
        paths = request["paths"]
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise ShredRefused("paths must be a list of strings", KIND_USAGE)
        return sorted({self._shredder.file_at(p) for p in paths})

    async def _undelete(self, request: dict[str, Any], send: Send) -> None:
        if await self._refuse_read_only(send):
            return
        inode = request.get("id")
        path = request.get("path")
        to = request.get("to")
        try:
            if (inode is None) == (path is None):
                raise ShredRefused("undelete needs a PATH or --id N", KIND_USAGE)
            if inode is not None and not isinstance(inode, int):
                raise ShredRefused("--id must be a number", KIND_USAGE)
            result = await self._shredder.undelete(
                path=str(path) if path is not None else None, inode=inode, to=str(to) if to is not None else None
            )
        except ShredRefused as exc:
            await send({"ok": False, "error": str(exc), "kind": exc.kind})
            return
        await send({"ok": True, **result})

    async def _list(self, request: dict[str, Any], send: Send) -> None:
        await send({"ok": True, "items": self._shredder.list_retained(self._retention_ns)})
