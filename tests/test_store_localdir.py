"""Conformance suite for the ObjectStore protocol (mifs.store.base), plus LocalDirStore specifics.

Every test in the "conformance" section runs against every entry of BACKENDS. To add a backend
(S3 via SeaweedFS, a retry wrapper, ...), write an async context manager factory that takes
tmp_path and yields a fresh, empty store, and append a Backend(...) to BACKENDS. Tests that
depend on how one backend lays things out go below the conformance section.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from mifs.errors import MifsError, ObjectNotFound, StoreNotFound
from mifs.store.base import DESCRIPTOR_KEY, ObjectStore, check_key
from mifs.store.localdir import TMP_DIR, LocalDirStore
from mifs.types import ObjectKey

MiB = 1024 * 1024


# --- backends -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Backend:
    name: str
    open: Callable[[Path], AbstractAsyncContextManager[ObjectStore]]
    """Given a per-test scratch directory, yield a fresh empty store and clean up afterwards."""


@asynccontextmanager
async def _localdir(tmp_path: Path) -> AsyncIterator[ObjectStore]:
    store = LocalDirStore(tmp_path / "store", create=True)
    try:
        yield store
    finally:
        await store.aclose()


@asynccontextmanager
async def _seaweedfs_s3(tmp_path: Path) -> AsyncIterator[ObjectStore]:
    """S3Store on a fresh prefix ("tN-xxxxxx/mifs/") of one bucket of the session's SeaweedFS
    server (tests/s3server.py): other tests' objects sit next to it, which tests isolation too."""
    from s3server import shared_server

    from mifs.store.s3 import S3Options, S3Store

    server = shared_server()
    options = S3Options(
        endpoint_url=server.endpoint_url,
        region=server.region,
        access_key=server.access_key,
        secret_key=server.secret_key,
        addressing_style="path",
    )
    store = S3Store(server.session_bucket("conformance"), server.unique_prefix() + "/mifs", options)
    try:
        yield store
    finally:
        await store.aclose()


# The hook: append more backends here (e.g. Backend("s3", _seaweedfs_s3)).
BACKENDS: list[Backend] = [
    Backend("localdir", _localdir),
    Backend("s3", _seaweedfs_s3),
]


@pytest.fixture(params=BACKENDS, ids=[b.name for b in BACKENDS])
def backend(request: pytest.FixtureRequest) -> Backend:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
async def store(backend: Backend, tmp_path: Path) -> AsyncIterator[ObjectStore]:
    async with backend.open(tmp_path) as s:
        yield s


def _key(name: str) -> ObjectKey:
    return check_key(name)


