"""Envelope encryption: wrapping data keys under the KEK and sealing chunks under data keys.

Pure functions over bytes; must not touch the store, files or the event loop. Every AEAD call
binds its context (archive, file, position, generation, key id) as associated data, so that a
blob moved to another place fails to open. Byte layouts are documented in docs/FORMAT.md.
"""

from __future__ import annotations

import hmac as _stdlib_hmac
import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from mifs.crypto.keyring import KEK_ID_LEN, MasterKey
from mifs.errors import IntegrityError, WrongKey
from mifs.types import KEY_LEN, ArchiveId, FileId

NONCE_LEN = 12
TAG_LEN = 16

# Wrapped data key: version(1) | kek_id(16) | nonce(12) | AES-256-GCM(DEK)(32) | tag(16)
WRAP_VERSION = 1
WRAPPED_DEK_LEN = 1 + KEK_ID_LEN + NONCE_LEN + KEY_LEN + TAG_LEN
_DEK_AAD_LABEL = b"mifs/v1/dek"

# Chunk object: magic(4) | version(1) | flags(1) | nonce(12) | ciphertext | tag(16)
CHUNK_MAGIC = b"MIFC"
CHUNK_VERSION = 1
CHUNK_HEADER_LEN = 4 + 1 + 1 + NONCE_LEN
CHUNK_OVERHEAD = CHUNK_HEADER_LEN + TAG_LEN
FLAG_ZSTD = 0x01
_CHUNK_AAD_LABEL = b"mifs/v1/chunk"

# Metadata blob (snapshots, journals): magic(4) | version(1) | kind(1) | nonce(12) | ct | tag(16)
BLOB_MAGIC = b"MIFM"


AUDIT_KEY_FILE_ID = FileId(b"mifs/audit-key/1")
"""The reserved file id the audit trail's key is wrapped under (wrap_data_key), like a file's
data key; no file gets it (file ids are random)."""
AUDIT_KEY_OBJECT = "audit/key"
"""The store object holding the audit key wrapped under the KEK (docs/FORMAT.md section 10)."""


def new_data_key() -> bytes:
    """A fresh random 256-bit data key for one file."""
    return os.urandom(KEY_LEN)


def new_file_id() -> FileId:
    return FileId(os.urandom(16))


def _dek_aad(archive_id: ArchiveId, file_id: FileId, kek_id: bytes) -> bytes:
    return _DEK_AAD_LABEL + bytes(archive_id) + bytes(file_id) + kek_id


def wrap_data_key(kek: MasterKey, archive_id: ArchiveId, file_id: FileId, dek: bytes) -> bytes:
    """Wrap a file's data key under the KEK, bound to the archive, the file and the KEK id."""
    if len(dek) != KEY_LEN:
        raise ValueError("data key must be 32 bytes")
    nonce = os.urandom(NONCE_LEN)
    sealed = AESGCM(kek.secret).encrypt(nonce, dek, _dek_aad(archive_id, file_id, kek.kek_id))
    return bytes([WRAP_VERSION]) + kek.kek_id + nonce + sealed


def wrapped_key_kek_id(blob: bytes) -> bytes:
    """The id of the KEK a wrapped data key needs (readable without any key)."""
    if len(blob) != WRAPPED_DEK_LEN or blob[0] != WRAP_VERSION:
        raise IntegrityError("wrapped data key has an unknown layout")
    return blob[1 : 1 + KEK_ID_LEN]


def unwrap_data_key(kek: MasterKey, archive_id: ArchiveId, file_id: FileId, blob: bytes) -> bytes:
    """Recover a file's data key; IntegrityError if the blob was altered or moved, WrongKey if
    it was wrapped by another KEK."""
    kek_id = wrapped_key_kek_id(blob)
    if not _stdlib_hmac.compare_digest(kek_id, kek.kek_id):
        raise WrongKey("data key is wrapped by another master key")
    nonce = blob[1 + KEK_ID_LEN : 1 + KEK_ID_LEN + NONCE_LEN]
    try:
        return AESGCM(kek.secret).decrypt(
            nonce, blob[1 + KEK_ID_LEN + NONCE_LEN :], _dek_aad(archive_id, file_id, kek_id)
        )
    except InvalidTag:
        raise IntegrityError("wrapped data key failed authentication") from None


def _check_key(key: bytes) -> None:
    if len(key) != KEY_LEN:
        raise ValueError("keys must be 32 bytes (AES-256)")


