"""Tests for mifs.store.retry.RetryingStore: what is retried, how long it waits, what it counts.

The wrapper is tested against a deterministic in-memory store whose failures the test scripts
(it tests the wrapper, not a backend), against LocalDirStore, and against the real S3 backend
behind tests/faultproxy.py injecting 5xx answers, dropped connections and truncated answers.
"""

from __future__ import annotations

from typing import Any

import logging
import os
import random
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from faultproxy import FAILING_KINDS, FaultPlan, FaultProxy
from mifs.errors import MifsError, ObjectNotFound, StorePermissionDenied, StoreUnavailable
from mifs.store.base import check_key
from mifs.store.localdir import LocalDirStore
from mifs.store.retry import RetryingStore, RetryStatistics
from mifs.store.s3 import S3Options, S3Store
from mifs.types import ObjectKey
from s3server import SeaweedS3

K = check_key("data/ab/0123456789abcdef")


class ScriptedStore:
    """An in-memory ObjectStore whose next calls fail as scripted.

    script[op] is a queue of failures for that operation; each entry is an exception to raise,
    or ("after", exc) to perform the operation first and then raise (a reply lost on the way).
    The times of every call are recorded (trio clock) to check the backoff.
    """

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.script: dict[str, deque[Exception | tuple[str, Exception]]] = {}
        self.calls: list[tuple[str, float]] = []

    def fail(self, op: str, *failures: Exception | tuple[str, Exception]) -> None:
        self.script.setdefault(op, deque()).extend(failures)

    @property
    def description(self) -> str:
        return "scripted in-memory store"

    async def _op(self, op: str, action: Callable[[], object]) -> object:
        await trio.lowlevel.checkpoint()
        self.calls.append((op, trio.current_time()))
        queue = self.script.get(op)
        failure = queue.popleft() if queue else None
        if isinstance(failure, tuple):
            action()
            raise failure[1]
        if failure is not None:
            raise failure
        return action()

    async def put(self, key: ObjectKey, data: bytes) -> None:
        await self._op("put", lambda: self.objects.__setitem__(key, data))

    async def put_if_absent(self, key: ObjectKey, data: bytes) -> bool:
        def action() -> bool:
            if key in self.objects:
                return False
            self.objects[key] = data
            return True

        return bool(await self._op("put_if_absent", action))

    def _get(self, key: ObjectKey) -> bytes:
        if key not in self.objects:
            raise ObjectNotFound(f"object {key} is not in the store")
        return self.objects[key]

    async def get(self, key: ObjectKey) -> bytes:
        result = await self._op("get", lambda: self._get(key))
        assert isinstance(result, bytes)
        return result

    async def get_then(self, key: ObjectKey, then: Any) -> Any:
        return then(await self.get(key))

    async def get_range_then(self, key: ObjectKey, offset: int, length: int, then: Any) -> Any:
        result = await self._op("get_range", lambda: self._get(key)[offset : offset + length])
        assert isinstance(result, bytes)
        return then(result)

    async def delete(self, key: ObjectKey) -> None:
        await self._op("delete", lambda: self.objects.pop(key, None))

    async def exists(self, key: ObjectKey) -> bool:
        return bool(await self._op("exists", lambda: key in self.objects))

    async def list(self, prefix: str) -> list[ObjectKey]:
        result = await self._op("list", lambda: [ObjectKey(k) for k in self.objects if k.startswith(prefix)])
        assert isinstance(result, list)
        return result

    async def aclose(self) -> None:
        return None


def unavailable(n: int = 1) -> list[MifsError]:
    return [StoreUnavailable(f"transient failure {i}") for i in range(n)]


def stats_tuple(s: RetryStatistics) -> tuple[int, int, int, int, int]:
    return (s.attempts, s.retries, s.transient_failures, s.permanent_failures, s.exhausted)


# --- against the scripted store -----------------------------------------------------------------


async def test_transient_failures_are_retried_until_success(autojump_clock: trio.testing.MockClock) -> None:
    inner = ScriptedStore()
    store = RetryingStore(inner, max_attempts=5, base_delay=0.5, max_delay=4)
    inner.fail("put", *unavailable(2))
    await store.put(K, b"payload")
    assert inner.objects[K] == b"payload"
    stats = store.statistics()
    assert stats_tuple(stats) == (3, 2, 2, 0, 0)
    assert stats.last_error == "StoreUnavailable: transient failure 1"


