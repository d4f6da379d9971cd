"""The directory tree: entries, inodes, links, attributes, xattrs and the kernel's lookup counts.

Must not touch file contents (files.py does) nor pyfuse3. Every method validates like POSIX
and raises the domain errors of mifs.errors; fuse_ops turns them into errno values. An inode
is deleted only when it has no links, no kernel references and no open handles.
"""

from __future__ import annotations

import stat
import time
from dataclasses import dataclass
from typing import Callable

from mifs.errors import (
    AttributeTooLarge,
    Exists,
    InvalidArgument,
    IsADirectory,
    NameTooLong,
    NoAttribute,
    NotADirectory,
    NotEmpty,
    NotFound,
    NotPermitted,
    TooManyLinks,
)
from mifs.metadb import retention, tables
from mifs.metadb.db import MetaDb
from mifs.metadb.tables import InodeRow
from mifs.types import NAME_MAX, ROOT_INODE, FileId, InodeId
from mifs.vfs.files import FileData
from mifs.vfs.retention import RetentionPolicy

XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 65536
LINK_MAX = 65000
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2

NewFileKey = Callable[[], tuple[FileId, bytes]]
CAPABILITY_XATTR = b"security.capability"


@dataclass(frozen=True)
class Caller:
    uid: int
    gid: int
    pid: int = 0


def _check_name(name: bytes) -> None:
    if len(name) > NAME_MAX:
        raise NameTooLong("name longer than 255 bytes")
    if not name or b"/" in name or name in (b".", b".."):
        raise InvalidArgument("invalid name")


