"""Direct S3 GETs and PUTs: AWS SigV4 query signing and a small pool of keep-alive HTTP connections.

Must not see plaintext, keys or names, must not retry (mifs.store.retry does) and must not
import boto3: s3.py owns the client, gives this module the URL base and credentials, and maps
what goes wrong here to mifs errors, so that both GET paths fail the same way.

Why it exists: a cold study read is hundreds of GETs of ~0.5 MiB objects, and the per-request
Python of botocore (events, its signer) and of urllib3 cost ~1.2 ms of GIL-holding CPU per
object on the reference machine, more than decrypting the object. The signature computed here
is the same SigV4 query signature botocore's S3SigV4QueryAuth computes (tests compare them
byte for byte), and http.client is the HTTP layer urllib3 itself sits on: ~0.6 ms per object.
Uploads are the same story (a study ingest is hundreds of PUTs of ~0.5 MiB): a PUT signed here
carries a signed Content-MD5 header, so the server rejects a body damaged on the way
(BadDigest) instead of storing it, ~1.6 ms of CPU per 0.5 MiB PUT against ~3.8 ms through
boto3's put_object. Multipart and conditional PUTs stay with boto3.

Thread safety: get(), get_range() and put() run in worker threads. A connection is used by one thread at a time:
it is popped from the idle list and pushed back after a complete response (list.pop/append
are atomic under the GIL).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import http.client
import select
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import quote, urlsplit

SIGNED_URL_LIFETIME = 300
"""Seconds a signed URL stays valid; it is used at once, this only bounds clock skew."""

_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class Credentials:
    access_key: str
    secret_key: str = field(repr=False)
    token: str | None = field(default=None, repr=False)


def _uri_encode(value: str) -> str:
    """RFC 3986 unreserved characters stay, everything else is %-encoded (SigV4's rule)."""
    return quote(value, safe="-_.~")


class SigV4QuerySigner:
    """Presigns GET requests (SigV4, query parameters, UNSIGNED-PAYLOAD) for one host and region.

    The signing key depends only on the secret, the day and the region, so it is derived once
    per day instead of four HMACs per request."""

    def __init__(self, host: str, region: str, service: str = "s3") -> None:
        self.host = host
        self.region = region
        self.service = service
        self._signing_keys: dict[tuple[str, str], bytes] = {}

    def _signing_key(self, secret_key: str, date: str) -> bytes:
        cached = self._signing_keys.get((secret_key, date))
        if cached is None:
            cached = ("AWS4" + secret_key).encode("utf-8")
            for part in (date, self.region, self.service, "aws4_request"):
                cached = hmac.digest(cached, part.encode("utf-8"), "sha256")
            self._signing_keys = {(secret_key, date): cached}  # one day, one secret at a time
        return cached

    def presign_get(self, path: str, credentials: Credentials, now: datetime.datetime | None = None) -> str:
        """`path` (already URI-encoded, as sent) plus the signed query string."""
        return self.presign("GET", path, credentials, now)

    def presign_put(self, path: str, content_md5: str, credentials: Credentials, now: datetime.datetime | None = None) -> str:
        """A PUT whose Content-MD5 header (base64 of the body's MD5) is part of the signature:
        the request must send exactly that header."""
        return self.presign("PUT", path, credentials, now, {"content-md5": content_md5})

    def presign(
        self, method: str, path: str, credentials: Credentials, now: datetime.datetime | None = None,
        headers: dict[str, str] | None = None,
    ) -> str:
        """`path` plus the signed query string of a `method` request that sends `headers`
        (lower-case names, values as sent) besides Host; the payload is UNSIGNED-PAYLOAD."""
        now = now or datetime.datetime.now(datetime.timezone.utc)
        timestamp = now.strftime("%Y%m%dT%H%M%SZ")
        date = timestamp[:8]
        scope = f"{date}/{self.region}/{self.service}/aws4_request"
        query = (
            "X-Amz-Algorithm=AWS4-HMAC-SHA256"
            f"&X-Amz-Credential={_uri_encode(credentials.access_key + '/' + scope)}"
            f"&X-Amz-Date={timestamp}"
            f"&X-Amz-Expires={SIGNED_URL_LIFETIME}"
        )
        if credentials.token:
            query += f"&X-Amz-Security-Token={_uri_encode(credentials.token)}"
        signed = dict(headers or {})
        signed["host"] = self.host
        names = sorted(signed)
        signed_names = ";".join(names)
        canonical_headers = "".join(f"{name}:{' '.join(signed[name].split())}\n" for name in names)
        query += f"&X-Amz-SignedHeaders={_uri_encode(signed_names)}"
        canonical = f"{method}\n{path}\n{query}\n{canonical_headers}\n{signed_names}\nUNSIGNED-PAYLOAD"
        to_sign = f"AWS4-HMAC-SHA256\n{timestamp}\n{scope}\n" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()
        signature = hmac.new(self._signing_key(credentials.secret_key, date), to_sign.encode("utf-8"), "sha256").hexdigest()
        return f"{path}?{query}&X-Amz-Signature={signature}"


def _readable(sock: socket.socket) -> bool:
    """Whether an idle socket has something to read (poll, not select: any fd number works)."""
    poller = select.poll()
    poller.register(sock, select.POLLIN | select.POLLERR | select.POLLHUP)
    return bool(poller.poll(0))


class ConnectFailed(Exception):
    """The connection could not be made (refused, no route, name not resolved, connect timeout)."""

    def __init__(self, cause: OSError) -> None:
        super().__init__(type(cause).__name__)
        self.cause = cause


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    content_length: int | None
    content_range: str | None = None
    """The Content-Range header of a ranged GET's answer, as sent ("bytes 0-9/100")."""


class DirectClient:
    """GETs and PUTs objects under one URL base (``scheme://host[:port]/[bucket/]``, as the boto3 client
    addresses the bucket) with signed URLs over pooled http.client connections.

    Raises ConnectFailed when no connection could be made, otherwise what the socket, ssl and
    http.client layers raise (OSError, ssl.SSLError, http.client.HTTPException); the caller
    maps them."""

    def __init__(
        self,
        base_url: str,
        region: str,
        credentials: Callable[[], Credentials],
        *,
        ca_file: str | None,
        connect_timeout: float,
        read_timeout: float,
        max_idle: int,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
            raise ValueError("the S3 URL base must be an http or https URL")
        self._https = parts.scheme == "https"
        self._hostname = parts.hostname
        self._port = parts.port or _DEFAULT_PORTS[parts.scheme]
        bracketed = f"[{self._hostname}]" if ":" in self._hostname else self._hostname
        host = bracketed if self._port == _DEFAULT_PORTS[parts.scheme] else f"{bracketed}:{self._port}"
        self._path_base = parts.path if parts.path.endswith("/") else parts.path + "/"
        self._signer = SigV4QuerySigner(host, region)
        self._host_header = host
        self._credentials = credentials
        self._ssl = ssl.create_default_context(cafile=ca_file) if self._https else None
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._max_idle = max_idle
        self._idle: list[http.client.HTTPConnection] = []

    def _new_connection(self) -> http.client.HTTPConnection:
        if self._ssl is not None:
            return http.client.HTTPSConnection(self._hostname, self._port, timeout=self._connect_timeout, context=self._ssl)
        return http.client.HTTPConnection(self._hostname, self._port, timeout=self._connect_timeout)

    def _take_connection(self) -> http.client.HTTPConnection:
        """An idle kept-alive connection the server has not closed meanwhile (a readable idle
        socket means EOF or garbage: it is dropped, as urllib3 does), or a new one."""
        while True:
            try:
                conn = self._idle.pop()
            except IndexError:
                return self._new_connection()
            if conn.sock is not None and not _readable(conn.sock):
                return conn
            conn.close()

    def get(self, name: str) -> Reply:
        """One GET of object `name` (the bucket-relative object name, not yet encoded). Not
        retried here, whatever fails: the retry wrapper decides."""
        target = self._signer.presign_get(self._path_base + quote(name, safe="/~"), self._credentials())
        return self._request("GET", target, None, ())

    def get_range(self, name: str, offset: int, length: int) -> Reply:
        """One GET of bytes offset .. offset+length-1 of object `name`; not retried here. The
        Range header is not signed: query signatures cover only the headers they list, and a
        changed range yields bytes the caller's authentication refuses. The server answers
        206 with the range, 416 when offset is past the end, or 200 with the whole object if
        it ignores ranges: the caller tells them apart."""
        target = self._signer.presign_get(self._path_base + quote(name, safe="/~"), self._credentials())
        return self._request("GET", target, None, (("Range", f"bytes={offset}-{offset + length - 1}"),))

    def put(self, name: str, body: bytes | bytearray | memoryview) -> Reply:
        """One PUT of object `name` with a signed Content-MD5 of `body`; not retried here.
        The reply's body is the server's error document, if any."""
        md5 = base64.b64encode(hashlib.md5(body, usedforsecurity=False).digest()).decode("ascii")
        target = self._signer.presign_put(self._path_base + quote(name, safe="/~"), md5, self._credentials())
        return self._request("PUT", target, body, (("Content-MD5", md5),))

    def _request(
        self, method: str, target: str, body: bytes | bytearray | memoryview | None, headers: tuple[tuple[str, str], ...]
    ) -> Reply:
        conn = self._take_connection()
        try:
            reply = self._exchange(conn, target, method, body, headers)
        except BaseException:
            conn.close()
            raise
        if len(self._idle) < self._max_idle and conn.sock is not None:
            self._idle.append(conn)
        else:
            conn.close()
        return reply

    def _exchange(
        self, conn: http.client.HTTPConnection, target: str, method: str = "GET",
        body: bytes | bytearray | memoryview | None = None, headers: tuple[tuple[str, str], ...] = (),
    ) -> Reply:
        if conn.sock is None:
            try:
                conn.connect()
            except ssl.SSLError:
                raise
            except OSError as exc:
                raise ConnectFailed(exc) from None
            assert conn.sock is not None
            conn.sock.settimeout(self._read_timeout)
        conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", self._host_header)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        for name, value in headers:
            conn.putheader(name, value)
        conn.endheaders(body)
        response = conn.getresponse()
        length = response.getheader("Content-Length")
        body = response.read()  # raises IncompleteRead when the body is cut short
        if response.will_close:
            conn.close()
        content_length = int(length) if length is not None and length.isdigit() else None
        return Reply(response.status, body, content_length, response.getheader("Content-Range"))

    def close(self) -> None:
        while self._idle:
            self._idle.pop().close()
