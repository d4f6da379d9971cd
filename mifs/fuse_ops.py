"""The pyfuse3 adapter: converts kernel requests into FileSystem calls and errors into errno.

The only module (with mount) that imports pyfuse3, and the only one that knows errno values.
No POSIX logic lives here. An unexpected exception is logged with its traceback, answered
with EIO, and switches the mount to failsafe read-only mode so viewers keep their studies.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
from typing import Any, Awaitable, Callable, Sequence, TypeVar

import pyfuse3

from mifs import errors
from mifs.audit.events import FsAudit, Who
from mifs.metadb.tables import InodeRow
from mifs.types import ROOT_INODE, InodeId
from mifs.vfs.filesystem import FileSystem
from mifs.vfs.namespace import Caller

log = logging.getLogger(__name__)

ERRNO: dict[type[errors.FsError], int] = {
    errors.NotFound: errno.ENOENT,
    errors.Exists: errno.EEXIST,
    errors.NotEmpty: errno.ENOTEMPTY,
    errors.IsADirectory: errno.EISDIR,
    errors.NotADirectory: errno.ENOTDIR,
    errors.NameTooLong: errno.ENAMETOOLONG,
    errors.InvalidArgument: errno.EINVAL,
    errors.NoSpace: errno.ENOSPC,
    errors.NoAttribute: pyfuse3.ENOATTR,
    errors.AttributeTooLarge: errno.E2BIG,
    errors.NotPermitted: errno.EPERM,
    errors.Protected: errno.EPERM,
    errors.AccessDenied: errno.EACCES,
    errors.ReadOnly: errno.EROFS,
    errors.BadFileHandle: errno.EBADF,
    errors.TooManyLinks: errno.EMLINK,
    errors.IntegrityError: errno.EIO,
    errors.DataUnavailable: errno.EIO,
    errors.NotCached: errno.EIO,
    errors.LocalIOError: errno.EIO,
}

BLKSIZE = 1024 * 1024
CAPABILITY_XATTR = b"security.capability"

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def errno_of(exc: errors.FsError) -> int:
    for cls in type(exc).__mro__:
        if cls in ERRNO:
            return ERRNO[cls]
    return errno.EIO


def _handler(mutating: bool = False) -> Callable[[F], F]:
    """Wrap a request handler: domain errors -> errno, surprises -> EIO + failsafe."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        async def wrapper(self: Operations, *args: Any) -> Any:
            try:
                if mutating:
                    self.fs.check_writable()
                return await fn(self, *args)
            except pyfuse3.FUSEError:
                raise
            except errors.FsError as exc:
                raise pyfuse3.FUSEError(errno_of(exc)) from None
            except errors.WrongKey:
                log.error("%s: a data key is wrapped by an unknown master key", fn.__name__)
                raise pyfuse3.FUSEError(errno.EIO) from None
            except Exception:
                log.exception("unexpected error in %s; switching the mount to read-only", fn.__name__)
                self.fs.enter_failsafe(f"unexpected error in {fn.__name__}")
                raise pyfuse3.FUSEError(errno.EIO) from None

        return wrapper  # type: ignore[return-value]

    return decorate


def _caller(ctx: pyfuse3.RequestContext) -> Caller:
    return Caller(ctx.uid, ctx.gid, ctx.pid)


def _who(ctx: pyfuse3.RequestContext) -> Who:
    return Who(ctx.uid, ctx.gid, ctx.pid)


