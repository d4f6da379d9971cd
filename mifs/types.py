"""Typed ids and small value types used across layers.

Imports nothing from mifs; holds no behaviour beyond validation of its own values.
"""

from __future__ import annotations

from typing import NewType

InodeId = NewType("InodeId", int)
"""The inode number the kernel sees; 1 is the root directory."""

FileId = NewType("FileId", bytes)
"""16 random bytes naming a file's content for the envelope (bound into every chunk's AAD)."""

ObjectKey = NewType("ObjectKey", str)
"""The name of an object in the store; random, never derived from names or sizes."""

ArchiveId = NewType("ArchiveId", bytes)
"""16 random bytes naming an archive; bound into every wrapped key and chunk."""

ROOT_INODE = InodeId(1)
FILE_ID_LEN = 16
ARCHIVE_ID_LEN = 16
KEY_LEN = 32
NAME_MAX = 255
