"""The archive descriptor: the one fixed-name object that says what an archive is.

Must not hold key material: it names the KEK by id and carries an HMAC (under a key derived
from the KEK) so that a wrong key and a tampered descriptor are told apart. Layout in
docs/FORMAT.md, "Archive descriptor".
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any

from mifs.crypto.envelope import mac, verify_mac
from mifs.crypto.keyring import MasterKey
from mifs.errors import ArchiveCorrupt, ArchiveExists, ObjectNotFound, StoreNotFound, WrongKey
from mifs.store.base import DESCRIPTOR_KEY, ObjectStore
from mifs.types import ARCHIVE_ID_LEN, ArchiveId

FORMAT_NAME = "mifs-archive"
FORMAT_VERSION = 1
CIPHER_SUITE = "AES-256-GCM"
KEY_WRAP = "AES-256-GCM"
KDF = "HKDF-SHA256"


@dataclass(frozen=True)
class Descriptor:
    archive_id: ArchiveId
    chunk_size: int
    kek_id: bytes
    created: str
    format_version: int = FORMAT_VERSION
    cipher: str = CIPHER_SUITE
    key_wrap: str = KEY_WRAP
    kdf: str = KDF

    @property
    def archive_id_hex(self) -> str:
        return bytes(self.archive_id).hex()

    def body(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "archive_id": self.archive_id_hex,
            "chunk_size": self.chunk_size,
            "cipher": self.cipher,
            "key_wrap": self.key_wrap,
            "kdf": self.kdf,
            "kek_id": self.kek_id.hex(),
            "created": self.created,
        }


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")


def encode_descriptor(desc: Descriptor, kek: MasterKey) -> bytes:
    body = desc.body()
    tag = mac(kek.derive(desc.archive_id, "descriptor-mac"), _canonical(body))
    return (json.dumps({**body, "mac": tag.hex()}, indent=2, sort_keys=True) + "\n").encode("utf-8")


def new_descriptor(kek: MasterKey, chunk_size: int) -> Descriptor:
    return Descriptor(
        archive_id=ArchiveId(os.urandom(ARCHIVE_ID_LEN)),
        chunk_size=chunk_size,
        kek_id=kek.kek_id,
        created=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )


async def rewrite_descriptor(store: ObjectStore, desc: Descriptor, kek: MasterKey) -> Descriptor:
    """Replace the descriptor by one naming (and authenticated by) `kek`: the last step of a
    key rotation. Everything else in it stays as it was."""
    rekeyed = replace(desc, kek_id=kek.kek_id)
    await store.put(DESCRIPTOR_KEY, encode_descriptor(rekeyed, kek))
    return rekeyed


async def check_no_archive(store: ObjectStore) -> None:
    if await store.exists(DESCRIPTOR_KEY):
        raise ArchiveExists(f"{store.description} already holds a mifs archive")


async def create_archive(store: ObjectStore, desc: Descriptor, kek: MasterKey) -> None:
    """Write a new descriptor; ArchiveExists if the store already holds one."""
    if not await store.put_if_absent(DESCRIPTOR_KEY, encode_descriptor(desc, kek)):
        raise ArchiveExists(f"{store.description} already holds a mifs archive")


def parse_descriptor(raw: bytes) -> tuple[Descriptor, bytes]:
    """Parse without a key; returns the descriptor and its MAC. ArchiveCorrupt if malformed."""
    try:
        doc = json.loads(raw.decode("utf-8"))
        if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
            raise ValueError("not a mifs descriptor")
        if doc.get("format_version") != FORMAT_VERSION:
            raise ArchiveCorrupt(f"archive format version {doc.get('format_version')!r} is not supported by this mifs")
        archive_id = bytes.fromhex(doc["archive_id"])
        kek_id = bytes.fromhex(doc["kek_id"])
        tag = bytes.fromhex(doc["mac"])
        chunk_size = doc["chunk_size"]
        if len(archive_id) != ARCHIVE_ID_LEN or len(kek_id) != 16 or not isinstance(chunk_size, int) or chunk_size <= 0:
            raise ValueError("bad field")
        desc = Descriptor(
            archive_id=ArchiveId(archive_id), chunk_size=chunk_size, kek_id=kek_id, created=str(doc["created"]),
            cipher=str(doc["cipher"]), key_wrap=str(doc["key_wrap"]), kdf=str(doc["kdf"]),
        )
    except ArchiveCorrupt:
        raise
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise ArchiveCorrupt("the archive descriptor is corrupted (cannot parse it)") from None
    if (desc.cipher, desc.key_wrap, desc.kdf) != (CIPHER_SUITE, KEY_WRAP, KDF):
        raise ArchiveCorrupt("the archive descriptor names an unknown cipher suite")
    return desc, tag


async def load_descriptor(store: ObjectStore) -> tuple[Descriptor, bytes]:
    try:
        raw = await store.get(DESCRIPTOR_KEY)
    except ObjectNotFound:
        raise StoreNotFound(f"{store.description} holds no mifs archive") from None
    return parse_descriptor(raw)


def verify_descriptor(desc: Descriptor, tag: bytes, kek: MasterKey) -> None:
    """WrongKey if the KEK is not the archive's; ArchiveCorrupt if the descriptor was altered."""
    if desc.kek_id != kek.kek_id:
        raise WrongKey("the key does not belong to this archive (key id mismatch)")
    if not verify_mac(kek.derive(desc.archive_id, "descriptor-mac"), _canonical(desc.body()), tag):
        raise ArchiveCorrupt("the archive descriptor failed its integrity check (it was altered)")
