"""Tests for mifs.chunking: splitting byte ranges into per-chunk spans."""

from __future__ import annotations

import itertools

import pytest

from mifs.chunking import ChunkSpan, chunk_count, chunk_plain_len, spans

try:
    from hypothesis import given
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis is in the [test] extra
    given = None


def _check_cover(offset: int, length: int, chunk_size: int) -> list[ChunkSpan]:
    """Assert the spans tile [offset, offset+length) exactly, in order, one per chunk touched."""
    most = length // chunk_size + 2  # never more spans than chunks touched (guards against hangs)
    result = list(itertools.islice(spans(offset, length, chunk_size), most + 1))
    assert len(result) <= most
    pos = offset
    buf = 0
    prev_index = None
    for span in result:
        assert 0 <= span.start < span.end <= chunk_size
        assert span.length == span.end - span.start > 0
        assert span.index * chunk_size + span.start == pos  # contiguous in file offsets
        assert span.buf_offset == buf  # contiguous in the caller's buffer
        if prev_index is not None:
            assert span.index == prev_index + 1
            assert span.start == 0
        prev_index = span.index
        pos += span.length
        buf += span.length
    assert pos == offset + length
    assert buf == length
    if length:
        assert result[0].index == offset // chunk_size
        assert result[-1].index == (offset + length - 1) // chunk_size
    else:
        assert result == []
    return result


# --- spans: examples ------------------------------------------------------------------------------


def _spans(offset: int, length: int, chunk_size: int) -> list[ChunkSpan]:
    return _check_cover(offset, length, chunk_size)


def test_spans_examples() -> None:
    assert _spans(0, 0, 4) == []
    assert _spans(7, 0, 4) == []
    assert _spans(0, 4, 4) == [ChunkSpan(0, 0, 4, 0)]
    assert _spans(0, 10, 4) == [ChunkSpan(0, 0, 4, 0), ChunkSpan(1, 0, 4, 4), ChunkSpan(2, 0, 2, 8)]
    assert _spans(5, 3, 4) == [ChunkSpan(1, 1, 4, 0)]
    assert _spans(3, 2, 4) == [ChunkSpan(0, 3, 4, 0), ChunkSpan(1, 0, 1, 1)]
    assert _spans(4, 4, 4) == [ChunkSpan(1, 0, 4, 0)]
    assert _spans(3, 1, 4) == [ChunkSpan(0, 3, 4, 0)]
    assert _spans(0, 3, 1) == [ChunkSpan(0, 0, 1, 0), ChunkSpan(1, 0, 1, 1), ChunkSpan(2, 0, 1, 2)]


def test_spans_realistic_sizes() -> None:
    cs = 4 * 1024 * 1024
    # a 128 KiB kernel read straddling the first chunk boundary
    assert _spans(cs - 65536, 131072, cs) == [ChunkSpan(0, cs - 65536, cs, 0), ChunkSpan(1, 0, 65536, 65536)]
    # far into a large file
    off = 1000 * cs + 17
    assert _spans(off, 10, cs) == [ChunkSpan(1000, 17, 27, 0)]
    assert ChunkSpan(1000, 17, 27, 0).length == 10


@pytest.mark.parametrize("offset, length, chunk_size", [(-1, 1, 4), (0, -1, 4), (0, 1, 0), (0, 1, -4)])
def test_spans_rejects_bad_arguments(offset: int, length: int, chunk_size: int) -> None:
    with pytest.raises(ValueError):
        list(spans(offset, length, chunk_size))


def test_spans_exhaustive_small() -> None:
    for chunk_size in range(1, 8):
        for offset in range(0, 40):
            for length in range(0, 40):
                _check_cover(offset, length, chunk_size)


