"""Key objects in the store and opening an archive's keyring from a key source.

Must not touch the metadata database, files or FUSE. Store objects (docs/FORMAT.md, "Key
objects"), none of which holds a key in the clear:

- ``keys/passphrase/<kek id>``: Argon2id salt and parameters of a passphrase-derived KEK.
- ``keys/kms/<kek id>``: a KEK encrypted by KMS (EncryptionContext binds archive and kek id).
- ``keys/rotation``: a key rotation in progress (old and new kek id, where each key comes
  from), authenticated by HMACs under both KEKs; deleted when the rotation completes.
- ``keys/retired``: the kek ids retired by rotations (informational: it only chooses the
  error message for a mount given a retired key, so it carries no MAC).

WRAPPED_KEY_OBJECTS is the one register of store objects that hold a single wrapped data key
(envelope.wrap_data_key) besides the per-file keys in the metadata: key rotation re-wraps each.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Sequence

import trio

from mifs.archive import Descriptor, verify_descriptor
from mifs.crypto import envelope
from mifs.crypto.envelope import mac, verify_mac
from mifs.crypto.keyring import KeyRing, MasterKey
from mifs.crypto.keysource import (
    KIND_KMS,
    KIND_PASSPHRASE,
    KeySource,
    PassphraseParams,
    check_new_passphrase,
    derive_passphrase_key,
    kms_encryption_context,
    load_static_key,
    read_passphrase,
)
from mifs.errors import ArchiveCorrupt, KeyFileError, KeyRetired, KeyUnavailable, ObjectNotFound, WrongKey
from mifs.kms import KmsClient
from mifs.store.base import ObjectStore
from mifs.types import ArchiveId, FileId, ObjectKey

PASSPHRASE_PREFIX = "keys/passphrase/"
KMS_PREFIX = "keys/kms/"
ROTATION_KEY = ObjectKey("keys/rotation")
RETIRED_KEY = ObjectKey("keys/retired")
KMS_FORMAT = "mifs-kms-kek-1"
ROTATION_FORMAT = "mifs-key-rotation-1"
RETIRED_FORMAT = "mifs-retired-keys-1"


@dataclass(frozen=True)
class WrappedKeyObject:
    """A store object holding exactly one wrap_data_key blob, wrapped for `file_id`."""

    key: ObjectKey
    file_id: FileId


WRAPPED_KEY_OBJECTS: tuple[WrappedKeyObject, ...] = (
    WrappedKeyObject(ObjectKey(envelope.AUDIT_KEY_OBJECT), envelope.AUDIT_KEY_FILE_ID),  # the audit trail's key
)
"""Every store object that holds one wrapped data key (e.g. the audit trail's `audit/key`):
register it here and key rotation re-wraps it and `mifs key status` counts it. A missing
object is skipped (the feature that writes it may be off)."""


def passphrase_object(kek_id: bytes) -> ObjectKey:
    return ObjectKey(PASSPHRASE_PREFIX + kek_id.hex())


def kms_object(kek_id: bytes) -> ObjectKey:
    return ObjectKey(KMS_PREFIX + kek_id.hex())


async def _get_or_none(store: ObjectStore, key: ObjectKey) -> bytes | None:
    try:
        return await store.get(key)
    except ObjectNotFound:
        return None


# --- loading and creating KEKs -----------------------------------------------------------------


def _kms_client(source: KeySource) -> KmsClient:
    assert source.name is not None
    return KmsClient(source.name, source.endpoint, source.region)


def _parse_kms_object(raw: bytes) -> bytes:
    try:
        doc = json.loads(raw.decode("utf-8"))
        if not isinstance(doc, dict) or doc.get("format") != KMS_FORMAT:
            raise ValueError
        return base64.b64decode(doc["ciphertext"], validate=True)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise ArchiveCorrupt("a KMS-wrapped key object in the store is corrupted") from None


async def load_source_key(source: KeySource, store: ObjectStore, archive_id: ArchiveId, candidates: Sequence[bytes]) -> MasterKey:
    """The KEK a source holds. Passphrase and KMS sources need a key object in the store and
    look for one of `candidates` (kek ids, in order); WrongKey if none matches."""
    if source.kind == KIND_PASSPHRASE:
        passphrase = read_passphrase(source)
        found = False
        for kek_id in candidates:
            raw = await _get_or_none(store, passphrase_object(kek_id))
            if raw is None:
                continue
            found = True
            try:
                params = PassphraseParams.parse(raw)
            except (ValueError, KeyError, TypeError, UnicodeDecodeError):
                raise ArchiveCorrupt("the passphrase parameters in the store are corrupted") from None
            key = await trio.to_thread.run_sync(derive_passphrase_key, passphrase, params)
            if key.kek_id == kek_id:
                return key
        if not found:
            raise WrongKey("this archive's master key is not protected by a passphrase (use its key source)")
        raise WrongKey("wrong passphrase")
    if source.kind == KIND_KMS:
        client = await trio.to_thread.run_sync(_kms_client, source)
        found = False
        for kek_id in candidates:
            raw = await _get_or_none(store, kms_object(kek_id))
            if raw is None:
                continue
            found = True
            blob = _parse_kms_object(raw)
            secret = await trio.to_thread.run_sync(
                client.decrypt, blob, kms_encryption_context(bytes(archive_id).hex(), kek_id)
            )
            key = MasterKey.from_secret(secret)
            if key.kek_id == kek_id:
                return key
            raise ArchiveCorrupt("the KMS-wrapped key object does not hold the key it names")
        if not found:
            raise WrongKey("this archive's master key is not wrapped by KMS (use its key source)")
    return await trio.to_thread.run_sync(load_static_key, source)


async def new_source_key(source: KeySource) -> tuple[MasterKey, PassphraseParams | None]:
    """A new KEK from a source: generated (KMS), derived with a fresh salt (passphrase) or
    read (key file, credential, environment). Nothing is written yet: see publish_source_key."""
    if source.kind == KIND_KMS:
        return MasterKey.generate(), None
    if source.kind == KIND_PASSPHRASE:
        passphrase = read_passphrase(source)
        check_new_passphrase(passphrase)
        params = PassphraseParams.new()
        return await trio.to_thread.run_sync(derive_passphrase_key, passphrase, params), params
    return await trio.to_thread.run_sync(load_static_key, source), None


async def publish_source_key(
    source: KeySource, store: ObjectStore, archive_id: ArchiveId, key: MasterKey, params: PassphraseParams | None
) -> None:
    """Write the store object a later mount needs to find `key` from `source` (none for
    key files, credentials and environment variables)."""
    if source.kind == KIND_PASSPHRASE:
        assert params is not None
        await store.put(passphrase_object(key.kek_id), params.encode())
    elif source.kind == KIND_KMS:
        client = await trio.to_thread.run_sync(_kms_client, source)
        blob = await trio.to_thread.run_sync(
            client.encrypt, key.secret, kms_encryption_context(bytes(archive_id).hex(), key.kek_id)
        )
        doc = {"format": KMS_FORMAT, "kms_key_id": source.name, "ciphertext": base64.b64encode(blob).decode("ascii")}
        await store.put(kms_object(key.kek_id), (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode("utf-8"))


async def forget_source_key(store: ObjectStore, kek_id: bytes) -> None:
    """Delete the key objects of a retired KEK (the KMS-wrapped copy, the passphrase salt)."""
    await store.delete(kms_object(kek_id))
    await store.delete(passphrase_object(kek_id))


# --- rotation record and retired keys ----------------------------------------------------------


@dataclass(frozen=True)
class RotationRecord:
    old_kek_id: bytes
    new_kek_id: bytes
    old_source: KeySource
    new_source: KeySource
    started: str
    macs: tuple[bytes, bytes] = (b"", b"")

    def body(self) -> dict[str, Any]:
        return {
            "format": ROTATION_FORMAT, "old_kek_id": self.old_kek_id.hex(), "new_kek_id": self.new_kek_id.hex(),
            "old_source": self.old_source.to_record(), "new_source": self.new_source.to_record(), "started": self.started,
        }

    def source_of(self, kek_id: bytes) -> KeySource:
        return self.new_source if kek_id == self.new_kek_id else self.old_source


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _rotation_mac(key: MasterKey, archive_id: ArchiveId, body: dict[str, Any]) -> bytes:
    return mac(key.derive(archive_id, "rotation-mac"), _canonical(body))


def new_rotation_record(old: MasterKey, old_source: KeySource, new: MasterKey, new_source: KeySource) -> RotationRecord:
    return RotationRecord(
        old.kek_id, new.kek_id, old_source, new_source, datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    )


async def write_rotation(store: ObjectStore, archive_id: ArchiveId, record: RotationRecord, old: MasterKey, new: MasterKey) -> None:
    """Store the record with an HMAC under each KEK, so whichever key the descriptor names
    authenticates it (a forged record could otherwise point a mount at an attacker's key)."""
    body = record.body()
    doc = {**body, "mac_old": _rotation_mac(old, archive_id, body).hex(), "mac_new": _rotation_mac(new, archive_id, body).hex()}
    await store.put(ROTATION_KEY, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode("utf-8"))


async def read_rotation(store: ObjectStore) -> RotationRecord | None:
    """The rotation in progress, unauthenticated (see verify_rotation), or None."""
    raw = await _get_or_none(store, ROTATION_KEY)
    if raw is None:
        return None
    try:
        doc = json.loads(raw.decode("utf-8"))
        if not isinstance(doc, dict) or doc.get("format") != ROTATION_FORMAT:
            raise ValueError
        record = RotationRecord(
            bytes.fromhex(doc["old_kek_id"]), bytes.fromhex(doc["new_kek_id"]),
            KeySource.from_record(doc["old_source"]), KeySource.from_record(doc["new_source"]), str(doc["started"]),
            (bytes.fromhex(doc["mac_old"]), bytes.fromhex(doc["mac_new"])),
        )
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise ArchiveCorrupt("the key rotation record in the store is corrupted") from None
    return record


def verify_rotation(record: RotationRecord, archive_id: ArchiveId, key: MasterKey) -> None:
    """ArchiveCorrupt unless `key` (the old or the new KEK) authenticates the record."""
    if key.kek_id == record.old_kek_id:
        tag = record.macs[0]
    elif key.kek_id == record.new_kek_id:
        tag = record.macs[1]
    else:
        raise ArchiveCorrupt("the key rotation record names other keys than the archive's")
    if not verify_mac(key.derive(archive_id, "rotation-mac"), _canonical(record.body()), tag):
        raise ArchiveCorrupt("the key rotation record failed its integrity check (it was altered)")


async def read_retired(store: ObjectStore) -> list[dict[str, str]]:
    raw = await _get_or_none(store, RETIRED_KEY)
    if raw is None:
        return []
    try:
        doc = json.loads(raw.decode("utf-8"))
        entries = doc["keys"] if isinstance(doc, dict) and doc.get("format") == RETIRED_FORMAT else None
        if not isinstance(entries, list):
            raise ValueError
        return [{k: str(v) for k, v in e.items()} for e in entries if isinstance(e, dict)]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return []  # informational only


async def add_retired(store: ObjectStore, kek_id: bytes, replaced_by: bytes) -> None:
    entries = [e for e in await read_retired(store) if e.get("kek_id") != kek_id.hex()]
    entries.append({
        "kek_id": kek_id.hex(), "replaced_by": replaced_by.hex(),
        "retired": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    })
    doc = {"format": RETIRED_FORMAT, "keys": entries}
    await store.put(RETIRED_KEY, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode("utf-8"))


# --- opening the keyring of an archive ---------------------------------------------------------


async def _load_other(record: RotationRecord, kek_id: bytes, store: ObjectStore, archive_id: ArchiveId) -> MasterKey:
    """The other KEK of a rotation in progress, from where the rotation recorded it."""
    source = record.source_of(kek_id)
    try:
        if source.kind == KIND_PASSPHRASE and source.path is None:
            raise KeyFileError("it was typed at a prompt; mount with that passphrase to finish the rotation")
        key = await load_source_key(source, store, archive_id, [kek_id])
        if key.kek_id != kek_id:
            raise WrongKey(f"{source.describe()} now holds another key")
        return key
    except (KeyFileError, WrongKey, KeyUnavailable) as exc:
        raise type(exc)(
            f"a key rotation is in progress and needs master key {kek_id.hex()} from {source.describe()}: {exc}"
        ) from None


async def open_keyring(
    source: KeySource, store: ObjectStore, desc: Descriptor, tag: bytes
) -> tuple[KeyRing, RotationRecord | None]:
    """Load the source's KEK, check it against the descriptor (and a rotation in progress) and
    return the keyring a mount works with: during a rotation both KEKs, the new one current.

    WrongKey: not this archive's key; KeyRetired: a key a rotation retired; ArchiveCorrupt: the
    descriptor or rotation record was altered."""
    record = await read_rotation(store)
    candidates = [desc.kek_id] + ([record.new_kek_id, record.old_kek_id] if record else [])
    key = await load_source_key(source, store, desc.archive_id, candidates)
    if key.kek_id == desc.kek_id:
        verify_descriptor(desc, tag, key)
        if record is None:
            return KeyRing(key), None
        verify_rotation(record, desc.archive_id, key)
        if record.new_kek_id == desc.kek_id:
            return KeyRing(key), record  # only the retirement of the old key is left
        other = await _load_other(record, record.new_kek_id, store, desc.archive_id)
        return KeyRing(other, key), record
    if record is not None and key.kek_id == record.new_kek_id and record.old_kek_id == desc.kek_id:
        other = await _load_other(record, record.old_kek_id, store, desc.archive_id)
        verify_descriptor(desc, tag, other)
        verify_rotation(record, desc.archive_id, other)
        return KeyRing(key, other), record
    for entry in await read_retired(store):
        if entry.get("kek_id") == key.kek_id.hex():
            raise KeyRetired(
                f"{source.describe()} holds master key {key.kek_id.hex()}, retired by a key rotation on "
                f"{entry.get('retired', '?')}; use the key that replaced it (kek id {entry.get('replaced_by', '?')})"
            )
    if record is not None and key.kek_id == record.old_kek_id:
        raise KeyRetired(
            f"{source.describe()} holds master key {key.kek_id.hex()}, which a key rotation is retiring; "
            f"use the new key (kek id {record.new_kek_id.hex()})"
        )
    raise WrongKey("the key does not belong to this archive (key id mismatch)")
