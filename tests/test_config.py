"""Tests for mifs.config: size parsing and formatting."""

from __future__ import annotations

from pathlib import Path

import pytest

from mifs.config import (
    DEFAULT_CHUNK_SIZE,
    MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    format_size,
    parse_size,
)
from mifs.errors import UserError

KiB, MiB, GiB, TiB = 1024, 1024**2, 1024**3, 1024**4


@pytest.mark.parametrize(
    "text, expected",
    [
        ("0", 0),
        ("1", 1),
        ("123", 123),
        ("123b", 123),
        ("123B", 123),
        ("4MiB", 4 * MiB),
        ("4mib", 4 * MiB),
        ("4MIB", 4 * MiB),
        ("512KiB", 512 * KiB),
        ("64KiB", 64 * KiB),
        ("10GiB", 10 * GiB),
        ("1TiB", TiB),
        ("4MB", 4_000_000),
        ("4mb", 4_000_000),
        ("4M", 4_000_000),
        ("4k", 4000),
        ("4K", 4000),
        ("4KB", 4000),
        ("2G", 2 * 10**9),
        ("2GB", 2 * 10**9),
        ("3T", 3 * 10**12),
        ("3TB", 3 * 10**12),
        (" 4 MiB ", 4 * MiB),
        ("4MiB\n", 4 * MiB),
        ("0004MiB", 4 * MiB),
        ("99999999999999GiB", 99999999999999 * GiB),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", " ", "MiB", "-1", "-4MiB", "+4MiB", "1.5MiB", "1,5MiB", "4XB", "4 Mi B", "4MiBs", "4PiB", "0x10", "4MiB4", "four", "4iB", "4 MiB extra"],
)
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(UserError) as info:
        parse_size(text, "chunk size")
    assert info.value.exit_code == 2
    message = str(info.value)
    assert "chunk size" in message
    assert repr(text) in message
    assert "\n" not in message


def test_parse_size_default_label() -> None:
    with pytest.raises(UserError) as info:
        parse_size("lots")
    assert "size" in str(info.value)


def test_chunk_size_constants() -> None:
    assert DEFAULT_CHUNK_SIZE == parse_size("4MiB")
    assert MIN_CHUNK_SIZE == parse_size("64KiB")
    assert MAX_CHUNK_SIZE == parse_size("64MiB")


@pytest.mark.parametrize(
    "n, expected",
    [
        (0, "0 B"),
        (1, "1 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (MiB - KiB, "1023.0 KiB"),
        (MiB, "1.0 MiB"),
        (4 * MiB, "4.0 MiB"),
        (int(2.5 * GiB), "2.5 GiB"),
        (10 * GiB, "10.0 GiB"),
        (TiB, "1.0 TiB"),
        (1024 * TiB, "1024.0 TiB"),
        (512.0, "512 B"),
        (-2048, "-2.0 KiB"),
    ],
)
def test_format_size(n: int | float, expected: str) -> None:
    assert format_size(n) == expected


@pytest.mark.parametrize("n", [0, 1, 1023, 64 * KiB, 4 * MiB, 10 * GiB, 3 * TiB])
def test_format_size_is_readable_by_parse_size_when_whole(n: int) -> None:
    text = format_size(n)
    number, unit = text.split(" ")
    assert number.endswith(".0") or unit == "B"
    assert parse_size(number.removesuffix(".0") + unit) == n


def test_access_and_audit_sections(tmp_path: "Path") -> None:
    from pathlib import Path

    from mifs.config import load_config_file

    path = Path(tmp_path) / "m.toml"
    path.write_text('store = "/s"\n[access]\nallow_uids = [1001, 1002]\nallow_gids = [50]\n[audit]\nsegment_seconds = 30\n')
    assert load_config_file(path) == {"store_url": "/s", "allow_uids": [1001, 1002], "allow_gids": [50], "audit_segment_seconds": 30}
    for bad in ('[access]\nallow_uids = ["pacs"]\n', "[access]\nallow_uids = [-1]\n", "[audit]\nsegment_seconds = 0\n",
                "[access]\nallow_users = [1]\n"):
        path.write_text(bad)
        with pytest.raises(UserError) as info:
            load_config_file(path)
        assert info.value.exit_code == 2


def test_config_file_retention_section(tmp_path: Path) -> None:
    from mifs.config import load_config_file

    path = tmp_path / "m.toml"
    path.write_text('store = "/s"\nmountpoint = "/m"\n[retention]\nretention_days = 30\nworm_days = 0.5\n')
    assert load_config_file(path) == {
        "store_url": "/s", "mountpoint": Path("/m"), "retention_days": 30.0, "worm_days": 0.5,
    }
    for bad in ("retention_days = -1", 'worm_days = "7"', "worm_days = true", "keep_days = 1"):
        path.write_text(f"[retention]\n{bad}\n")
        with pytest.raises(UserError) as info:
            load_config_file(path)
        assert info.value.exit_code == 2



def test_config_file_upload_delay(tmp_path: Path) -> None:
    from mifs.config import MountConfig, load_config_file

    assert MountConfig("/s", Path("/m")).upload_delay == 5.0
    path = tmp_path / "m.toml"
    path.write_text("[tuning]\nupload_delay = 0\nupload_workers = 8\n")
    assert load_config_file(path) == {"upload_delay": 0, "upload_workers": 8}
    for bad in ("upload_delay = -1", 'upload_delay = "5s"', "upload_delay = true"):
        path.write_text(f"[tuning]\n{bad}\n")
        with pytest.raises(UserError, match="upload_delay") as info:
            load_config_file(path)
        assert info.value.exit_code == 2


def test_config_file_pack_size(tmp_path: Path) -> None:
    from mifs.config import MountConfig, load_config_file

    assert MountConfig("/s", Path("/m")).pack_size is None  # the store kind decides (mount.py)
    path = tmp_path / "m.toml"
    for text, expected in (('"4MiB"', 4 * MiB), ("0", 0), ('"64KiB"', 64 * KiB), ('"64MiB"', 64 * MiB), ("1048576", MiB)):
        path.write_text(f"[tuning]\npack_size = {text}\n")
        assert load_config_file(path) == {"pack_size": expected}, text
    for bad in ('"1KiB"', '"65MiB"', "-1", "true", '"lots"', "1.5"):
        path.write_text(f"[tuning]\npack_size = {bad}\n")
        with pytest.raises(UserError, match="pack_size") as info:
            load_config_file(path)
        assert info.value.exit_code == 2
