"""Filesystem audit events: turns what fuse_ops reports (caller, inode, operation, bytes)
into audit records with the path, the process and, where indexed, the DICOM ids.

Must not import pyfuse3 or raise into a FUSE handler: an audit problem is logged and counted,
never turned into an errno. Runs on the trio thread; its database reads are short indexed
queries and /proc reads are cached for a few seconds (procfs answers from memory).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from mifs.audit.trail import AuditTrail
from mifs.metadb import studies
from mifs.metadb.db import MetaDb
from mifs.types import ROOT_INODE, InodeId

log = logging.getLogger(__name__)


class ProcessNames:
    """pid -> (comm, exe) from /proc, cached briefly (a pid is reused only after wrapping)."""

    def __init__(self, ttl: float = 5.0, size: int = 1024) -> None:
        self._ttl = ttl
        self._size = size
        self._cache: dict[int, tuple[float, str | None, str | None]] = {}

    def lookup(self, pid: int) -> tuple[str | None, str | None]:
        if pid <= 0:
            return None, None
        now = time.monotonic()
        hit = self._cache.get(pid)
        if hit is not None and hit[0] > now:
            return hit[1], hit[2]
        comm: str | None
        exe: str | None
        try:
            with open(f"/proc/{pid}/comm", "rb") as fh:
                comm = fh.read(64).decode("utf-8", "replace").rstrip("\n")
        except OSError:
            comm = None
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
        except OSError:
            exe = None
        if len(self._cache) >= self._size:
            self._cache = {p: v for p, v in self._cache.items() if v[0] > now}
            if len(self._cache) >= self._size:
                self._cache.clear()
        self._cache[pid] = (now + self._ttl, comm, exe)
        return comm, exe


@dataclass(frozen=True)
class Who:
    uid: int
    gid: int
    pid: int


@dataclass
class _OpenFile:
    who: dict[str, Any]
    op: str
    target: dict[str, Any]
    opened_ms: int
    bytes_read: int = 0
    bytes_written: int = 0


class FsAudit:
    def __init__(self, trail: AuditTrail, db: MetaDb, processes: ProcessNames | None = None) -> None:
        self._trail = trail
        self._db = db
        self._proc = processes or ProcessNames()
        self._open: dict[int, _OpenFile] = {}
        self.errors = 0

    # --- building blocks ---------------------------------------------------------------------

    def _who(self, who: Who) -> dict[str, Any]:
        comm, exe = self._proc.lookup(who.pid)
        return {"uid": who.uid, "gid": who.gid, "pid": who.pid, "comm": comm, "exe": exe}

    def _path(self, inode: InodeId) -> str | None:
        if inode == ROOT_INODE:
            return "/"
        rel = studies.path_of(self._db, inode, {})
        return "/" + rel if rel is not None else None

    def _target(self, inode: InodeId | None, *, parent: InodeId | None = None, name: bytes | None = None) -> dict[str, Any]:
        fields: dict[str, Any] = {}
        if parent is not None and name is not None:
            base = self._path(parent) or "?"
            fields["path"] = base.rstrip("/") + "/" + name.decode("utf-8", "surrogateescape")
        elif inode is not None:
            fields["path"] = self._path(inode)
        if inode is not None:
            fields["ino"] = int(inode)
            ids = studies.identity_of(self._db, inode)
            if ids is not None:
                fields["patient"], fields["study"], fields["sop"] = ids
        return fields

    def _emit(self, event: str, who: Who | None, fields: dict[str, Any]) -> None:
        try:
            self._trail.record(event, **(self._who(who) if who is not None else {}), **fields)
        except Exception:
            self.errors += 1
            log.exception("recording an audit event failed")

    def _safe(self, fn: Any, *args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except Exception:
            self.errors += 1
            log.exception("building an audit event failed")

    # --- file handles: one record per handle, at release -------------------------------------

    def opened(self, fh: int, who: Who, inode: InodeId, *, write: bool, created: bool = False,
               truncated: bool = False, parent: InodeId | None = None, name: bytes | None = None) -> None:
        def go() -> None:
            op = "create" if created else "open-write" if write else "open-read"
            target = self._target(inode, parent=parent, name=name)
            if truncated:
                target["truncated"] = True
            # The process is looked up now: at release it may be gone.
            self._open[fh] = _OpenFile(self._who(who), op, target, time.time_ns() // 1_000_000)
        self._safe(go)

    def read(self, fh: int, count: int) -> None:
        entry = self._open.get(fh)
        if entry is not None:
            entry.bytes_read += count

    def wrote(self, fh: int, count: int) -> None:
        entry = self._open.get(fh)
        if entry is not None:
            entry.bytes_written += count

    def released(self, fh: int) -> None:
        entry = self._open.pop(fh, None)
        if entry is None:
            return
        target = dict(entry.target)
        if "patient" not in target and "ino" in target:
            self._safe(lambda: target.update(self._ids(InodeId(target["ino"]))))
        self._emit(entry.op, None, {
            **entry.who, **target, "bytes_read": entry.bytes_read, "bytes_written": entry.bytes_written,
            "opened_ms": entry.opened_ms,
        })

    def _ids(self, inode: InodeId) -> dict[str, Any]:
        ids = studies.identity_of(self._db, inode)
        return {} if ids is None else {"patient": ids[0], "study": ids[1], "sop": ids[2]}

    # --- single operations ---------------------------------------------------------------------

    def changed(self, op: str, who: Who, inode: InodeId | None = None, *, parent: InodeId | None = None,
                name: bytes | None = None, **extra: Any) -> None:
        """rename, unlink, rmdir, mkdir, chmod, chown, truncate, setxattr, ...: call before the
        change for operations that remove a name (so the path and ids are still known)."""
        self._safe(lambda: self._emit(op, who, {**self._target(inode, parent=parent, name=name), **extra}))

    def target_of(self, inode: InodeId | None, *, parent: InodeId | None = None, name: bytes | None = None) -> dict[str, Any]:
        try:
            return self._target(inode, parent=parent, name=name)
        except Exception:
            self.errors += 1
            log.exception("resolving an audit target failed")
            return {}

    def record(self, op: str, who: Who, fields: dict[str, Any]) -> None:
        self._emit(op, who, fields)

    def denied(self, op: str, who: Who, inode: InodeId | None, *, name: bytes | None = None) -> None:
        """A request refused by the allow list (EACCES)."""
        def go() -> None:
            fields: dict[str, Any] = {"op": op, "errno": "EACCES"}
            if inode is not None and name is not None:
                fields["path"] = (self._path(inode) or "?").rstrip("/") + "/" + name.decode("utf-8", "surrogateescape")
            elif inode is not None:
                fields.update(self._target(inode))
            self._emit("denied", who, fields)
        self._safe(go)

    def integrity_failure(self, inode: InodeId, chunk: int, where: str) -> None:
        """A chunk failed authentication (the reader gets EIO)."""
        self._safe(lambda: self._emit("integrity-failure", None, {**self._target(inode), "chunk": chunk, "source": where}))

    def statistics(self) -> dict[str, int]:
        return {"audit_open_handles": len(self._open), "audit_errors": self.errors}