@pytest.mark.parametrize("op", ["put", "put_if_absent", "get", "get_range", "delete", "exists", "list"])
async def test_every_operation_is_retried(op: str, autojump_clock: trio.testing.MockClock) -> None:
    inner = ScriptedStore()
    inner.objects[K] = b"present"
    store = RetryingStore(inner, max_attempts=3, base_delay=0.1)
    inner.fail(op, *unavailable(2))
    calls: dict[str, Callable[[], Awaitable[object]]] = {
        "put": lambda: store.put(K, b"new"),
        "put_if_absent": lambda: store.put_if_absent(check_key("data/cd/new"), b"new"),
        "get": lambda: store.get(K),
        "get_range": lambda: store.get_range_then(K, 2, 4, bytes),
        "delete": lambda: store.delete(K),
        "exists": lambda: store.exists(K),
        "list": lambda: store.list("data/"),
    }
    result = await calls[op]()
    expected = {
        "put": None, "put_if_absent": True, "get": b"present", "get_range": b"esen", "delete": None, "exists": True,
        "list": [K],
    }
    assert result == expected[op]
    assert [name for name, _ in inner.calls] == [op] * 3
    assert store.statistics().retries == 2


async def test_get_then_retries_the_read_and_runs_the_continuation_once(autojump_clock: trio.testing.MockClock) -> None:
    inner = ScriptedStore()
    store = RetryingStore(inner, max_attempts=5, base_delay=0.5, max_delay=4)
    await store.put(K, b"payload")
    inner.fail("get", *unavailable(2))
    calls: list[bytes] = []
    assert await store.get_then(K, lambda blob: calls.append(blob) or len(blob)) == 7
    assert calls == [b"payload"]


async def test_get_range_then_retries_the_read_and_runs_the_continuation_once(autojump_clock: trio.testing.MockClock) -> None:
    inner = ScriptedStore()
    store = RetryingStore(inner, max_attempts=5, base_delay=0.5, max_delay=4)
    await store.put(K, b"payload")
    inner.fail("get_range", *unavailable(2))
    calls: list[bytes] = []

    def count(blob: bytes) -> int:
        calls.append(blob)
        return len(blob)

    assert await store.get_range_then(K, 1, 3, count) == 3
    assert calls == [b"ayl"]
    assert [name for name, _ in inner.calls] == ["put"] + ["get_range"] * 3
    assert stats_tuple(store.statistics()) == (4, 2, 2, 0, 0)


async def test_get_range_then_continuation_errors_are_not_retried() -> None:
    inner = ScriptedStore()
    store = RetryingStore(inner, max_attempts=5, base_delay=0)
    await store.put(K, b"payload")

    class Refused(Exception):
        pass

    def refuse(blob: bytes) -> bytes:
        raise Refused(blob)

    with pytest.raises(Refused):
        await store.get_range_then(K, 0, 3, refuse)
    with pytest.raises(ObjectNotFound):  # an answer, not retried either
        await store.get_range_then(check_key("data/ab/absent"), 0, 3, bytes)
    assert [name for name, _ in inner.calls] == ["put", "get_range", "get_range"]
    assert store.statistics().retries == 0


async def test_object_not_found_is_an_answer_not_retried() -> None:
    inner = ScriptedStore()
    store = RetryingStore(inner, max_attempts=5, base_delay=0)
    with pytest.raises(ObjectNotFound):
        await store.get(K)
    assert stats_tuple(store.statistics()) == (1, 0, 0, 0, 0)
    assert store.statistics().last_error == ""


async def test_permission_denied_is_final() -> None:
    inner = ScriptedStore()
    store = RetryingStore(inner, max_attempts=5, base_delay=0)
    inner.fail("put", StorePermissionDenied("access denied to bucket b"), *unavailable(3))
    with pytest.raises(StorePermissionDenied):
        await store.put(K, b"x")
    assert stats_tuple(store.statistics()) == (1, 0, 0, 1, 0)
    assert store.statistics().last_error == "StorePermissionDenied: access denied to bucket b"
    assert K not in inner.objects


async def test_transient_then_permanent_stops_at_the_permanent_error(autojump_clock: trio.testing.MockClock) -> None:
    inner = ScriptedStore()
    store = RetryingStore(inner, max_attempts=5, base_delay=0.1)
    inner.fail("get", *unavailable(1), StorePermissionDenied("refused"))
    with pytest.raises(StorePermissionDenied):
        await store.get(K)
    assert stats_tuple(store.statistics()) == (2, 1, 1, 1, 0)


