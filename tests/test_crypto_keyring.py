"""Tests for mifs.crypto.keyring: key files, KEK ids and derived keys.

Key files are written and read for real in tmp_path. Error messages are checked to carry no
key material. Golden values pin the key-file encoding, the KEK id and derive() so that keys
and archives made today keep working.
"""

from __future__ import annotations

import base64
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from mifs.crypto.keyring import (
    KEK_ID_LEN,
    KEY_FILE_PREFIX,
    MasterKey,
    encode_key_file,
    load_key_file,
    parse_key_text,
    write_key_file,
)
from mifs.errors import KeyFileError
from mifs.types import ArchiveId

SECRET = bytes(range(32))
SECRET_B64 = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
ARCHIVE_A = ArchiveId(bytes.fromhex("a0a1a2a3a4a5a6a7a8a9aaabacadaeaf"))
ARCHIVE_B = ArchiveId(bytes.fromhex("b0b1b2b3b4b5b6b7b8b9babbbcbdbebf"))

# Golden values for format version 1 (generated once; never regenerate).
GOLDEN_KEY_FILE = b"MIFS-KEK-1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n"
GOLDEN_KEK_ID_HEX = "fef11ace3ead4d2207ad385e93bc5e3b"
GOLDEN_DERIVED = {
    "metadb": "5cce5cac997b85eeb0d386d062a137b7ef38c5079e5c0ab8707ba51e79ff6e32",
    "descriptor-mac": "0b2251d059caa3c2be7e2f54e7902bcab3d5f99c1c9c86be57dafc2560a1bbb9",
}


