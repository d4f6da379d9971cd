"""Tests for mifs.store.s3.S3Store against a real SeaweedFS S3 gateway (tests/s3server.py).

The ObjectStore conformance suite runs on S3 through BACKENDS in test_store_localdir.py; this
file covers what is specific to S3: key prefixes, multipart uploads, conditional puts, the
mapping of S3 failures to mifs errors, and outages of the server (stopped and restarted).
No mocks: errors come from the real server, a stopped server, or tests/faultproxy.py.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest
import trio

from faultproxy import FaultPlan, FaultProxy
from mifs.errors import MifsError, ObjectNotFound, StorePermissionDenied, StoreUnavailable
from mifs.store.base import check_key
from mifs.store.retry import RetryingStore
from mifs.store.s3 import MiB, S3Options, S3Store, from_location
from mifs.store.url import parse_store_url
from s3server import SeaweedS3

K = check_key("data/ab/00112233445566778899aabbccddeeff")


def options(server: SeaweedS3, **overrides: object) -> S3Options:
    fields: dict[str, object] = {
        "endpoint_url": server.endpoint_url,
        "region": server.region,
        "access_key": server.access_key,
        "secret_key": server.secret_key,
        "addressing_style": "path",
    }
    fields.update(overrides)
    return S3Options(**fields)  # type: ignore[arg-type]


@pytest.fixture
def bucket(s3_server: SeaweedS3) -> str:
    """A bucket of this test module, shared; tests use their own prefixes in it."""
    return s3_server.session_bucket("s3-tests")


@pytest.fixture
async def store(s3_server: SeaweedS3, bucket: str) -> AsyncIterator[S3Store]:
    s = S3Store(bucket, s3_server.unique_prefix(), options(s3_server))
    yield s
    await s.aclose()


def raw_keys(server: SeaweedS3, bucket: str, prefix: str = "") -> set[str]:
    reply = server.client().list_objects_v2(Bucket=bucket, Prefix=prefix)
    return {entry["Key"] for entry in reply.get("Contents", [])}


# --- layout and prefixes ------------------------------------------------------------------------


async def test_objects_live_under_the_prefix(s3_server: SeaweedS3, bucket: str) -> None:
    prefix = s3_server.unique_prefix() + "/archives/one"
    store = S3Store(bucket, "/" + prefix + "/", options(s3_server))  # slashes are trimmed
    await store.put(K, b"sealed")
    await store.put(check_key("mifs-archive.json"), b"{}")
    assert raw_keys(s3_server, bucket, prefix) == {f"{prefix}/{K}", f"{prefix}/mifs-archive.json"}
    assert s3_server.client().get_object(Bucket=bucket, Key=f"{prefix}/{K}")["Body"].read() == b"sealed"
    assert store.description == f"s3://{bucket}/{prefix} at {s3_server.endpoint_url}"
    await store.aclose()


async def test_prefix_isolation(s3_server: SeaweedS3, bucket: str) -> None:
    base = s3_server.unique_prefix()
    one = S3Store(bucket, f"{base}/one", options(s3_server))
    sibling = S3Store(bucket, f"{base}/one-more", options(s3_server))  # a string prefix of the other
    await one.put(K, b"from one")
    await sibling.put(K, b"from sibling")
    await sibling.put(check_key("data/zz/only-sibling"), b"x")
    assert await one.get(K) == b"from one"
    assert await sibling.get(K) == b"from sibling"
    assert await one.list("") == [K]
    assert sorted(await sibling.list("")) == sorted([K, check_key("data/zz/only-sibling")])
    assert await one.exists(check_key("data/zz/only-sibling")) is False
    await one.delete(K)
    assert await sibling.get(K) == b"from sibling"
    assert await one.put_if_absent(K, b"new in one") is True
    await one.aclose()
    await sibling.aclose()


async def test_store_without_prefix_uses_bare_keys(s3_server: SeaweedS3) -> None:
    bucket = s3_server.new_bucket("bare")
    store = S3Store(bucket, "", options(s3_server))
    await store.put(K, b"x")
    assert raw_keys(s3_server, bucket) == {K}
    assert await store.list("") == [K]
    assert store.description == f"s3://{bucket}/ at {s3_server.endpoint_url}"
    await store.aclose()


async def test_list_skips_objects_mifs_cannot_have_written(s3_server: SeaweedS3, store: S3Store) -> None:
    client = s3_server.client()
    client.put_object(Bucket=store.bucket, Key=f"{store.prefix}/", Body=b"")  # a console's folder marker
    client.put_object(Bucket=store.bucket, Key=f"{store.prefix}/Notes From Someone.txt", Body=b"hi")
    client.put_object(Bucket=store.bucket, Key=f"{store.prefix}/data/ab/UPPER", Body=b"hi")
    await store.put(K, b"ours")
    assert await store.list("") == [K]


async def test_list_paginates(s3_server: SeaweedS3, bucket: str) -> None:
    store = S3Store(bucket, s3_server.unique_prefix(), options(s3_server, list_page_size=7))
    keys = {check_key(f"data/{i % 3:02x}/{i:04d}") for i in range(23)}
    async with trio.open_nursery() as nursery:
        for key in keys:
            nursery.start_soon(store.put, key, b"x")
    listed = await store.list("data/")
    assert len(listed) == 23 and set(listed) == keys
    assert set(await store.list("data/01/")) == {k for k in keys if k.startswith("data/01/")}
    await store.aclose()


def test_from_location_uses_bucket_and_prefix(s3_server: SeaweedS3) -> None:
    location = parse_store_url("s3://some-bucket/archives/2024")
    store = from_location(location, options(s3_server))
    assert (store.bucket, store.prefix) == ("some-bucket", "archives/2024")
    with pytest.raises(ValueError):
        from_location(parse_store_url("/tmp/x"), options(s3_server))


def test_options_are_checked_and_hide_the_secret(s3_server: SeaweedS3) -> None:
    with pytest.raises(ValueError):
        S3Options(addressing_style="sideways")
    with pytest.raises(ValueError):
        S3Options(part_size=4 * MiB)
    with pytest.raises(ValueError):
        S3Options(access_key="only-half")
    opts = options(s3_server)
    assert s3_server.secret_key not in repr(opts)
    store = S3Store("b", "p", opts)
    assert s3_server.secret_key not in store.description
    assert store.region == s3_server.region


def test_region_defaults_to_the_chain_then_us_east_1(monkeypatch: pytest.MonkeyPatch, s3_server: SeaweedS3) -> None:
    # The standard AWS environment variable is an input of boto3 (not our code): set it.
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-central-1")
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    assert S3Store("b", "", options(s3_server, region=None)).region == "eu-central-1"
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    assert S3Store("b", "", options(s3_server, region=None)).region == "us-east-1"


async def test_endpoint_from_the_standard_environment_variable(
    monkeypatch: pytest.MonkeyPatch, s3_server: SeaweedS3, bucket: str
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    store = S3Store(bucket, s3_server.unique_prefix(), options(s3_server, endpoint_url=None))
    assert store.endpoint == s3_server.endpoint_url
    await store.put(K, b"via env")
    assert await store.get(K) == b"via env"
    await store.aclose()


# --- TLS --------------------------------------------------------------------------------------


async def test_tls_is_verified_by_default(s3_server: SeaweedS3, bucket: str) -> None:
    store = S3Store(bucket, s3_server.unique_prefix(), options(s3_server, endpoint_url=s3_server.https_endpoint_url))
    retrying = RetryingStore(store, max_attempts=3, base_delay=0)
    with pytest.raises(StorePermissionDenied, match="not trusted"):
        await retrying.put(K, b"x")  # an untrusted certificate is final, not retried
    assert retrying.statistics().attempts == 1
    with pytest.raises(StorePermissionDenied, match="not trusted"):
        await store.check_access()
    await store.aclose()


async def test_tls_with_ca_bundle(s3_server: SeaweedS3, bucket: str) -> None:
    prefix = s3_server.unique_prefix()
    store = S3Store(bucket, prefix, options(s3_server, endpoint_url=s3_server.https_endpoint_url, ca_bundle=s3_server.ca_bundle))
    assert store.endpoint.startswith("https://")
    await store.check_access()
    await store.put(K, b"over TLS")
    assert await store.get(K) == b"over TLS"
    assert s3_server.client().get_object(Bucket=bucket, Key=f"{prefix}/{K}")["Body"].read() == b"over TLS"
    await store.aclose()


def test_ca_bundle_must_be_a_file(s3_server: SeaweedS3, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="CA bundle"):
        S3Store("b", "", options(s3_server, ca_bundle=tmp_path / "missing.pem"))


# --- multipart ----------------------------------------------------------------------------------


async def test_multipart_upload_above_threshold(s3_server: SeaweedS3, bucket: str) -> None:
    store = S3Store(bucket, s3_server.unique_prefix(), options(s3_server, multipart_threshold=5 * MiB, part_size=5 * MiB))
    data = os.urandom(12 * MiB + 3)  # parts of 5 MiB, 5 MiB, 2 MiB + 3 bytes
    await store.put(K, data)
    assert await store.get(K) == data
    head = s3_server.client().head_object(Bucket=bucket, Key=f"{store.prefix}/{K}")
    assert head["ETag"].strip('"').endswith("-3")  # S3's multipart ETag: md5 of md5s, dash, parts
    assert head["ContentLength"] == len(data)
    exactly = os.urandom(5 * MiB)  # at the threshold: a single PUT
    await store.put(check_key("data/00/exact"), exactly)
    head = s3_server.client().head_object(Bucket=bucket, Key=f"{store.prefix}/data/00/exact")
    assert "-" not in head["ETag"]
    assert await store.get(check_key("data/00/exact")) == exactly
    await store.aclose()


async def test_failed_multipart_upload_is_aborted(s3_server: SeaweedS3, bucket: str) -> None:
    with FaultProxy(s3_server.endpoint_url) as proxy:
        prefix = s3_server.unique_prefix()
        store = S3Store(
            bucket, prefix, options(s3_server, endpoint_url=proxy.endpoint_url, multipart_threshold=5 * MiB, part_size=5 * MiB)
        )
        await store.put(K, b"previous version")
        proxy.set_plan(FaultPlan(slowdown_503=1.0, query_contains="partNumber=2", max_consecutive=None))
        with pytest.raises(StoreUnavailable, match="SlowDown"):
            await store.put(K, os.urandom(11 * MiB))
        assert proxy.counts()["slowdown_503"] == 1
        uploads = s3_server.client().list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", [])
        assert uploads == []
        assert await store.get(K) == b"previous version"
        await store.aclose()


async def test_cancelled_multipart_upload_is_aborted(s3_server: SeaweedS3, bucket: str) -> None:
    with FaultProxy(s3_server.endpoint_url) as proxy:
        prefix = s3_server.unique_prefix()
        store = S3Store(
            bucket, prefix, options(s3_server, endpoint_url=proxy.endpoint_url, multipart_threshold=5 * MiB, part_size=5 * MiB)
        )
        proxy.set_plan(FaultPlan(delay=1.0, delay_seconds=1.0, query_contains="partNumber=1", max_consecutive=None))
        started = time.monotonic()
        with trio.move_on_after(0.3) as scope:
            await store.put(K, os.urandom(11 * MiB))
        assert scope.cancelled_caught
        assert time.monotonic() - started < 5  # waited for part 1 only, then stopped
        assert proxy.counts()["forwarded"] == 3  # create, part 1, abort: no part 2, no complete
        uploads = s3_server.client().list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", [])
        assert uploads == []
        assert await store.exists(K) is False
        await store.aclose()


# --- conditional put ----------------------------------------------------------------------------


async def test_head_then_put_fallback_when_conditional_puts_are_off(s3_server: SeaweedS3, bucket: str) -> None:
    store = S3Store(bucket, s3_server.unique_prefix(), options(s3_server, conditional_put=False))
    assert await store.put_if_absent(K, b"first") is True
    assert await store.put_if_absent(K, b"second") is False
    assert await store.get(K) == b"first"
    await store.aclose()


async def test_put_if_absent_large_body_is_one_conditional_put(s3_server: SeaweedS3, bucket: str) -> None:
    store = S3Store(bucket, s3_server.unique_prefix(), options(s3_server, multipart_threshold=5 * MiB, part_size=5 * MiB))
    data = os.urandom(6 * MiB)
    assert await store.put_if_absent(K, data) is True
    assert await store.put_if_absent(K, b"other") is False
    assert await store.get(K) == data
    await store.aclose()


# --- error mapping --------------------------------------------------------------------------------


async def test_get_of_missing_object_is_object_not_found(store: S3Store) -> None:
    with pytest.raises(ObjectNotFound):
        await store.get(K)
    assert await store.exists(K) is False
    await store.delete(K)  # no error


async def _assert_every_operation_raises(store: S3Store, error: type[MifsError], *, exists_too: bool = True) -> list[str]:
    messages = []
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: store.put(K, b"x"),
        lambda: store.put_if_absent(K, b"x"),
        lambda: store.get(K),
        lambda: store.delete(K),
        lambda: store.list(""),
        lambda: store.check_access(),
        lambda: store.put(K, os.urandom(6 * MiB)),  # multipart with the options below
    ]
    if exists_too:
        calls.append(lambda: store.exists(K))
    for call in calls:
        with pytest.raises(error) as info:
            await call()
        messages.append(str(info.value))
    return messages


async def test_wrong_secret_is_permission_denied(s3_server: SeaweedS3, bucket: str) -> None:
    wrong = "wrong" + s3_server.secret_key[5:]
    store = S3Store(bucket, "p", options(s3_server, secret_key=wrong, multipart_threshold=5 * MiB, part_size=5 * MiB))
    messages = await _assert_every_operation_raises(store, StorePermissionDenied)
    for message in messages:
        assert wrong not in message and s3_server.secret_key not in message
        assert s3_server.access_key not in message
    assert any("secret key" in m for m in messages)
    await store.aclose()


async def test_unknown_access_key_is_permission_denied(s3_server: SeaweedS3, bucket: str) -> None:
    store = S3Store(bucket, "p", options(s3_server, access_key="nobody", secret_key="nothing", multipart_threshold=5 * MiB, part_size=5 * MiB))
    messages = await _assert_every_operation_raises(store, StorePermissionDenied)
    assert any("access key" in m for m in messages)
    await store.aclose()


async def test_read_only_identity_cannot_write(s3_server: SeaweedS3, bucket: str) -> None:
    writer = S3Store(bucket, s3_server.unique_prefix(), options(s3_server))
    await writer.put(K, b"readable")
    reader = S3Store(
        bucket,
        writer.prefix,
        options(s3_server, access_key=s3_server.reader.access_key, secret_key=s3_server.reader.secret_key),
    )
    assert await reader.get(K) == b"readable"
    assert await reader.list("") == [K]
    with pytest.raises(StorePermissionDenied, match="access denied to bucket"):
        await reader.put(K, b"overwrite")
    with pytest.raises(StorePermissionDenied):
        await reader.put_if_absent(check_key("data/00/new"), b"x")
    assert await writer.get(K) == b"readable"
    await writer.aclose()
    await reader.aclose()


async def test_missing_bucket_is_permission_denied_and_not_retried(s3_server: SeaweedS3) -> None:
    name = "mifs-no-such-bucket-" + os.urandom(4).hex()
    store = S3Store(name, "p", options(s3_server, multipart_threshold=5 * MiB, part_size=5 * MiB))
    # exists() is a HEAD: S3 answers a missing bucket with a bare 404, like a missing key.
    messages = await _assert_every_operation_raises(store, StorePermissionDenied, exists_too=False)
    assert all(name in m for m in messages)
    assert await store.exists(K) is False
    retrying = RetryingStore(store, max_attempts=5, base_delay=0)
    with pytest.raises(StorePermissionDenied, match="does not exist"):
        await retrying.put(K, b"x")
    assert retrying.statistics().attempts == 1
    assert name not in {b["Name"] for b in s3_server.client().list_buckets()["Buckets"]}  # not auto-created
    await store.aclose()


async def test_check_access_and_create_bucket(s3_server: SeaweedS3) -> None:
    name = "mifs-created-" + os.urandom(4).hex()
    store = S3Store(name, "", options(s3_server))
    with pytest.raises(StorePermissionDenied, match="does not exist"):
        await store.check_access()
    assert await store.create_bucket() is True
    assert await store.create_bucket() is False  # already ours
    await store.check_access()
    await store.put(K, b"x")
    assert await store.get(K) == b"x"
    await store.aclose()


async def test_server_error_and_throttling_are_transient(s3_server: SeaweedS3, bucket: str) -> None:
    with FaultProxy(s3_server.endpoint_url) as proxy:
        store = S3Store(bucket, s3_server.unique_prefix(), options(s3_server, endpoint_url=proxy.endpoint_url))
        for kind, code in (("error_500", "InternalError"), ("slowdown_503", "SlowDown")):
            for call in (lambda: store.put(K, b"x"), lambda: store.get(K), lambda: store.list("")):
                proxy.set_plan(FaultPlan(**{kind: 1.0}, max_faults=1))  # type: ignore[arg-type]
                with pytest.raises(StoreUnavailable, match=code):
                    await call()
            proxy.set_plan(FaultPlan(**{kind: 1.0}, max_faults=1))  # type: ignore[arg-type]
            with pytest.raises(StoreUnavailable):
                await store.exists(K)  # HEAD: no body, the status alone decides
        await store.aclose()


async def test_direct_put_stores_exact_bytes_with_their_md5(s3_server: SeaweedS3, bucket: str) -> None:
    """A single-part PUT goes out signed by mifs (not boto3) with Content-MD5: the object is the
    bytes sent, and its ETag (S3: the MD5 of a single-part object) says so."""
    with FaultProxy(s3_server.endpoint_url) as proxy:
        prefix = s3_server.unique_prefix()
        store = S3Store(bucket, prefix, options(s3_server, endpoint_url=proxy.endpoint_url))
        data = os.urandom(512 * 1024 + 7)
        # Only presigned requests (query signatures) are eligible: a fault proves the PUT was one.
        proxy.set_plan(FaultPlan(error_500=1.0, max_faults=1, methods=frozenset({"PUT"}), query_contains="X-Amz-Signature="))
        with pytest.raises(StoreUnavailable, match="InternalError"):
            await store.put(K, data)
        await store.put(K, data)
        assert proxy.counts()["error_500"] == 1
        head = s3_server.client().head_object(Bucket=bucket, Key=f"{prefix}/{K}")
        assert head["ETag"].strip('"') == hashlib.md5(data).hexdigest()
        assert await store.get(K) == data
        await store.aclose()


async def test_put_body_damaged_on_the_way_is_refused_and_retried(s3_server: SeaweedS3, bucket: str) -> None:
    """The server checks the body against the signed Content-MD5: a damaged body is refused
    (BadDigest, transient) and never stored; the retry wrapper sends it again."""
    with FaultProxy(s3_server.endpoint_url) as proxy:
        prefix = s3_server.unique_prefix()
        inner = S3Store(bucket, prefix, options(s3_server, endpoint_url=proxy.endpoint_url))
        data = os.urandom(300_000)
        proxy.set_plan(FaultPlan(corrupt_body=1.0, max_faults=1, methods=frozenset({"PUT"})))
        with pytest.raises(StoreUnavailable, match="BadDigest"):
            await inner.put(K, data)
        assert proxy.counts()["corrupt_body"] == 1
        assert raw_keys(s3_server, bucket, prefix) == set()  # nothing damaged was stored
        retrying = RetryingStore(inner, max_attempts=3, base_delay=0)
        proxy.set_plan(FaultPlan(corrupt_body=1.0, max_faults=1, methods=frozenset({"PUT"})))
        await retrying.put(K, data)
        assert proxy.counts()["corrupt_body"] == 2  # counts are cumulative: one more, then the good one
        assert await inner.get(K) == data
        await inner.aclose()


async def test_read_timeout_is_transient_and_bounded(s3_server: SeaweedS3, bucket: str) -> None:
    with FaultProxy(s3_server.endpoint_url) as proxy:
        store = S3Store(bucket, s3_server.unique_prefix(), options(s3_server, endpoint_url=proxy.endpoint_url, read_timeout=0.5))
        await store.put(K, b"x")
        proxy.set_plan(FaultPlan(delay=1.0, delay_seconds=3.0, max_faults=1))
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="timed out"):
            await store.get(K)
        assert time.monotonic() - started < 2.0
        await store.aclose()


# --- ranged reads ----------------------------------------------------------------------------------
# The conformance suite (test_store_localdir.py) covers ranged reads on the direct path; here both
# GET paths, told apart by a fault that only a presigned (direct) GET can meet.

_PROXY_ENV = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy")


def _use_get_path(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    """Make the next S3Store do its GETs directly or through boto3. A proxy in the environment
    is what sends GETs through boto3 (it handles proxies); NO_PROXY keeps boto3 off that proxy,
    whose port nothing listens on."""
    for name in _PROXY_ENV:
        monkeypatch.delenv(name, raising=False)
    if path == "boto3":
        monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
        monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@pytest.mark.parametrize("path", ["direct", "boto3"])
async def test_ranged_reads_on_both_get_paths(
    s3_server: SeaweedS3, bucket: str, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    _use_get_path(monkeypatch, path)
    with FaultProxy(s3_server.endpoint_url) as proxy:
        store = S3Store(bucket, s3_server.unique_prefix(), options(s3_server, endpoint_url=proxy.endpoint_url))
        data = os.urandom(200_000)
        await store.put(K, data)
        await store.put(check_key("data/00/empty"), b"")
        # One 500 for the first presigned GET: only the direct path meets it.
        proxy.set_plan(FaultPlan(error_500=1.0, max_faults=1, methods=frozenset({"GET"}), query_contains="X-Amz-Signature="))
        if path == "direct":
            with pytest.raises(StoreUnavailable, match="InternalError"):
                await store.get_range_then(K, 0, 10, bytes)
        cases = [
            (70_000, 50_000, data[70_000:120_000]),  # middle
            (0, 4096, data[:4096]),  # start
            (200_000 - 4096, 4096, data[-4096:]),  # ending exactly at the end
            (199_000, 4096, data[199_000:]),  # running past the end: the 1000 bytes there are
            (200_000, 10, b""),  # starting at the end
            (300_000, 10, b""),  # starting past the end (416 InvalidRange)
        ]
        for offset, length, expected in cases:
            assert await store.get_range_then(K, offset, length, bytes) == expected, (offset, length)
        assert await store.get_range_then(check_key("data/00/empty"), 0, 10, bytes) == b""
        for offset in (0, 300_000):
            with pytest.raises(ObjectNotFound):
                await store.get_range_then(check_key("data/00/missing"), offset, 10, bytes)
        assert proxy.counts()["error_500"] == (1 if path == "direct" else 0)
        await store.aclose()


async def test_truncated_ranged_answer_is_incomplete_and_retried(s3_server: SeaweedS3, bucket: str) -> None:
    """The Content-Length check holds for 206 answers: a range cut short is a transient failure,
    never a short read the caller would take for the end of the object."""
    with FaultProxy(s3_server.endpoint_url) as proxy:
        inner = S3Store(bucket, s3_server.unique_prefix(), options(s3_server, endpoint_url=proxy.endpoint_url))
        data = os.urandom(400_000)
        await inner.put(K, data)
        proxy.set_plan(FaultPlan(truncate=1.0, max_faults=1, methods=frozenset({"GET"})))
        with pytest.raises(StoreUnavailable, match="incomplete"):
            await inner.get_range_then(K, 100_000, 250_000, bytes)
        reads: list[int] = []

        def keep(blob: bytes) -> bytes:
            reads.append(len(blob))
            return blob

        retrying = RetryingStore(inner, max_attempts=3, base_delay=0)
        proxy.set_plan(FaultPlan(truncate=1.0, max_faults=1, methods=frozenset({"GET"})))
        got = await retrying.get_range_then(K, 100_000, 250_000, keep)
        assert got == data[100_000:350_000]
        assert reads == [250_000]  # the continuation ran once, on the complete range
        assert proxy.counts()["truncate"] == 2 and retrying.statistics().retries == 1
        await inner.aclose()


# --- outages --------------------------------------------------------------------------------------


@pytest.fixture
def restarts_server(s3_server: SeaweedS3) -> Iterator[SeaweedS3]:
    """For tests that stop the server: it runs again afterwards, whatever happened."""
    yield s3_server
    if not s3_server.running:
        s3_server.start()


async def test_stopped_server_is_unavailable_then_recovers(restarts_server: SeaweedS3, bucket: str) -> None:
    server = restarts_server
    store = S3Store(bucket, server.unique_prefix(), options(server, connect_timeout=1, read_timeout=2))
    await store.put(K, b"before the outage")
    server.stop(grace=0)
    for call in (
        lambda: store.get(K),
        lambda: store.put(check_key("data/00/during"), b"x"),
        lambda: store.put_if_absent(check_key("data/00/during"), b"x"),
        lambda: store.exists(K),
        lambda: store.list(""),
        lambda: store.delete(K),
        lambda: store.check_access(),
    ):
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="unreachable"):
            await call()
        assert time.monotonic() - started < 3.0
    server.start()
    assert await store.get(K) == b"before the outage"  # same client, same pool: recovered
    await store.put(check_key("data/00/after"), b"after")
    assert sorted(await store.list("")) == sorted([K, check_key("data/00/after")])
    await store.aclose()


async def test_retrying_store_rides_out_a_restart(restarts_server: SeaweedS3, bucket: str) -> None:
    server = restarts_server
    inner = S3Store(bucket, server.unique_prefix(), options(server, connect_timeout=1, read_timeout=2))
    store = RetryingStore(inner, max_attempts=None, deadline=30.0, base_delay=0.05, max_delay=0.5)
    await store.put(K, b"v1")
    server.stop(grace=0)
    data = os.urandom(3 * MiB)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(store.put, check_key("data/00/during-outage"), data)
        with trio.fail_after(10):
            while store.statistics().transient_failures < 3:  # the put has failed a few times
                await trio.sleep(0.01)
        await trio.to_thread.run_sync(server.start)
    assert await store.get(check_key("data/00/during-outage")) == data
    assert await store.get(K) == b"v1"
    stats = store.statistics()
    assert stats.exhausted == 0 and stats.permanent_failures == 0
    await store.aclose()


# --- versioned buckets (crypto-shredding) ---------------------------------------------------------


async def test_purge_deletes_every_version_in_a_versioned_bucket(s3_server: SeaweedS3) -> None:
    """SeaweedFS implements bucket versioning; purge must leave no version and no delete marker,
    and list_all must find keys that only have noncurrent versions left."""
    bucket = s3_server.new_bucket("versioned")
    client = s3_server.client()
    client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    prefix = s3_server.unique_prefix()
    store = S3Store(bucket, prefix, options(s3_server))
    try:
        key, other = check_key("data/ab/00ff"), check_key("data/ab/00ff1")
        for body in (b"v1", b"v2", b"v3"):
            await store.put(key, body)
        await store.put(other, b"keep")
        await store.delete(key)  # plain delete: a marker, the three versions stay
        assert await store.list("data/") == [other]
        assert set(await store.list_all("data/")) == {key, other}
        listing = client.list_object_versions(Bucket=bucket, Prefix=f"{prefix}/data/ab/00ff")
        assert len([v for v in listing.get("Versions", []) if v["Key"].endswith("/00ff")]) == 3
        await store.purge(key)
        listing = client.list_object_versions(Bucket=bucket, Prefix=f"{prefix}/data/")
        left = {(v["Key"], v["VersionId"]) for v in listing.get("Versions", []) + listing.get("DeleteMarkers", [])}
        assert {k for k, _ in left} == {f"{prefix}/data/ab/00ff1"}, left
        assert await store.list_all("data/") == [other]
        assert await store.get(other) == b"keep"
    finally:
        await store.aclose()
