"""Durability primitives for local files: the one place mifs fsyncs a directory or a file by name.

Imports nothing from mifs; knows nothing about what the files hold.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make the names in a directory (files created, renamed, removed) survive power loss."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fdatasync_path(path: str | Path) -> bool:
    """Make a file's written data (and its size) survive power loss, by name: the writer may
    have closed it long ago. False if there is no such file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)
    return True
