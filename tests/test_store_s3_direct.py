"""The direct GET path's SigV4 signer against botocore's, byte for byte, and its URL handling.

The end-to-end behaviour of direct GETs (errors, TLS, timeouts, restarts) is covered against a
real SeaweedFS in test_store_s3.py; this file pins the signature itself, including the cases
SeaweedFS does not exercise (session tokens, default ports, virtual-hosted buckets)."""

from __future__ import annotations

import base64
import datetime
import hashlib
from urllib.parse import parse_qsl, quote, urlsplit

import botocore.auth
import pytest
from botocore.auth import S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials as BotoCredentials

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
