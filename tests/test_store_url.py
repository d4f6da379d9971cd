"""Tests for mifs.store.url: turning STORE arguments into locations and opening backends."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from mifs.errors import StoreNotFound, UserError
from mifs.store.localdir import LocalDirStore
from mifs.store.retry import RetryingStore
from mifs.store.url import StoreLocation, StoreOptions, open_store, parse_store_url

EXIT_USAGE = 2


def _assert_usage_error(info: pytest.ExceptionInfo[UserError]) -> None:
    assert info.value.exit_code == EXIT_USAGE
    assert str(info.value)
    assert "\n" not in str(info.value)


# --- parse_store_url ----------------------------------------------------------------------------


def test_absolute_path() -> None:
    loc = parse_store_url("/srv/mifs/store")
    assert loc == StoreLocation("file", path=Path("/srv/mifs/store"))
    assert str(loc) == "/srv/mifs/store"


def test_relative_path_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    loc = parse_store_url("store")
    assert loc.scheme == "file"
    assert loc.path == tmp_path / "store"
    assert loc.path is not None and loc.path.is_absolute()


@pytest.mark.parametrize(
    "url, expected",
    [
        ("file:///srv/mifs/store", "/srv/mifs/store"),
        ("file://localhost/srv/mifs/store", "/srv/mifs/store"),
        ("file:///srv/mifs/a%20b", "/srv/mifs/a b"),
        ("file:///", "/"),
    ],
)
def test_file_url(url: str, expected: str) -> None:
    loc = parse_store_url(url)
    assert loc.scheme == "file"
    assert loc.path == Path(expected)
    assert str(loc) == expected


def test_file_url_with_host_is_refused() -> None:
    with pytest.raises(UserError) as info:
        parse_store_url("file://fileserver/srv/store")
    _assert_usage_error(info)


@pytest.mark.parametrize("url", ["file://", "file://localhost"])
def test_file_url_without_path_is_refused(url: str) -> None:
    with pytest.raises(UserError) as info:
        parse_store_url(url)
    _assert_usage_error(info)


@pytest.mark.parametrize(
    "url, bucket, prefix",
    [
        ("s3://bucket/some/prefix", "bucket", "some/prefix"),
        ("s3://bucket/some/prefix/", "bucket", "some/prefix"),
        ("s3://bucket", "bucket", ""),
        ("s3://bucket/", "bucket", ""),
    ],
)
def test_s3_url_parses(url: str, bucket: str, prefix: str) -> None:
    loc = parse_store_url(url)
    assert loc == StoreLocation("s3", bucket=bucket, prefix=prefix)
    assert str(loc) == f"s3://{bucket}/{prefix}"


def test_s3_url_without_bucket() -> None:
    with pytest.raises(UserError) as info:
        parse_store_url("s3:///prefix")
    _assert_usage_error(info)


@pytest.mark.parametrize("url", ["ftp://host/path", "http://host/path", "https://host/bucket", "gs://bucket/x", "sftp://h/p"])
def test_unknown_scheme(url: str) -> None:
    with pytest.raises(UserError) as info:
        parse_store_url(url)
    _assert_usage_error(info)


def test_empty_url() -> None:
    with pytest.raises(UserError) as info:
        parse_store_url("")
    _assert_usage_error(info)


# --- open_store ---------------------------------------------------------------------------------


async def test_open_existing_directory(tmp_path: Path) -> None:
    store = await open_store(parse_store_url(str(tmp_path)))
    assert isinstance(store, RetryingStore)
    assert isinstance(store.inner, LocalDirStore)
    assert store.inner.root == tmp_path


async def test_open_file_url(tmp_path: Path) -> None:
    store = await open_store(parse_store_url(f"file://{tmp_path}"))
    assert isinstance(store, RetryingStore)
    assert isinstance(store.inner, LocalDirStore)
    assert store.inner.root == tmp_path


async def test_open_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(StoreNotFound):
        await open_store(parse_store_url(str(tmp_path / "missing")))
    assert not (tmp_path / "missing").exists()


async def test_open_create(tmp_path: Path) -> None:
    store = await open_store(parse_store_url(str(tmp_path / "new")), create=True)
    assert isinstance(store, RetryingStore)
    assert (tmp_path / "new").is_dir()
    assert stat.S_IMODE(os.stat(tmp_path / "new").st_mode) == 0o700


async def test_open_create_without_parent(tmp_path: Path) -> None:
    with pytest.raises(StoreNotFound):
        await open_store(parse_store_url(str(tmp_path / "a" / "b")), create=True)


async def test_open_s3_with_bad_settings_is_a_usage_error() -> None:
    with pytest.raises(UserError) as info:
        await open_store(parse_store_url("s3://bucket/prefix"), options=StoreOptions(addressing_style="sideways"))
    _assert_usage_error(info)
