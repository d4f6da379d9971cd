"""End-to-end: every key source of `mifs init` / `mifs mount`, and their clean failures.

Key file (the default, covered everywhere else), systemd credential, environment variable,
passphrase file (Argon2id) and AWS KMS against moto's KMS server on 127.0.0.1 (no real KMS
runs offline; moto is used for KMS only).
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Iterator

import pytest

from conftest import fuse_available
from mifs_e2e import Archive, assert_cli_error, describe, pattern, read_file, write_file

EXIT_KEY = 4
EXIT_KEY_UNAVAILABLE = 10
EXIT_KEY_RETIRED = 11


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def private_file(path: Path, text: str) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    return path


@pytest.fixture
def bare(tmp_path: Path) -> Iterator[Archive]:
    """An Archive (paths only, no init): the test runs init with its own key source."""
    reason = fuse_available()
    if reason:
        pytest.skip(reason)
    arc = Archive(tmp_path / "archive")
    yield arc
    for mountpoint, _ in list(arc.mounts):
        arc.umount(mountpoint)
    assert not arc.force_cleanup()
    assert not arc.unexpected_log_lines([]), arc.unexpected_log_lines([])


def roundtrip(arc: Archive, flags: list[object], env: dict[str, str] | None = None) -> None:
    """Mount with `flags`, write a file, remount, read it back."""
    data = pattern("source", 100_000)
    arc.mount(flags=[str(f) for f in flags], env=env)
    write_file(arc.mountpoint / "f", data)
    arc.remount()
    assert read_file(arc.mountpoint / "f") == data
    arc.umount()


def key_line(arc: Archive) -> str:
    """A key in MIFS-KEK-1 form, made by `mifs init` in a scratch store."""
    scratch = arc.base / f"scratch-{len(list(arc.base.glob('scratch-*')))}"
    scratch.mkdir()
    result = arc.run_cli("init", scratch / "store", "--key-file", scratch / "k")
    assert result.returncode == 0, describe(result)
    return (scratch / "k").read_text()


def init(arc: Archive, *flags: object, env: dict[str, str] | None = None) -> None:
    result = arc.run_cli("init", arc.store, *flags, env=env)
    assert result.returncode == 0, describe(result)


def mount_args(arc: Archive, *flags: object) -> list[object]:
    return ["mount", arc.store, arc.mountpoint, "--cache-dir", arc.cache_dir, *flags]


def test_environment_variable(bare: Archive) -> None:
    arc = bare
    env = {"MIFS_TEST_KEK": key_line(arc)}
    init(arc, "--key-env", "MIFS_TEST_KEK", env=env)
    roundtrip(arc, ["--key-env", "MIFS_TEST_KEK"], env)
    assert_cli_error(arc.run_cli(*mount_args(arc, "--key-env", "MIFS_TEST_KEK"), env={"MIFS_TEST_KEK": key_line(arc)}), EXIT_KEY)
    assert_cli_error(arc.run_cli(*mount_args(arc, "--key-env", "MIFS_NOT_SET")), EXIT_KEY)
    assert_cli_error(arc.run_cli(*mount_args(arc, "--key-env", "V"), env={"V": "garbage"}), EXIT_KEY)
    # Only one key source at a time.
    assert_cli_error(arc.run_cli(*mount_args(arc, "--key-env", "V", "--key-file", arc.key_file)), 2)


def test_systemd_credential(bare: Archive) -> None:
    arc = bare
    creds = arc.base / "credentials"
    creds.mkdir(mode=0o700)
    private_file(creds / "mifs-kek", key_line(arc))
    env = {"CREDENTIALS_DIRECTORY": str(creds)}
    init(arc, "--key-credential", "mifs-kek", env=env)
    roundtrip(arc, ["--key-credential", "mifs-kek"], env)
    result = arc.run_cli(*mount_args(arc, "--key-credential", "mifs-kek"))  # no $CREDENTIALS_DIRECTORY
    assert_cli_error(result, EXIT_KEY)
    assert "CREDENTIALS_DIRECTORY" in result.stderr
    assert_cli_error(arc.run_cli(*mount_args(arc, "--key-credential", "other"), env=env), EXIT_KEY)


def test_passphrase_file(bare: Archive) -> None:
    arc = bare
    secret = "correct horse battery staple"
    good = private_file(arc.base / "pass", secret + "\n")
    init(arc, "--passphrase-file", good)
    params = [p for p in (arc.store / "keys" / "passphrase").iterdir()]
    assert len(params) == 1
    doc = json.loads(params[0].read_text())
    assert doc["kdf"] == "argon2id" and doc["memory_kib"] == 65536 and doc["iterations"] == 3 and doc["lanes"] == 4
    assert secret not in "".join(p.read_text(errors="replace") for p in arc.store.rglob("*") if p.is_file())
    roundtrip(arc, ["--passphrase-file", good])
    wrong = private_file(arc.base / "wrong", "correct horse battery stapler\n")
    result = arc.run_cli(*mount_args(arc, "--passphrase-file", wrong))
    assert_cli_error(result, EXIT_KEY)
    assert "wrong passphrase" in result.stderr and "stapler" not in result.stderr
    loose = arc.base / "loose"
    loose.write_text(secret)
    loose.chmod(0o644)
    assert_cli_error(arc.run_cli(*mount_args(arc, "--passphrase-file", loose)), EXIT_KEY)
    # A key file is not this archive's key either.
    assert_cli_error(arc.run_cli(*mount_args(arc, "--key-file", private_file(arc.base / "k", key_line(arc)))), EXIT_KEY)
    # Too short a new passphrase is refused at init.
    short = private_file(arc.base / "short", "tiny\n")
    assert_cli_error(arc.run_cli("init", arc.base / "store2", "--passphrase-file", short), EXIT_KEY)


@pytest.fixture(scope="module")
def kms_server() -> Iterator[str]:
    """moto's KMS (server mode, on 127.0.0.1, a free port): the only stand-in for AWS here."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


