"""The direct GET path's SigV4 signer against botocore's, byte for byte, and its URL handling.

The end-to-end behaviour of direct GETs (errors, TLS, timeouts, restarts) is covered against a
real SeaweedFS in test_store_s3.py; this file pins the signature itself, including the cases
SeaweedFS does not exercise (session tokens, default ports, virtual-hosted buckets), and how a
ranged GET takes answers SeaweedFS never gives (a server that ignores Range, or answers another
range), from a small HTTP server of its own."""

from __future__ import annotations

import base64
import datetime
import hashlib
import http.server
import threading
from collections.abc import Iterator
from urllib.parse import parse_qsl, quote, urlsplit

import botocore.auth
import pytest
from botocore.auth import S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials as BotoCredentials

from mifs.errors import StoreUnavailable
from mifs.store.base import check_key
from mifs.store.s3 import S3Options, S3Store
from mifs.store.s3_direct import Credentials, DirectClient, SigV4QuerySigner

NOW = datetime.datetime(2026, 11, 29, 15, 4, 5, tzinfo=datetime.timezone.utc)


def botocore_url(base: str, name: str, region: str, creds: Credentials, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda remove_tzinfo=True: NOW.replace(tzinfo=None))
    request = AWSRequest(method="GET", url=base + quote(name, safe="/~"))
    S3SigV4QueryAuth(BotoCredentials(creds.access_key, creds.secret_key, creds.token), "s3", region, expires=300).add_auth(request)
    return str(request.url)


def our_url(base: str, name: str, region: str, creds: Credentials) -> str:
    parts = urlsplit(base)
    default = {"http": 80, "https": 443}[parts.scheme]
    host = parts.hostname if ":" not in (parts.hostname or "") else f"[{parts.hostname}]"
    if parts.port and parts.port != default:
        host = f"{host}:{parts.port}"
    signer = SigV4QuerySigner(str(host), region)
    return f"{parts.scheme}://{parts.netloc}" + signer.presign_get(parts.path + quote(name, safe="/~"), creds, NOW)


@pytest.mark.parametrize(
    "base",
    [
        "http://127.0.0.1:8333/bucket/",
        "https://s3.eu-central-1.amazonaws.com/my-bucket/",
        "https://my-bucket.s3.eu-central-1.amazonaws.com/",
        "http://[::1]:9000/b/",
    ],
)
@pytest.mark.parametrize(
    "creds",
    [
        Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"),
        Credentials("ASIA/ODD+KEY=", "s3cr3t", token="FwoGZXIvYXdzEJr//////////wEaDG+token/with=chars"),
    ],
)
@pytest.mark.parametrize("name", ["data/ab/abcdef0123456789", "pre fix/data/00/x~y_z.-1", "p%c3/ü/key"])
def test_signature_matches_botocore(base: str, creds: Credentials, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    region = "eu-central-1"
    ours = our_url(base, name, region, creds)
    theirs = botocore_url(base, name, region, creds, monkeypatch)
    assert urlsplit(ours).path == urlsplit(theirs).path
    assert sorted(parse_qsl(urlsplit(ours).query)) == sorted(parse_qsl(urlsplit(theirs).query))
    assert dict(parse_qsl(urlsplit(ours).query))["X-Amz-Signature"] == dict(parse_qsl(urlsplit(theirs).query))["X-Amz-Signature"]


def test_signing_key_follows_the_day_and_the_secret() -> None:
    signer = SigV4QuerySigner("h", "us-east-1")
    a = signer.presign_get("/b/k", Credentials("A", "one"), NOW)
    b = signer.presign_get("/b/k", Credentials("A", "two"), NOW)
    c = signer.presign_get("/b/k", Credentials("A", "one"), NOW + datetime.timedelta(days=1))
    d = signer.presign_get("/b/k", Credentials("A", "one"), NOW)
    sig = lambda url: dict(parse_qsl(url.split("?", 1)[1]))["X-Amz-Signature"]  # noqa: E731
    assert len({sig(a), sig(b), sig(c)}) == 3
    assert sig(a) == sig(d)


@pytest.mark.parametrize("base", ["ftp://host/b/", "http:///b/", "bucket/"])
def test_url_base_must_be_http(base: str) -> None:
    with pytest.raises(ValueError, match="http or https"):
        DirectClient(base, "us-east-1", lambda: Credentials("a", "b"), ca_file=None, connect_timeout=1, read_timeout=1, max_idle=1)


def test_credentials_repr_hides_the_secret_and_token() -> None:
    text = repr(Credentials("AKID", "very-secret", token="session-token"))
    assert "AKID" in text and "very-secret" not in text and "session-token" not in text


@pytest.mark.parametrize(
    "base", ["http://127.0.0.1:8333/bucket/", "https://my-bucket.s3.eu-central-1.amazonaws.com/"]
)
@pytest.mark.parametrize(
    "creds",
    [
        Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"),
        Credentials("ASIA/ODD+KEY=", "s3cr3t", token="FwoGZXIvYXdzEJr//////////wEaDG+token/with=chars"),
    ],
)
def test_put_signature_with_content_md5_matches_botocore(base: str, creds: Credentials, monkeypatch: pytest.MonkeyPatch) -> None:
    """A direct PUT signs its Content-MD5 header exactly as botocore's S3SigV4QueryAuth does."""
    body = bytes(range(256)) * 100
    md5 = base64.b64encode(hashlib.md5(body).digest()).decode()
    name = "pre/data/ab/abcdef0123456789"
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda remove_tzinfo=True: NOW.replace(tzinfo=None))
    request = AWSRequest(method="PUT", url=base + quote(name, safe="/~"), headers={"Content-MD5": md5})
    S3SigV4QueryAuth(BotoCredentials(creds.access_key, creds.secret_key, creds.token), "s3", "eu-central-1", expires=300).add_auth(request)
    theirs = dict(parse_qsl(urlsplit(str(request.url)).query))
    parts = urlsplit(base)
    host = parts.netloc if parts.port not in (None, 443) else str(parts.hostname)
    ours_target = SigV4QuerySigner(host, "eu-central-1").presign_put(parts.path + quote(name, safe="/~"), md5, creds, NOW)
    ours = dict(parse_qsl(ours_target.split("?", 1)[1]))
    assert ours["X-Amz-SignedHeaders"] == theirs["X-Amz-SignedHeaders"] == "content-md5;host"
    assert ours == theirs
    # Another body's MD5 gives another signature: the server checks the body against it.
    other = SigV4QuerySigner(host, "eu-central-1").presign_put(
        parts.path + quote(name, safe="/~"), base64.b64encode(hashlib.md5(b"x").digest()).decode(), creds, NOW
    )
    assert dict(parse_qsl(other.split("?", 1)[1]))["X-Amz-Signature"] != ours["X-Amz-Signature"]


