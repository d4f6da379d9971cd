"""The chunk cache on a real directory: study-grouped LRU eviction, pins, dirty chunks."""

from __future__ import annotations

import os
from pathlib import Path

from mifs.cache import ChunkCache
from mifs.types import ObjectKey

KiB = 1024


def key(n: int) -> ObjectKey:
    name = f"{n:032x}"
    return ObjectKey(f"data/{name[:2]}/{name}")


def blob(n: int, size: int = 10 * KiB) -> bytes:
    return bytes([n % 256]) * size


def cached(cache: ChunkCache, keys: range | list[int]) -> set[int]:
    return {n for n in keys if cache.contains(key(n)) and cache.file_path(key(n)) is not None}


def test_eviction_takes_whole_least_recently_used_studies(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path, 100 * KiB)
    for n in range(0, 4):
        cache.fill_sync(key(n), blob(n), group=1)  # study 1: 40 KiB
    for n in range(10, 14):
        cache.fill_sync(key(n), blob(n), group=2)  # study 2: 40 KiB
    assert cached(cache, range(20)) == {0, 1, 2, 3, 10, 11, 12, 13}
    assert cache.read_sync(key(0)) == blob(0)  # study 1 is now the most recently used
    for n in range(20, 24):
        cache.fill_sync(key(n), blob(n), group=3)  # 120 KiB > 100 KiB: study 2 must go, whole
    assert cached(cache, range(30)) == {0, 1, 2, 3, 20, 21, 22, 23}
    assert cache.group_bytes(2) == 0 and cache.group_bytes(1) == 40 * KiB
    assert not any((tmp_path / "chunks" / key(n).split("/", 1)[1]).exists() for n in range(10, 14))
    assert cache.statistics().evictions == 4


def test_pinned_studies_are_never_evicted(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path, 100 * KiB)
    for n in range(0, 4):
        cache.fill_sync(key(n), blob(n), group=1)
    cache.set_pinned([1])
    assert cache.statistics().pinned_bytes == 40 * KiB
    for round_ in range(5):
        base = 100 + 10 * round_
        for n in range(base, base + 4):
            cache.fill_sync(key(n), blob(n), group=10 + round_)
    assert cached(cache, range(4)) == {0, 1, 2, 3}
    assert cache.statistics().bytes_used <= 100 * KiB
    cache.set_pinned([])
    for n in range(200, 206):
        cache.fill_sync(key(n), blob(n), group=99)
    assert cached(cache, range(4)) == set(), "an unpinned study is evicted like any other"


def test_chunks_outside_studies_are_evicted_one_by_one(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path, 50 * KiB)
    for n in range(5):
        cache.fill_sync(key(n), blob(n))
    cache.read_sync(key(0))
    cache.fill_sync(key(5), blob(5))
    assert cached(cache, range(6)) == {0, 2, 3, 4, 5}


def test_dirty_chunks_stay_and_join_their_study_when_uploaded(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path, 50 * KiB)
    for n in range(3):
        cache.stage_sync(key(n), blob(n))
    cache.assign_group([key(0), key(1), key(2)], 7)
    assert cache.group_bytes(7) == 30 * KiB
    for n in range(10, 16):
        cache.fill_sync(key(n), blob(n), group=8)
    assert cached(cache, range(3)) == {0, 1, 2}, "staged chunks are never evicted"
    for n in range(3):
        cache.mark_clean_sync(key(n))
    cache.touch_group(8)  # study 8 is now the most recently used
    cache.fill_sync(key(20), blob(20), group=9)
    assert cached(cache, range(3)) == set(), "study 7, least recently used, left as a whole"
    assert cache.group_bytes(7) == 0


def test_the_study_being_read_is_thinned_only_when_nothing_else_is_left(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path, 30 * KiB)
    for n in range(6):  # one study twice the size of the cache
        cache.fill_sync(key(n), blob(n), group=1)
    assert len(cached(cache, range(6))) == 3
    assert cache.statistics().bytes_used == 30 * KiB


def test_scan_restores_groups_and_order(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path, 1000 * KiB)
    for n in range(4):
        cache.fill_sync(key(n), blob(n), group=1 + n // 2)
    for n in range(4):  # study 2 (keys 2, 3) used last
        path = tmp_path / "chunks" / key(n).split("/", 1)[1]
        os.utime(path, (1_000_000 + n, 1_000_000 + n))
    again = ChunkCache(tmp_path, 30 * KiB)
    again.scan_sync({key(0)}, group_of=lambda k: 1 + int(k.rsplit("/", 1)[1], 16) // 2)
    assert again.group_bytes(1) == 10 * KiB, "the staged chunk of study 1 stays; its uploaded one went"
    assert again.group_bytes(2) == 20 * KiB
    assert cached(again, range(4)) == {0, 2, 3}


def test_local_store_keeps_no_uploaded_copies(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path, 1000 * KiB, keep_uploaded=False)
    cache.stage_sync(key(1), blob(1), group=3)
    cache.fill_sync(key(2), blob(2), group=3)
    assert cached(cache, [1, 2]) == {1}
    cache.mark_clean_sync(key(1))
    assert cached(cache, [1, 2]) == set()
    assert cache.group_bytes(3) == 0
