"""Master keys (KEKs): generating and loading key files, key ids, and keys derived for a purpose.

Must not touch the store, the metadata database or any plaintext file content.

Key file format (text, one line): ``MIFS-KEK-1:`` followed by the base64 (standard alphabet,
padded) encoding of 32 random bytes, then a newline. The file must not be readable by group or
others. The KEK id is ``HKDF-SHA256(ikm=KEK, salt=none, info="mifs/v1/kek-id")[:16]``: it names
the key in wrapped blobs and the descriptor without revealing anything about it.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from mifs.localfs import fsync_dir
from mifs.errors import KeyFileError, WrongKey
from mifs.types import ARCHIVE_ID_LEN, KEY_LEN, ArchiveId

KEY_FILE_PREFIX = "MIFS-KEK-1:"
KEK_ID_LEN = 16


def _hkdf(ikm: bytes, salt: bytes | None, info: bytes, length: int = KEY_LEN) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


@dataclass(frozen=True)
class MasterKey:
    """A KEK held in memory. repr never shows the key bytes."""

    secret: bytes = field(repr=False)
    kek_id: bytes

    @classmethod
    def from_secret(cls, secret: bytes) -> MasterKey:
        if len(secret) != KEY_LEN:
            raise KeyFileError(f"a master key must be {KEY_LEN} bytes")
        return cls(secret=secret, kek_id=_hkdf(secret, None, b"mifs/v1/kek-id", KEK_ID_LEN))

    @classmethod
    def generate(cls) -> MasterKey:
        return cls.from_secret(secrets.token_bytes(KEY_LEN))

    def derive(self, archive_id: ArchiveId, purpose: str) -> bytes:
        """A 256-bit key for one purpose of one archive (metadb, descriptor-mac, ...)."""
        if len(archive_id) != ARCHIVE_ID_LEN:
            raise ValueError("archive id must be 16 bytes")
        return _hkdf(self.secret, bytes(archive_id), b"mifs/v1/" + purpose.encode("ascii"))


def encode_key_file(key: MasterKey) -> bytes:
    return (KEY_FILE_PREFIX + base64.b64encode(key.secret).decode("ascii") + "\n").encode("ascii")


def write_key_file(path: Path, key: MasterKey) -> None:
    """Create a new 0600 key file; never overwrites an existing one."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise KeyFileError(f"key file {path} already exists; refusing to overwrite it") from None
    except OSError as exc:
        raise KeyFileError(f"cannot create key file {path}: {exc.strerror}") from None
    try:
        os.write(fd, encode_key_file(key))
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(path.parent)



def parse_key_text(text: bytes, source: str) -> MasterKey:
    """Parse key file contents; `source` names where they came from, for the error message."""
    line = text.strip()
    prefix = KEY_FILE_PREFIX.encode("ascii")
    if not line.startswith(prefix) or b"\n" in line:
        raise KeyFileError(f"{source} is not a mifs key file (expected one line starting with {KEY_FILE_PREFIX})")
    try:
        secret = base64.b64decode(line[len(prefix):], validate=True)
    except (binascii.Error, ValueError):
        raise KeyFileError(f"{source} is not a mifs key file (bad base64)") from None
    if len(secret) != KEY_LEN:
        raise KeyFileError(f"{source} does not hold a {KEY_LEN * 8}-bit key")
    return MasterKey.from_secret(secret)


def load_key_file(path: Path, *, check_mode: bool = True) -> MasterKey:
    """Load a KEK from a key file, refusing files that group or others may read."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"key file {path} is not a regular file")
        if check_mode and st.st_mode & 0o077:
            raise KeyFileError(
                f"key file {path} is readable by group or others (mode {stat.S_IMODE(st.st_mode):o}); chmod 600 it"
            )
        with open(path, "rb") as fh:
            text = fh.read(4096)
    except FileNotFoundError:
        raise KeyFileError(f"key file {path} does not exist") from None
    except PermissionError:
        raise KeyFileError(f"key file {path} is not readable") from None
    except IsADirectoryError:
        raise KeyFileError(f"key file {path} is a directory") from None
    return parse_key_text(text, f"key file {path}")


class KeyRing:
    """The KEKs a mount holds: `current` wraps every new data key; any held KEK unwraps.

    Normally one key. During a key rotation two: the new one (current) and the old one, until
    nothing references the old one any more (see keyrotation). Mutated only on the trio thread.
    """

    def __init__(self, current: MasterKey, *others: MasterKey) -> None:
        self._keys: dict[bytes, MasterKey] = {current.kek_id: current}
        for key in others:
            self._keys.setdefault(key.kek_id, key)
        self.current = current

    def get(self, kek_id: bytes) -> MasterKey:
        """The KEK with this id; WrongKey if this mount does not hold it."""
        key = self._keys.get(kek_id)
        if key is None:
            raise WrongKey(f"this mount does not hold master key {kek_id.hex()}")
        return key

    def holds(self, kek_id: bytes) -> bool:
        return kek_id in self._keys

    def ids(self) -> list[bytes]:
        return list(self._keys)

    def add(self, key: MasterKey, *, make_current: bool = False) -> None:
        self._keys.setdefault(key.kek_id, key)
        if make_current:
            self.current = self._keys[key.kek_id]

    def drop(self, kek_id: bytes) -> None:
        """Forget a KEK (after it was retired); the current one cannot be dropped."""
        if kek_id == self.current.kek_id:
            raise ValueError("cannot drop the current master key")
        self._keys.pop(kek_id, None)
