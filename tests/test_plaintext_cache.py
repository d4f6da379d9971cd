"""The plaintext LRU's account of what study prefetch keeps ahead of a reader (plaintext_cache.py).

Prefetch that runs further ahead than the LRU holds makes the reader read and decrypt the
cached copy a second time; these tests pin the accounting the prefetcher throttles on.
"""

from __future__ import annotations

from mifs.plaintext_cache import PlaintextCache
from mifs.types import ObjectKey

A, B, C, D = (ObjectKey(f"data/00/{n * 32}") for n in "abcd")


def test_ahead_bytes_count_until_read_dropped_or_evicted() -> None:
    consumed: list[int] = []
    cache = PlaintextCache(300)
    cache.on_consumed = lambda: consumed.append(cache.ahead_bytes)
    assert cache.ahead_limit == 150
    cache.put(A, b"a" * 100, ahead=True)
    cache.put(B, b"b" * 100, ahead=True)
    cache.put(C, b"c" * 50)  # a reader's own: not ahead
    assert cache.ahead_bytes == 200
    assert cache.contains(A) and cache.ahead_bytes == 200  # looking is not reading
    assert cache.get(A) == b"a" * 100
    assert cache.ahead_bytes == 100 and consumed == [100]
    assert cache.get(A) == b"a" * 100 and consumed == [100]  # read twice: counted once
    cache.drop(B)
    assert cache.ahead_bytes == 0 and consumed == [100, 0]
    cache.put(D, b"d" * 100, ahead=True)
    cache.put(B, b"b" * 250)  # evicts the least recently used: C, A, then D
    assert not cache.contains(D) and cache.ahead_bytes == 0 and consumed == [100, 0, 0]
    assert cache.get(B) == b"b" * 250


def test_put_again_replaces_without_counting_twice() -> None:
    cache = PlaintextCache(1000)
    cache.put(A, b"x" * 100, ahead=True)
    cache.put(A, b"y" * 120, ahead=True)
    assert cache.ahead_bytes == 120
    cache.put(A, b"z" * 10)
    assert cache.ahead_bytes == 0