KMS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
    "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
}


def new_kms_key(endpoint: str) -> str:
    import boto3

    client = boto3.client("kms", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    key_id: str = client.create_key(Description="mifs test")["KeyMetadata"]["KeyId"]
    return key_id


def test_kms(bare: Archive, kms_server: str) -> None:
    arc = bare
    arc.env.update(KMS_ENV)
    key_id = new_kms_key(kms_server)
    kms = ["--kms-key-id", key_id, "--kms-endpoint", kms_server]
    init(arc, *kms)
    objects = list((arc.store / "keys" / "kms").iterdir())
    assert len(objects) == 1
    doc = json.loads(objects[0].read_text())
    assert doc["format"] == "mifs-kms-kek-1" and doc["kms_key_id"] == key_id
    roundtrip(arc, kms)
    # Another KMS key: wrong key. KMS unreachable: its own exit code.
    other = new_kms_key(kms_server)
    # (AWS answers IncorrectKeyException -> EXIT_KEY; moto answers AccessDeniedException ->
    # EXIT_KEY_UNAVAILABLE, as for a key the principal may not use.)
    result = arc.run_cli(*mount_args(arc, "--kms-key-id", other, "--kms-endpoint", kms_server))
    assert result.returncode in (EXIT_KEY, EXIT_KEY_UNAVAILABLE)
    assert_cli_error(result, result.returncode)
    assert "KMS refused to decrypt" in result.stderr
    dead = f"http://127.0.0.1:{free_port()}"
    result = arc.run_cli(*mount_args(arc, "--kms-key-id", key_id, "--kms-endpoint", dead))
    assert_cli_error(result, EXIT_KEY_UNAVAILABLE)
    assert "unreachable" in result.stderr


def test_rotate_from_key_file_to_kms(bare: Archive, kms_server: str) -> None:
    arc = bare
    arc.env.update(KMS_ENV)
    init(arc, "--key-file", arc.key_file)
    arc.mount()
    data = pattern("kms-rotation", 300_000)
    write_file(arc.mountpoint / "f", data)
    key_id = new_kms_key(kms_server)
    result = arc.run_cli("key", "rotate", arc.mountpoint, "--new-kms-key-id", key_id, "--new-kms-endpoint", kms_server)
    assert result.returncode == 0, describe(result)
    arc.umount()
    assert_cli_error(arc.try_mount(), EXIT_KEY_RETIRED)
    arc.mount(flags=["--kms-key-id", key_id, "--kms-endpoint", kms_server])
    assert read_file(arc.mountpoint / "f") == data
    arc.umount()
