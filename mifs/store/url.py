"""Parsing store URLs (a path, file:///path, s3://bucket/prefix) and opening the backend.

Must not touch keys or the archive format: it only turns a URL into an ObjectStore.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from mifs.errors import UserError
from mifs.store.base import ObjectStore
from mifs.store.localdir import LocalDirStore

EXIT_BAD_STORE_URL = 2


@dataclass(frozen=True)
class StoreOptions:
    """How to reach an S3 store; ignored by the local store. None = boto3's default chain."""

    endpoint_url: str | None = None
    region: str | None = None
    addressing_style: str = "auto"
    ca_bundle: Path | None = None
    profile: str | None = None


@dataclass(frozen=True)
class StoreLocation:
    scheme: str
    path: Path | None = None
    bucket: str = ""
    prefix: str = ""

    def __str__(self) -> str:
        if self.scheme == "file":
            return str(self.path)
        return f"s3://{self.bucket}/{self.prefix}"


def parse_store_url(url: str) -> StoreLocation:
    if not url:
        raise UserError("store URL is empty", EXIT_BAD_STORE_URL)
    if "://" not in url:
        return StoreLocation("file", path=Path(url).absolute())
    parts = urlsplit(url)
    if parts.query or parts.fragment:
        raise UserError("store URLs take no ?query or #fragment", EXIT_BAD_STORE_URL)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise UserError(f"file URLs must be file:///absolute/path, got host {parts.netloc!r}", EXIT_BAD_STORE_URL)
        if not parts.path:
            raise UserError("file URLs must name a directory: file:///absolute/path", EXIT_BAD_STORE_URL)
        return StoreLocation("file", path=Path(unquote(parts.path)).absolute())
    if parts.scheme == "s3":
        if not parts.netloc:
            raise UserError("s3 URLs must name a bucket: s3://bucket/prefix", EXIT_BAD_STORE_URL)
        return StoreLocation("s3", bucket=parts.netloc, prefix=parts.path.strip("/"))
    raise UserError(f"unknown store URL scheme {parts.scheme!r} (use a path, file:///path or s3://bucket/prefix)", EXIT_BAD_STORE_URL)


def open_store(location: StoreLocation, *, create: bool = False, options: StoreOptions | None = None) -> ObjectStore:
    if location.scheme == "file":
        assert location.path is not None
        return LocalDirStore(location.path, create=create)
    raise UserError("s3:// stores are not supported by this version of mifs yet", EXIT_BAD_STORE_URL)
