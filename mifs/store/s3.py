"""The S3 backend: sealed objects in a bucket (AWS S3, SeaweedFS, MinIO, ...) through one boto3 client.

Must not see plaintext, keys or names, and must not retry: a transient failure is raised as
StoreUnavailable for the retry wrapper (mifs.store.retry). boto3 is imported here and nowhere else.

Concurrency: every boto3 call runs in a worker thread (``trio.to_thread.run_sync``) under one
CapacityLimiter; the single boto3 client is shared by those threads (botocore clients are
thread-safe) and its connection pool is as large as the limiter. GETs and single-part PUTs
are signed here and go out over pooled http.client connections (mifs.store.s3_direct, see
_direct_get_sync and _direct_put_sync), unless a proxy is configured; multipart and
conditional PUTs, deletes and listings use boto3. Cancelling an operation waits
for the request in flight, which the connect/read timeouts bound; a multipart upload also
stops between parts and is aborted, so cancellation leaves either the old object or the new one.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from os import PathLike
from typing import Any, Protocol, TypeVar
import http.client
import ssl
from urllib.parse import urlsplit, urlunsplit

import boto3
import botocore.exceptions as bce
import trio
from botocore.config import Config
from botocore.httpsession import get_cert_path

from mifs.errors import MifsError, ObjectNotFound, StorePermissionDenied, StoreUnavailable
from mifs.store.base import check_key, check_range
from mifs.store.s3_direct import ConnectFailed, Credentials, DirectClient, Reply
from mifs.store.s3_errors import error_code, translate
from mifs.types import ObjectKey

log = logging.getLogger(__name__)

MiB = 1024 * 1024
MIN_PART_SIZE = 5 * MiB
"""S3's minimum size of every part of a multipart upload except the last."""

ADDRESSING_STYLES = ("auto", "path", "virtual")
DEFAULT_REGION = "us-east-1"

_T = TypeVar("_T")

_RANGE_STATUSES = frozenset({200, 206, 416})
"""What a ranged GET may answer: the whole object (a server that ignores Range), the range,
or Range Not Satisfiable (the range starts past the end)."""
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(?:\d+|\*)")


@dataclass(frozen=True)
class S3Options:
    """How to reach the bucket. Everything left None comes from the standard AWS chain
    (environment, shared config/credentials files, instance role)."""

    endpoint_url: str | None = None
    """None: AWS, or the AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 environment variable."""
    region: str | None = None
    """None: AWS_REGION / AWS_DEFAULT_REGION / the profile's region, else us-east-1."""
    addressing_style: str = "auto"
    """auto | path | virtual (botocore's s3 addressing_style)."""
    profile: str | None = None
    """A profile of ~/.aws/config and ~/.aws/credentials."""
    ca_bundle: str | PathLike[str] | None = None
    """A PEM file of CAs to verify the endpoint's TLS certificate with (verification is always on)."""
    access_key: str | None = None
    """Explicit credentials (tests, embedding); the CLI leaves them to the chain."""
    secret_key: str | None = field(default=None, repr=False)
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    max_threads: int = 16
    """Concurrent requests: worker threads and pooled connections."""
    multipart_threshold: int = 16 * MiB
    """Bodies larger than this go up as multipart uploads."""
    part_size: int = 8 * MiB
    conditional_put: bool = True
    """put_if_absent sends If-None-Match: * (atomic). False: HEAD then PUT, which races."""
    list_page_size: int = 1000
    """Keys per ListObjectsV2 request (1000 is S3's maximum)."""

    def __post_init__(self) -> None:
        if self.addressing_style not in ADDRESSING_STYLES:
            raise ValueError(f"addressing style must be one of {', '.join(ADDRESSING_STYLES)}")
        if self.part_size < MIN_PART_SIZE:
            raise ValueError("multipart part size must be at least 5 MiB")
        if self.multipart_threshold < 1 or self.max_threads < 1 or not 1 <= self.list_page_size <= 1000:
            raise ValueError("multipart threshold and thread count must be positive, list page size 1..1000")
        if self.connect_timeout <= 0 or self.read_timeout <= 0:
            raise ValueError("timeouts must be positive")
        if (self.access_key is None) != (self.secret_key is None):
            raise ValueError("give both an access key and a secret key, or neither")


