"""Domain exceptions shared by every layer of mifs.

Imports nothing from mifs. Messages carry ids only: never file names, patient data or keys.
The errno mapping lives in fuse_ops, the exit-code mapping in cli.
"""

from __future__ import annotations


class MifsError(Exception):
    """Base of every error mifs raises on purpose."""


# --- errors an admin sees from the CLI -------------------------------------------------------


class UserError(MifsError):
    """A problem the person at the terminal can fix; printed as one line, no traceback."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class StoreNotFound(MifsError):
    """The store location does not exist or holds no archive."""


class StoreUnavailable(MifsError):
    """The store could not be reached or answered with a transient failure."""


class StorePermissionDenied(MifsError):
    """The store refused the request for good (permissions, missing bucket)."""


class ObjectNotFound(MifsError):
    """A named object is not in the store."""


class ArchiveExists(MifsError):
    """init was asked to write over an existing archive."""


class ArchiveCorrupt(MifsError):
    """The archive descriptor cannot be parsed or fails its integrity check."""


class WrongKey(MifsError):
    """The key source does not hold the key this archive was created with."""


class KeyFileError(MifsError):
    """A key file is missing, unreadable, badly formatted or too permissive."""


class KeyUnavailable(MifsError):
    """The key service (KMS) could not be reached or refused to decrypt for reasons other
    than a wrong key (throttling, disabled key, missing permission, timeout)."""


class KeyRetired(MifsError):
    """The key source holds a master key that a key rotation retired."""


class RotationError(MifsError):
    """A key rotation cannot start or continue (another one in progress, key reused, ...)."""


# --- errors inside the filesystem (mapped to errno by fuse_ops) ------------------------------


class FsError(MifsError):
    """Base of errors that a filesystem operation reports to the caller."""


class NotFound(FsError):
    """ENOENT: no such entry or inode."""


class Exists(FsError):
    """EEXIST: the target name is taken."""


class NotEmpty(FsError):
    """ENOTEMPTY: a directory to remove or replace still has entries."""


class IsADirectory(FsError):
    """EISDIR: a file operation was aimed at a directory."""


class NotADirectory(FsError):
    """ENOTDIR: a directory operation was aimed at something else."""


class NameTooLong(FsError):
    """ENAMETOOLONG: a name component is longer than 255 bytes."""


class InvalidArgument(FsError):
    """EINVAL: the request is malformed (bad flags, rename into own subtree, ...)."""


class NoSpace(FsError):
    """ENOSPC: local staging is full of data not yet safely in the store."""


class NoAttribute(FsError):
    """ENODATA: no such extended attribute."""


class AttributeTooLarge(FsError):
    """E2BIG/ERANGE: an extended attribute value or name is too large."""


class NotPermitted(FsError):
    """EPERM: the operation is not allowed on this object."""


class Protected(FsError):
    """EPERM: the file is WORM-protected (retention policy) and may not change or go yet."""


class AccessDenied(FsError):
    """EACCES: the caller lacks permission."""


class ReadOnly(FsError):
    """EROFS: the mount is read-only (by request or after an internal failure)."""


class BadFileHandle(FsError):
    """EBADF: the handle is unknown or not open for this kind of access."""


class TooManyLinks(FsError):
    """EMLINK: a link count would overflow."""


class IntegrityError(FsError):
    """EIO: a stored chunk failed authentication (tampered, swapped, replayed or truncated).

    Final: never retried, never returns partial plaintext.
    """


class DataUnavailable(FsError):
    """EIO: the data could not be fetched within the configured time."""


class NotCached(FsError):
    """The data is not on this host and the caller asked not to fetch it from the store."""


class LocalIOError(FsError):
    """EIO: the local cache disk failed a read or write (other than running out of space)."""