def _data(size: int, seed: int = 0) -> bytes:
    return (bytes((seed + i) & 0xFF for i in range(256)) * (size // 256 + 1))[:size]


# --- conformance: every backend -----------------------------------------------------------------


async def test_description_is_text(store: ObjectStore) -> None:
    assert isinstance(store.description, str) and store.description


@pytest.mark.parametrize("size", [0, 1, 5 * MiB], ids=["0B", "1B", "5MiB"])
async def test_put_get_round_trip(store: ObjectStore, size: int) -> None:
    key = _key("data/ab/abcdef0123456789abcdef0123456789")
    data = os.urandom(size)
    await store.put(key, data)
    assert await store.get(key) == data
    assert await store.exists(key)


async def test_put_top_level_key(store: ObjectStore) -> None:
    await store.put(DESCRIPTOR_KEY, b'{"v": 1}')
    assert await store.get(DESCRIPTOR_KEY) == b'{"v": 1}'


async def test_put_overwrites(store: ObjectStore) -> None:
    key = _key("data/00/overwrite")
    await store.put(key, b"first version, longer than the second")
    await store.put(key, b"second")
    assert await store.get(key) == b"second"
    await store.put(key, b"")
    assert await store.get(key) == b""


async def test_put_if_absent_creates(store: ObjectStore) -> None:
    key = _key("data/01/new")
    assert await store.put_if_absent(key, b"created") is True
    assert await store.get(key) == b"created"


async def test_put_if_absent_keeps_existing(store: ObjectStore) -> None:
    key = _key("data/01/existing")
    await store.put(key, b"original")
    assert await store.put_if_absent(key, b"intruder") is False
    assert await store.get(key) == b"original"
    assert await store.put_if_absent(key, b"") is False
    assert await store.get(key) == b"original"


async def test_put_if_absent_twice(store: ObjectStore) -> None:
    key = _key("mifs-archive.json")
    assert await store.put_if_absent(key, b"one") is True
    assert await store.put_if_absent(key, b"two") is False
    assert await store.get(key) == b"one"


async def test_put_if_absent_concurrent_single_winner(store: ObjectStore) -> None:
    key = _key("data/02/contended")
    results: dict[int, bool] = {}

    async def attempt(i: int) -> None:
        results[i] = await store.put_if_absent(key, f"writer {i}".encode() * 1000)

    async with trio.open_nursery() as nursery:
        for i in range(16):
            nursery.start_soon(attempt, i)
    winners = [i for i, won in results.items() if won]
    assert len(winners) == 1
    assert await store.get(key) == f"writer {winners[0]}".encode() * 1000


async def test_concurrent_puts_same_key_are_atomic(store: ObjectStore) -> None:
    key = _key("data/03/raced")
    candidates = {_data(256 * 1024, seed=i) for i in range(8)}

    async with trio.open_nursery() as nursery:
        for blob in candidates:
            nursery.start_soon(store.put, key, blob)
    assert await store.get(key) in candidates


async def test_concurrent_puts_into_new_prefixes(store: ObjectStore) -> None:
    keys = [_key(f"data/{i % 4:02x}/obj{i}") for i in range(32)]

    async with trio.open_nursery() as nursery:
        for i, key in enumerate(keys):
            nursery.start_soon(store.put, key, f"obj {i}".encode())
    for i, key in enumerate(keys):
        assert await store.get(key) == f"obj {i}".encode()
    assert set(await store.list("data/")) == set(keys)


async def test_get_missing(store: ObjectStore) -> None:
    with pytest.raises(ObjectNotFound):
        await store.get(_key("data/ff/missing"))
    with pytest.raises(ObjectNotFound):
        await store.get(_key("never-written"))


async def test_get_then_runs_the_continuation_on_the_object(store: ObjectStore) -> None:
    key = _key("data/ab/then")
    await store.put(key, _data(70_000, seed=3))
    assert await store.get_then(key, lambda blob: (len(blob), blob[:3])) == (70_000, _data(3, seed=3))

    class Refused(Exception):
        pass

    def refuse(blob: bytes) -> bytes:
        raise Refused(len(blob))

    with pytest.raises(Refused):  # the continuation's own errors pass through untouched
        await store.get_then(key, refuse)
    with pytest.raises(ObjectNotFound):
        await store.get_then(_key("data/ab/absent"), lambda blob: blob)


PACK_SIZE = 70_000
"""A pack object's size in the ranged-read tests: several chunks of a few KiB back to back."""


@pytest.mark.parametrize(
    ("offset", "length", "expected"),
    [
        (30_000, 4096, (30_000, 34_096)),  # in the middle
        (0, 4096, (0, 4096)),  # at the very start
        (PACK_SIZE - 4096, 4096, (PACK_SIZE - 4096, PACK_SIZE)),  # ending exactly at the end
        (0, PACK_SIZE, (0, PACK_SIZE)),  # the whole object
        (PACK_SIZE - 100, 4096, (PACK_SIZE - 100, PACK_SIZE)),  # running past the end: short
        (PACK_SIZE - 1, 1, (PACK_SIZE - 1, PACK_SIZE)),  # the last byte
        (PACK_SIZE, 10, (0, 0)),  # starting right at the end: nothing
        (PACK_SIZE + 5000, 10, (0, 0)),  # starting past the end: nothing
    ],
    ids=["middle", "start", "to-the-end", "whole", "past-the-end", "last-byte", "at-the-end", "beyond-the-end"],
)
async def test_get_range_then_reads_the_asked_bytes(
    store: ObjectStore, offset: int, length: int, expected: tuple[int, int]
) -> None:
    key = _key("data/ab/pack")
    data = os.urandom(PACK_SIZE)
    await store.put(key, data)
    got = await store.get_range_then(key, offset, length, lambda blob: blob)
    assert got == data[expected[0] : expected[1]]
    assert len(got) == expected[1] - expected[0]


async def test_get_range_then_runs_the_continuation_once_and_lets_its_errors_through(store: ObjectStore) -> None:
    key = _key("data/ab/pack")
    await store.put(key, _data(10_000, seed=5))
    seen: list[bytes] = []

    def count(blob: bytes) -> int:
        seen.append(blob)
        return len(blob)

    assert await store.get_range_then(key, 256, 3, count) == 3
    assert seen == [_data(3, seed=5)]

    class Refused(Exception):
        pass

    def refuse(blob: bytes) -> bytes:
        raise Refused(len(blob))

    with pytest.raises(Refused):
        await store.get_range_then(key, 0, 10, refuse)


async def test_get_range_then_of_a_missing_object(store: ObjectStore) -> None:
    with pytest.raises(ObjectNotFound):
        await store.get_range_then(_key("data/ab/absent"), 0, 10, lambda blob: blob)
    with pytest.raises(ObjectNotFound):
        await store.get_range_then(_key("data/ab/absent"), 1_000_000, 10, lambda blob: blob)
    await store.put(_key("data/ab/0001"), b"x")
    with pytest.raises(ObjectNotFound):  # a prefix of other keys is no object either
        await store.get_range_then(_key("data/ab"), 0, 10, lambda blob: blob)


async def test_get_range_then_of_an_empty_object_is_empty(store: ObjectStore) -> None:
    key = _key("data/ab/empty")
    await store.put(key, b"")
    assert await store.get_range_then(key, 0, 10, lambda blob: blob) == b""


@pytest.mark.parametrize(("offset", "length"), [(-1, 10), (0, 0), (5, -3)])
async def test_get_range_then_refuses_ranges_no_caller_means(store: ObjectStore, offset: int, length: int) -> None:
    key = _key("data/ab/pack")
    await store.put(key, b"0123456789")
    with pytest.raises(ValueError):
        await store.get_range_then(key, offset, length, lambda blob: blob)


async def test_exists(store: ObjectStore) -> None:
    key = _key("data/04/here")
    assert await store.exists(key) is False
    await store.put(key, b"x")
    assert await store.exists(key) is True
    assert await store.exists(_key("data/04/not-here")) is False


async def test_delete(store: ObjectStore) -> None:
    key = _key("data/05/doomed")
    keep = _key("data/05/kept")
    await store.put(key, b"bye")
    await store.put(keep, b"stay")
    await store.delete(key)
    assert await store.exists(key) is False
    with pytest.raises(ObjectNotFound):
        await store.get(key)
    assert await store.get(keep) == b"stay"
    assert await store.list("data/05/") == [keep]


async def test_delete_is_idempotent(store: ObjectStore) -> None:
    key = _key("data/06/once")
    await store.put(key, b"x")
    await store.delete(key)
    await store.delete(key)
    await store.delete(_key("data/06/never-existed"))
    await store.delete(_key("no-such-prefix/at/all"))
    assert await store.exists(key) is False


async def test_purge_removes_the_object_and_leaves_its_neighbours(store: ObjectStore) -> None:
    key = _key("data/08/0123")
    longer = _key("data/08/01234")  # a key that starts with the purged one stays
    await store.put(key, b"one")
    await store.put(key, b"two")
    await store.put(longer, b"stay")
    assert set(await store.list_all("data/08/")) == {key, longer}
    await store.purge(key)
    await store.purge(key)  # idempotent
    await store.purge(_key("data/08/never"))
    assert await store.exists(key) is False
    assert await store.get(longer) == b"stay"
    assert await store.list_all("data/08/") == [longer]


async def test_put_after_delete(store: ObjectStore) -> None:
    key = _key("data/07/phoenix")
    await store.put(key, b"one")
    await store.delete(key)
    assert await store.put_if_absent(key, b"two") is True
    assert await store.get(key) == b"two"


async def test_list_by_prefix(store: ObjectStore) -> None:
    keys = {
        "data/ab/0001",
        "data/ab/0002",
        "data/ac/0003",
        "data/cd/0004",
        "journal/0001",
        "mifs-archive.json",
    }
    for k in keys:
        await store.put(_key(k), k.encode())

    async def listed(prefix: str) -> set[str]:
        result = await store.list(prefix)
        assert len(result) == len(set(result)), "list returned duplicates"
        return set(result)

    assert await listed("") == keys
    assert await listed("data/") == {"data/ab/0001", "data/ab/0002", "data/ac/0003", "data/cd/0004"}
    assert await listed("data/ab/") == {"data/ab/0001", "data/ab/0002"}
    assert await listed("data/a") == {"data/ab/0001", "data/ab/0002", "data/ac/0003"}  # plain string prefix
    assert await listed("data/ab/0001") == {"data/ab/0001"}
    assert await listed("journal") == {"journal/0001"}
    assert await listed("mifs-") == {"mifs-archive.json"}
    assert await listed("nothing/") == set()
    assert await listed("data/ab/00019") == set()

    await store.delete(_key("data/ab/0001"))
    assert await listed("data/ab/") == {"data/ab/0002"}


async def test_list_empty_store(store: ObjectStore) -> None:
    assert await store.list("") == []
    assert await store.list("data/") == []


INVALID_KEYS = ["../x", "/abs", "A", "", "a//b", "data/../x", "a/", "./a", ".tmp/x", "a/.b", "Data/x", "a b", "a\x00b"]


@pytest.mark.parametrize("bad", INVALID_KEYS)
async def test_invalid_keys_rejected(store: ObjectStore, bad: str) -> None:
    with pytest.raises(ValueError):
        check_key(bad)
    raw = ObjectKey(bad)  # bypass the type: backends must validate on their own
    with pytest.raises(ValueError):
        await store.put(raw, b"x")
    with pytest.raises(ValueError):
        await store.put_if_absent(raw, b"x")
    with pytest.raises(ValueError):
        await store.get(raw)
    with pytest.raises(ValueError):
        await store.get_range_then(raw, 0, 1, lambda blob: blob)
    with pytest.raises(ValueError):
        await store.exists(raw)
    with pytest.raises(ValueError):
        await store.delete(raw)
    assert await store.list("") == []


def test_check_key_accepts_our_alphabet() -> None:
    for good in ["mifs-archive.json", "data/ab/" + "0" * 32, "a", "0", "a.b_c-d/e"]:
        assert check_key(good) == good
    with pytest.raises(ValueError):
        check_key("a" * 513)
    assert check_key("a" * 512) == "a" * 512


# S3 semantics: "data/ab" is simply a missing object even when objects under "data/ab/" exist.


async def test_get_key_that_is_a_prefix_of_other_keys(
    store: ObjectStore,
) -> None:
    await store.put(_key("data/ab/0001"), b"x")
    assert await store.exists(_key("data/ab")) is False
    with pytest.raises(ObjectNotFound):
        await store.get(_key("data/ab"))


async def test_delete_key_that_is_a_prefix_of_other_keys(
    store: ObjectStore,
) -> None:
    await store.put(_key("data/ab/0001"), b"x")
    await store.delete(_key("data/ab"))  # deleting a missing object is not an error
    assert await store.get(_key("data/ab/0001")) == b"x"


# --- LocalDirStore specifics --------------------------------------------------------------------


@pytest.fixture
async def local(tmp_path: Path) -> LocalDirStore:
    return LocalDirStore(tmp_path / "store", create=True)


def _tmp_leftovers(root: Path) -> list[str]:
    tmp = root / TMP_DIR
    return sorted(os.listdir(tmp)) if tmp.exists() else []


def _all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


async def test_localdir_layout_is_key_path(local: LocalDirStore) -> None:
    key = _key("data/ab/abcdef0123456789abcdef0123456789")
    await local.put(key, b"sealed bytes")
    assert (local.root / "data" / "ab" / "abcdef0123456789abcdef0123456789").read_bytes() == b"sealed bytes"
    await local.put(DESCRIPTOR_KEY, b"{}")
    assert (local.root / "mifs-archive.json").read_bytes() == b"{}"


async def test_localdir_no_temp_files_left(local: LocalDirStore) -> None:
    for i in range(5):
        await local.put(_key(f"data/0{i}/obj"), _data(1000 + i))
        await local.put(_key(f"data/0{i}/obj"), _data(2000 + i))  # overwrite
    assert await local.put_if_absent(_key("data/10/pia"), b"new") is True
    assert await local.put_if_absent(_key("data/10/pia"), b"refused") is False
    await local.put(_key("data/11/empty"), b"")
    assert _tmp_leftovers(local.root) == []
    files = {str(p.relative_to(local.root)) for p in _all_files(local.root)}
    assert files == {*(f"data/0{i}/obj" for i in range(5)), "data/10/pia", "data/11/empty"}


async def _populate_with_umask0(root: Path) -> LocalDirStore:
    old = os.umask(0)  # the store must not rely on the caller's umask
    try:
        store = LocalDirStore(root, create=True)
        await store.put(_key("data/ab/obj"), b"x")
        assert await store.put_if_absent(_key("data/cd/obj"), b"y") is True
        await store.put(DESCRIPTOR_KEY, b"{}")
    finally:
        os.umask(old)
    return store


async def test_localdir_files_are_0600(tmp_path: Path) -> None:
    store = await _populate_with_umask0(tmp_path / "store")
    files = _all_files(store.root)
    assert len(files) == 3
    for p in files:
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o600, p


async def test_localdir_root_and_leaf_dirs_are_0700(tmp_path: Path) -> None:
    store = await _populate_with_umask0(tmp_path / "store")
    for d in (store.root, store.root / "data" / "ab", store.root / "data" / "cd", store.root / TMP_DIR):
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700, d


async def test_localdir_intermediate_dirs_are_0700(tmp_path: Path) -> None:
    store = await _populate_with_umask0(tmp_path / "store")
    assert stat.S_IMODE(os.stat(store.root / "data").st_mode) == 0o700


async def test_localdir_list_ignores_temp_dir(local: LocalDirStore) -> None:
    await local.put(_key("data/ab/real"), b"x")
    (local.root / TMP_DIR / "deadbeef").write_bytes(b"half-written")
    assert await local.list("") == [_key("data/ab/real")]


async def test_localdir_put_if_absent_keeps_existing_file_identity(local: LocalDirStore) -> None:
    key = _key("data/ab/ino")
    await local.put(key, b"orig")
    before = os.stat(local.root / key)
    assert await local.put_if_absent(key, b"other") is False
    after = os.stat(local.root / key)
    assert (before.st_ino, before.st_mtime_ns, before.st_size) == (after.st_ino, after.st_mtime_ns, after.st_size)


def test_localdir_missing_root(tmp_path: Path) -> None:
    with pytest.raises(StoreNotFound):
        LocalDirStore(tmp_path / "absent")
    assert not (tmp_path / "absent").exists()


def test_localdir_create_needs_parent(tmp_path: Path) -> None:
    with pytest.raises(StoreNotFound):
        LocalDirStore(tmp_path / "no-parent" / "store", create=True)


def test_localdir_root_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(StoreNotFound):
        LocalDirStore(tmp_path / "file")


async def test_localdir_put_colliding_with_tree_leaves_no_temp_file(local: LocalDirStore) -> None:
    # S3 would accept both keys; a directory tree cannot. The put must fail cleanly.
    await local.put(_key("data/ab/0001"), b"x")
    with pytest.raises(MifsError):
        await local.put(_key("data/ab"), b"y")
    with pytest.raises(MifsError):
        await local.put(_key("data/ab/0001/x"), b"y")
    assert await local.get(_key("data/ab/0001")) == b"x"
    assert await local.list("") == [_key("data/ab/0001")]
    assert _tmp_leftovers(local.root) == []


async def test_localdir_put_if_absent_false_only_if_object_exists(local: LocalDirStore) -> None:
    await local.put(_key("data/ab/0001"), b"x")
    assert await local.exists(_key("data/ab")) is False
    try:
        created = await local.put_if_absent(_key("data/ab"), b"y")
    except MifsError:
        return  # refusing the key outright is fine
    assert created is True
    assert await local.get(_key("data/ab")) == b"y"


def test_localdir_create_existing_dir_keeps_contents(tmp_path: Path) -> None:
    root = tmp_path / "store"
    root.mkdir()
    (root / "mifs-archive.json").write_bytes(b"{}")
    store = LocalDirStore(root, create=True)
    assert (store.root / "mifs-archive.json").read_bytes() == b"{}"


_FAILED_PUT_SCRIPT = textwrap.dedent(
    """
    import os, resource, signal, sys
    from pathlib import Path
    import trio
    from mifs.errors import StoreUnavailable
    from mifs.store.localdir import LocalDirStore

    root = Path(sys.argv[1])
    store = LocalDirStore(root, create=True)

    async def main():
        await store.put("data/ab/small", b"fits")          # creates .tmp and data/ab
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)      # get EFBIG instead of a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024 * 1024, resource.RLIM_INFINITY))
        try:
            await store.put("data/ab/big", b"x" * (2 * 1024 * 1024))
        except StoreUnavailable:
            print("StoreUnavailable")
        else:
            print("no error")

    trio.run(main)
    """
)


def test_localdir_failed_put_leaves_no_temp_file(tmp_path: Path) -> None:
    """A put that fails half-way (disk full, file too large) must clean up its temp file.

    The write failure is produced for real, in a child process, by RLIMIT_FSIZE.
    """
    root = tmp_path / "store"
    proc = subprocess.run(
        [sys.executable, "-c", _FAILED_PUT_SCRIPT, str(root)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "StoreUnavailable"
    assert not (root / "data" / "ab" / "big").exists()
    assert (root / "data" / "ab" / "small").read_bytes() == b"fits"
    assert _tmp_leftovers(root) == []