_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


class BucketLocation(Protocol):
    """What from_location needs of mifs.store.url.StoreLocation (no import: no cycle)."""

    @property
    def scheme(self) -> str: ...

    @property
    def bucket(self) -> str: ...

    @property
    def prefix(self) -> str: ...


def from_location(location: BucketLocation, options: S3Options | None = None) -> S3Store:
    """The store for ``s3://bucket/prefix``; blocks briefly to build the boto3 client."""
    if location.scheme != "s3" or not location.bucket:
        raise ValueError("not an s3://bucket location")
    return S3Store(location.bucket, location.prefix, options or S3Options())


def _redact_url(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


class S3Store:
    """Object ``key`` is ``PREFIX/key`` in the bucket (just ``key`` without a prefix)."""

    def __init__(self, bucket: str, prefix: str = "", options: S3Options | None = None) -> None:
        self.options = options or S3Options()
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._key_prefix = self.prefix + "/" if self.prefix else ""
        opts = self.options
        if opts.ca_bundle and not os.path.isfile(opts.ca_bundle):
            raise ValueError(f"CA bundle {os.fspath(opts.ca_bundle)} is not a file")
        try:
            session = boto3.session.Session(
                profile_name=opts.profile,
                aws_access_key_id=opts.access_key,
                aws_secret_access_key=opts.secret_key,
            )
        except bce.ProfileNotFound:
            raise StorePermissionDenied(f"AWS profile {opts.profile!r} is not configured") from None
        self.region: str = opts.region or session.region_name or DEFAULT_REGION
        config = Config(
            region_name=self.region,
            s3={"addressing_style": opts.addressing_style},
            retries={"mode": "standard", "total_max_attempts": 1},  # mifs.store.retry retries
            connect_timeout=opts.connect_timeout,
            read_timeout=opts.read_timeout,
            max_pool_connections=opts.max_threads,
            tcp_keepalive=True,
            user_agent_extra="mifs",
        )
        self._client: Any = session.client(
            "s3",
            endpoint_url=opts.endpoint_url,
            verify=os.fspath(opts.ca_bundle) if opts.ca_bundle else True,
            config=config,
        )
        self.endpoint = _redact_url(str(self._client.meta.endpoint_url))
        self._limiter = trio.CapacityLimiter(opts.max_threads)
        self._credentials: Any = session.get_credentials()
        self._direct: DirectClient | None = None
        self._direct_ready = not any(os.environ.get(v) for v in _PROXY_VARIABLES)  # botocore handles proxies

    @property
    def description(self) -> str:
        return f"s3://{self.bucket}/{self.prefix} at {self.endpoint}"

    # --- plumbing -------------------------------------------------------------------------

    def _object_name(self, key: ObjectKey) -> str:
        return self._key_prefix + check_key(key)

    def _translate(self, exc: Exception, what: str) -> MifsError:
        """The mifs error for a boto3 failure (s3_errors.translate)."""
        return translate(exc, what, bucket=self.bucket, endpoint=self.endpoint)

    def _call(self, what: str, fn: Callable[..., _T], **kwargs: Any) -> _T:
        """One boto3 request (in a worker thread), its failure translated."""
        try:
            return fn(Bucket=self.bucket, **kwargs)
        except (bce.ClientError, bce.BotoCoreError, OSError) as exc:
            if isinstance(exc, bce.ParamValidationError):
                raise
            raise self._translate(exc, what) from None

    async def _run(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    # --- put ------------------------------------------------------------------------------

    def _put_sync(self, key: ObjectKey, data: bytes) -> None:
        name = self._object_name(key)
        if len(data) > self.options.multipart_threshold:
            self._multipart_sync(key, name, data)
        elif self._direct_setup() is not None:
            self._direct_put_sync(key, data, f"put of {key}")
        else:
            self._call(f"put of {key}", self._client.put_object, Key=name, Body=data)

    def _multipart_sync(self, key: ObjectKey, name: str, data: bytes) -> None:
        what = f"multipart put of {key}"
        created = self._call(what, self._client.create_multipart_upload, Key=name)
        upload_id = str(created["UploadId"])
        try:
            parts = []
            size = self.options.part_size
            for number, offset in enumerate(range(0, len(data), size), start=1):
                trio.from_thread.check_cancelled()
                reply = self._call(
                    what,
                    self._client.upload_part,
                    Key=name,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=data[offset : offset + size],
                )
                parts.append({"ETag": reply["ETag"], "PartNumber": number})
            trio.from_thread.check_cancelled()
            self._call(
                what,
                self._client.complete_multipart_upload,
                Key=name,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )
        except BaseException:
            try:
                self._call(what, self._client.abort_multipart_upload, Key=name, UploadId=upload_id)
            except MifsError as exc:  # the bucket's lifecycle rules must clean up then
                log.warning("could not abort multipart upload of %s: %s", key, type(exc).__name__)
            raise

    async def put(self, key: ObjectKey, data: bytes) -> None:
        await self._run(self._put_sync, key, data)

    def _put_if_absent_sync(self, key: ObjectKey, data: bytes) -> bool:
        name = self._object_name(key)
        if not self.options.conditional_put:
            # Not atomic: another writer can create the key between HEAD and PUT.
            if self._exists_sync(key):
                return False
            self._call(f"put of {key}", self._client.put_object, Key=name, Body=data)
            return True
        try:
            # One PUT whatever the size (S3 takes up to 5 GiB); mifs objects are chunk-sized.
            self._client.put_object(Bucket=self.bucket, Key=name, Body=data, IfNoneMatch="*")
        except bce.ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("PreconditionFailed", "412"):
                return False
            raise self._translate(exc, f"conditional put of {key}") from None
        except (bce.BotoCoreError, OSError) as exc:
            if isinstance(exc, bce.ParamValidationError):
                raise
            raise self._translate(exc, f"conditional put of {key}") from None
        return True

    async def put_if_absent(self, key: ObjectKey, data: bytes) -> bool:
        return await self._run(self._put_if_absent_sync, key, data)

    # --- get, exists, delete, list ----------------------------------------------------------

    def _direct_get_sync(self, key: ObjectKey, what: str) -> bytes:
        """GET through a URL signed here (mifs.store.s3_direct): the request botocore would
        send, without its per-request machinery, which costs about a millisecond of Python (and
        of the GIL) per object, the largest cost of a cold study read. An error answer is
        parsed as botocore parses it and mapped by _translate, so both paths fail the same way."""
        client = self._direct
        assert client is not None
        reply = self._direct_call(what, "GetObject", lambda: client.get(self._object_name(key)))
        if reply.content_length is not None and reply.content_length != len(reply.body):
            raise StoreUnavailable(f"{what}: S3 at {self.endpoint} sent an incomplete object")
        return reply.body

    def _direct_get_range_sync(self, key: ObjectKey, offset: int, length: int, what: str) -> bytes:
        """A ranged GET through a URL signed here; the Content-Length check holds for a 206
        as for a 200 (it is the length of the body sent, whichever part of the object)."""
        client = self._direct
        assert client is not None
        reply = self._direct_call(
            what, "GetObject", lambda: client.get_range(self._object_name(key), offset, length), ok=_RANGE_STATUSES
        )
        if reply.status == 416:
            return b""
        if reply.content_length is not None and reply.content_length != len(reply.body):
            raise StoreUnavailable(f"{what}: S3 at {self.endpoint} sent an incomplete object")
        return self._range_of_reply(what, reply.status, reply.body, reply.content_range, offset, length)

    def _range_of_reply(
        self, what: str, status: int, body: bytes, content_range: str | None, offset: int, length: int
    ) -> bytes:
        """The asked bytes of a ranged GET's answer. A 200 is the whole object (the server
        ignored Range): sliced here. A 206 must say it starts at `offset` and be no longer than
        asked; anything else (a proxy serving another range) is refused as a transient fault
        here, rather than surfacing later as an authentication failure, which is final."""
        if status == 200:
            return body[offset : offset + length]
        match = _CONTENT_RANGE.fullmatch((content_range or "").strip())
        if match is None or int(match.group(1)) != offset or len(body) > length:
            raise StoreUnavailable(f"{what}: S3 at {self.endpoint} answered another byte range than asked")
        return body

    def _direct_put_sync(self, key: ObjectKey, data: bytes, what: str) -> None:
        """PUT through a URL signed here, with a signed Content-MD5 (the server refuses a
        damaged body with BadDigest, which is transient: the retry wrapper sends it again).
        Errors are mapped like botocore's, as for GETs."""
        client = self._direct
        assert client is not None
        self._direct_call(what, "PutObject", lambda: client.put(self._object_name(key), data))

    def _direct_call(
        self, what: str, operation: str, request: Callable[[], Reply], ok: frozenset[int] = frozenset({200})
    ) -> Reply:
        """One direct request; an answer whose status is not in `ok`, or a transport failure,
        becomes a mifs error."""
        try:
            reply = request()
        except ConnectFailed as exc:
            raise StoreUnavailable(f"{what}: S3 at {self.endpoint} unreachable ({exc})") from None
        except ssl.SSLCertVerificationError:
            raise StorePermissionDenied(f"TLS certificate of {self.endpoint} not trusted (CA bundle?)") from None
        except ssl.SSLError:
            raise StoreUnavailable(f"{what}: TLS failure talking to {self.endpoint}") from None
        except TimeoutError:
            raise StoreUnavailable(f"{what}: S3 at {self.endpoint} timed out") from None
        except http.client.IncompleteRead:
            raise StoreUnavailable(f"{what}: S3 at {self.endpoint} sent an incomplete object") from None
        except (http.client.HTTPException, OSError) as exc:
            raise StoreUnavailable(f"{what}: S3 at {self.endpoint} unreachable ({type(exc).__name__})") from None
        if reply.status not in ok:
            code, message = error_code(reply.body)
            if not code and reply.status in (301, 307):
                code = str(reply.status)
            response: Any = {
                "Error": {"Code": code or str(reply.status), "Message": message},
                "ResponseMetadata": {"HTTPStatusCode": reply.status},
            }
            raise self._translate(bce.ClientError(response, operation), what)
        return reply

    def _direct_setup(self) -> DirectClient | None:
        """The direct client, made on first use: its URL base (endpoint, addressing style,
        bucket) is taken from a URL the boto3 client presigns once, so both paths address the
        bucket alike. None when boto3 must do the GETs (a proxy, or credentials it can't share)."""
        if self._direct is not None or not self._direct_ready:
            return self._direct
        probe = "mifs-url-probe"
        try:
            url = self._client.generate_presigned_url("get_object", Params={"Bucket": self.bucket, "Key": probe}, ExpiresIn=300)
        except (bce.BotoCoreError, bce.ClientError) as exc:
            raise self._translate(exc, "signing a GET") from None
        head = str(url).split("?", 1)[0]
        if self._credentials is None or not head.endswith("/" + probe):
            self._direct_ready = False
            return None
        opts = self.options
        ca = os.fspath(opts.ca_bundle) if opts.ca_bundle else os.environ.get("AWS_CA_BUNDLE") or get_cert_path(True)
        credentials = self._credentials

        def current_credentials() -> Credentials:
            frozen = credentials.get_frozen_credentials()  # refreshes temporary credentials
            return Credentials(frozen.access_key, frozen.secret_key, frozen.token)

        self._direct = DirectClient(
            head[: -len(probe)], self.region, current_credentials, ca_file=ca,
            connect_timeout=opts.connect_timeout, read_timeout=opts.read_timeout, max_idle=opts.max_threads,
        )
        return self._direct

    def _get_sync(self, key: ObjectKey) -> bytes:
        what = f"get of {key}"
        if self._direct_setup() is not None:
            return self._direct_get_sync(key, what)
        reply = self._call(what, self._client.get_object, Key=self._object_name(key))
        return self._read_body(reply, what)

    def _read_body(self, reply: Any, what: str) -> bytes:
        """The body of a boto3 get_object reply, read and closed."""
        body = reply["Body"]
        try:
            data = body.read()  # botocore checks the length against Content-Length
        except (bce.BotoCoreError, OSError) as exc:
            raise self._translate(exc, what) from None
        finally:
            body.close()
        return bytes(data)

    async def get(self, key: ObjectKey) -> bytes:
        return await self._run(self._get_sync, key)

    async def get_then(self, key: ObjectKey, then: Callable[[bytes], _T]) -> _T:
        return await self._run(lambda: then(self._get_sync(key)))

    def _get_range_sync(self, key: ObjectKey, offset: int, length: int) -> bytes:
        what = f"ranged get of {key}"
        if self._direct_setup() is not None:
            return self._direct_get_range_sync(key, offset, length, what)
        name = self._object_name(key)
        try:
            reply = self._client.get_object(Bucket=self.bucket, Key=name, Range=f"bytes={offset}-{offset + length - 1}")
        except bce.ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code", "")) in ("InvalidRange", "416"):
                return b""  # the range starts past the end of the object
            raise self._translate(exc, what) from None
        except (bce.BotoCoreError, OSError) as exc:
            if isinstance(exc, bce.ParamValidationError):
                raise
            raise self._translate(exc, what) from None
        status = int(reply.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        return self._range_of_reply(what, status, self._read_body(reply, what), reply.get("ContentRange"), offset, length)

    async def get_range_then(self, key: ObjectKey, offset: int, length: int, then: Callable[[bytes], _T]) -> _T:
        check_range(offset, length)
        return await self._run(lambda: then(self._get_range_sync(key, offset, length)))

    def _exists_sync(self, key: ObjectKey) -> bool:
        # A HEAD of a key in a missing bucket is a plain 404 too: check_access() tells them apart.
        try:
            self._call(f"exists of {key}", self._client.head_object, Key=self._object_name(key))
        except ObjectNotFound:
            return False
        return True

    async def exists(self, key: ObjectKey) -> bool:
        return await self._run(self._exists_sync, key)

    def _delete_sync(self, key: ObjectKey) -> None:
        try:
            self._call(f"delete of {key}", self._client.delete_object, Key=self._object_name(key))
        except ObjectNotFound:
            pass

    async def delete(self, key: ObjectKey) -> None:
        await self._run(self._delete_sync, key)

    def _versions_sync(self, prefix: str) -> list[tuple[str, str]] | None:
        """(object name, version id) of every version and delete marker under prefix; None
        when the server does not implement ListObjectVersions (then it keeps no versions)."""
        found: list[tuple[str, str]] = []
        paginator = self._client.get_paginator("list_object_versions")
        try:
            pages = paginator.paginate(
                Bucket=self.bucket, Prefix=self._key_prefix + prefix,
                PaginationConfig={"PageSize": self.options.list_page_size},
            )
            for page in pages:
                for entry in (*page.get("Versions", ()), *page.get("DeleteMarkers", ())):
                    found.append((str(entry["Key"]), str(entry.get("VersionId") or "null")))
        except bce.ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code", "")) in ("NotImplemented", "MethodNotAllowed"):
                return None
            raise self._translate(exc, f"list of versions of {prefix or '(all)'}") from None
        except (bce.BotoCoreError, OSError) as exc:
            raise self._translate(exc, f"list of versions of {prefix or '(all)'}") from None
        return found

    def _purge_sync(self, key: ObjectKey) -> None:
        name = self._object_name(key)
        versions = self._versions_sync(key)
        if versions is None:
            self._delete_sync(key)  # the server keeps no versions
            return
        # No plain delete afterwards: in a versioned bucket it would add a delete marker.
        for entry_name, version in versions:
            if entry_name != name:
                continue  # a longer key that starts with this one
            try:
                self._call(f"purge of {key}", self._client.delete_object, Key=name, VersionId=version)
            except ObjectNotFound:
                pass

    async def purge(self, key: ObjectKey) -> None:
        await self._run(self._purge_sync, key)

    def _list_all_sync(self, prefix: str) -> list[ObjectKey]:
        versions = self._versions_sync(prefix)
        if versions is None:
            return self._list_sync(prefix)
        keys: set[ObjectKey] = set()
        strip = len(self._key_prefix)
        for name, _ in versions:
            try:
                keys.add(check_key(name[strip:]))
            except ValueError:
                continue
        return sorted(keys)

    async def list_all(self, prefix: str) -> list[ObjectKey]:
        return await self._run(self._list_all_sync, prefix)

    def _list_sync(self, prefix: str) -> list[ObjectKey]:
        keys: list[ObjectKey] = []
        strip = len(self._key_prefix)
        paginator = self._client.get_paginator("list_objects_v2")
        try:
            pages = paginator.paginate(
                Bucket=self.bucket,
                Prefix=self._key_prefix + prefix,
                PaginationConfig={"PageSize": self.options.list_page_size},
            )
            for page in pages:
                for entry in page.get("Contents", ()):
                    name = str(entry["Key"])[strip:]
                    try:
                        keys.append(check_key(name))
                    except ValueError:
                        continue  # not ours: a folder marker or another tool's object
        except (bce.ClientError, bce.BotoCoreError, OSError) as exc:
            raise self._translate(exc, f"list of {prefix or '(all)'}") from None
        return keys

    async def list(self, prefix: str) -> list[ObjectKey]:
        return await self._run(self._list_sync, prefix)

    # --- bucket ---------------------------------------------------------------------------

    def _check_access_sync(self) -> None:
        try:
            self._call("access check", self._client.head_bucket)
        except ObjectNotFound:
            raise StorePermissionDenied(f"bucket {self.bucket} does not exist") from None

    async def check_access(self) -> None:
        """HEAD the bucket: StorePermissionDenied if it is missing or refused, StoreUnavailable
        if the endpoint cannot be reached."""
        await self._run(self._check_access_sync)

    def _create_bucket_sync(self) -> bool:
        kwargs: dict[str, Any] = {}
        if self.region != DEFAULT_REGION:
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        try:
            self._client.create_bucket(Bucket=self.bucket, **kwargs)
        except bce.ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code == "BucketAlreadyOwnedByYou":
                return False
            if code == "BucketAlreadyExists":
                raise StorePermissionDenied(f"bucket name {self.bucket} is taken by another account") from None
            raise self._translate(exc, "bucket creation") from None
        except (bce.BotoCoreError, OSError) as exc:
            raise self._translate(exc, "bucket creation") from None
        return True

    async def create_bucket(self) -> bool:
        """Create the bucket (``mifs init --create-bucket``); False if we already own it."""
        return await self._run(self._create_bucket_sync)

    async def aclose(self) -> None:
        """Close the client's connection pool; the store is unusable afterwards."""
        if self._direct is not None:
            self._direct.close()
        self._client.close()
