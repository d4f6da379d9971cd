"""The host's mount table as mifs needs it: which mounts are mifs, unmounting through
fusermount3, and the kernel read-ahead of a FUSE mount.

Must not know about archives or the daemon's objects; plain functions over /proc, /sys and
fusermount3. Callers inside the daemon pass paths already resolved (see raise_readahead).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Iterator


def _mount_entries() -> Iterator[tuple[str, str, list[str]]]:
    """(mount point, filesystem type, all fields) of each line of /proc/self/mountinfo, in
    order (the last entry for a point is the one on top); nothing if it cannot be read."""
    try:
        with open("/proc/self/mountinfo") as fh:
            lines = fh.readlines()
    except OSError:
        return
    for line in lines:
        fields = line.split()
        if len(fields) > 4 and "-" in fields[4:]:
            after = fields[fields.index("-", 4) + 1 :]
            yield fields[4].encode().decode("unicode_escape"), after[0] if after else "", fields


def mountinfo_entry(real_path: str) -> list[str] | None:
    """The /proc/self/mountinfo fields of the mount at an already resolved path, or None.

    Never stats the path: callers inside the daemon must not touch their own mount."""
    return next((fields for point, _, fields in _mount_entries() if point == real_path), None)


def live_mifs_mounts() -> list[Path]:
    """Mount points of every mifs filesystem mounted in this mount namespace."""
    return [Path(point) for point, fstype, _ in _mount_entries() if fstype == "fuse.mifs"]


def mount_fstype(path: Path) -> str | None:
    """The filesystem type mounted exactly at path (from /proc/self/mountinfo), or None."""
    fields = mountinfo_entry(os.path.realpath(path))
    return fields[fields.index("-") + 1] if fields else None


def raise_readahead(real_mountpoint: str, kib: int = 1024) -> bool:
    """Let the kernel read ahead 1 MiB on this mount (FUSE's default is 128 KiB): sequential
    reads then arrive as 1 MiB requests, about 1.6x faster (FUSE-NOTES). Best effort, root.

    Takes the mount point already resolved: resolving it now would stat the mount itself,
    which from the daemon's own event loop would wait for itself forever.
    """
    fields = mountinfo_entry(real_mountpoint)
    if fields is None:
        return False
    try:
        with open(f"/sys/class/bdi/{fields[2]}/read_ahead_kb", "w") as bdi:
            bdi.write(str(kib))
    except OSError:
        return False
    return True


def run_fusermount(mountpoint: Path, lazy: bool = False) -> str | None:
    """Unmount through fusermount3; returns None on success or its complaint."""
    args = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [str(mountpoint)]
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode == 0:
        return None
    text = proc.stderr.strip().splitlines()
    if text and "busy" in text[-1].lower():
        return f"mountpoint {mountpoint} is busy (a process still uses it)"
    return text[-1] if text else f"fusermount3 exited with {proc.returncode}"
