"""Tests for mifs.crypto.envelope: sealing chunks, wrapping data keys, metadata blobs, MACs.

Covers flip/truncate/extend/wrong-key/swap/replay for every sealed format, and golden vectors
per format version (so archives written today stay readable), plus an independent
re-derivation of each byte layout with nothing but `cryptography`'s AESGCM/HMAC/HKDF.
"""

from __future__ import annotations

import hashlib
import hmac as stdlib_hmac
import struct

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from mifs.crypto import envelope
from mifs.crypto.envelope import (
    CHUNK_HEADER_LEN,
    CHUNK_OVERHEAD,
    FLAG_ZSTD,
    WRAPPED_DEK_LEN,
    chunk_aad,
    mac,
    new_data_key,
    new_file_id,
    open_blob,
    open_chunk,
    seal_blob,
    seal_chunk,
    unwrap_data_key,
    verify_mac,
    wrap_data_key,
    wrapped_key_kek_id,
)
from mifs.crypto.keyring import MasterKey
from mifs.errors import IntegrityError, WrongKey
from mifs.types import ArchiveId, FileId

# --- fixed inputs shared by the golden vectors ---------------------------------------------------

GOLDEN_KEK_SECRET = bytes(range(32))
GOLDEN_ARCHIVE_ID = ArchiveId(bytes.fromhex("a0a1a2a3a4a5a6a7a8a9aaabacadaeaf"))
GOLDEN_FILE_ID = FileId(bytes.fromhex("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff"))
GOLDEN_DEK = bytes(range(0x40, 0x60))

OTHER_ARCHIVE_ID = ArchiveId(bytes.fromhex("b0b1b2b3b4b5b6b7b8b9babbbcbdbebf"))
OTHER_FILE_ID = FileId(bytes.fromhex("e0e1e2e3e4e5e6e7e8e9eaebecedeeef"))

MiB = 1024 * 1024


@pytest.fixture
def kek() -> MasterKey:
    return MasterKey.from_secret(GOLDEN_KEK_SECRET)


@pytest.fixture
def other_kek() -> MasterKey:
    return MasterKey.from_secret(bytes(range(100, 132)))


def _flip(blob: bytes, pos: int, mask: int = 0x01) -> bytes:
    out = bytearray(blob)
    out[pos] ^= mask
    return bytes(out)