class Namespace:
    def __init__(
        self, db: MetaDb, files: FileData, new_file_key: NewFileKey, policy: RetentionPolicy | None = None
    ) -> None:
        self.policy = policy or RetentionPolicy()
        self._db = db
        self._files = files
        self._new_file_key = new_file_key
        self._lookups: dict[InodeId, int] = {}
        self.capability_xattrs = tables.xattr_name_in_use(db, CAPABILITY_XATTR)
        """Whether any inode has a security.capability attribute (the kernel asks on every write)."""

    # --- bootstrap ----------------------------------------------------------------------------

    def ensure_root(self, uid: int, gid: int) -> None:
        if tables.get_inode(self._db, ROOT_INODE) is None:
            now = time.time_ns()
            tables.insert_inode(
                self._db,
                InodeRow(ROOT_INODE, stat.S_IFDIR | 0o755, uid, gid, 2, 0, now, now, now),
                with_id=True,
            )

    def purge_orphans(self) -> int:
        """Delete inodes left unlinked-but-open by a previous run (called at mount)."""
        orphans = tables.orphan_inodes(self._db)
        for inode in orphans:
            tables.delete_inode(self._db, inode)
        return len(orphans)

    # --- lookup counts ------------------------------------------------------------------------

    def remember(self, inode: InodeId, count: int = 1) -> None:
        """The kernel now holds `count` more references to inode (lookup, create, readdirplus)."""
        self._lookups[inode] = self._lookups.get(inode, 0) + count

    def forget(self, inode: InodeId, count: int) -> None:
        left = self._lookups.get(inode, 0) - count
        if left > 0:
            self._lookups[inode] = left
        else:
            self._lookups.pop(inode, None)
            self.maybe_delete(inode)

    def maybe_delete(self, inode: InodeId) -> None:
        """Delete an unlinked inode once nothing refers to it any more."""
        if inode == ROOT_INODE or inode in self._lookups or inode in self._files.open:
            return
        row = tables.get_inode(self._db, inode)
        if row is not None and row.nlink == 0 and not retention.is_retained(self._db, inode):
            tables.delete_inode(self._db, inode)
            self._files.forget_header(inode)

    # --- reading the tree ---------------------------------------------------------------------

    def getattr(self, inode: InodeId) -> InodeRow:
        row = tables.get_inode(self._db, inode)
        if row is None:
            raise NotFound(f"inode {inode} does not exist")
        return self._with_live_size(row)

    def _with_live_size(self, row: InodeRow) -> InodeRow:
        """row, with the size of the file's open writers where they changed it."""
        size = self._files.size_of(row.id)
        if size is not None:
            row.size = size
        return row

    def _dir(self, inode: InodeId) -> InodeRow:
        row = self.getattr(inode)
        if not stat.S_ISDIR(row.mode):
            raise NotADirectory("not a directory")
        return row

    def lookup(self, parent: InodeId, name: bytes) -> InodeRow:
        if len(name) > NAME_MAX:
            raise NameTooLong("name longer than 255 bytes")
        self._dir(parent)
        if name == b".":
            return self.getattr(parent)
        if name == b"..":
            return self.getattr(tables.parent_of_dir(self._db, parent) or ROOT_INODE)
        inode = tables.lookup(self._db, parent, name)
        if inode is None:
            raise NotFound("no such entry")
        return self.getattr(inode)

    def readdir(self, parent: InodeId, after: int, limit: int = 256) -> list[tuple[int, bytes, InodeRow]]:
        self._dir(parent)
        entries = tables.list_dentries(self._db, parent, after, limit)
        for _, _, row in entries:
            size = self._files.size_of(row.id)
            if size is not None:
                row.size = size
        return entries

    def readlink(self, inode: InodeId) -> bytes:
        row = self.getattr(inode)
        if not stat.S_ISLNK(row.mode) or row.target is None:
            raise InvalidArgument("not a symbolic link")
        return bytes(row.target)

    # --- creating -----------------------------------------------------------------------------

    def _touch_dir(self, row: InodeRow, nlink_delta: int = 0) -> None:
        now = time.time_ns()
        row.mtime_ns = row.ctime_ns = now
        row.nlink += nlink_delta
        tables.save_inode_attrs(self._db, row)

    def _new_entry(self, parent: InodeId, name: bytes, mode: int, caller: Caller, **extra: object) -> InodeRow:
        _check_name(name)
        parent_row = self._dir(parent)
        if tables.lookup(self._db, parent, name) is not None:
            raise Exists("entry exists")
        now = time.time_ns()
        gid = parent_row.gid if parent_row.mode & stat.S_ISGID else caller.gid
        if stat.S_ISDIR(mode) and parent_row.mode & stat.S_ISGID:
            mode |= stat.S_ISGID
        row = InodeRow(InodeId(0), mode, caller.uid, gid, 2 if stat.S_ISDIR(mode) else 1, 0, now, now, now)
        for attr, value in extra.items():
            setattr(row, attr, value)
        row.id = tables.insert_inode(self._db, row)
        tables.add_dentry(self._db, parent, name, row.id)
        self._touch_dir(parent_row, 1 if stat.S_ISDIR(mode) else 0)
        return row

    def mkdir(self, parent: InodeId, name: bytes, mode: int, caller: Caller) -> InodeRow:
        return self._new_entry(parent, name, stat.S_IFDIR | (mode & 0o7777), caller)

    def create_file(self, parent: InodeId, name: bytes, mode: int, caller: Caller) -> InodeRow:
        file_id, wrapped = self._new_file_key()
        return self._new_entry(parent, name, stat.S_IFREG | (mode & 0o7777), caller, file_id=file_id, wrapped_dek=wrapped)

    def mknod(self, parent: InodeId, name: bytes, mode: int, rdev: int, caller: Caller) -> InodeRow:
        if stat.S_ISREG(mode):
            return self.create_file(parent, name, mode, caller)
        if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
            return self._new_entry(parent, name, mode, caller, rdev=rdev)
        raise NotPermitted("device nodes are not supported")

    def symlink(self, parent: InodeId, name: bytes, target: bytes, caller: Caller) -> InodeRow:
        if len(target) > 4095:
            raise NameTooLong("symlink target too long")
        return self._new_entry(parent, name, stat.S_IFLNK | 0o777, caller, target=target, size=len(target))

    def link(self, inode: InodeId, new_parent: InodeId, new_name: bytes) -> InodeRow:
        _check_name(new_name)
        row = self.getattr(inode)
        if stat.S_ISDIR(row.mode):
            raise NotPermitted("hard links to directories are not allowed")
        if row.nlink >= LINK_MAX:
            raise TooManyLinks("too many links")
        parent_row = self._dir(new_parent)
        if tables.lookup(self._db, new_parent, new_name) is not None:
            raise Exists("entry exists")
        tables.add_dentry(self._db, new_parent, new_name, inode)
        row.nlink += 1
        row.ctime_ns = time.time_ns()
        tables.save_inode_attrs(self._db, row)
        self._touch_dir(parent_row)
        return self.getattr(inode)

    # --- removing -----------------------------------------------------------------------------

    def _drop_link(self, row: InodeRow, parent: InodeId, name: bytes) -> None:
        """The name (parent, name) of row is gone; a file losing its last name is kept for
        undelete under a retention window, otherwise deleted once nothing refers to it."""
        row.nlink = 0 if stat.S_ISDIR(row.mode) else row.nlink - 1
        row.ctime_ns = time.time_ns()
        tables.save_inode_attrs(self._db, row)
        if row.nlink == 0:
            if self.policy.retention_ns > 0 and stat.S_ISREG(row.mode):
                retention.retain(self._db, row.id, parent, name, row.ctime_ns)
                self._files.forget_header(row.id)
            else:
                self.maybe_delete(row.id)

    def unlink(self, parent: InodeId, name: bytes) -> None:
        parent_row = self._dir(parent)
        inode = tables.lookup(self._db, parent, name)
        if inode is None:
            raise NotFound("no such entry")
        row = self.getattr(inode)
        if stat.S_ISDIR(row.mode):
            raise IsADirectory("is a directory")
        self.policy.check_changeable(self._db, row, "unlink")
        tables.remove_dentry(self._db, parent, name)
        self._touch_dir(parent_row)
        self._drop_link(row, parent, name)

    def rmdir(self, parent: InodeId, name: bytes) -> None:
        parent_row = self._dir(parent)
        if name == b".":
            raise InvalidArgument("cannot remove '.'")
        inode = tables.lookup(self._db, parent, name)
        if inode is None:
            raise NotFound("no such entry")
        row = self.getattr(inode)
        if not stat.S_ISDIR(row.mode):
            raise NotADirectory("not a directory")
        if tables.has_children(self._db, inode):
            raise NotEmpty("directory not empty")
        tables.remove_dentry(self._db, parent, name)
        self._touch_dir(parent_row, -1)
        self._drop_link(row, parent, name)

    # --- renaming -----------------------------------------------------------------------------

    def _is_ancestor(self, ancestor: InodeId, inode: InodeId) -> bool:
        current: InodeId | None = inode
        while current is not None and current != ROOT_INODE:
            if current == ancestor:
                return True
            current = tables.parent_of_dir(self._db, current)
        return ancestor == ROOT_INODE

    def rename(self, old_parent: InodeId, old_name: bytes, new_parent: InodeId, new_name: bytes, flags: int) -> None:
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == RENAME_NOREPLACE | RENAME_EXCHANGE:
            raise InvalidArgument("unsupported rename flags")
        _check_name(new_name)
        old_dir = self._dir(old_parent)
        new_dir = old_dir if new_parent == old_parent else self._dir(new_parent)
        src = tables.lookup(self._db, old_parent, old_name)
        if src is None:
            raise NotFound("no such entry")
        src_row = self.getattr(src)
        dst = tables.lookup(self._db, new_parent, new_name)
        src_is_dir = stat.S_ISDIR(src_row.mode)
        if src_is_dir and new_parent != old_parent and self._is_ancestor(src, new_parent):
            raise InvalidArgument("cannot move a directory into itself")
        if flags & RENAME_EXCHANGE:
            if dst is None:
                raise NotFound("exchange target does not exist")
            self._exchange(old_dir, old_name, src_row, new_dir, new_name, self.getattr(dst))
            return
        if dst is not None:
            if flags & RENAME_NOREPLACE:
                raise Exists("target exists")
            if dst == src:
                return  # two names of one inode: POSIX says do nothing
            dst_row = self.getattr(dst)
            dst_is_dir = stat.S_ISDIR(dst_row.mode)
            if src_is_dir and not dst_is_dir:
                raise NotADirectory("target is not a directory")
            if dst_is_dir and not src_is_dir:
                raise IsADirectory("target is a directory")
            if dst_is_dir and tables.has_children(self._db, dst):
                raise NotEmpty("target directory not empty")
            self.policy.check_changeable(self._db, dst_row, "rename over")
            tables.remove_dentry(self._db, new_parent, new_name)
            if dst_is_dir:
                new_dir.nlink -= 1
            self._drop_link(dst_row, new_parent, new_name)
        tables.move_dentry(self._db, old_parent, old_name, new_parent, new_name)
        src_row.ctime_ns = time.time_ns()
        tables.save_inode_attrs(self._db, src_row)
        if src_is_dir and new_parent != old_parent:
            self._touch_dir(old_dir, -1)
            self._touch_dir(new_dir, 1)
        else:
            self._touch_dir(old_dir)
            if new_dir is not old_dir:
                self._touch_dir(new_dir)

    def _exchange(self, old_dir: InodeRow, old_name: bytes, a: InodeRow, new_dir: InodeRow, new_name: bytes, b: InodeRow) -> None:
        if a.id == b.id:
            return
        a_dir, b_dir = stat.S_ISDIR(a.mode), stat.S_ISDIR(b.mode)
        if old_dir.id != new_dir.id and (a_dir and self._is_ancestor(a.id, new_dir.id) or b_dir and self._is_ancestor(b.id, old_dir.id)):
            raise InvalidArgument("cannot move a directory into itself")
        tables.repoint_dentry(self._db, old_dir.id, old_name, b.id)
        tables.repoint_dentry(self._db, new_dir.id, new_name, a.id)
        now = time.time_ns()
        for row in (a, b):
            row.ctime_ns = now
            tables.save_inode_attrs(self._db, row)
        if old_dir.id != new_dir.id and a_dir != b_dir:
            delta = 1 if b_dir else -1
            self._touch_dir(old_dir, delta)
            self._touch_dir(new_dir, -delta)
        else:
            self._touch_dir(old_dir)
            if new_dir.id != old_dir.id:
                self._touch_dir(new_dir)

    # --- attributes ---------------------------------------------------------------------------

    def set_attrs(
        self, inode: InodeId, *, mode: int | None = None, uid: int | None = None, gid: int | None = None,
        atime_ns: int | None = None, mtime_ns: int | None = None, ctime_ns: int | None = None,
    ) -> InodeRow:
        row = tables.get_inode(self._db, inode)
        if row is None:
            raise NotFound(f"inode {inode} does not exist")
        if mode is not None:
            row.mode = stat.S_IFMT(row.mode) | (mode & 0o7777)
        if uid is not None:
            row.uid = uid
        if gid is not None:
            row.gid = gid
        if atime_ns is not None:
            row.atime_ns = atime_ns
        if mtime_ns is not None:
            row.mtime_ns = mtime_ns
            oi = self._files.open.get(inode)
            if oi is not None:
                oi.mtime_ns = None  # an explicit mtime wins over the one writes would set
        row.ctime_ns = ctime_ns if ctime_ns is not None else time.time_ns()
        if row.nlink > 0 or self._keeps_unlinked(inode):
            tables.save_inode_attrs(self._db, row)
        # else: the kernel writing back the times of a file it just unlinked (writeback cache);
        # the row goes with the FORGET that follows.
        return self._with_live_size(row)

    def _keeps_unlinked(self, inode: InodeId) -> bool:
        """Whether an unlinked inode's attributes still matter: it is open (fchmod, futimens
        through a handle) or may be undeleted (retention)."""
        return inode in self._files.open or self.policy.retention_ns > 0

    # --- extended attributes ------------------------------------------------------------------

    def setxattr(self, inode: InodeId, name: bytes, value: bytes) -> None:
        self.getattr(inode)
        if len(name) > XATTR_NAME_MAX or not name:
            raise AttributeTooLarge("xattr name too long")
        if len(value) > XATTR_SIZE_MAX:
            raise AttributeTooLarge("xattr value too large")
        tables.set_xattr(self._db, inode, name, value)
        if name == CAPABILITY_XATTR:
            self.capability_xattrs = True

    def getxattr(self, inode: InodeId, name: bytes) -> bytes:
        self.getattr(inode)
        value = tables.get_xattr(self._db, inode, name)
        if value is None:
            raise NoAttribute("no such attribute")
        return value

    def listxattr(self, inode: InodeId) -> list[bytes]:
        self.getattr(inode)
        return tables.list_xattrs(self._db, inode)

    def removexattr(self, inode: InodeId, name: bytes) -> None:
        self.getattr(inode)
        if not tables.remove_xattr(self._db, inode, name):
            raise NoAttribute("no such attribute")