async def test_other_exceptions_pass_through_untouched() -> None:
    inner = ScriptedStore()
    store = RetryingStore(inner, max_attempts=3, base_delay=0)
    inner.fail("put", ValueError("invalid object key"))
    with pytest.raises(ValueError):
        await store.put(K, b"x")
    assert store.statistics().attempts == 1


async def test_gives_up_after_max_attempts(autojump_clock: trio.testing.MockClock) -> None:
    inner = ScriptedStore()
    store = RetryingStore(inner, max_attempts=4, base_delay=0.1, max_delay=1)
    inner.fail("get", *unavailable(10))
    with pytest.raises(StoreUnavailable, match="transient failure 3"):
        await store.get(K)
    assert stats_tuple(store.statistics()) == (4, 3, 4, 0, 1)
    assert len(inner.script["get"]) == 6


async def test_backoff_is_full_jitter_capped_exponential(autojump_clock: trio.testing.MockClock) -> None:
    inner = ScriptedStore()
    store = RetryingStore(inner, max_attempts=8, base_delay=0.5, max_delay=4.0, rng=random.Random(1234))
    inner.fail("put", *unavailable(7))
    await store.put(K, b"x")
    times = [t for _, t in inner.calls]
    gaps = [b - a for a, b in zip(times, times[1:])]
    expected_rng = random.Random(1234)
    caps = [min(4.0, 0.5 * 2**n) for n in range(7)]  # 0.5, 1, 2, 4, 4, 4, 4
    expected = [expected_rng.uniform(0, cap) for cap in caps]
    assert gaps == pytest.approx(expected, abs=1e-6)
    assert all(0 <= gap <= cap for gap, cap in zip(gaps, caps))


async def test_deadline_bounds_the_time_spent(autojump_clock: trio.testing.MockClock) -> None:
    inner = ScriptedStore()
    store = RetryingStore(inner, max_attempts=None, deadline=30.0, base_delay=1.0, max_delay=5.0)
    inner.fail("get", *unavailable(1000))
    start = trio.current_time()
    with pytest.raises(StoreUnavailable):
        await store.get(K)
    elapsed = trio.current_time() - start
    assert 30.0 - 1e-6 <= elapsed <= 30.0 + 1e-6  # the last wait is shortened to end at the deadline
    stats = store.statistics()
    assert stats.exhausted == 1
    assert stats.attempts == len(inner.calls) >= 7  # at most 5 s per wait: at least 6 waits in 30 s
    assert inner.calls[-1][1] - start == pytest.approx(30.0)


async def test_deadline_and_max_attempts_first_one_wins(autojump_clock: trio.testing.MockClock) -> None:
    inner = ScriptedStore()
    store = RetryingStore(inner, max_attempts=3, deadline=1000.0, base_delay=1.0)
    inner.fail("get", *unavailable(10))
    with pytest.raises(StoreUnavailable):
        await store.get(K)
    assert store.statistics().attempts == 3


def test_configuration_is_checked() -> None:
    inner = ScriptedStore()
    with pytest.raises(ValueError):
        RetryingStore(inner, max_attempts=None, deadline=None)
    with pytest.raises(ValueError):
        RetryingStore(inner, max_attempts=0)
    with pytest.raises(ValueError):
        RetryingStore(inner, base_delay=-1)


async def test_cancel_during_backoff_leaves_no_attempt_running(autojump_clock: trio.testing.MockClock) -> None:
    inner = ScriptedStore()
    store = RetryingStore(inner, max_attempts=5, base_delay=100.0, max_delay=100.0, rng=random.Random(7))
    inner.fail("put", *unavailable(5))
    with trio.move_on_after(0.001) as scope:  # the first backoff is >0.001 s with this seed
        await store.put(K, b"x")
    assert scope.cancelled_caught
    await trio.sleep(1000)  # nothing else wakes up and retries behind our back
    assert len(inner.calls) == 1
    assert K not in inner.objects


async def test_put_if_absent_after_a_lost_reply_is_true(autojump_clock: trio.testing.MockClock) -> None:
    """The first attempt created the object but its reply was lost; the retry sees the object.
    The stored bytes are ours, so the caller is told it created the object."""
    inner = ScriptedStore()
    store = RetryingStore(inner, max_attempts=3, base_delay=0.1)
    inner.fail("put_if_absent", ("after", StoreUnavailable("connection closed")))
    assert await store.put_if_absent(K, b"mine") is True
    assert inner.objects[K] == b"mine"
    assert [op for op, _ in inner.calls] == ["put_if_absent", "put_if_absent", "get"]


