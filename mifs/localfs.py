"""Durability primitives for local files: the one place mifs fsyncs a directory.

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
