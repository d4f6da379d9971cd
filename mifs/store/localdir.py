"""The embedded object store: one file per object under a local directory.

Must not see plaintext or names; it only maps object keys to files. Every put is atomic and
durable (temp file, fsync, rename, fsync of the directory), so a crash leaves either the old
object or the new one. Blocking file calls run in worker threads under one limiter.
"""

from __future__ import annotations

import errno
import os
import secrets
from pathlib import Path
from typing import Callable, TypeVar

import trio

from mifs.localfs import fdatasync_path, fsync_dir
from mifs.errors import ObjectNotFound, StoreNotFound, StoreUnavailable
from mifs.store.base import check_key, check_range
from mifs.types import ObjectKey

T = TypeVar("T")

TMP_DIR = ".tmp"



class LocalDirStore:
    """Objects as files: key ``data/ab/abcd...`` is the file ``ROOT/data/ab/abcd...``."""

    def __init__(self, root: Path, *, create: bool = False, max_threads: int = 8) -> None:
        self.root = root
        if create:
            try:
                root.mkdir(mode=0o700, exist_ok=True)
            except FileNotFoundError:
                raise StoreNotFound(f"parent directory of {root} does not exist") from None
            except OSError as exc:
                raise StoreUnavailable(f"cannot create store directory {root}: {exc.strerror}") from None
        if not root.is_dir():
            raise StoreNotFound(f"store directory {root} does not exist")
        self._limiter = trio.CapacityLimiter(max_threads)
        self._made_dirs: set[Path] = set()

    @property
    def description(self) -> str:
        return f"local directory {self.root}"

    def _path(self, key: ObjectKey) -> Path:
        return self.root / check_key(key)

    def _write_tmp(self, data: bytes) -> Path:
        tmp_dir = self.root / TMP_DIR
        tmp_dir.mkdir(mode=0o700, exist_ok=True)
        tmp = tmp_dir / secrets.token_hex(16)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        return tmp

    def _ensure_parent(self, path: Path) -> None:
        parent = path.parent
        if parent in self._made_dirs:
            return
        missing = []
        probe = parent
        while not probe.is_dir():
            missing.append(probe)
            probe = probe.parent
        for directory in reversed(missing):
            try:
                directory.mkdir(mode=0o700)
            except FileExistsError:
                pass
            fsync_dir(directory.parent)
        self._made_dirs.add(parent)

    def _put_sync(self, key: ObjectKey, data: bytes, replace: bool) -> bool:
        path = self._path(key)
        try:
            self._ensure_parent(path)
            tmp = self._write_tmp(data)
            try:
                if replace:
                    os.rename(tmp, path)
                else:
                    try:
                        os.link(tmp, path)
                    except FileExistsError:
                        if path.is_file():
                            return False
                        raise IsADirectoryError(errno.EISDIR, "a directory has that name") from None
            finally:
                tmp.unlink(missing_ok=True)
            fsync_dir(path.parent)
            return True
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreUnavailable(f"store {self.root} is full") from None
            raise StoreUnavailable(f"cannot write to store {self.root}: {exc.strerror}") from None

    async def put(self, key: ObjectKey, data: bytes) -> None:
        await trio.to_thread.run_sync(self._put_sync, key, data, True, limiter=self._limiter)

    async def put_if_absent(self, key: ObjectKey, data: bytes) -> bool:
        return await trio.to_thread.run_sync(self._put_sync, key, data, False, limiter=self._limiter)

    def _adopt_sync(self, key: ObjectKey, source: Path) -> bool:
        path = self._path(key)
        tmp = self.root / TMP_DIR / secrets.token_hex(16)
        try:
            self._ensure_parent(path)
            (self.root / TMP_DIR).mkdir(mode=0o700, exist_ok=True)
            if not fdatasync_path(source):  # a staged chunk may not be synced yet (light commits)
                return False
            os.link(source, tmp)
        except OSError as exc:
            if exc.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOENT):
                return False  # other filesystem, or no hard links here: caller copies
            raise StoreUnavailable(f"cannot write to store {self.root}: {exc.strerror}") from None
        try:
            os.rename(tmp, path)
            fsync_dir(path.parent)
        except OSError as exc:
            raise StoreUnavailable(f"cannot write to store {self.root}: {exc.strerror}") from None
        finally:
            tmp.unlink(missing_ok=True)
        return True

    async def adopt_file(self, key: ObjectKey, source: Path) -> bool:
        """Store a local file as object `key` by hard-linking it (no copy), after syncing it.


        False if the file cannot be linked (another filesystem); the caller then uses put().
        """
        return await trio.to_thread.run_sync(self._adopt_sync, key, source, limiter=self._limiter)

    def _get_sync(self, key: ObjectKey) -> bytes:
        try:
            with open(self._path(key), "rb") as fh:
                return fh.read()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(f"object {key} is not in the store") from None
        except OSError as exc:
            raise StoreUnavailable(f"cannot read object {key}: {exc.strerror}") from None

    async def get(self, key: ObjectKey) -> bytes:
        return await trio.to_thread.run_sync(self._get_sync, key, limiter=self._limiter)

    async def get_then(self, key: ObjectKey, then: Callable[[bytes], T]) -> T:
        return await trio.to_thread.run_sync(lambda: then(self._get_sync(key)), limiter=self._limiter)

    def _get_range_sync(self, key: ObjectKey, offset: int, length: int) -> bytes:
        """pread until `length` bytes or the end of the file: one short read is not the end
        of a regular file on every filesystem (network ones may split a read)."""
        try:
            fd = os.open(self._path(key), os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(f"object {key} is not in the store") from None
        except OSError as exc:
            raise StoreUnavailable(f"cannot read object {key}: {exc.strerror}") from None
        try:
            parts: list[bytes] = []
            got = 0
            while got < length:
                part = os.pread(fd, length - got, offset + got)
                if not part:
                    break
                parts.append(part)
                got += len(part)
            return b"".join(parts)
        except IsADirectoryError:  # open() of a directory succeeds, reading it does not
            raise ObjectNotFound(f"object {key} is not in the store") from None
        except OSError as exc:
            raise StoreUnavailable(f"cannot read object {key}: {exc.strerror}") from None
        finally:
            os.close(fd)

    async def get_range_then(self, key: ObjectKey, offset: int, length: int, then: Callable[[bytes], T]) -> T:
        check_range(offset, length)
        return await trio.to_thread.run_sync(
            lambda: then(self._get_range_sync(key, offset, length)), limiter=self._limiter
        )

    def _delete_sync(self, key: ObjectKey) -> None:
        try:
            os.unlink(self._path(key))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            pass  # no object of that name (a directory is a prefix, not an object)
        except OSError as exc:
            raise StoreUnavailable(f"cannot delete object {key}: {exc.strerror}") from None

    async def delete(self, key: ObjectKey) -> None:
        await trio.to_thread.run_sync(self._delete_sync, key, limiter=self._limiter)

    async def purge(self, key: ObjectKey) -> None:
        """A directory keeps no versions: the same as delete."""
        await self.delete(key)

    async def list_all(self, prefix: str) -> list[ObjectKey]:
        return await self.list(prefix)

    async def exists(self, key: ObjectKey) -> bool:
        return await trio.to_thread.run_sync(self._path(key).is_file, limiter=self._limiter)

    def _list_sync(self, prefix: str) -> list[ObjectKey]:
        keys: list[ObjectKey] = []
        # Walk only the directory the prefix lies in ("data/ab/" -> root/data/ab).
        start = os.path.join(self.root, prefix.rpartition("/")[0])
        for dirpath, dirnames, filenames in os.walk(start):
            rel = os.path.relpath(dirpath, self.root)
            if rel == TMP_DIR or rel.startswith(TMP_DIR + os.sep):
                dirnames[:] = []
                continue
            for name in filenames:
                key = name if rel == "." else f"{rel}/{name}"
                if key.startswith(prefix):
                    keys.append(ObjectKey(key))
        return keys

    async def list(self, prefix: str) -> list[ObjectKey]:
        return await trio.to_thread.run_sync(self._list_sync, prefix, limiter=self._limiter)

    async def aclose(self) -> None:
        return None
