"""Opening an archive, shared by the CLI and the daemon: the key source of a
configuration, default paths, the store options, the descriptor and key ring, the cache dir
and its metadata database (restored from the store when the cache dir is new), and the checks
before a mount.

Must not know about FUSE or the running daemon (mount.py wires those).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from mifs.archive import Descriptor, load_descriptor
from mifs.config import MountConfig
from mifs.crypto.keyring import KeyRing, MasterKey
from mifs.crypto.keysource import KIND_CREDENTIAL, KIND_ENV, KIND_FILE, KIND_KMS, KIND_PASSPHRASE, KeySource
from mifs.exit_codes import (
    EXIT_ARCHIVE,
    EXIT_FUSE,
    EXIT_INTERNAL,
    EXIT_KEY,
    EXIT_KEY_RETIRED,
    EXIT_KEY_UNAVAILABLE,
    EXIT_MOUNTPOINT,
    EXIT_ROTATION,
    EXIT_STORE,
    EXIT_USAGE,
)
from mifs.errors import (
    ArchiveCorrupt,
    ArchiveExists,
    KeyFileError,
    KeyRetired,
    KeyUnavailable,
    RotationError,
    StoreNotFound,
    StorePermissionDenied,
    StoreUnavailable,
    UserError,
    WrongKey,
)
from mifs.keystore import RotationRecord, open_keyring
from mifs.metadb.db import DatabaseTooNew, MetaDb
from mifs.metasync import newest_store_seq, restore, store_has_metadata
from mifs.mounttable import mount_fstype, run_fusermount
from mifs.store.base import ObjectStore
from mifs.store.url import StoreLocation, StoreOptions, open_store, parse_store_url

log = logging.getLogger(__name__)


LOG_FILE = "mifs.log"
DB_FILE = "meta.db"
ARCHIVE_MARKER = "archive-id"


@dataclass
class OpenedArchive:
    location: StoreLocation
    store: ObjectStore
    descriptor: Descriptor
    keyring: KeyRing | None
    key_source: KeySource | None
    rotation: RotationRecord | None = None

    @property
    def kek(self) -> MasterKey | None:
        """The current KEK (during a rotation: the new one)."""
        return self.keyring.current if self.keyring is not None else None

    def keks(self) -> list[MasterKey]:
        """Every KEK held, the current one first."""
        if self.keyring is None:
            return []
        return [self.keyring.current] + [self.keyring.get(i) for i in self.keyring.ids() if i != self.keyring.current.kek_id]


def key_source_of(cfg: MountConfig) -> KeySource | None:
    """The key source a mount config names (None: the default key file of the archive)."""
    chosen = [
        name for name, value in (
            ("key_file", cfg.key_file), ("key_credential", cfg.key_credential), ("key_env", cfg.key_env),
            ("passphrase", cfg.passphrase_file or cfg.passphrase), ("kms_key_id", cfg.kms_key_id),
        ) if value
    ]
    if len(chosen) > 1:
        raise UserError(f"give one key source, not {' and '.join(chosen)}", EXIT_USAGE)
    if cfg.key_file is not None:
        return KeySource(KIND_FILE, path=cfg.key_file)
    if cfg.key_credential:
        return KeySource(KIND_CREDENTIAL, name=cfg.key_credential)
    if cfg.key_env:
        return KeySource(KIND_ENV, name=cfg.key_env)
    if cfg.passphrase_file is not None or cfg.passphrase is not None:
        return KeySource(KIND_PASSPHRASE, path=cfg.passphrase_file, passphrase=cfg.passphrase)
    if cfg.kms_key_id:
        return KeySource(KIND_KMS, name=cfg.kms_key_id, endpoint=cfg.kms_endpoint, region=cfg.kms_region)
    if cfg.kms_endpoint or cfg.kms_region:
        raise UserError("--kms-endpoint and --kms-region need --kms-key-id", EXIT_USAGE)
    return None


def default_key_file(archive_id_hex: str) -> Path:
    if os.geteuid() == 0:
        return Path("/etc/mifs/keys") / f"{archive_id_hex}.key"
    return Path.home() / ".config/mifs/keys" / f"{archive_id_hex}.key"


def default_cache_dir(archive_id_hex: str) -> Path:
    if os.geteuid() == 0:
        return Path("/var/cache/mifs") / archive_id_hex
    return Path.home() / ".cache/mifs" / archive_id_hex


def translate(exc: Exception) -> UserError:
    """Domain errors raised while opening an archive, as one-line CLI errors."""
    if isinstance(exc, UserError):
        return exc
    table: list[tuple[type[Exception], int]] = [
        (StoreNotFound, EXIT_STORE), (StoreUnavailable, EXIT_STORE), (StorePermissionDenied, EXIT_STORE), (WrongKey, EXIT_KEY),
        (ArchiveExists, EXIT_ARCHIVE), (KeyUnavailable, EXIT_KEY_UNAVAILABLE), (KeyRetired, EXIT_KEY_RETIRED),
        (RotationError, EXIT_ROTATION),
        (KeyFileError, EXIT_KEY), (ArchiveCorrupt, EXIT_ARCHIVE), (DatabaseTooNew, EXIT_ARCHIVE),
    ]
    for cls, code in table:
        if isinstance(exc, cls):
            return UserError(str(exc), code)
    return UserError(f"unexpected error: {exc.__class__.__name__}", EXIT_INTERNAL)


def store_options(cfg: MountConfig) -> StoreOptions:
    return StoreOptions(cfg.endpoint_url, cfg.region, cfg.addressing_style, cfg.ca_bundle, cfg.profile)


async def open_archive(
    store_url: str, key: KeySource | None, *, need_key: bool = True, options: StoreOptions | None = None
) -> OpenedArchive:
    """Open the store and the archive's keyring. key None: the archive's default key file
    (only if it exists, unless need_key). During a key rotation the keyring holds both KEKs
    (see keystore.open_keyring)."""
    location = parse_store_url(store_url)
    try:
        store = await open_store(location, options=options)
        descriptor, tag = await load_descriptor(store)
        keyring = None
        rotation = None
        if key is None:
            candidate = default_key_file(descriptor.archive_id_hex)
            if candidate.exists() or need_key:
                key = KeySource(KIND_FILE, path=candidate)
        if key is not None:
            keyring, rotation = await open_keyring(key, store, descriptor, tag)
    except (
        StoreNotFound, StoreUnavailable, StorePermissionDenied, WrongKey, KeyFileError, ArchiveCorrupt, KeyUnavailable, KeyRetired,
    ) as exc:
        raise translate(exc) from None
    return OpenedArchive(location, store, descriptor, keyring, key, rotation)


def open_cache_db(cache_dir: Path, archive: OpenedArchive) -> MetaDb:
    """Open (or create) the encrypted metadata database of an archive in its cache dir."""
    assert archive.kek is not None
    marker = cache_dir / ARCHIVE_MARKER
    archive_hex = archive.descriptor.archive_id_hex
    if marker.exists():
        if marker.read_text().strip() != archive_hex:
            raise UserError(f"cache dir {cache_dir} belongs to another archive", EXIT_ARCHIVE)
    else:
        marker.write_text(archive_hex + "\n")
    # During a key rotation the database may still be under the old KEK (the rotation
    # re-keys it); otherwise it is under the current one.
    keks = archive.keks()
    for kek in keks:
        try:
            return MetaDb(cache_dir / DB_FILE, kek.derive(archive.descriptor.archive_id, "metadb"))
        except WrongKey as exc:
            if kek is keks[-1]:
                raise translate(exc) from None
        except DatabaseTooNew as exc:
            raise translate(exc) from None
    raise AssertionError("unreachable")


def kek_of_db(db: MetaDb, archive: OpenedArchive) -> MasterKey:
    """The KEK the open metadata database is under."""
    for kek in archive.keks():
        if db.keyed_with(kek.derive(archive.descriptor.archive_id, "metadb")):
            return kek
    raise AssertionError("the database is under no key of the keyring")


async def restore_if_needed(archive: OpenedArchive, cache_dir: Path) -> None:
    """A cache dir without metadata on an archive whose store has some: rebuild it from the
    store (new host, lost or wiped cache disk)."""
    if (cache_dir / DB_FILE).exists() or not await store_has_metadata(archive.store):
        return
    assert archive.kek is not None
    desc = archive.descriptor
    marker = cache_dir / ARCHIVE_MARKER
    if not marker.exists():
        marker.write_text(desc.archive_id_hex + "\n")
    keys = [(k.derive(desc.archive_id, "metadata-replica"), k.derive(desc.archive_id, "metadb")) for k in archive.keks()]
    snap, seq = await restore(archive.store, keys, cache_dir / DB_FILE)
    log.info("rebuilt the metadata from the store: snapshot %016x, journal up to commit %016x", snap, seq)


async def check_cache_not_behind_store(archive: OpenedArchive, cache_dir: Path, *, read_only: bool) -> int | None:
    """Refuse a writable mount whose local metadata is older than the metadata in the store.
    Returns the newest commit the store's metadata reaches, as listed (None: not listed), so
    the mount need not list it again.

    The store only ever holds commits the local database made durable, so the store being
    ahead means another host, or an old copy of this cache disk, wrote to the archive since:
    mounting would fork the metadata (the store's journal would get two different histories)
    and files written there would be invisible here. Rebuilding from the store is the way out."""
    if not (cache_dir / DB_FILE).exists():
        return None
    try:
        newest = await newest_store_seq(archive.store)
    except (StoreUnavailable, StorePermissionDenied) as exc:
        log.warning("cannot list the metadata in the store to compare it with the cache: %s", exc)
        return None
    db = open_cache_db(cache_dir, archive)
    try:
        local = db.commit_seq
    finally:
        db.close()
    if newest <= local:
        return newest
    what = (
        f"the store holds metadata up to commit {newest}, but the cache dir {cache_dir} only up to commit {local}: "
        "another host or an old copy of this cache wrote to the archive since"
    )
    if read_only:
        log.warning("%s; mounting read-only what this cache knows", what)
        return newest
    raise UserError(f"{what}; move the cache dir away and mount again to rebuild it from the store", EXIT_ARCHIVE)


# --- checks before mounting --------------------------------------------------------------------


def check_fuse_available() -> None:
    if not os.path.exists("/dev/fuse"):
        raise UserError("/dev/fuse does not exist (load the fuse kernel module: modprobe fuse)", EXIT_FUSE)
    if shutil.which("fusermount3") is None:
        raise UserError("fusermount3 is not installed (apt-get install fuse3)", EXIT_FUSE)


def check_mountpoint(path: Path) -> None:
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ENOTCONN and mount_fstype(path) == "fuse.mifs":
            # A daemon that died (kill -9, OOM) leaves its mount behind: detach it and go on;
            # everything it had closed is on local disk and the new daemon recovers it.
            problem = run_fusermount(path, lazy=True)
            if problem is not None:
                raise UserError(f"mountpoint {path} holds a dead mifs mount that cannot be detached: {problem}", EXIT_MOUNTPOINT) from None
            log.warning("detached the dead mifs mount at %s", path)
        elif exc.errno == errno.ENOTCONN:
            raise UserError(f"mountpoint {path} is a dead mount of another filesystem", EXIT_MOUNTPOINT) from None
    if not path.exists():
        raise UserError(f"mountpoint {path} does not exist", EXIT_MOUNTPOINT)
    if not path.is_dir():
        raise UserError(f"mountpoint {path} is not a directory", EXIT_MOUNTPOINT)
    if os.path.ismount(path):
        raise UserError(f"mountpoint {path} is already a mount point", EXIT_MOUNTPOINT)
    try:
        if any(os.scandir(path)):
            raise UserError(f"mountpoint {path} is not empty", EXIT_MOUNTPOINT)
    except PermissionError:
        raise UserError(f"mountpoint {path} is not accessible", EXIT_MOUNTPOINT) from None


def prepare_cache_dir(path: Path) -> int:
    """Create the cache dir (0700) and take its lock; returns the lock's fd (held for life)."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        problem = "not a directory" if path.exists() and not path.is_dir() else exc.strerror
        raise UserError(f"cannot use cache dir {path}: {problem}", EXIT_USAGE) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(f"cache dir {path} is in use by another mifs daemon", EXIT_MOUNTPOINT) from None
    return fd
