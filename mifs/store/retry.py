"""Retrying transient store failures: capped exponential backoff with full jitter around any ObjectStore.

Must not look into objects or know which backend it wraps; this is the one place where
StoreUnavailable is retried (STYLE.md). ObjectNotFound is an answer and StorePermissionDenied
is final: neither is retried.

Runs on the trio thread only; counters need no lock. Cancelling an operation during a backoff
sleep leaves nothing behind; during an attempt, whatever the inner store documents.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import trio

from mifs.errors import MifsError, ObjectNotFound, StoreUnavailable
from mifs.store.base import ObjectStore
from mifs.types import ObjectKey

log = logging.getLogger(__name__)

_T = TypeVar("_T")


@dataclass(frozen=True)
class RetryStatistics:
    attempts: int
    """Calls made to the inner store."""
    retries: int
    """Calls that repeated a failed one."""
    transient_failures: int
    """StoreUnavailable raised by the inner store (each one, retried or not)."""
    permanent_failures: int
    """Operations that failed with an error that is not retried (ObjectNotFound excluded)."""
    exhausted: int
    """Operations that still failed with StoreUnavailable when attempts or time ran out."""
    last_error: str
    """Class and message of the latest failure ("" if none); messages carry no secrets."""
    retrying: int
    """Operations waiting now to try again after a transient failure (the store is failing
    them, though none has been given up on yet)."""


class RetryingStore:
    """An ObjectStore that retries its inner store's StoreUnavailable.

    An operation stops after `max_attempts` calls or, with `deadline` (seconds from its first
    attempt), when no time is left for another; whichever comes first. The n-th retry waits a
    random time in [0, min(max_delay, base_delay * 2**(n-1))] ("full jitter").
    """

    adopt_file: Callable[[ObjectKey, Path], Awaitable[bool]]
    """Present only if the inner store has it (callers use getattr(store, "adopt_file", None))."""

    def __init__(
        self,
        inner: ObjectStore,
        *,
        max_attempts: int | None = 5,
        deadline: float | None = None,
        base_delay: float = 0.1,
        max_delay: float = 10.0,
        rng: random.Random | None = None,
    ) -> None:
        if max_attempts is None and deadline is None:
            raise ValueError("give max_attempts, deadline or both")
        if max_attempts is not None and max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if deadline is not None and deadline < 0:
            raise ValueError("deadline must not be negative")
        if base_delay < 0 or max_delay < 0:
            raise ValueError("delays must not be negative")
        self.inner = inner
        self.max_attempts = max_attempts
        self.deadline = deadline
        self.base_delay = base_delay
        self.max_delay = max_delay
        self._rng = rng or random.Random()
        self._attempts = 0
        self._retries = 0
        self._transient = 0
        self._permanent = 0
        self._exhausted = 0
        self._last_error = ""
        self._retrying = 0
        inner_adopt: Callable[[ObjectKey, Path], Awaitable[bool]] | None = getattr(inner, "adopt_file", None)
        if inner_adopt is not None:

            async def adopt_file(key: ObjectKey, source: Path) -> bool:
                return await self._retry("adopt_file", key, lambda: inner_adopt(key, source))

            self.adopt_file = adopt_file

    def statistics(self) -> RetryStatistics:
        return RetryStatistics(
            attempts=self._attempts,
            retries=self._retries,
            transient_failures=self._transient,
            permanent_failures=self._permanent,
            exhausted=self._exhausted,
            last_error=self._last_error,
            retrying=self._retrying,
        )

    @property
    def description(self) -> str:
        return self.inner.description

    def _backoff(self, retry_number: int) -> float:
        cap = min(self.max_delay, self.base_delay * 2.0 ** (retry_number - 1))
        return self._rng.uniform(0.0, cap)

    async def call(self, op: str, call: Callable[[], Awaitable[_T]]) -> _T:
        """Run another operation of the inner store (access check, bucket creation) under the
        same retry policy."""
        return await self._retry(op, "-", call)

    async def _retry(self, op: str, key: str, call: Callable[[], Awaitable[_T]]) -> _T:
        value, _ = await self._retry_noting_failures(op, key, call)
        return value

    async def _retry_noting_failures(self, op: str, key: str, call: Callable[[], Awaitable[_T]]) -> tuple[_T, bool]:
        """The call's result, and whether an earlier attempt of it failed transiently."""
        give_up_at = None if self.deadline is None else trio.current_time() + self.deadline
        attempt = 0
        while True:
            attempt += 1
            self._attempts += 1
            if attempt > 1:
                self._retries += 1
            try:
                return await call(), attempt > 1
            except ObjectNotFound:
                raise
            except StoreUnavailable as exc:
                self._transient += 1
                self._last_error = f"{type(exc).__name__}: {exc}"
                delay = self._backoff(attempt)
                out_of_attempts = self.max_attempts is not None and attempt >= self.max_attempts
                if give_up_at is not None:
                    remaining = give_up_at - trio.current_time()
                    out_of_time = remaining <= 0
                    delay = min(delay, max(remaining, 0.0))
                else:
                    out_of_time = False
                if out_of_attempts or out_of_time:
                    self._exhausted += 1
                    raise
                log.warning(
                    "store %s of %s failed with %s; retry %d in %.2f s", op, key, type(exc).__name__, attempt, delay
                )
                self._retrying += 1
                try:
                    await trio.sleep(delay)
                finally:
                    self._retrying -= 1
            except MifsError as exc:
                self._permanent += 1
                self._last_error = f"{type(exc).__name__}: {exc}"
                raise

    async def put(self, key: ObjectKey, data: bytes) -> None:
        await self._retry("put", key, lambda: self.inner.put(key, data))

    async def put_if_absent(self, key: ObjectKey, data: bytes) -> bool:
        """As the inner store's, with one more rule after a failed attempt: an attempt whose
        reply was lost may have created the object, so the retry finds it and answers False.
        Then the stored bytes decide: equal to `data` means created (by us, or an identical
        object, which no caller can tell apart), so True."""
        created, retried = await self._retry_noting_failures(
            "put_if_absent", key, lambda: self.inner.put_if_absent(key, data)
        )
        if created or not retried:
            return created
        try:
            stored = await self._retry("get", key, lambda: self.inner.get(key))
        except ObjectNotFound:
            return False  # it existed a moment ago and is gone: someone else's object
        return stored == data

    async def get(self, key: ObjectKey) -> bytes:
        return await self._retry("get", key, lambda: self.inner.get(key))

    async def get_then(self, key: ObjectKey, then: Callable[[bytes], _T]) -> _T:
        """Only the read is retried: `then` runs once per successful read."""
        return await self._retry("get", key, lambda: self.inner.get_then(key, then))

    async def get_range_then(self, key: ObjectKey, offset: int, length: int, then: Callable[[bytes], _T]) -> _T:
        """Only the read is retried: `then` runs once per successful read."""
        return await self._retry("get_range", key, lambda: self.inner.get_range_then(key, offset, length, then))

    async def delete(self, key: ObjectKey) -> None:
        await self._retry("delete", key, lambda: self.inner.delete(key))

    async def purge(self, key: ObjectKey) -> None:
        await self._retry("purge", key, lambda: self.inner.purge(key))

    async def list_all(self, prefix: str) -> list[ObjectKey]:
        return await self._retry("list", prefix, lambda: self.inner.list_all(prefix))

    async def exists(self, key: ObjectKey) -> bool:
        return await self._retry("exists", key, lambda: self.inner.exists(key))

    async def list(self, prefix: str) -> list[ObjectKey]:
        return await self._retry("list", prefix, lambda: self.inner.list(prefix))

    async def aclose(self) -> None:
        await self.inner.aclose()