async def test_put_if_absent_after_a_failure_still_sees_foreign_object(autojump_clock: trio.testing.MockClock) -> None:
    inner = ScriptedStore()
    store = RetryingStore(inner, max_attempts=3, base_delay=0.1)

    inner.fail("put_if_absent", StoreUnavailable("timeout"))
    original = inner._op

    async def racing_op(op: str, action: Callable[[], object]) -> object:
        if op == "put_if_absent" and len(inner.calls) == 1:
            inner.objects[K] = b"someone else's"  # another writer won during our backoff
        return await original(op, action)

    inner._op = racing_op  # type: ignore[method-assign]
    assert await store.put_if_absent(K, b"mine") is False
    assert inner.objects[K] == b"someone else's"


async def test_put_if_absent_without_failures_trusts_the_inner_answer() -> None:
    inner = ScriptedStore()
    inner.objects[K] = b"same"
    store = RetryingStore(inner, max_attempts=3, base_delay=0)
    assert await store.put_if_absent(K, b"same") is False  # no failure: no second guessing
    assert [op for op, _ in inner.calls] == ["put_if_absent"]


async def test_retries_are_logged_with_key_and_class_only(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    inner = ScriptedStore()
    store = RetryingStore(inner, max_attempts=3, base_delay=0.1)
    inner.fail("get", StoreUnavailable("detail-that-must-not-be-logged"))
    inner.objects[K] = b"x"
    with caplog.at_level(logging.DEBUG, logger="mifs.store.retry"):
        assert await store.get(K) == b"x"
    records = [r for r in caplog.records if r.name == "mifs.store.retry"]
    assert [r.levelno for r in records] == [logging.WARNING]
    message = records[0].getMessage()
    assert K in message and "StoreUnavailable" in message
    assert "detail-that-must-not-be-logged" not in message


async def test_statistics_is_a_frozen_snapshot(autojump_clock: trio.testing.MockClock) -> None:
    inner = ScriptedStore()
    store = RetryingStore(inner, max_attempts=3, base_delay=0.1)
    before = store.statistics()
    inner.fail("put", *unavailable(1))
    await store.put(K, b"x")
    assert before.attempts == 0 and store.statistics().attempts == 2
    with pytest.raises(AttributeError):
        before.attempts = 5  # type: ignore[misc]


async def test_description_and_aclose_pass_through() -> None:
    inner = ScriptedStore()
    store = RetryingStore(inner)
    assert store.description == "scripted in-memory store"
    await store.aclose()


# --- against LocalDirStore ----------------------------------------------------------------------


@pytest.fixture
async def local(tmp_path: Path) -> AsyncIterator[LocalDirStore]:
    store = LocalDirStore(tmp_path / "store", create=True)
    yield store
    await store.aclose()


async def test_localdir_round_trip_through_the_wrapper(local: LocalDirStore) -> None:
    store = RetryingStore(local, max_attempts=3, base_delay=0)
    data = os.urandom(100_000)
    await store.put(K, data)
    assert await store.get(K) == data
    assert await store.exists(K)
    assert await store.put_if_absent(K, b"other") is False
    assert await store.list("data/") == [K]
    await store.delete(K)
    with pytest.raises(ObjectNotFound):
        await store.get(K)
    stats = store.statistics()
    assert stats_tuple(stats) == (7, 0, 0, 0, 0)


async def test_localdir_failure_is_retried_then_reported(local: LocalDirStore) -> None:
    # A key whose path is taken by a directory: LocalDirStore raises StoreUnavailable every time.
    store = RetryingStore(local, max_attempts=3, base_delay=0)
    await store.put(check_key("data/ab/0001"), b"x")
    with pytest.raises(StoreUnavailable):
        await store.put(check_key("data/ab"), b"y")
    stats = store.statistics()
    assert (stats.attempts, stats.retries, stats.transient_failures, stats.exhausted) == (4, 2, 3, 1)
    assert stats.last_error.startswith("StoreUnavailable: ")


async def test_adopt_file_passes_through_when_inner_has_it(local: LocalDirStore, tmp_path: Path) -> None:
    store = RetryingStore(local, max_attempts=2, base_delay=0)
    adopt = getattr(store, "adopt_file", None)
    assert adopt is not None
    source = tmp_path / "staged"
    source.write_bytes(b"sealed chunk")
    assert await adopt(K, source) is True
    assert await store.get(K) == b"sealed chunk"
    assert os.stat(source).st_ino == os.stat(local.root / K).st_ino  # linked, not copied
    assert store.statistics().attempts == 2


def test_adopt_file_absent_when_inner_lacks_it() -> None:
    store = RetryingStore(ScriptedStore())
    assert getattr(store, "adopt_file", None) is None
    assert not hasattr(store, "adopt_file")


# --- against S3 through the fault-injecting proxy -------------------------------------------------


@pytest.fixture
def proxy(s3_server: SeaweedS3) -> Iterator[FaultProxy]:
    with FaultProxy(s3_server.endpoint_url) as p:
        yield p


def proxied_s3(server: SeaweedS3, proxy: FaultProxy, prefix: str) -> S3Store:
    options = S3Options(
        endpoint_url=proxy.endpoint_url,
        region=server.region,
        access_key=server.access_key,
        secret_key=server.secret_key,
        addressing_style="path",
        connect_timeout=2,
        read_timeout=2,
    )
    return S3Store(server.session_bucket("retry"), prefix, options)


async def test_s3_through_faults_puts_and_gets_are_byte_exact(s3_server: SeaweedS3, proxy: FaultProxy) -> None:
    inner = proxied_s3(s3_server, proxy, s3_server.unique_prefix("faults"))
    store = RetryingStore(inner, max_attempts=8, base_delay=0.01, max_delay=0.1)
    proxy.set_plan(
        FaultPlan(
            error_500=0.06,
            slowdown_503=0.06,
            drop_before=0.05,
            drop_after=0.05,
            truncate=0.05,
            delay=0.05,
            delay_seconds=0.05,
            seed=20240611,
            max_consecutive=3,
        )
    )
    rng = random.Random(99)
    blobs = {check_key(f"data/{i % 16:02x}/{i:032x}"): rng.randbytes(rng.choice([0, 1, 4096, 300_000, 1_500_000])) for i in range(50)}

    async with trio.open_nursery() as nursery:
        for key, blob in blobs.items():
            nursery.start_soon(store.put, key, blob)
    for key, blob in blobs.items():
        assert await store.get(key) == blob
    assert sorted(await store.list("data/")) == sorted(blobs)

    counts = proxy.counts()
    stats = store.statistics()
    assert proxy.failures_injected > 0, counts
    assert sum(1 for kind in FAILING_KINDS if counts[kind] > 0) >= 3, counts  # a mix, not one kind
    assert counts["delay"] > 0, counts
    # Every failing fault surfaced exactly once as StoreUnavailable and was retried here:
    # botocore itself retried nothing.
    assert stats.transient_failures == proxy.failures_injected, (stats, counts)
    assert stats.retries == stats.transient_failures
    assert stats.exhausted == 0 and stats.permanent_failures == 0
    # the objects really are in the bucket, under the prefix
    direct = s3_server.client()
    for key, blob in list(blobs.items())[:5]:
        assert direct.get_object(Bucket=inner.bucket, Key=f"{inner.prefix}/{key}")["Body"].read() == blob
    await store.aclose()


async def test_s3_put_if_absent_with_lost_reply(s3_server: SeaweedS3, proxy: FaultProxy) -> None:
    """The server executes the conditional PUT, the client never hears: the bare S3 store then
    answers False on its next try; the retry wrapper recognises its own bytes and says True."""
    inner = proxied_s3(s3_server, proxy, s3_server.unique_prefix("pia"))
    bare_key, wrapped_key = check_key("mifs-archive.json"), check_key("data/00/descriptor-copy")
    lose_one_put = FaultPlan(drop_after=1.0, max_faults=1, methods=frozenset({"PUT"}))

    proxy.set_plan(lose_one_put)
    with pytest.raises(StoreUnavailable):
        await inner.put_if_absent(bare_key, b"descriptor")
    assert await inner.put_if_absent(bare_key, b"descriptor") is False  # the bare store is fooled

    proxy.set_plan(lose_one_put)
    store = RetryingStore(inner, max_attempts=3, base_delay=0)
    assert await store.put_if_absent(wrapped_key, b"descriptor") is True
    assert proxy.counts()["drop_after"] == 2  # one per plan
    assert await store.put_if_absent(wrapped_key, b"descriptor") is False  # and later it exists
    await store.aclose()


async def test_s3_ranged_reads_through_faults_are_byte_exact(s3_server: SeaweedS3, proxy: FaultProxy) -> None:
    """Ranged reads of one pack object through 5xx answers, dropped and truncated answers: every
    read returns exactly its range, and each continuation ran once."""
    inner = proxied_s3(s3_server, proxy, s3_server.unique_prefix("ranges"))
    store = RetryingStore(inner, max_attempts=8, base_delay=0.01, max_delay=0.1)
    rng = random.Random(7)
    pack = rng.randbytes(1_000_000)
    await store.put(K, pack)
    proxy.set_plan(
        FaultPlan(
            error_500=0.15, drop_before=0.1, drop_after=0.1, truncate=0.15, seed=20240612, max_consecutive=3,
            methods=frozenset({"GET"}),
        )
    )
    ranges = [(rng.randrange(0, 1_050_000), rng.randrange(1, 120_000)) for _ in range(40)] + [(0, 1), (999_999, 10)]
    seen: list[int] = []

    def keep(blob: bytes) -> bytes:
        seen.append(len(blob))
        return blob

    for offset, length in ranges:
        assert await store.get_range_then(K, offset, length, keep) == pack[offset : offset + length], (offset, length)
    assert seen == [len(pack[o : o + n]) for o, n in ranges]  # once per read
    stats = store.statistics()
    assert proxy.failures_injected > 0 and stats.transient_failures == proxy.failures_injected, (stats, proxy.counts())
    assert stats.exhausted == 0 and stats.permanent_failures == 0
    await store.aclose()


async def test_s3_slowdown_storm_is_exhausted_and_reported(s3_server: SeaweedS3, proxy: FaultProxy) -> None:
    inner = proxied_s3(s3_server, proxy, s3_server.unique_prefix("storm"))
    store = RetryingStore(inner, max_attempts=4, base_delay=0.01, max_delay=0.02)
    proxy.set_plan(FaultPlan(slowdown_503=1.0, max_consecutive=None))
    with pytest.raises(StoreUnavailable, match="SlowDown"):
        await store.put(K, b"x")
    assert proxy.counts()["slowdown_503"] == 4
    assert proxy.counts()["forwarded"] == 0
    assert stats_tuple(store.statistics()) == (4, 3, 4, 0, 1)
    await store.aclose()


def test_fault_sequence_is_deterministic_for_a_seed(s3_server: SeaweedS3) -> None:
    plan = FaultPlan(error_500=0.3, drop_before=0.2, seed=5, max_consecutive=None)
    sequences = []
    for _ in range(2):
        with FaultProxy(s3_server.endpoint_url, plan) as p:
            sequences.append([p._decide("GET", "/b/k") for _ in range(50)])
    assert sequences[0] == sequences[1]
    assert {"error_500", "drop_before", None} == set(sequences[0])


def test_fault_plan_bounds() -> None:
    with pytest.raises(ValueError):
        FaultPlan(error_500=0.7, slowdown_503=0.5)
    plan = FaultPlan(error_500=1.0, max_faults=3, max_consecutive=None)
    with FaultProxy("http://127.0.0.1:9", plan) as p:
        decisions = [p._decide("PUT", "/b/k") for _ in range(10)]
    assert decisions == ["error_500"] * 3 + [None] * 7
    plan = FaultPlan(error_500=1.0, max_consecutive=2)
    with FaultProxy("http://127.0.0.1:9", plan) as p:
        decisions = [p._decide("PUT", "/b/k") for _ in range(6)]
    assert decisions == ["error_500", "error_500", None] * 2


class _LongestBackoff(random.Random):
    def uniform(self, a: float, b: float) -> float:
        return b


async def test_status_counts_the_operations_waiting_to_retry() -> None:
    """`mifs status` shows a failing store long before an operation gives up (a minute)."""
    inner = ScriptedStore()
    store = RetryingStore(inner, max_attempts=3, base_delay=0.3, max_delay=4, rng=_LongestBackoff())
    inner.fail("put", *unavailable(1))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(store.put, K, b"payload")
        await trio.sleep(0.1)  # the first attempt failed; the retry waits 0.3 s
        assert store.statistics().retrying == 1
        assert store.statistics().last_error == "StoreUnavailable: transient failure 0"
    assert store.statistics().retrying == 0
    assert inner.objects[K] == b"payload"