class Operations(pyfuse3.Operations):
    enable_writeback_cache = True
    supports_dot_lookup = True

    def __init__(
        self, fs: FileSystem, attr_timeout: float = 60.0, *, audit: FsAudit | None = None,
        allow_uids: frozenset[int] = frozenset(), allow_gids: frozenset[int] = frozenset(), xattrs: bool = True,
    ) -> None:
        """audit: where accesses are recorded (None: not recorded). allow_uids/allow_gids:
        when either is non-empty, only root and these uids / primary gids may use the mount;
        everyone else gets EACCES on everything but getattr of the root and statfs. xattrs:
        False answers every xattr request ENOSYS, which the kernel remembers for the mount
        (callers get EOPNOTSUPP): it then stops asking for security.capability before each
        write(2) (file_remove_privs; FUSE never sets SB_NOSEC without HANDLE_KILLPRIV_V2,
        which pyfuse3 cannot request)."""
        super().__init__()
        self.fs = fs
        self._timeout = attr_timeout
        self._audit = audit
        self._allow_uids = allow_uids
        self._allow_gids = allow_gids
        self._restricted = bool(allow_uids or allow_gids)
        self._xattrs = xattrs

    def _xattrs_off(self) -> None:
        if not self._xattrs:
            raise pyfuse3.FUSEError(errno.ENOSYS)

    # --- access control -----------------------------------------------------------------------

    def _allowed(self, ctx: pyfuse3.RequestContext) -> bool:
        return not self._restricted or ctx.uid == 0 or ctx.uid in self._allow_uids or ctx.gid in self._allow_gids

    def _gate(self, ctx: pyfuse3.RequestContext, op: str, inode: int | None = None, name: bytes | None = None) -> None:
        """EACCES (and an audit record) for a caller outside the allow list."""
        if self._allowed(ctx):
            return
        if self._audit is not None:
            self._audit.denied(op, _who(ctx), InodeId(inode) if inode is not None else None, name=name)
        raise pyfuse3.FUSEError(errno.EACCES)

    def _child(self, parent: int, name: bytes) -> InodeId | None:
        try:
            return self.fs.ns.lookup(InodeId(parent), name).id
        except errors.FsError:
            return None

    def _entry(self, row: InodeRow) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = row.id
        attr.generation = 0
        attr.entry_timeout = self._timeout
        attr.attr_timeout = self._timeout
        attr.st_mode = row.mode
        attr.st_nlink = row.nlink
        attr.st_uid = row.uid
        attr.st_gid = row.gid
        attr.st_rdev = row.rdev
        attr.st_size = row.size
        attr.st_blksize = BLKSIZE
        attr.st_blocks = (row.size + 511) // 512
        attr.st_atime_ns = row.atime_ns
        attr.st_mtime_ns = row.mtime_ns
        attr.st_ctime_ns = row.ctime_ns
        return attr

    def _remembered(self, row: InodeRow) -> pyfuse3.EntryAttributes:
        self.fs.ns.remember(row.id)
        return self._entry(row)

    # --- tree ---------------------------------------------------------------------------------

    @_handler()
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._gate(ctx, "lookup", parent_inode, name)
        try:
            row = self.fs.ns.lookup(InodeId(parent_inode), name)
        except errors.NotFound:
            negative = pyfuse3.EntryAttributes()
            negative.st_ino = 0
            negative.entry_timeout = self._timeout
            return negative
        return self._remembered(row)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for inode, count in inode_list:
            try:
                self.fs.ns.forget(InodeId(inode), count)
            except Exception:
                log.exception("forget of inode %d failed", inode)

    @_handler()
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if inode != ROOT_INODE:
            self._gate(ctx, "getattr", inode)
        return self._entry(self.fs.ns.getattr(InodeId(inode)))

    @_handler(mutating=True)
    async def setattr(
        self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields, fh: int | None, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self._gate(ctx, "setattr", inode)
        row = await self.fs.setattr(
            InodeId(inode),
            size=attr.st_size if fields.update_size else None,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            ctime_ns=attr.st_ctime_ns if fields.update_ctime else None,
        )
        if self._audit is not None:
            if fields.update_size:
                self._audit.changed("truncate", _who(ctx), InodeId(inode), size=row.size)
            if fields.update_mode:
                self._audit.changed("chmod", _who(ctx), InodeId(inode), mode=f"{stat.S_IMODE(row.mode):o}")
            if fields.update_uid or fields.update_gid:
                self._audit.changed("chown", _who(ctx), InodeId(inode), owner=row.uid, group=row.gid)
        return self._entry(row)

    @_handler()
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        self._gate(ctx, "readlink", inode)
        return self.fs.ns.readlink(InodeId(inode))

    @_handler(mutating=True)
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._gate(ctx, "mknod", parent_inode, name)
        row = self.fs.ns.mknod(InodeId(parent_inode), name, mode, rdev, _caller(ctx))
        if self._audit is not None:
            self._audit.changed("mknod", _who(ctx), row.id, parent=InodeId(parent_inode), name=name)
        return self._remembered(row)

    @_handler(mutating=True)
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._gate(ctx, "mkdir", parent_inode, name)
        row = self.fs.ns.mkdir(InodeId(parent_inode), name, mode, _caller(ctx))
        if self._audit is not None:
            self._audit.changed("mkdir", _who(ctx), row.id, parent=InodeId(parent_inode), name=name)
        return self._remembered(row)

    @_handler(mutating=True)
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._gate(ctx, "unlink", parent_inode, name)
        target = self._audit.target_of(self._child(parent_inode, name), parent=InodeId(parent_inode), name=name) if self._audit else {}
        self.fs.ns.unlink(InodeId(parent_inode), name)
        if self._audit is not None:
            self._audit.record("unlink", _who(ctx), target)

    @_handler(mutating=True)
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._gate(ctx, "rmdir", parent_inode, name)
        target = self._audit.target_of(self._child(parent_inode, name), parent=InodeId(parent_inode), name=name) if self._audit else {}
        self.fs.ns.rmdir(InodeId(parent_inode), name)
        if self._audit is not None:
            self._audit.record("rmdir", _who(ctx), target)

    @_handler(mutating=True)
    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._gate(ctx, "symlink", parent_inode, name)
        row = self.fs.ns.symlink(InodeId(parent_inode), name, target, _caller(ctx))
        if self._audit is not None:
            self._audit.changed("symlink", _who(ctx), row.id, parent=InodeId(parent_inode), name=name)
        return self._remembered(row)

    @_handler(mutating=True)
    async def rename(
        self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes, flags: int, ctx: pyfuse3.RequestContext
    ) -> None:
        ns_flags = (1 if flags & pyfuse3.RENAME_NOREPLACE else 0) | (2 if flags & pyfuse3.RENAME_EXCHANGE else 0)
        if flags & ~(pyfuse3.RENAME_NOREPLACE | pyfuse3.RENAME_EXCHANGE):
            raise pyfuse3.FUSEError(errno.EINVAL)
        self._gate(ctx, "rename", parent_inode_old, name_old)
        target: dict[str, object] = {}
        if self._audit is not None:
            target = self._audit.target_of(self._child(parent_inode_old, name_old), parent=InodeId(parent_inode_old), name=name_old)
            target["new_path"] = self._audit.target_of(None, parent=InodeId(parent_inode_new), name=name_new).get("path")
        self.fs.ns.rename(InodeId(parent_inode_old), name_old, InodeId(parent_inode_new), name_new, ns_flags)
        # A PACS publishes a stored file by renaming it into place: once rename returns, a
        # crash of the daemon must not undo it (power loss: see commits.py).
        await self.fs.files.commit(durable=False)
        if self._audit is not None:
            self._audit.record("rename", _who(ctx), target)

    @_handler(mutating=True)
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._gate(ctx, "link", inode)
        row = self.fs.ns.link(InodeId(inode), InodeId(new_parent_inode), new_name)
        await self.fs.files.commit(durable=False)  # publishes a file, as rename does
        if self._audit is not None:

            self._audit.changed("link", _who(ctx), row.id, parent=InodeId(new_parent_inode), name=new_name)
        return self._remembered(row)

    # --- directories --------------------------------------------------------------------------

    @_handler()
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        self._gate(ctx, "opendir", inode)
        row = self.fs.ns.getattr(InodeId(inode))
        if not stat.S_ISDIR(row.mode):
            raise errors.NotADirectory("not a directory")
        return inode

    @_handler()
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        after = start_id
        while True:
            entries = self.fs.ns.readdir(InodeId(fh), after)
            if not entries:
                return
            for dentry_id, name, row in entries:
                if not pyfuse3.readdir_reply(token, name, self._entry(row), dentry_id):
                    return
                self.fs.ns.remember(row.id)
                after = dentry_id

    async def releasedir(self, fh: int) -> None:
        return None

    @_handler()
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        await self.fs.files.commit()

    # --- files --------------------------------------------------------------------------------

    @_handler()
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        self._gate(ctx, "open", inode)
        fh = await self.fs.open(InodeId(inode), flags)
        if self._audit is not None:
            write = (flags & os.O_ACCMODE) != os.O_RDONLY
            self._audit.opened(fh, _who(ctx), InodeId(inode), write=write, truncated=bool(flags & os.O_TRUNC))
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    @_handler(mutating=True)
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        self._gate(ctx, "create", parent_inode, name)
        fh, row = await self.fs.create(InodeId(parent_inode), name, mode, flags, _caller(ctx))
        if self._audit is not None:
            self._audit.opened(fh, _who(ctx), row.id, write=True, created=True, parent=InodeId(parent_inode), name=name)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True), self._entry(row)

    @_handler()
    async def read(self, fh: int, off: int, size: int) -> bytes:
        data = await self.fs.files.read(fh, off, size)
        if self._audit is not None:
            self._audit.read(fh, len(data))
        return data

    @_handler(mutating=True)
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        written = await self.fs.files.write(fh, off, buf)
        if self._audit is not None:
            self._audit.wrote(fh, written)
        return written

    @_handler()
    async def flush(self, fh: int) -> None:
        await self.fs.files.flush(fh, closing=True)

    @_handler()
    async def release(self, fh: int) -> None:
        try:
            await self.fs.release(fh)
        finally:
            if self._audit is not None:
                self._audit.released(fh)

    @_handler()
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.fs.files.flush(fh, durable_anyway=True)

    # --- extended attributes ------------------------------------------------------------------

    @_handler(mutating=True)
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._xattrs_off()
        self._gate(ctx, "setxattr", inode)
        self.fs.ns.setxattr(InodeId(inode), name, value)
        if self._audit is not None:
            self._audit.changed("setxattr", _who(ctx), InodeId(inode), xattr=name.decode("utf-8", "replace"))

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        # The kernel asks for security.capability before every write(2) (file_remove_privs):
        # answer without touching the database while no file carries that attribute.
        self._xattrs_off()
        self._gate(ctx, "getxattr", inode)
        if name == CAPABILITY_XATTR and not self.fs.ns.capability_xattrs:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return await self._getxattr(inode, name)

    @_handler()
    async def _getxattr(self, inode: int, name: bytes) -> bytes:
        return self.fs.ns.getxattr(InodeId(inode), name)

    @_handler()
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        self._xattrs_off()
        self._gate(ctx, "listxattr", inode)
        return self.fs.ns.listxattr(InodeId(inode))

    @_handler(mutating=True)
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._xattrs_off()
        self._gate(ctx, "removexattr", inode)
        self.fs.ns.removexattr(InodeId(inode), name)
        if self._audit is not None:
            self._audit.changed("removexattr", _who(ctx), InodeId(inode), xattr=name.decode("utf-8", "replace"))

    # --- misc ---------------------------------------------------------------------------------

    @_handler()
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        self._gate(ctx, "access", inode)
        row = self.fs.ns.getattr(InodeId(inode))
        if mode & os.W_OK and (self.fs.read_only or self.fs.failsafe_reason):
            raise errors.ReadOnly("the mount is read-only")
        if ctx.uid == 0:
            return not (mode & os.X_OK) or bool(row.mode & 0o111) or stat.S_ISDIR(row.mode)
        if ctx.uid == row.uid:
            bits = (row.mode >> 6) & 7
        elif ctx.gid == row.gid:
            bits = (row.mode >> 3) & 7
        else:
            bits = row.mode & 7
        return (mode & 7) & ~bits == 0

    @_handler()
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        figures = self.fs.statfs()
        data = pyfuse3.StatvfsData()
        data.f_bsize = figures.block_size
        data.f_frsize = figures.block_size
        data.f_blocks = figures.blocks
        data.f_bfree = figures.blocks_free
        data.f_bavail = figures.blocks_avail
        data.f_files = figures.files
        data.f_ffree = figures.files_free
        data.f_favail = figures.files_free
        data.f_namemax = figures.name_max
        return data