def _sample_positions(length: int) -> list[int]:
    """Every header byte, plus a spread of positions through the body, plus the last 16 (tag)."""
    positions = set(range(min(length, CHUNK_HEADER_LEN + 2)))
    positions.update(range(0, length, max(1, length // 40)))
    positions.update(range(max(0, length - 16), length))
    return sorted(positions)


# --- chunks: round trip ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 4 * MiB], ids=["empty", "1-byte", "4MiB"])
def test_chunk_round_trip(size: int) -> None:
    plaintext = (bytes(range(251)) * (size // 251 + 1))[:size]
    assert len(plaintext) == size
    blob = seal_chunk(GOLDEN_DEK, GOLDEN_ARCHIVE_ID, GOLDEN_FILE_ID, 5, 2, plaintext)
    assert len(blob) == size + CHUNK_OVERHEAD
    payload, flags = open_chunk(GOLDEN_DEK, GOLDEN_ARCHIVE_ID, GOLDEN_FILE_ID, 5, 2, blob)
    assert payload == plaintext
    assert flags == 0


def test_chunk_layout_header() -> None:
    blob = seal_chunk(GOLDEN_DEK, GOLDEN_ARCHIVE_ID, GOLDEN_FILE_ID, 0, 1, b"abc", flags=FLAG_ZSTD)
    assert CHUNK_HEADER_LEN == 18
    assert CHUNK_OVERHEAD == 34
    assert blob[:4] == b"MIFC"
    assert blob[4] == 0x01
    assert blob[5] == FLAG_ZSTD
    assert len(blob) == 4 + 1 + 1 + 12 + 3 + 16


def test_chunk_flags_are_returned() -> None:
    blob = seal_chunk(GOLDEN_DEK, GOLDEN_ARCHIVE_ID, GOLDEN_FILE_ID, 0, 1, b"zzz", flags=FLAG_ZSTD)
    assert open_chunk(GOLDEN_DEK, GOLDEN_ARCHIVE_ID, GOLDEN_FILE_ID, 0, 1, blob) == (b"zzz", FLAG_ZSTD)


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview])
def test_chunk_accepts_buffer_types(wrap: type) -> None:
    data = b"buffer types are fine"
    blob = seal_chunk(GOLDEN_DEK, GOLDEN_ARCHIVE_ID, GOLDEN_FILE_ID, 1, 1, wrap(data))
    assert open_chunk(GOLDEN_DEK, GOLDEN_ARCHIVE_ID, GOLDEN_FILE_ID, 1, 1, blob) == (data, 0)


def test_chunk_max_index_and_generation_round_trip() -> None:
    top = 2**64 - 1
    blob = seal_chunk(GOLDEN_DEK, GOLDEN_ARCHIVE_ID, GOLDEN_FILE_ID, top, top, b"edge")
    assert open_chunk(GOLDEN_DEK, GOLDEN_ARCHIVE_ID, GOLDEN_FILE_ID, top, top, blob) == (b"edge", 0)


# --- chunks: nonce freshness ----------------------------------------------------------------------


def test_same_plaintext_sealed_twice_differs() -> None:
    a = seal_chunk(GOLDEN_DEK, GOLDEN_ARCHIVE_ID, GOLDEN_FILE_ID, 0, 1, b"same plaintext")
    b = seal_chunk(GOLDEN_DEK, GOLDEN_ARCHIVE_ID, GOLDEN_FILE_ID, 0, 1, b"same plaintext")
    assert a != b
    assert a[6:18] != b[6:18]  # nonces
    assert a[18:] != b[18:]  # ciphertext + tag


def test_nonces_are_unique_over_many_seals() -> None:
    nonces = {seal_chunk(GOLDEN_DEK, GOLDEN_ARCHIVE_ID, GOLDEN_FILE_ID, 0, 1, b"")[6:18] for _ in range(2000)}
    assert len(nonces) == 2000


# --- chunks: tampering ----------------------------------------------------------------------------


@pytest.fixture
def sealed_chunk() -> bytes:
    return seal_chunk(GOLDEN_DEK, GOLDEN_ARCHIVE_ID, GOLDEN_FILE_ID, 9, 4, bytes(range(256)) * 2)


@pytest.mark.parametrize("mask", [0x01, 0x80, 0xFF])
def test_chunk_any_flipped_byte_fails(sealed_chunk: bytes, mask: int) -> None:
    positions = _sample_positions(len(sealed_chunk))
    # header (magic, version, flags), nonce, ciphertext body and tag are all in the sample
    assert {0, 4, 5, 6, 17, 18, len(sealed_chunk) - 1} <= set(positions)
    for pos in positions:
        with pytest.raises(IntegrityError):
            open_chunk(GOLDEN_DEK, GOLDEN_ARCHIVE_ID, GOLDEN_FILE_ID, 9, 4, _flip(sealed_chunk, pos, mask))


def test_chunk_every_single_bit_flip_fails_small_blob() -> None:
    blob = seal_chunk(GOLDEN_DEK, GOLDEN_ARCHIVE_ID, GOLDEN_FILE_ID, 0, 1, b"x")
    for pos in range(len(blob)):
        for bit in range(8):
            with pytest.raises(IntegrityError):
                open_chunk(GOLDEN_DEK, GOLDEN_ARCHIVE_ID, GOLDEN_FILE_ID, 0, 1, _flip(blob, pos, 1 << bit))


def test_chunk_truncated_fails(sealed_chunk: bytes) -> None:
    for cut in list(range(0, CHUNK_OVERHEAD + 2)) + [len(sealed_chunk) - 16, len(sealed_chunk) - 1]:
        with pytest.raises(IntegrityError):
            open_chunk(GOLDEN_DEK, GOLDEN_ARCHIVE_ID, GOLDEN_FILE_ID, 9, 4, sealed_chunk[:cut])


def test_empty_chunk_truncated_fails() -> None:
    blob = seal_chunk(GOLDEN_DEK, GOLDEN_ARCHIVE_ID, GOLDEN_FILE_ID, 0, 1, b"")
    assert len(blob) == CHUNK_OVERHEAD
    for cut in range(len(blob)):
        with pytest.raises(IntegrityError):
            open_chunk(GOLDEN_DEK, GOLDEN_ARCHIVE_ID, GOLDEN_FILE_ID, 0, 1, blob[:cut])


@pytest.mark.parametrize("extra", [b"\x00", b"\x00" * 16, b"trailing garbage"])
def test_chunk_extended_fails(sealed_chunk: bytes, extra: bytes) -> None:
    with pytest.raises(IntegrityError):
        open_chunk(GOLDEN_DEK, GOLDEN_ARCHIVE_ID, GOLDEN_FILE_ID, 9, 4, sealed_chunk + extra)


def test_chunk_prepended_fails(sealed_chunk: bytes) -> None:
    with pytest.raises(IntegrityError):
        open_chunk(GOLDEN_DEK, GOLDEN_ARCHIVE_ID, GOLDEN_FILE_ID, 9, 4, b"MIFC" + sealed_chunk)


def test_chunk_wrong_dek_fails(sealed_chunk: bytes) -> None:
    wrong = bytes(range(0x41, 0x61))
    with pytest.raises(IntegrityError):
        open_chunk(wrong, GOLDEN_ARCHIVE_ID, GOLDEN_FILE_ID, 9, 4, sealed_chunk)
    with pytest.raises(IntegrityError):
        open_chunk(new_data_key(), GOLDEN_ARCHIVE_ID, GOLDEN_FILE_ID, 9, 4, sealed_chunk)


def test_chunk_swapped_between_files_fails(sealed_chunk: bytes) -> None:
    # Even if both files shared a DEK, the file id in the AAD must catch the swap.
    with pytest.raises(IntegrityError):
        open_chunk(GOLDEN_DEK, GOLDEN_ARCHIVE_ID, OTHER_FILE_ID, 9, 4, sealed_chunk)


@pytest.mark.parametrize("index", [0, 8, 10, 9 + 2**32, 2**64 - 1])
def test_chunk_swapped_between_positions_fails(sealed_chunk: bytes, index: int) -> None:
    with pytest.raises(IntegrityError):
        open_chunk(GOLDEN_DEK, GOLDEN_ARCHIVE_ID, GOLDEN_FILE_ID, index, 4, sealed_chunk)


def test_chunk_older_generation_replay_fails() -> None:
    old = seal_chunk(GOLDEN_DEK, GOLDEN_ARCHIVE_ID, GOLDEN_FILE_ID, 2, 6, b"old contents")
    new = seal_chunk(GOLDEN_DEK, GOLDEN_ARCHIVE_ID, GOLDEN_FILE_ID, 2, 7, b"new contents")
    assert open_chunk(GOLDEN_DEK, GOLDEN_ARCHIVE_ID, GOLDEN_FILE_ID, 2, 7, new) == (b"new contents", 0)
    with pytest.raises(IntegrityError):
        open_chunk(GOLDEN_DEK, GOLDEN_ARCHIVE_ID, GOLDEN_FILE_ID, 2, 7, old)
    # and a newer object cannot stand in for an older expected generation either
    with pytest.raises(IntegrityError):
        open_chunk(GOLDEN_DEK, GOLDEN_ARCHIVE_ID, GOLDEN_FILE_ID, 2, 6, new)


def test_chunk_index_and_generation_are_not_interchangeable() -> None:
    blob = seal_chunk(GOLDEN_DEK, GOLDEN_ARCHIVE_ID, GOLDEN_FILE_ID, 1, 2, b"ordered")
    with pytest.raises(IntegrityError):
        open_chunk(GOLDEN_DEK, GOLDEN_ARCHIVE_ID, GOLDEN_FILE_ID, 2, 1, blob)


def test_chunk_from_other_archive_fails(sealed_chunk: bytes) -> None:
    with pytest.raises(IntegrityError):
        open_chunk(GOLDEN_DEK, OTHER_ARCHIVE_ID, GOLDEN_FILE_ID, 9, 4, sealed_chunk)


def test_chunk_flags_are_authenticated() -> None:
    blob = seal_chunk(GOLDEN_DEK, GOLDEN_ARCHIVE_ID, GOLDEN_FILE_ID, 0, 1, b"raw")
    forged = blob[:5] + bytes([FLAG_ZSTD]) + blob[6:]
    with pytest.raises(IntegrityError):
        open_chunk(GOLDEN_DEK, GOLDEN_ARCHIVE_ID, GOLDEN_FILE_ID, 0, 1, forged)


def test_metadata_blob_is_not_a_chunk() -> None:
    blob = seal_blob(GOLDEN_DEK, 1, b"ctx", b"not a chunk")
    with pytest.raises(IntegrityError):
        open_chunk(GOLDEN_DEK, GOLDEN_ARCHIVE_ID, GOLDEN_FILE_ID, 0, 1, blob)


# --- wrapped data keys ----------------------------------------------------------------------------


def test_new_ids_and_keys_are_random_and_sized() -> None:
    assert len(new_data_key()) == 32
    assert new_data_key() != new_data_key()
    assert len(new_file_id()) == 16
    assert new_file_id() != new_file_id()


def test_wrap_round_trip(kek: MasterKey) -> None:
    dek = new_data_key()
    blob = wrap_data_key(kek, GOLDEN_ARCHIVE_ID, GOLDEN_FILE_ID, dek)
    assert len(blob) == WRAPPED_DEK_LEN == 77
    assert blob[0] == 0x01
    assert dek not in blob
    assert unwrap_data_key(kek, GOLDEN_ARCHIVE_ID, GOLDEN_FILE_ID, blob) == dek


def test_wrap_twice_differs(kek: MasterKey) -> None:
    a = wrap_data_key(kek, GOLDEN_ARCHIVE_ID, GOLDEN_FILE_ID, GOLDEN_DEK)
    b = wrap_data_key(kek, GOLDEN_ARCHIVE_ID, GOLDEN_FILE_ID, GOLDEN_DEK)
    assert a != b
    assert a[17:29] != b[17:29]


@pytest.mark.parametrize("bad_len", [0, 16, 31, 33])
def test_wrap_rejects_wrong_dek_length(kek: MasterKey, bad_len: int) -> None:
    with pytest.raises(ValueError):
        wrap_data_key(kek, GOLDEN_ARCHIVE_ID, GOLDEN_FILE_ID, b"\x00" * bad_len)


def test_wrapped_key_kek_id_is_readable_without_key(kek: MasterKey, other_kek: MasterKey) -> None:
    blob = wrap_data_key(kek, GOLDEN_ARCHIVE_ID, GOLDEN_FILE_ID, GOLDEN_DEK)
    assert wrapped_key_kek_id(blob) == kek.kek_id
    assert wrapped_key_kek_id(blob) == blob[1:17]
    assert wrapped_key_kek_id(blob) != other_kek.kek_id


def test_wrapped_key_kek_id_rejects_bad_layout(kek: MasterKey) -> None:
    blob = wrap_data_key(kek, GOLDEN_ARCHIVE_ID, GOLDEN_FILE_ID, GOLDEN_DEK)
    for bad in (b"", blob[:-1], blob + b"\x00", b"\x02" + blob[1:]):
        with pytest.raises(IntegrityError):
            wrapped_key_kek_id(bad)


def test_unwrap_with_wrong_kek_is_wrong_key(kek: MasterKey, other_kek: MasterKey) -> None:
    blob = wrap_data_key(kek, GOLDEN_ARCHIVE_ID, GOLDEN_FILE_ID, GOLDEN_DEK)
    with pytest.raises(WrongKey):
        unwrap_data_key(other_kek, GOLDEN_ARCHIVE_ID, GOLDEN_FILE_ID, blob)


def test_unwrap_tampered_fails(kek: MasterKey) -> None:
    blob = wrap_data_key(kek, GOLDEN_ARCHIVE_ID, GOLDEN_FILE_ID, GOLDEN_DEK)
    # version byte, nonce, wrapped key and tag: every byte, several masks
    for pos in [0] + list(range(17, len(blob))):
        for mask in (0x01, 0x80, 0xFF):
            with pytest.raises(IntegrityError):
                unwrap_data_key(kek, GOLDEN_ARCHIVE_ID, GOLDEN_FILE_ID, _flip(blob, pos, mask))


def test_unwrap_tampered_kek_id_never_yields_a_key(kek: MasterKey) -> None:
    # A changed kek id names a key we do not hold: it is reported as WrongKey (and it is also
    # bound into the AAD, so it could never authenticate).
    blob = wrap_data_key(kek, GOLDEN_ARCHIVE_ID, GOLDEN_FILE_ID, GOLDEN_DEK)
    for pos in range(1, 17):
        with pytest.raises(WrongKey):
            unwrap_data_key(kek, GOLDEN_ARCHIVE_ID, GOLDEN_FILE_ID, _flip(blob, pos))


def test_unwrap_truncated_or_extended_fails(kek: MasterKey) -> None:
    blob = wrap_data_key(kek, GOLDEN_ARCHIVE_ID, GOLDEN_FILE_ID, GOLDEN_DEK)
    for bad in [blob[:cut] for cut in range(len(blob))] + [blob + b"\x00", blob + blob[-16:]]:
        with pytest.raises(IntegrityError):
            unwrap_data_key(kek, GOLDEN_ARCHIVE_ID, GOLDEN_FILE_ID, bad)


def test_unwrap_moved_to_other_file_fails(kek: MasterKey) -> None:
    blob = wrap_data_key(kek, GOLDEN_ARCHIVE_ID, GOLDEN_FILE_ID, GOLDEN_DEK)
    with pytest.raises(IntegrityError):
        unwrap_data_key(kek, GOLDEN_ARCHIVE_ID, OTHER_FILE_ID, blob)


def test_unwrap_moved_to_other_archive_fails(kek: MasterKey) -> None:
    blob = wrap_data_key(kek, GOLDEN_ARCHIVE_ID, GOLDEN_FILE_ID, GOLDEN_DEK)
    with pytest.raises(IntegrityError):
        unwrap_data_key(kek, OTHER_ARCHIVE_ID, GOLDEN_FILE_ID, blob)


# --- metadata blobs -------------------------------------------------------------------------------


@pytest.mark.parametrize("plaintext", [b"", b"x", bytes(range(256)) * 64])
def test_blob_round_trip(plaintext: bytes) -> None:
    blob = seal_blob(GOLDEN_DEK, 3, b"journal/7", plaintext)
    assert blob[:4] == b"MIFM"
    assert blob[4] == 0x01
    assert blob[5] == 3
    assert len(blob) == len(plaintext) + 34
    assert open_blob(GOLDEN_DEK, 3, b"journal/7", blob) == plaintext


def test_blob_sealed_twice_differs() -> None:
    a = seal_blob(GOLDEN_DEK, 3, b"c", b"same")
    b = seal_blob(GOLDEN_DEK, 3, b"c", b"same")
    assert a != b and a[6:18] != b[6:18]


def test_blob_wrong_context_fails() -> None:
    blob = seal_blob(GOLDEN_DEK, 3, b"snapshot/1", b"meta")
    for ctx in (b"snapshot/2", b"", b"snapshot/1\x00", b"snapshot/"):
        with pytest.raises(IntegrityError):
            open_blob(GOLDEN_DEK, 3, ctx, blob)


def test_blob_wrong_kind_fails() -> None:
    blob = seal_blob(GOLDEN_DEK, 3, b"ctx", b"meta")
    for kind in (0, 2, 4, 255):
        with pytest.raises(IntegrityError):
            open_blob(GOLDEN_DEK, kind, b"ctx", blob)
    # rewriting the kind byte to match the caller's expectation is caught by the AAD
    with pytest.raises(IntegrityError):
        open_blob(GOLDEN_DEK, 4, b"ctx", blob[:5] + b"\x04" + blob[6:])


def test_blob_wrong_key_fails() -> None:
    blob = seal_blob(GOLDEN_DEK, 3, b"ctx", b"meta")
    with pytest.raises(IntegrityError):
        open_blob(new_data_key(), 3, b"ctx", blob)


def test_blob_flipped_truncated_extended_fails() -> None:
    blob = seal_blob(GOLDEN_DEK, 3, b"ctx", b"metadata payload " * 8)
    for pos in range(len(blob)):
        with pytest.raises(IntegrityError):
            open_blob(GOLDEN_DEK, 3, b"ctx", _flip(blob, pos))
    for cut in range(len(blob)):
        with pytest.raises(IntegrityError):
            open_blob(GOLDEN_DEK, 3, b"ctx", blob[:cut])
    with pytest.raises(IntegrityError):
        open_blob(GOLDEN_DEK, 3, b"ctx", blob + b"\x00")


def test_chunk_is_not_a_metadata_blob() -> None:
    blob = seal_chunk(GOLDEN_DEK, GOLDEN_ARCHIVE_ID, GOLDEN_FILE_ID, 0, 1, b"chunk")
    with pytest.raises(IntegrityError):
        open_blob(GOLDEN_DEK, 0, b"", blob)


# --- MACs -----------------------------------------------------------------------------------------


def test_mac_is_hmac_sha256() -> None:
    key, msg = b"k" * 32, b"descriptor bytes"
    tag = mac(key, msg)
    assert len(tag) == 32
    assert tag == stdlib_hmac.new(key, msg, hashlib.sha256).digest()
    assert mac(key, msg) == tag


def test_verify_mac() -> None:
    key, msg = b"k" * 32, b"descriptor bytes"
    tag = mac(key, msg)
    assert verify_mac(key, msg, tag) is True
    assert verify_mac(key, msg + b"!", tag) is False
    assert verify_mac(b"K" * 32, msg, tag) is False
    assert verify_mac(key, msg, tag[:-1]) is False
    assert verify_mac(key, msg, tag + b"\x00") is False
    assert verify_mac(key, msg, b"") is False
    for pos in range(len(tag)):
        assert verify_mac(key, msg, _flip(tag, pos)) is False


# --- golden vectors, format version 1 -------------------------------------------------------------
# Generated once with mifs 0.1.0 from the fixed inputs above. NEVER regenerate these: if a test
# below fails, the code no longer reads archives written by format version 1.

GOLDEN_KEK_ID_HEX = "fef11ace3ead4d2207ad385e93bc5e3b"

# seal_chunk(GOLDEN_DEK, GOLDEN_ARCHIVE_ID, GOLDEN_FILE_ID, index=3, generation=7, b"mifs golden chunk v1\n")
GOLDEN_CHUNK_V1 = bytes.fromhex(
    "4d4946430100141b541751b352ff35360b70b0edcc4e0dbd889deca9a29e69c25ee951226f0a5aadb5102addc13993a8aff567adc9e634"
)
GOLDEN_CHUNK_V1_PLAINTEXT = b"mifs golden chunk v1\n"

# seal_chunk(GOLDEN_DEK, GOLDEN_ARCHIVE_ID, GOLDEN_FILE_ID, index=0, generation=1, b"", flags=FLAG_ZSTD)
GOLDEN_EMPTY_ZSTD_CHUNK_V1 = bytes.fromhex("4d4946430101171e6513b105c58a8882c30b6746d2e55ddf215be868c2146eb80dff")

# wrap_data_key(MasterKey.from_secret(GOLDEN_KEK_SECRET), GOLDEN_ARCHIVE_ID, GOLDEN_FILE_ID, GOLDEN_DEK)
GOLDEN_WRAPPED_DEK_V1 = bytes.fromhex(
    "01fef11ace3ead4d2207ad385e93bc5e3bc6bbea6cabaa9ab25ea6cb895405782ad893fd719b460af082f851e3d7c6589"
    "4a53f0e4aaa6c4bc6306fc0972b20f3b1fe75dbee6600ebab984660e3"
)

# seal_blob(kek.derive(GOLDEN_ARCHIVE_ID, "metadb"), kind=2, context=b"snapshot/42", b"golden metadata blob v1")
GOLDEN_BLOB_V1 = bytes.fromhex(
    "4d49464d0102a81efb69c2c74537bee76415e4ada4f4ef7740c2bee6c19e3f6048e950d5cbaef6466b461ff96bcc1d47a72c"
    "300cfa02185fea"
)
GOLDEN_BLOB_V1_PLAINTEXT = b"golden metadata blob v1"
GOLDEN_METADB_KEY_HEX = "5cce5cac997b85eeb0d386d062a137b7ef38c5079e5c0ab8707ba51e79ff6e32"

# mac(kek.derive(GOLDEN_ARCHIVE_ID, "metadb"), b"golden mac message")
GOLDEN_MAC_V1 = bytes.fromhex("e878c85b3eb4c360ea0f3f249c6ab50d93efcdb52802a8b1f2d1a9dfe33dfd8c")


def test_golden_kek_id(kek: MasterKey) -> None:
    assert kek.kek_id.hex() == GOLDEN_KEK_ID_HEX


def test_golden_chunk_v1_opens() -> None:
    payload, flags = open_chunk(GOLDEN_DEK, GOLDEN_ARCHIVE_ID, GOLDEN_FILE_ID, 3, 7, GOLDEN_CHUNK_V1)
    assert payload == GOLDEN_CHUNK_V1_PLAINTEXT
    assert flags == 0


def test_golden_chunk_v1_is_bound_to_its_place() -> None:
    for args in [
        (GOLDEN_ARCHIVE_ID, GOLDEN_FILE_ID, 3, 6),
        (GOLDEN_ARCHIVE_ID, GOLDEN_FILE_ID, 2, 7),
        (GOLDEN_ARCHIVE_ID, OTHER_FILE_ID, 3, 7),
        (OTHER_ARCHIVE_ID, GOLDEN_FILE_ID, 3, 7),
    ]:
        with pytest.raises(IntegrityError):
            open_chunk(GOLDEN_DEK, *args, GOLDEN_CHUNK_V1)


def test_golden_empty_zstd_chunk_v1_opens() -> None:
    assert open_chunk(GOLDEN_DEK, GOLDEN_ARCHIVE_ID, GOLDEN_FILE_ID, 0, 1, GOLDEN_EMPTY_ZSTD_CHUNK_V1) == (
        b"",
        FLAG_ZSTD,
    )


def test_golden_wrapped_dek_v1_unwraps(kek: MasterKey) -> None:
    assert wrapped_key_kek_id(GOLDEN_WRAPPED_DEK_V1).hex() == GOLDEN_KEK_ID_HEX
    assert unwrap_data_key(kek, GOLDEN_ARCHIVE_ID, GOLDEN_FILE_ID, GOLDEN_WRAPPED_DEK_V1) == GOLDEN_DEK


def test_golden_blob_v1_opens(kek: MasterKey) -> None:
    key = kek.derive(GOLDEN_ARCHIVE_ID, "metadb")
    assert key.hex() == GOLDEN_METADB_KEY_HEX
    assert open_blob(key, 2, b"snapshot/42", GOLDEN_BLOB_V1) == GOLDEN_BLOB_V1_PLAINTEXT


def test_golden_mac_v1(kek: MasterKey) -> None:
    key = kek.derive(GOLDEN_ARCHIVE_ID, "metadb")
    assert mac(key, b"golden mac message") == GOLDEN_MAC_V1
    assert verify_mac(key, b"golden mac message", GOLDEN_MAC_V1)


# --- independent re-derivation of the documented layouts ------------------------------------------
# These use only `cryptography` and the layout as written in envelope.py's comments / FORMAT.md,
# never mifs' own helpers, so an accidental change to the format cannot go unnoticed.


def _independent_chunk_aad(archive_id: bytes, file_id: bytes, index: int, generation: int, header: bytes) -> bytes:
    return b"mifs/v1/chunk" + archive_id + file_id + struct.pack(">Q", index) + struct.pack(">Q", generation) + header[:6]


def test_independent_chunk_layout_decrypts_golden_vector() -> None:
    blob = GOLDEN_CHUNK_V1
    magic, version, flags, nonce = blob[:4], blob[4], blob[5], blob[6:18]
    assert (magic, version, flags) == (b"MIFC", 1, 0)
    aad = _independent_chunk_aad(GOLDEN_ARCHIVE_ID, GOLDEN_FILE_ID, 3, 7, blob[:18])
    assert AESGCM(GOLDEN_DEK).decrypt(nonce, blob[18:], aad) == GOLDEN_CHUNK_V1_PLAINTEXT
    # the AAD helper agrees with the documented layout byte for byte
    assert chunk_aad(GOLDEN_ARCHIVE_ID, GOLDEN_FILE_ID, 3, 7, blob[:18]) == aad
    assert len(aad) == 13 + 16 + 16 + 8 + 8 + 6


def test_independently_built_chunk_opens() -> None:
    nonce = bytes(range(12))
    flags = FLAG_ZSTD
    header = b"MIFC" + bytes([1, flags]) + nonce
    plaintext = b"built by hand from the documented layout"
    aad = _independent_chunk_aad(GOLDEN_ARCHIVE_ID, GOLDEN_FILE_ID, 258, 2**40 + 5, header)
    blob = header + AESGCM(GOLDEN_DEK).encrypt(nonce, plaintext, aad)
    assert open_chunk(GOLDEN_DEK, GOLDEN_ARCHIVE_ID, GOLDEN_FILE_ID, 258, 2**40 + 5, blob) == (plaintext, flags)


def _independent_kek_id(secret: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=16, salt=None, info=b"mifs/v1/kek-id").derive(secret)


def test_independent_wrapped_dek_layout() -> None:
    blob = GOLDEN_WRAPPED_DEK_V1
    kek_id = _independent_kek_id(GOLDEN_KEK_SECRET)
    assert blob[0] == 1
    assert blob[1:17] == kek_id
    nonce = blob[17:29]
    aad = b"mifs/v1/dek" + GOLDEN_ARCHIVE_ID + GOLDEN_FILE_ID + kek_id
    assert AESGCM(GOLDEN_KEK_SECRET).decrypt(nonce, blob[29:], aad) == GOLDEN_DEK


def test_independently_wrapped_dek_unwraps(kek: MasterKey) -> None:
    kek_id = _independent_kek_id(GOLDEN_KEK_SECRET)
    nonce = b"\xaa" * 12
    dek = bytes(range(200, 232))
    aad = b"mifs/v1/dek" + GOLDEN_ARCHIVE_ID + GOLDEN_FILE_ID + kek_id
    blob = b"\x01" + kek_id + nonce + AESGCM(GOLDEN_KEK_SECRET).encrypt(nonce, dek, aad)
    assert unwrap_data_key(kek, GOLDEN_ARCHIVE_ID, GOLDEN_FILE_ID, blob) == dek


def test_independent_blob_layout() -> None:
    key = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=GOLDEN_ARCHIVE_ID, info=b"mifs/v1/metadb"
    ).derive(GOLDEN_KEK_SECRET)
    blob = GOLDEN_BLOB_V1
    assert blob[:6] == b"MIFM\x01\x02"
    aad = b"mifs/v1/blob" + blob[:6] + b"snapshot/42"
    assert AESGCM(key).decrypt(blob[6:18], blob[18:], aad) == GOLDEN_BLOB_V1_PLAINTEXT
    nonce = b"\x55" * 12
    header = b"MIFM\x01\x09" + nonce
    hand_made = header + AESGCM(key).encrypt(nonce, b"hand", b"mifs/v1/blob" + header[:6] + b"j/1")
    assert open_blob(key, 9, b"j/1", hand_made) == b"hand"


def test_module_constants_match_documented_layout() -> None:
    assert envelope.CHUNK_MAGIC == b"MIFC"
    assert envelope.CHUNK_VERSION == 1
    assert envelope.BLOB_MAGIC == b"MIFM"
    assert envelope.WRAP_VERSION == 1
    assert envelope.NONCE_LEN == 12
    assert envelope.TAG_LEN == 16
