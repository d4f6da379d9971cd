"""Mount configuration: the values every component is built from, and size parsing.

Imports nothing from mifs but errors; holds no behaviour beyond parsing and defaults.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from mifs.errors import UserError

DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024
MIN_CHUNK_SIZE = 64 * 1024
MAX_CHUNK_SIZE = 64 * 1024 * 1024
DEFAULT_CACHE_SIZE = 10 * 1024**3

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1024,
    "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1000**3, "gb": 1000**3, "gib": 1024**3,
    "t": 1000**4, "tb": 1000**4, "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([a-zA-Z]*)\s*$", re.ASCII)


def parse_size(text: str, what: str = "size") -> int:
    """'4MiB' -> 4194304. Decimal units (MB) are powers of 1000, binary units (MiB) of 1024."""
    match = _SIZE_RE.match(text)
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _UNITS:
        raise UserError(f"invalid {what} {text!r} (examples: 4MiB, 512KiB, 10GiB)", 2)
    return int(match.group(1)) * _UNITS[unit]


def format_size(n: int | float) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


KNOWN_FUSE_OPTIONS = frozenset({"allow_other", "allow_root", "ro", "rw", "default_permissions", "noatime", "nodev", "nosuid", "noexec", "exec", "suid", "dev"})


@dataclass
class MountConfig:
    """Everything `mifs mount` needs; built by the CLI from flags (later also from TOML)."""

    store_url: str
    mountpoint: Path
    key_file: Path | None = None
    cache_dir: Path | None = None
    foreground: bool = False
    fuse_options: list[str] = field(default_factory=list)
    cache_size: int = DEFAULT_CACHE_SIZE
    log_file: Path | None = None
    debug: bool = False
    upload_workers: int = 4
    plaintext_cache_bytes: int = 64 * 1024 * 1024
    dirty_buffer_bytes: int = 96 * 1024 * 1024
    attr_timeout: float = 60.0
    wait_uploads_on_exit: bool = True

    @property
    def read_only(self) -> bool:
        return "ro" in self.fuse_options
