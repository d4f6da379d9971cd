"""Mount configuration: the values every component is built from, and size parsing.

Imports nothing from mifs but errors; holds no behaviour beyond parsing and defaults.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from mifs.errors import UserError

DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024
MIN_CHUNK_SIZE = 64 * 1024
MAX_CHUNK_SIZE = 64 * 1024 * 1024
DEFAULT_CACHE_SIZE = 10 * 1024**3
ZSTD_MIN_LEVEL = 1
ZSTD_MAX_LEVEL = 9
"""Higher zstd levels compress images little better at a fraction of the speed and up to
~55 MiB of memory per concurrent seal: not for a gateway that compresses as it ingests."""
ZSTD_DEFAULT_LEVEL = 1

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


DEFAULT_PACK_SIZE = 4 * 1024**2
MAX_PACK_SIZE = 64 * 1024**2
"""Every upload worker holds one pack in memory: this bounds that memory."""


def check_pack_size(value: object, what: str) -> int:
    """A pack size in bytes: 0 (off) or 64 KiB .. MAX_PACK_SIZE."""
    if isinstance(value, bool) or not isinstance(value, int) or not (value == 0 or 64 * 1024 <= value <= MAX_PACK_SIZE):
        raise UserError(f"{what} must be 0 (off) or a size from 64KiB to 64MiB", 2)
    return value


def format_size(n: int | float) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


_COMPRESS_RE = re.compile(r"^zstd(?::([+-]?\d+))?$", re.ASCII)


def parse_compress(text: str) -> int | None:
    """Chunk compression: 'off' -> None, 'zstd' -> ZSTD_DEFAULT_LEVEL, 'zstd:LEVEL' -> LEVEL."""
    value = text.strip().lower()
    if value == "off":
        return None
    match = _COMPRESS_RE.match(value)
    if match is None:
        raise UserError(f"invalid compression {text!r} (use off, zstd or zstd:LEVEL)", 2)
    level = int(match.group(1)) if match.group(1) is not None else ZSTD_DEFAULT_LEVEL
    if not ZSTD_MIN_LEVEL <= level <= ZSTD_MAX_LEVEL:
        raise UserError(f"zstd level must be between {ZSTD_MIN_LEVEL} and {ZSTD_MAX_LEVEL}", 2)
    return level


KNOWN_FUSE_OPTIONS = frozenset({"allow_other", "allow_root", "ro", "rw", "default_permissions", "noatime", "nodev", "nosuid", "noexec", "exec", "suid", "dev"})


@dataclass
class MountConfig:
    """Everything `mifs mount` needs; built by the CLI from flags (later also from TOML)."""

    store_url: str
    mountpoint: Path
    key_file: Path | None = None
    # other key sources (exactly one, or none for the archive's default key file)
    key_credential: str | None = None
    key_env: str | None = None
    passphrase_file: Path | None = None
    passphrase: bytes | None = field(default=None, repr=False)  # typed at the prompt; memory only
    kms_key_id: str | None = None
    kms_endpoint: str | None = None
    kms_region: str | None = None
    cache_dir: Path | None = None
    foreground: bool = False
    fuse_options: list[str] = field(default_factory=list)
    cache_size: int = DEFAULT_CACHE_SIZE
    log_file: Path | None = None
    debug: bool = False
    upload_workers: int = 8
    upload_delay: float = 5.0
    """Seconds at most a freshly staged chunk waits for the mount to stop writing before it is
    uploaded (uploader.py); 0: upload at once. Ignored with sync_uploads."""
    plaintext_cache_bytes: int = 64 * 1024 * 1024
    dirty_buffer_bytes: int = 96 * 1024 * 1024
    attr_timeout: float = 60.0
    wait_uploads_on_exit: bool = True
    fetch_timeout: float = 60.0
    staging_timeout: float = 120.0
    sync_uploads: bool = False
    sync_close: bool = False
    """close(2) returns only once the file would survive power loss (as after fsync); by
    default close survives a crash of the daemon at once and power loss within
    sync_interval seconds (commits.py)."""
    sync_interval: float = 5.0
    orphan_sweep_interval: float = 86400.0
    """Seconds between passes of the orphan sweep (sweep/service.py); 0: off."""
    orphan_grace: float = 3600.0
    """An object no metadata names is deleted only when found unnamed this long after it was
    first found so (sweep/service.py)."""
    xattrs: bool | None = None
    """Extended attributes on the mount. None: on if the archive already holds any, else off.
    Off, the kernel no longer asks for security.capability before every write(2), one FUSE
    round trip per write call (Orthanc writes 4 KiB at a time)."""
    pack_size: int | None = None
    """Small chunks are uploaded together as pack objects of up to this many bytes (0: every
    chunk is an object of its own). None: DEFAULT_PACK_SIZE on S3, off on a local-directory
    store (no per-request cost to save there)."""
    compress_level: int | None = None
    """zstd level chunks are compressed with before sealing; None: off (docs/CONFIG.md)."""
    # DICOM awareness (dicom_index)
    index: bool = True
    prefetch: bool = True
    prefetch_priors: int = 0
    prefetch_parallel: int = 8
    # retention and WORM (vfs/retention.py, shred/)
    retention_days: float = 0.0
    worm_days: float = 0.0
    # S3 stores
    endpoint_url: str | None = None
    region: str | None = None
    addressing_style: str = "auto"
    ca_bundle: Path | None = None
    profile: str | None = None
    # access control and the audit trail
    allow_uids: list[int] = field(default_factory=list)
    allow_gids: list[int] = field(default_factory=list)
    audit_segment_seconds: float = 300.0

    @property
    def read_only(self) -> bool:
        return "ro" in self.fuse_options


# --- the TOML config file (docs/CONFIG.md) -------------------------------------------------------

_PATH_KEYS = {"mountpoint", "key_file", "passphrase_file", "cache_dir", "log_file", "ca_bundle"}
_STRING_KEYS = {"key_credential", "key_env", "kms_key_id", "kms_endpoint", "kms_region"}
_RENAMED = {"store": "store_url", "options": "fuse_options", "kms.key_id": "kms_key_id", "kms.endpoint": "kms_endpoint", "kms.region": "kms_region",
            "audit.segment_seconds": "audit_segment_seconds", "tuning.compress": "compress_level"}
_BOOL_KEYS = {"index", "prefetch", "debug", "sync_uploads", "sync_close", "xattrs"}
_COUNT_KEYS = {"prefetch_priors": 0, "prefetch_parallel": 1, "upload_workers": 1}
_ID_LIST_KEYS = {"allow_uids", "allow_gids"}
_DAYS_KEYS = {"retention_days", "worm_days"}
_SIZE_KEYS = {"cache_size", "plaintext_cache_bytes", "dirty_buffer_bytes", "pack_size"}
_TOP_LEVEL = {
    "store", "mountpoint", "key_file", "key_credential", "key_env", "passphrase_file", "cache_dir", "cache_size", "options",
    "log_file", "debug", "xattrs",
}
_SECTIONS: dict[str, set[str]] = {
    "s3": {"endpoint_url", "region", "addressing_style", "ca_bundle", "profile"},
    "kms": {"key_id", "endpoint", "region"},
    "dicom": {"index", "prefetch", "prefetch_priors", "prefetch_parallel"},
    "access": {"allow_uids", "allow_gids"},
    "audit": {"segment_seconds"},
    "retention": {"retention_days", "worm_days"},
    "tuning": {"upload_workers", "upload_delay", "fetch_timeout", "staging_timeout", "sync_uploads", "sync_close",
               "sync_interval", "attr_timeout", "orphan_sweep_interval", "orphan_grace",
               "plaintext_cache_bytes", "dirty_buffer_bytes", "compress", "pack_size"},
}


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a mount config file into MountConfig field values; UserError on anything unknown."""
    try:
        with open(path, "rb") as fh:
            doc = tomllib.load(fh)
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist", 2) from None
    except PermissionError:
        raise UserError(f"config file {path} is not readable", 2) from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"config file {path} is not valid TOML: {exc}", 2) from None
    values: dict[str, Any] = {}
    for key, value in doc.items():
        if key in _SECTIONS and isinstance(value, dict):
            for sub, subvalue in value.items():
                if sub not in _SECTIONS[key]:
                    raise UserError(f"config file {path}: unknown key {key}.{sub}", 2)
                values[_RENAMED.get(f"{key}.{sub}", str(sub))] = subvalue
        elif key in _TOP_LEVEL:
            values[key] = value
        else:
            raise UserError(f"config file {path}: unknown key {key!r}", 2)
    known = {f.name for f in fields(MountConfig)}
    result: dict[str, Any] = {}
    for key, value in values.items():
        name = _RENAMED.get(key, key)
        if name not in known:
            raise UserError(f"config file {path}: unknown key {key!r}", 2)
        if key in _PATH_KEYS:
            if not isinstance(value, str):
                raise UserError(f"config file {path}: {key} must be a string path", 2)
            value = (path.parent / value) if not Path(value).is_absolute() else Path(value)
        elif key in _STRING_KEYS and not isinstance(value, str):
            raise UserError(f"config file {path}: {key} must be a string", 2)
        elif key in _SIZE_KEYS and isinstance(value, str):
            value = parse_size(value, key)
        elif key in _BOOL_KEYS and not isinstance(value, bool):
            raise UserError(f"config file {path}: {key} must be true or false", 2)
        elif key in _COUNT_KEYS and (not isinstance(value, int) or isinstance(value, bool) or value < _COUNT_KEYS[key]):
            raise UserError(f"config file {path}: {key} must be an integer >= {_COUNT_KEYS[key]}", 2)
        elif key in _ID_LIST_KEYS and not (
            isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**32 for v in value)
        ):
            raise UserError(f"config file {path}: {key} must be a list of numeric ids", 2)
        elif key == "upload_delay" and (not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0):
            raise UserError(f"config file {path}: tuning.upload_delay must be a number of seconds >= 0", 2)
        elif key == "sync_interval" and (
            not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value <= 60
        ):
            raise UserError(f"config file {path}: tuning.sync_interval must be a number of seconds in (0, 60]", 2)
        elif key in ("orphan_sweep_interval", "orphan_grace") and (
            not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0
        ):
            raise UserError(f"config file {path}: tuning.{key} must be a number of seconds >= 0", 2)
        elif key == "audit_segment_seconds" and (not isinstance(value, (int, float)) or isinstance(value, bool) or value < 1):
            raise UserError(f"config file {path}: audit.segment_seconds must be a number >= 1", 2)
        elif key in _DAYS_KEYS:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise UserError(f"config file {path}: {key} must be a number of days >= 0", 2)
            value = float(value)
        elif key == "compress_level":
            if not isinstance(value, str):
                raise UserError(f"config file {path}: tuning.compress must be a string: \"off\", \"zstd\" or \"zstd:LEVEL\"", 2)
            try:
                value = parse_compress(value)
            except UserError as exc:
                raise UserError(f"config file {path}: tuning.compress: {exc}", 2) from None
        elif key == "options":
            if isinstance(value, str):
                value = [o.strip() for o in value.split(",") if o.strip()]
            if not isinstance(value, list) or not all(isinstance(o, str) for o in value):
                raise UserError(f"config file {path}: options must be a list of strings", 2)
            unknown = [o for o in value if o not in KNOWN_FUSE_OPTIONS]
            if unknown:
                raise UserError(f"config file {path}: unknown mount option {unknown[0]!r}", 2)
        if key == "pack_size":
            value = check_pack_size(value, f"config file {path}: tuning.pack_size")
        result[name] = value
    return result
