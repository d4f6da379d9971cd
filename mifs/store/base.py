"""The object-store interface every backend implements, and object-key validation.

Must not see plaintext, keys, inode numbers, file names or study ids: it moves opaque bytes
under opaque names. Retries live in a wrapper, not in backends.
"""

from __future__ import annotations

import re
import secrets
from typing import Callable, Protocol, TypeVar

from mifs.types import ObjectKey

_KEY_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*(/[a-z0-9][a-z0-9._-]*)*$")

DESCRIPTOR_KEY = ObjectKey("mifs-archive.json")
"""The one fixed object name: the archive descriptor."""


def check_key(key: str) -> ObjectKey:
    """Reject keys that could escape a directory or carry anything but our own id alphabet."""
    if len(key) > 512 or not _KEY_RE.match(key) or ".." in key:
        raise ValueError("invalid object key")
    return ObjectKey(key)


def check_range(offset: int, length: int) -> None:
    """Reject a range no caller means: every backend fails the same way on it, before any I/O."""
    if offset < 0 or length < 1:
        raise ValueError("a byte range needs offset >= 0 and length >= 1")


def new_object_key() -> ObjectKey:
    """A random name for a data object (a chunk or a pack): 128 bits, hex, fanned out over
    256 prefixes. Random and never reused, so a name says nothing and an old one never
    comes back (the orphan sweep relies on it)."""
    name = secrets.token_hex(16)
    return ObjectKey(f"data/{name[:2]}/{name}")


T = TypeVar("T")


class ObjectStore(Protocol):
    """An async key-value store of immutable objects."""

    @property
    def description(self) -> str:
        """Where the store is, for messages (no secrets)."""
        ...

    async def put(self, key: ObjectKey, data: bytes) -> None:
        """Store an object durably, replacing any object of the same key."""
        ...

    async def put_if_absent(self, key: ObjectKey, data: bytes) -> bool:
        """Store an object unless the key exists; False if it did."""
        ...

    async def get(self, key: ObjectKey) -> bytes:
        """The object's bytes; ObjectNotFound if there is none."""
        ...

    async def get_then(self, key: ObjectKey, then: Callable[[bytes], T]) -> T:
        """then(the object's bytes), called in the same worker thread as the read, and its
        result: saves a thread hop per object on hot paths. Whatever `then` raises passes
        through untouched (and is never retried); the store does not look at its result."""
        ...

    async def get_range_then(self, key: ObjectKey, offset: int, length: int, then: Callable[[bytes], T]) -> T:
        """then(bytes offset .. offset+length-1 of the object), called in the same worker
        thread as the read, and its result. ObjectNotFound if there is no object. An object
        shorter than offset+length gives the bytes it has in that range (possibly b""): the
        caller authenticates what it reads, so a short object fails there. Whatever `then`
        raises passes through untouched (and is never retried). ValueError unless
        offset >= 0 and length >= 1."""
        ...

    async def delete(self, key: ObjectKey) -> None:
        """Remove an object; deleting a missing object is not an error."""
        ...

    async def purge(self, key: ObjectKey) -> None:
        """Remove an object and every older version of it the store keeps (S3 versioning):
        afterwards no request can return any content stored under `key`. Missing is fine."""
        ...

    async def exists(self, key: ObjectKey) -> bool:
        ...

    async def list_all(self, prefix: str) -> list[ObjectKey]:
        """Every key starting with prefix that has any stored version, current or not (with
        S3 versioning, a deleted object's older versions stay behind a delete marker)."""
        ...

    async def list(self, prefix: str) -> list[ObjectKey]:
        """Every key starting with prefix, in no particular order."""
        ...

    async def aclose(self) -> None:
        ...
