"""Key sources: passphrase derivation (Argon2id) and its stored parameters, source records."""

from __future__ import annotations

from pathlib import Path

import pytest

from mifs.crypto.keysource import (
    KIND_FILE,
    KIND_KMS,
    KIND_PASSPHRASE,
    KeySource,
    PassphraseParams,
    derive_passphrase_key,
    kms_encryption_context,
)

SALT = bytes(range(16))


def test_passphrase_key_is_deterministic_and_salted() -> None:
    params = PassphraseParams(salt=SALT)
    a = derive_passphrase_key(b"correct horse battery staple", params)
    assert a == derive_passphrase_key(b"correct horse battery staple", PassphraseParams.parse(params.encode()))
    assert a.kek_id != derive_passphrase_key(b"correct horse battery stapler", params).kek_id
    assert a.kek_id != derive_passphrase_key(b"correct horse battery staple", PassphraseParams(salt=bytes(16))).kek_id
    assert SALT.hex() in params.encode().decode() and "argon2id" in params.encode().decode()


@pytest.mark.parametrize("field,value", [("memory_kib", 8 * 1024 * 1024), ("iterations", 0), ("lanes", 1000), ("salt", "00")])
def test_passphrase_params_out_of_range_are_refused(field: str, value: object) -> None:
    import json

    doc = json.loads(PassphraseParams(salt=SALT).encode())
    doc[field] = value
    with pytest.raises(ValueError):
        PassphraseParams.parse(json.dumps(doc).encode())


def test_source_records_carry_no_secret() -> None:
    prompted = KeySource(KIND_PASSPHRASE, passphrase=b"hunter2hunter2")
    assert "hunter2" not in repr(prompted) and "hunter2" not in str(prompted.to_record())
    assert prompted.to_record() == {"kind": "passphrase", "prompt": True}
    for source in (KeySource(KIND_FILE, path=Path("/k")), KeySource(KIND_KMS, name="alias/x", endpoint="http://h", region="r")):
        assert KeySource.from_record(source.to_record()) == source
    with pytest.raises(ValueError):
        KeySource.from_record({"kind": "nope"})


def test_kms_context_binds_archive_and_key_id() -> None:
    assert kms_encryption_context("ab" * 16, b"\x01" * 16) == {"mifs:archive": "ab" * 16, "mifs:kek-id": "01" * 16}