def chunk_aad(archive_id: ArchiveId, file_id: FileId, index: int, generation: int, header: bytes) -> bytes:
    if not (0 <= index < 2**64 and 0 <= generation < 2**64):
        raise ValueError("chunk index and generation must fit in 64 bits")
    return _CHUNK_AAD_LABEL + bytes(archive_id) + bytes(file_id) + struct.pack(">QQ", index, generation) + header[:6]


def seal_chunk(
    dek: bytes, archive_id: ArchiveId, file_id: FileId, index: int, generation: int, plaintext: bytes | bytearray | memoryview, flags: int = 0
) -> bytes:
    """Encrypt one chunk with a fresh random nonce; the result is the whole stored object."""
    _check_key(dek)
    nonce = os.urandom(NONCE_LEN)
    header = CHUNK_MAGIC + bytes([CHUNK_VERSION, flags]) + nonce
    # No bytes() copy of a chunk-sized buffer: AESGCM reads any buffer.
    sealed = AESGCM(dek).encrypt(nonce, plaintext, chunk_aad(archive_id, file_id, index, generation, header))
    return header + sealed


def seal_chunk_into(
    out: bytearray, dek: bytes, archive_id: ArchiveId, file_id: FileId, index: int, generation: int,
    plaintext: bytes | bytearray | memoryview, flags: int = 0,
) -> memoryview:
    """seal_chunk into `out` (at least CHUNK_OVERHEAD + len(plaintext) bytes); returns the view
    of `out` that is the stored object. For a caller that reuses its buffers: a fresh chunk-
    sized object costs a page fault per 4 KiB on first touch, more than the encryption."""
    _check_key(dek)
    nonce = os.urandom(NONCE_LEN)
    header = CHUNK_MAGIC + bytes([CHUNK_VERSION, flags]) + nonce
    view = memoryview(out)[: CHUNK_OVERHEAD + len(plaintext)]
    view[:CHUNK_HEADER_LEN] = header
    AESGCM(dek).encrypt_into(
        nonce, plaintext, chunk_aad(archive_id, file_id, index, generation, header), view[CHUNK_HEADER_LEN:]
    )
    return view


def open_chunk(

    dek: bytes, archive_id: ArchiveId, file_id: FileId, index: int, generation: int, blob: bytes
) -> tuple[bytes, int]:
    """Decrypt and authenticate one chunk object; returns (payload, flags).

    IntegrityError if the object was flipped, truncated, extended, swapped with another
    chunk or file, or replaced by another generation. Never returns partial plaintext.
    """
    if len(blob) < CHUNK_OVERHEAD or blob[:4] != CHUNK_MAGIC or blob[4] != CHUNK_VERSION:
        raise IntegrityError("chunk object has a bad header or is truncated")
    header = blob[:CHUNK_HEADER_LEN]
    nonce = header[6:CHUNK_HEADER_LEN]
    try:
        payload = AESGCM(dek).decrypt(  # a view, not a copy, of the chunk-sized ciphertext
            nonce, memoryview(blob)[CHUNK_HEADER_LEN:], chunk_aad(archive_id, file_id, index, generation, header)
        )
    except InvalidTag:
        raise IntegrityError("chunk failed authentication") from None
    return payload, blob[5]


def seal_blob(key: bytes, kind: int, context: bytes, plaintext: bytes) -> bytes:
    """Seal a metadata blob (snapshot, journal segment) under a derived key."""
    _check_key(key)
    nonce = os.urandom(NONCE_LEN)
    header = BLOB_MAGIC + bytes([1, kind]) + nonce
    return header + AESGCM(key).encrypt(nonce, plaintext, b"mifs/v1/blob" + header[:6] + context)


def open_blob(key: bytes, kind: int, context: bytes, blob: bytes) -> bytes:
    _check_key(key)
    if len(blob) < CHUNK_OVERHEAD or blob[:4] != BLOB_MAGIC or blob[4] != 1 or blob[5] != kind:
        raise IntegrityError("metadata blob has a bad header or is truncated")
    header = blob[:CHUNK_HEADER_LEN]
    try:
        return AESGCM(key).decrypt(header[6:], blob[CHUNK_HEADER_LEN:], b"mifs/v1/blob" + header[:6] + context)
    except InvalidTag:
        raise IntegrityError("metadata blob failed authentication") from None


def mac(key: bytes, message: bytes) -> bytes:
    h = crypto_hmac.HMAC(key, hashes.SHA256())
    h.update(message)
    return h.finalize()


def verify_mac(key: bytes, message: bytes, tag: bytes) -> bool:
    """Constant-time check of an HMAC-SHA256 tag."""
    return _stdlib_hmac.compare_digest(mac(key, message), tag)
