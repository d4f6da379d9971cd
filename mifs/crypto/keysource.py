"""Where a master key (KEK) comes from: key-source descriptions, static sources (key file,
systemd credential, environment variable) and passphrase derivation (Argon2id).

Must not touch the store, the event loop or a KMS (see mifs.keystore and mifs.kms). A
KeySource names where a key is, never holds one, except the passphrase typed at a prompt,
kept in memory only (repr=False) and never written into any record.

Passphrase parameters (docs/FORMAT.md, "Key sources"): Argon2id, 16-byte random salt,
3 passes, 4 lanes, 64 MiB of memory, 32-byte output: the second recommended option of
RFC 9106 section 4 (for machines that cannot spare 2 GiB per derivation), about 0.2 s on one
core; the derived 32 bytes are the KEK itself, so a changed passphrase is a key rotation.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from mifs.crypto.keyring import MasterKey, load_key_file, parse_key_text
from mifs.errors import KeyFileError
from mifs.types import KEY_LEN

KIND_FILE = "file"
KIND_CREDENTIAL = "credential"
KIND_ENV = "env"
KIND_PASSPHRASE = "passphrase"
KIND_KMS = "kms"
KINDS = (KIND_FILE, KIND_CREDENTIAL, KIND_ENV, KIND_PASSPHRASE, KIND_KMS)

PASSPHRASE_FORMAT = "mifs-passphrase-kek-1"
ARGON2_ITERATIONS = 3
ARGON2_LANES = 4
ARGON2_MEMORY_KIB = 64 * 1024
SALT_LEN = 16
MIN_PASSPHRASE_LEN = 12
MAX_PASSPHRASE_LEN = 1024


@dataclass(frozen=True)
class KeySource:
    """One place a KEK comes from. kind: file (path), credential (name: a systemd credential
    in $CREDENTIALS_DIRECTORY), env (name: an environment variable holding the key-file line),
    passphrase (path of a passphrase file, or None with `passphrase` typed at a prompt),
    kms (name: the KMS key id; endpoint, region)."""

    kind: str
    path: Path | None = None
    name: str | None = None
    endpoint: str | None = None
    region: str | None = None
    passphrase: bytes | None = field(default=None, repr=False, compare=False)

    def describe(self) -> str:
        """For messages: says where, never what."""
        if self.kind == KIND_FILE:
            return f"key file {self.path}"
        if self.kind == KIND_CREDENTIAL:
            return f"systemd credential {self.name}"
        if self.kind == KIND_ENV:
            return f"environment variable {self.name}"
        if self.kind == KIND_PASSPHRASE:
            return f"passphrase file {self.path}" if self.path is not None else "the passphrase typed at the prompt"
        return f"KMS key {self.name}" + (f" at {self.endpoint}" if self.endpoint else "")

    def to_record(self) -> dict[str, Any]:
        """A JSON-able description (no secret) a later mount can load the key from again."""
        record: dict[str, Any] = {"kind": self.kind}
        if self.path is not None:
            record["path"] = str(self.path)
        for name in ("name", "endpoint", "region"):
            if getattr(self, name) is not None:
                record[name] = getattr(self, name)
        if self.kind == KIND_PASSPHRASE and self.path is None:
            record["prompt"] = True
        return record

    @classmethod
    def from_record(cls, record: Any) -> KeySource:
        if not isinstance(record, dict) or record.get("kind") not in KINDS:
            raise ValueError("bad key source record")
        path = record.get("path")
        values = {k: record.get(k) for k in ("name", "endpoint", "region")}
        if not all(v is None or isinstance(v, str) for v in values.values()) or not (path is None or isinstance(path, str)):
            raise ValueError("bad key source record")
        return cls(kind=record["kind"], path=Path(path) if path is not None else None, **values)


def _check_private(path: Path, what: str) -> bytes:
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"{what} {path} is not a regular file")
        if st.st_mode & 0o077:
            raise KeyFileError(f"{what} {path} is readable by group or others (mode {stat.S_IMODE(st.st_mode):o}); chmod 600 it")
        with open(path, "rb") as fh:
            return fh.read(MAX_PASSPHRASE_LEN + 2)
    except FileNotFoundError:
        raise KeyFileError(f"{what} {path} does not exist") from None
    except PermissionError:
        raise KeyFileError(f"{what} {path} is not readable") from None
    except IsADirectoryError:
        raise KeyFileError(f"{what} {path} is a directory") from None


def credential_path(name: str) -> Path:
    """systemd's LoadCredential=NAME:... puts the key at $CREDENTIALS_DIRECTORY/NAME."""
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        raise KeyFileError(
            f"systemd credential {name}: $CREDENTIALS_DIRECTORY is not set (run under systemd with LoadCredential={name}:/path/to/key)"
        )
    if not name or "/" in name or name in (".", ".."):
        raise KeyFileError(f"systemd credential name {name!r} is invalid")
    return Path(directory) / name