# --- ranged GETs against servers SeaweedFS does not imitate ------------------------------------

RANGE_OBJECT = bytes(range(256)) * 40


class _RangeServer(http.server.ThreadingHTTPServer):
    """Answers every GET with RANGE_OBJECT as `mode` says, and keeps the requests' heads."""

    mode = "ignore"
    requests: list[tuple[str, str | None]]


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _RangeServer

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.server.requests.append((self.path, self.headers.get("Range")))
        if self.server.mode == "ignore":  # a server without Range support: the whole object
            status, body, extra = 200, RANGE_OBJECT, {}
        else:  # "shifted": a 206 of another range than asked
            body = RANGE_OBJECT[1:11]
            status, extra = 206, {"Content-Range": f"bytes 1-10/{len(RANGE_OBJECT)}"}
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        for name, value in extra.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - http.server's name
        pass


@pytest.fixture
def range_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[_RangeServer]:
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)  # with a proxy, S3Store would GET through boto3
    server = _RangeServer(("127.0.0.1", 0), _RangeHandler)
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _store_on(server: _RangeServer) -> S3Store:
    options = S3Options(
        endpoint_url=f"http://127.0.0.1:{server.server_address[1]}", region="us-east-1", access_key="AKID", secret_key="secret",
        addressing_style="path",
    )
    return S3Store("bucket", "pre", options)


async def test_ranged_get_sends_an_unsigned_range_header_and_slices_a_whole_object(range_server: _RangeServer) -> None:
    store = _store_on(range_server)
    key = check_key("data/ab/pack")
    assert await store.get_range_then(key, 1000, 300, bytes) == RANGE_OBJECT[1000:1300]
    assert await store.get_range_then(key, len(RANGE_OBJECT) - 5, 300, bytes) == RANGE_OBJECT[-5:]
    assert await store.get_range_then(key, len(RANGE_OBJECT) + 5, 300, bytes) == b""
    size = len(RANGE_OBJECT)
    assert [sent for _, sent in range_server.requests] == [
        "bytes=1000-1299", f"bytes={size - 5}-{size + 294}", f"bytes={size + 5}-{size + 304}"
    ]
    path = urlsplit(range_server.requests[0][0])
    assert path.path == "/bucket/pre/data/ab/pack"
    assert dict(parse_qsl(path.query))["X-Amz-SignedHeaders"] == "host"
    await store.aclose()


async def test_ranged_get_refuses_another_range_than_asked(range_server: _RangeServer) -> None:
    """A 206 for bytes the caller did not ask for is a transient fault of the server (or a proxy),
    not bytes to hand on: authenticating them would fail, and that failure is final."""
    range_server.mode = "shifted"
    store = _store_on(range_server)
    with pytest.raises(StoreUnavailable, match="another byte range"):
        await store.get_range_then(check_key("data/ab/pack"), 0, 10, bytes)
    await store.aclose()
