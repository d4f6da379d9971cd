"""The filesystem as the FUSE adapter sees it: namespace and file data behind one facade.

Must not import pyfuse3. Adds what spans both halves: opening and creating files, setattr
with truncation, read-only and failsafe modes, statfs figures, and unmount-time flushing.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import trio

from mifs.errors import IsADirectory, ReadOnly
from mifs.metadb.db import MetaDb
from mifs.metadb.tables import InodeRow
from mifs.types import InodeId
from mifs.vfs.files import FileData
from mifs.vfs.namespace import Caller, Namespace

log = logging.getLogger(__name__)

O_ACCMODE = os.O_RDONLY | os.O_WRONLY | os.O_RDWR


@dataclass(frozen=True)
class StatFs:
    block_size: int
    blocks: int
    blocks_free: int
    blocks_avail: int
    files: int
    files_free: int
    name_max: int


class FileSystem:
    def __init__(
        self, db: MetaDb, namespace: Namespace, files: FileData, cache_root: Path, read_only: bool,
        opened_for_reading: trio.MemorySendChannel[InodeId] | None = None,
    ) -> None:
        """opened_for_reading: inodes opened read-only are sent here (best effort, never
        blocking) so the study prefetcher can fetch the rest of their study."""
        self._opened = opened_for_reading
        self._db = db
        self.ns = namespace
        self.files = files
        self._cache_root = cache_root
        self.read_only = read_only
        self.failsafe_reason = ""

    # --- modes --------------------------------------------------------------------------------

    def enter_failsafe(self, reason: str) -> None:
        """After an unexpected internal error: refuse changes, keep serving intact data."""
        if not self.failsafe_reason:
            self.failsafe_reason = reason

    def check_writable(self) -> None:
        if self.read_only or self.failsafe_reason:
            raise ReadOnly("the mount is read-only")

    # --- files --------------------------------------------------------------------------------

    async def open(self, inode: InodeId, flags: int) -> int:
        row = self.ns.getattr(inode)
        if stat.S_ISDIR(row.mode):
            raise IsADirectory("is a directory")
        writable = (flags & O_ACCMODE) != os.O_RDONLY
        if writable or flags & os.O_TRUNC:
            self.check_writable()
            self.ns.policy.check_changeable(self._db, row, "open for writing")
        fh = self.files.attach(row, writable)
        if flags & os.O_TRUNC and row.size:
            await self.files.truncate(row, 0)
        if not writable and self._opened is not None:
            try:
                self._opened.send_nowait(inode)
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # a hint only: prefetch is best effort
        return fh

    async def create(self, parent: InodeId, name: bytes, mode: int, flags: int, caller: Caller) -> tuple[int, InodeRow]:
        self.check_writable()
        row = self.ns.create_file(parent, name, mode, caller)
        fh = self.files.attach(row, True)
        self.ns.remember(row.id)
        return fh, row

    async def release(self, fh: int) -> None:
        inode = await self.files.release(fh)
        self.ns.maybe_delete(inode)

    async def setattr(
        self, inode: InodeId, *, size: int | None = None, mode: int | None = None, uid: int | None = None,
        gid: int | None = None, atime_ns: int | None = None, mtime_ns: int | None = None, ctime_ns: int | None = None,
    ) -> InodeRow:
        self.check_writable()
        if size is not None:
            row = self.ns.getattr(inode)
            if stat.S_ISDIR(row.mode):
                raise IsADirectory("is a directory")
            if stat.S_ISREG(row.mode) and size != row.size:
                self.ns.policy.check_changeable(self._db, row, "truncate")
                await self.files.truncate(row, size)
        return self.ns.set_attrs(inode, mode=mode, uid=uid, gid=gid, atime_ns=atime_ns, mtime_ns=mtime_ns, ctime_ns=ctime_ns)

    async def shutdown(self) -> list[str]:
        """Seal and commit everything still open (the kernel is gone or going). Returns why
        each file that could not be saved failed (logged here by inode number), so the
        unmount can say so instead of claiming everything is stored."""
        failed = await self.files.flush_all()
        for inode, exc in failed:
            log.error("inode %d: its last writes could not be saved at unmount: %s", inode, exc)
        return [str(exc) for _, exc in failed]

    def statfs(self) -> StatFs:
        st = os.statvfs(self._cache_root)
        block = 4096
        scale = st.f_frsize / block
        return StatFs(
            block_size=block,
            blocks=int(st.f_blocks * scale),
            blocks_free=int(st.f_bfree * scale),
            blocks_avail=int(st.f_bavail * scale),
            files=2**40,
            files_free=2**40 - int(self._db.scalar("SELECT count(*) FROM inodes") or 0),
            name_max=255,
        )