def load_static_key(source: KeySource) -> MasterKey:
    """A key that needs nothing from the store: key file, systemd credential, env variable."""
    if source.kind == KIND_FILE:
        assert source.path is not None
        return load_key_file(source.path)
    if source.kind == KIND_CREDENTIAL:
        assert source.name is not None
        path = credential_path(source.name)
        try:
            return load_key_file(path)
        except KeyFileError as exc:
            raise KeyFileError(f"systemd credential {source.name}: {exc}") from None
    if source.kind == KIND_ENV:
        assert source.name is not None
        value = os.environ.get(source.name)
        if not value:
            raise KeyFileError(f"environment variable {source.name} is not set")
        return parse_key_text(value.encode("utf-8", "replace"), f"environment variable {source.name}")
    raise ValueError(f"{source.kind} is not a static key source")


def read_passphrase(source: KeySource) -> bytes:
    """The passphrase of a passphrase source: typed at the prompt, or the passphrase file's
    content without its final newline (the file must be 0600, like a key file)."""
    if source.passphrase is not None:
        text = source.passphrase
    else:
        assert source.path is not None
        text = _check_private(source.path, "passphrase file")
        if text.endswith(b"\n"):
            text = text[:-1]
            if text.endswith(b"\r"):
                text = text[:-1]
        if len(text) > MAX_PASSPHRASE_LEN:
            raise KeyFileError(f"passphrase file {source.path} holds more than {MAX_PASSPHRASE_LEN} bytes")
    if not text:
        raise KeyFileError(f"{source.describe()} is empty")
    return text


def check_new_passphrase(passphrase: bytes) -> None:
    if len(passphrase) < MIN_PASSPHRASE_LEN:
        raise KeyFileError(f"a new passphrase must be at least {MIN_PASSPHRASE_LEN} characters long")


@dataclass(frozen=True)
class PassphraseParams:
    """Argon2id parameters of a passphrase-derived KEK (stored, with the salt, in the store)."""

    salt: bytes = field(repr=False)
    iterations: int = ARGON2_ITERATIONS
    lanes: int = ARGON2_LANES
    memory_kib: int = ARGON2_MEMORY_KIB

    @classmethod
    def new(cls) -> PassphraseParams:
        return cls(salt=os.urandom(SALT_LEN))

    def encode(self) -> bytes:
        doc = {
            "format": PASSPHRASE_FORMAT, "kdf": "argon2id", "salt": self.salt.hex(), "iterations": self.iterations,
            "lanes": self.lanes, "memory_kib": self.memory_kib, "length": KEY_LEN,
        }
        return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode("utf-8")

    @classmethod
    def parse(cls, raw: bytes) -> PassphraseParams:
        """ValueError unless the document is well-formed and its parameters are sane (bounded,
        so that a tampered object cannot make a mount allocate gigabytes)."""
        doc = json.loads(raw.decode("utf-8"))
        if not isinstance(doc, dict) or doc.get("format") != PASSPHRASE_FORMAT or doc.get("kdf") != "argon2id":
            raise ValueError("not a mifs passphrase parameter document")
        params = cls(salt=bytes.fromhex(doc["salt"]), iterations=doc["iterations"], lanes=doc["lanes"], memory_kib=doc["memory_kib"])
        if doc.get("length") != KEY_LEN or len(params.salt) < SALT_LEN:
            raise ValueError("bad salt or length")
        for value, low, high in ((params.iterations, 1, 64), (params.lanes, 1, 64), (params.memory_kib, 8 * params.lanes, 4 * 1024 * 1024)):
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise ValueError("passphrase parameters out of range")
        return params


def derive_passphrase_key(passphrase: bytes, params: PassphraseParams) -> MasterKey:
    """The KEK of a passphrase (slow on purpose: callers run it in a worker thread)."""
    kdf = Argon2id(
        salt=params.salt, length=KEY_LEN, iterations=params.iterations, lanes=params.lanes, memory_cost=params.memory_kib
    )
    return MasterKey.from_secret(kdf.derive(passphrase))


def kms_encryption_context(archive_id_hex: str, kek_id: bytes) -> dict[str, str]:
    """Bound into every KMS Encrypt/Decrypt of a KEK: a wrapped KEK moved to another archive
    or presented as another key id does not decrypt (and CloudTrail logs name the archive)."""
    return {"mifs:archive": archive_id_hex, "mifs:kek-id": kek_id.hex()}
