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
from mifs.store.retry import RetryingStore

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


RETRY_DEADLINE = 60.0
"""Seconds a store operation keeps retrying transient failures before it reports them."""


async def open_store(
    location: StoreLocation, *, create: bool = False, options: StoreOptions | None = None, create_bucket: bool = False
) -> ObjectStore:
    """The backend for a location, checked for access and wrapped in the retry policy.

    create: a local store directory may be created. create_bucket: an S3 bucket may be.
    """
    inner: ObjectStore
    if location.scheme == "file":
        assert location.path is not None
        inner = LocalDirStore(location.path, create=create)
    else:
        from mifs.store import s3  # boto3 is slow to import: only when needed

        opts = options or StoreOptions()
        try:
            backend = s3.from_location(
                location,
                s3.S3Options(
                    endpoint_url=opts.endpoint_url, region=opts.region, addressing_style=opts.addressing_style,
                    ca_bundle=opts.ca_bundle, profile=opts.profile,
                ),
            )
        except ValueError as exc:
            raise UserError(f"invalid S3 settings: {exc}", EXIT_BAD_STORE_URL) from None
        retrying = RetryingStore(backend, max_attempts=None, deadline=RETRY_DEADLINE, base_delay=0.2, max_delay=10.0)
        if create_bucket:
            await retrying.call("create bucket", backend.create_bucket)
        await retrying.call("access check", backend.check_access)
        return retrying
    return RetryingStore(inner, max_attempts=None, deadline=RETRY_DEADLINE, base_delay=0.2, max_delay=10.0)