@pytest.fixture
def key() -> MasterKey:
    return MasterKey.from_secret(SECRET)


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    """Run with umask 0, so that only the code itself keeps files private."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def _secret_forms(secret: bytes) -> list[str]:
    """Ways the key could leak into a message."""
    b64 = base64.b64encode(secret).decode()
    return [b64, b64[:16], b64[16:40], secret.hex(), secret.hex()[:16], repr(secret), repr(secret)[2:20]]


def _assert_no_key_material(message: str, secret: bytes = SECRET) -> None:
    for form in _secret_forms(secret):
        assert form not in message, f"error message leaks key material: {message!r}"


def _write_raw(path: Path, content: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(content)
    os.chmod(path, mode)
    return path


# --- MasterKey --------------------------------------------------------------------------------


def test_generate_gives_distinct_well_formed_keys() -> None:
    a, b = MasterKey.generate(), MasterKey.generate()
    assert len(a.secret) == 32 and len(b.secret) == 32
    assert a.secret != b.secret
    assert a.kek_id != b.kek_id
    assert len(a.kek_id) == KEK_ID_LEN == 16


@pytest.mark.parametrize("length", [0, 16, 31, 33, 64])
def test_from_secret_rejects_wrong_length(length: int) -> None:
    with pytest.raises(KeyFileError):
        MasterKey.from_secret(b"\x01" * length)


def test_kek_id_is_stable_and_golden(key: MasterKey) -> None:
    assert key.kek_id.hex() == GOLDEN_KEK_ID_HEX
    assert MasterKey.from_secret(SECRET).kek_id == key.kek_id
    independent = HKDF(algorithm=hashes.SHA256(), length=16, salt=None, info=b"mifs/v1/kek-id").derive(SECRET)
    assert key.kek_id == independent
    assert key.kek_id not in key.secret and key.secret[:16] != key.kek_id


def test_repr_and_str_do_not_show_secret(key: MasterKey) -> None:
    for text in (repr(key), str(key), f"{key}", f"{key!r}"):
        _assert_no_key_material(text)
        assert "secret" not in text


def test_derive_is_deterministic_and_golden(key: MasterKey) -> None:
    for purpose, expected in GOLDEN_DERIVED.items():
        assert key.derive(ARCHIVE_A, purpose).hex() == expected
        assert key.derive(ARCHIVE_A, purpose) == key.derive(ARCHIVE_A, purpose)
    independent = HKDF(algorithm=hashes.SHA256(), length=32, salt=ARCHIVE_A, info=b"mifs/v1/metadb").derive(SECRET)
    assert key.derive(ARCHIVE_A, "metadb") == independent


def test_derive_differs_per_purpose_archive_and_key(key: MasterKey) -> None:
    other = MasterKey.from_secret(bytes(range(1, 33)))
    derived = {
        key.derive(ARCHIVE_A, "metadb"),
        key.derive(ARCHIVE_A, "descriptor-mac"),
        key.derive(ARCHIVE_A, "journal"),
        key.derive(ARCHIVE_B, "metadb"),
        key.derive(ARCHIVE_B, "descriptor-mac"),
        other.derive(ARCHIVE_A, "metadb"),
    }
    assert len(derived) == 6
    assert all(len(d) == 32 for d in derived)
    assert key.secret not in derived


@pytest.mark.parametrize("bad", [b"", b"\x00" * 15, b"\x00" * 17, b"\x00" * 32])
def test_derive_rejects_bad_archive_id(key: MasterKey, bad: bytes) -> None:
    with pytest.raises(ValueError):
        key.derive(ArchiveId(bad), "metadb")


# --- key file encoding ------------------------------------------------------------------------


def test_encode_key_file_golden(key: MasterKey) -> None:
    assert KEY_FILE_PREFIX == "MIFS-KEK-1:"
    assert encode_key_file(key) == GOLDEN_KEY_FILE


def test_parse_golden_key_text() -> None:
    parsed = parse_key_text(GOLDEN_KEY_FILE, "test")
    assert parsed.secret == SECRET
    assert parsed.kek_id.hex() == GOLDEN_KEK_ID_HEX


@pytest.mark.parametrize(
    "text",
    [
        GOLDEN_KEY_FILE.rstrip(b"\n"),  # no final newline
        GOLDEN_KEY_FILE.rstrip(b"\n") + b"\r\n",  # edited on Windows
        b"  " + GOLDEN_KEY_FILE + b"\n\n",  # stray whitespace around the one line
    ],
)
def test_parse_tolerates_surrounding_whitespace(text: bytes) -> None:
    assert parse_key_text(text, "test").secret == SECRET


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\n", id="blank"),
        pytest.param(SECRET_B64.encode() + b"\n", id="no-prefix"),
        pytest.param(b"MIFS-KEK-2:" + SECRET_B64.encode() + b"\n", id="wrong-version-prefix"),
        pytest.param(b"mifs-kek-1:" + SECRET_B64.encode() + b"\n", id="lowercase-prefix"),
        pytest.param(b"MIFS-KEK-1 " + SECRET_B64.encode() + b"\n", id="prefix-without-colon"),
        pytest.param(GOLDEN_KEY_FILE + GOLDEN_KEY_FILE, id="two-lines"),
        pytest.param(GOLDEN_KEY_FILE + b"# comment\n", id="trailing-line"),
        pytest.param(b"MIFS-KEK-1:" + SECRET_B64[:-1].encode() + b"\n", id="bad-padding"),
        pytest.param(b"MIFS-KEK-1:" + SECRET_B64.replace("A", "*", 1).encode() + b"\n", id="bad-alphabet"),
        pytest.param(b"MIFS-KEK-1:" + SECRET_B64[:20].encode() + b" " + SECRET_B64[20:].encode() + b"\n", id="inner-space"),
        pytest.param(b"MIFS-KEK-1:" + base64.urlsafe_b64encode(b"\xff" * 32) + b"\n", id="urlsafe-alphabet"),
        pytest.param(b"MIFS-KEK-1:" + base64.b64encode(SECRET[:31]) + b"\n", id="31-bytes"),
        pytest.param(b"MIFS-KEK-1:" + base64.b64encode(SECRET + b"\x20") + b"\n", id="33-bytes"),
        pytest.param(b"MIFS-KEK-1:" + base64.b64encode(SECRET * 2) + b"\n", id="64-bytes"),
        pytest.param(b"MIFS-KEK-1:\n", id="empty-key"),
    ],
)
def test_parse_rejects_malformed_text_without_leaking(text: bytes) -> None:
    with pytest.raises(KeyFileError) as info:
        parse_key_text(text, "key file /somewhere/k.key")
    message = str(info.value)
    assert "/somewhere/k.key" in message
    _assert_no_key_material(message)
    _assert_no_key_material(message, b"\xff" * 32)


# --- writing key files ------------------------------------------------------------------------


def test_write_key_file_mode_and_content(tmp_path: Path, key: MasterKey) -> None:
    path = tmp_path / "k.key"
    write_key_file(path, key)
    st = os.stat(path)
    assert stat.S_ISREG(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert path.read_bytes() == GOLDEN_KEY_FILE


def test_write_key_file_is_private_even_with_permissive_umask(
    tmp_path: Path, key: MasterKey, permissive_umask: None
) -> None:
    path = tmp_path / "k.key"
    write_key_file(path, key)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_write_key_file_refuses_overwrite(tmp_path: Path, key: MasterKey) -> None:
    path = tmp_path / "k.key"
    path.write_bytes(b"precious old key\n")
    with pytest.raises(KeyFileError) as info:
        write_key_file(path, key)
    assert path.read_bytes() == b"precious old key\n"
    _assert_no_key_material(str(info.value))


def test_write_key_file_refuses_existing_key_file(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    first = MasterKey.generate()
    write_key_file(path, first)
    with pytest.raises(KeyFileError):
        write_key_file(path, MasterKey.generate())
    assert load_key_file(path).secret == first.secret


def test_write_key_file_does_not_follow_symlink(tmp_path: Path, key: MasterKey) -> None:
    target = tmp_path / "elsewhere.key"
    link = tmp_path / "k.key"
    link.symlink_to(target)  # dangling: O_CREAT alone would create `target`
    with pytest.raises(KeyFileError):
        write_key_file(link, key)
    assert not target.exists()


def test_write_key_file_missing_directory(tmp_path: Path, key: MasterKey) -> None:
    with pytest.raises(KeyFileError) as info:
        write_key_file(tmp_path / "no-such-dir" / "k.key", key)
    _assert_no_key_material(str(info.value))


# --- loading key files ------------------------------------------------------------------------


def test_write_then_load_round_trip(tmp_path: Path) -> None:
    key = MasterKey.generate()
    path = tmp_path / "k.key"
    write_key_file(path, key)
    loaded = load_key_file(path)
    assert loaded.secret == key.secret
    assert loaded.kek_id == key.kek_id
    assert loaded == key


def test_load_golden_key_file(tmp_path: Path) -> None:
    path = _write_raw(tmp_path / "k.key", GOLDEN_KEY_FILE)
    assert load_key_file(path).kek_id.hex() == GOLDEN_KEK_ID_HEX


@pytest.mark.parametrize("mode", [0o400, 0o600, 0o700])
def test_load_accepts_owner_only_modes(tmp_path: Path, mode: int) -> None:
    path = _write_raw(tmp_path / "k.key", GOLDEN_KEY_FILE, mode)
    assert load_key_file(path).secret == SECRET


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o606, 0o666, 0o620, 0o602, 0o610, 0o601, 0o777])
def test_load_refuses_group_or_other_access(tmp_path: Path, mode: int) -> None:
    path = _write_raw(tmp_path / "k.key", GOLDEN_KEY_FILE, mode)
    with pytest.raises(KeyFileError) as info:
        load_key_file(path)
    message = str(info.value)
    _assert_no_key_material(message)
    assert str(path) in message


def test_load_without_mode_check(tmp_path: Path) -> None:
    path = _write_raw(tmp_path / "k.key", GOLDEN_KEY_FILE, 0o644)
    assert load_key_file(path, check_mode=False).secret == SECRET


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError):
        load_key_file(tmp_path / "missing.key")


def test_load_directory(tmp_path: Path) -> None:
    d = tmp_path / "dir.key"
    d.mkdir(mode=0o700)
    with pytest.raises(KeyFileError):
        load_key_file(d)


def test_load_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "k.key"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(KeyFileError):
        load_key_file(fifo)  # would hang forever if it opened the FIFO


def test_load_follows_symlink_to_private_file(tmp_path: Path) -> None:
    target = _write_raw(tmp_path / "real.key", GOLDEN_KEY_FILE)
    link = tmp_path / "k.key"
    link.symlink_to(target)
    assert load_key_file(link).secret == SECRET


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"MIFS-KEK-2:" + SECRET_B64.encode() + b"\n", id="bad-prefix"),
        pytest.param(b"MIFS-KEK-1:" + SECRET_B64.replace("A", "!").encode() + b"\n", id="bad-base64"),
        pytest.param(b"MIFS-KEK-1:" + base64.b64encode(SECRET[:24]) + b"\n", id="bad-length"),
        pytest.param(b"", id="empty"),
        pytest.param(b"\x00" * 100, id="binary"),
    ],
)
def test_load_malformed_file_without_leaking(tmp_path: Path, content: bytes) -> None:
    path = _write_raw(tmp_path / "k.key", content)
    with pytest.raises(KeyFileError) as info:
        load_key_file(path)
    message = str(info.value)
    assert str(path) in message
    _assert_no_key_material(message)
    assert "\n" not in message  # one line for the CLI