def test_spans_reassemble_buffer() -> None:
    """Scatter a buffer into chunks with spans, then gather it back: same bytes, same places."""
    chunk_size = 7
    file = bytearray(100)
    data = bytes(range(1, 40))
    offset = 11
    chunks: dict[int, bytearray] = {}
    for s in _check_cover(offset, len(data), chunk_size):
        chunk = chunks.setdefault(s.index, bytearray(chunk_size))
        chunk[s.start : s.end] = data[s.buf_offset : s.buf_offset + s.length]
    for index, chunk in chunks.items():
        file[index * chunk_size : (index + 1) * chunk_size] = chunk
    assert bytes(file[offset : offset + len(data)]) == data
    assert set(file[:offset]) == {0}
    assert set(file[offset + len(data) :]) == {0}


# --- chunk_count / chunk_plain_len ----------------------------------------------------------------


@pytest.mark.parametrize(
    "size, expected",
    [(0, 0), (1, 1), (3, 1), (4, 1), (5, 2), (8, 2), (9, 3), (4 * 10**6, 10**6)],
)
def test_chunk_count(size: int, expected: int) -> None:
    assert chunk_count(size, 4) == expected


def test_chunk_count_large() -> None:
    cs = 4 * 1024 * 1024
    assert chunk_count(2**40, cs) == 2**40 // cs
    assert chunk_count(2**40 + 1, cs) == 2**40 // cs + 1


@pytest.mark.parametrize(
    "size, index, expected",
    [
        (0, 0, 0),
        (1, 0, 1),
        (4, 0, 4),
        (5, 0, 4),
        (5, 1, 1),
        (5, 2, 0),
        (8, 1, 4),
        (8, 2, 0),
        (10, 2, 2),
        (10, 100, 0),
    ],
)
def test_chunk_plain_len(size: int, index: int, expected: int) -> None:
    assert chunk_plain_len(size, index, 4) == expected


def test_chunk_plain_len_sums_to_size() -> None:
    for chunk_size in range(1, 9):
        for size in range(0, 60):
            n = chunk_count(size, chunk_size)
            lens = [chunk_plain_len(size, i, chunk_size) for i in range(n + 2)]
            assert sum(lens) == size
            assert all(x == chunk_size for x in lens[: max(0, n - 1)])
            assert lens[n:] == [0, 0]
            if n:
                assert 0 < lens[n - 1] <= chunk_size


# --- properties -----------------------------------------------------------------------------------

if given is not None:

    @given(
        offset=st.integers(min_value=0, max_value=2**50),
        length=st.integers(min_value=0, max_value=2**20),
        chunk_size=st.integers(min_value=1, max_value=2**23),
    )
    def test_spans_cover_range_exactly(offset: int, length: int, chunk_size: int) -> None:
        # keep the number of spans bounded so the test stays fast
        if length // chunk_size > 2000:
            length = chunk_size * 2000 + length % chunk_size
        _check_cover(offset, length, chunk_size)

    @given(
        size=st.integers(min_value=0, max_value=2**50),
        chunk_size=st.integers(min_value=1, max_value=2**26),
    )
    def test_chunk_count_and_plain_len_agree(size: int, chunk_size: int) -> None:
        n = chunk_count(size, chunk_size)
        assert (n - 1) * chunk_size < size <= n * chunk_size or (size == 0 and n == 0)
        if n:
            last = chunk_plain_len(size, n - 1, chunk_size)
            assert 0 < last <= chunk_size
            assert (n - 1) * chunk_size + last == size
            if n > 1:
                assert chunk_plain_len(size, n - 2, chunk_size) == chunk_size
        assert chunk_plain_len(size, n, chunk_size) == 0
        # a read of the whole file touches exactly n chunks, each of its plain length
        whole = _check_cover(0, size, chunk_size) if n <= 2000 else []
        for s in whole:
            assert s.length == chunk_plain_len(size, s.index, chunk_size)

else:  # pragma: no cover

    @pytest.mark.skip(reason="hypothesis is not installed")
    def test_properties_need_hypothesis() -> None:
        pass
