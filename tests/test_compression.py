"""Tests for mifs.compression: what gets compressed, the frame format, bounded decompression.

Also the configuration of it (mifs.config.parse_compress, [tuning] compress) and the sealed
form: a compressed chunk's flag is authenticated like the rest of its header.
"""

from __future__ import annotations

import os
import random
import struct
import sys
import threading
from pathlib import Path

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from mifs import compression
from mifs.compression import ChunkCompressor, decompress, is_precompressed_dicom, transfer_syntax
from mifs.config import ZSTD_DEFAULT_LEVEL, load_config_file, parse_compress
from mifs.crypto.envelope import FLAG_ZSTD, open_chunk, seal_chunk
from mifs.errors import IntegrityError, UserError
from mifs.types import ArchiveId, FileId

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dicom_factory  # noqa: E402

KiB, MiB = 1024, 1024 * 1024
DEK = bytes(range(32))
ARCHIVE = ArchiveId(b"A" * 16)
FILE = FileId(b"F" * 16)

EXPLICIT_LE = "1.2.840.10008.1.2.1"
PRECOMPRESSED = [
    "1.2.840.10008.1.2.4.50",  # JPEG baseline
    "1.2.840.10008.1.2.4.51",  # JPEG extended
    "1.2.840.10008.1.2.4.57",  # JPEG lossless
    "1.2.840.10008.1.2.4.70",  # JPEG lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.201",  # HTJ2K lossless
    "1.2.840.10008.1.2.4.100",  # MPEG-2
    "1.2.840.10008.1.2.4.102",  # MPEG-4 AVC
    "1.2.840.10008.1.2.4.107",  # HEVC
    "1.2.840.10008.1.2.5",  # RLE lossless
    "1.2.840.10008.1.2.1.99",  # deflated explicit VR little endian
]
NOT_PRECOMPRESSED = [
    "1.2.840.10008.1.2",  # implicit VR little endian
    "1.2.840.10008.1.2.1",  # explicit VR little endian
    "1.2.840.10008.1.2.2",  # explicit VR big endian (retired)
    "1.2.840.10008.1.2.1.98",  # encapsulated uncompressed explicit VR little endian
]


@pytest.fixture(scope="module")
def ct_file() -> bytes:
    """One synthetic CT slice, Part 10, explicit VR little endian (~513 KiB)."""
    return next(dicom_factory.study_files(dicom_factory.StudySpec(seed=3, images_per_series=1))).data


def meta_element(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    if vr in (b"OB", b"UN", b"SQ", b"UT", b"OW"):
        return struct.pack("<HH", group, element) + vr + b"\0\0" + struct.pack("<I", len(value)) + value
    return struct.pack("<HH", group, element) + vr + struct.pack("<H", len(value)) + value


def part10(ts: str, body: bytes = b"", *, with_version: bool = True) -> bytes:
    """A hand-built Part-10 file: preamble, DICM, file meta group with transfer syntax `ts`."""
    uid = ts.encode("ascii")
    if len(uid) % 2:
        uid += b"\0"
    elements = b""
    if with_version:
        elements += meta_element(2, 0x0001, b"OB", b"\0\1")
    elements += meta_element(2, 0x0002, b"UI", b"1.2.840.10008.5.1.4.1.1.2\0")
    elements += meta_element(2, 0x0003, b"UI", b"1.2.3.4")  # odd length: tolerated
    elements += meta_element(2, 0x0010, b"UI", uid)
    group_length = meta_element(2, 0x0000, b"UL", struct.pack("<I", len(elements)))
    return b"\0" * 128 + b"DICM" + group_length + elements + body


def compressible(size: int, seed: int = 0) -> bytes:
    """Like CT pixels: 12-bit values in 16-bit words, smooth with some noise."""
    rng = random.Random(seed)
    return b"".join(struct.pack("<H", (i // 7 + rng.randrange(16)) & 0x0FFF) for i in range(size // 2))


# --- configuration -----------------------------------------------------------------------


@pytest.mark.parametrize("text, level", [("off", None), ("OFF", None), ("zstd", ZSTD_DEFAULT_LEVEL), ("zstd:1", 1),
                                         ("zstd:3", 3), ("zstd:9", 9), (" zstd:+2 ", 2)])
def test_parse_compress(text: str, level: int | None) -> None:
    assert parse_compress(text) == level


@pytest.mark.parametrize("text", ["", "on", "lz4", "zstd:", "zstd:0", "zstd:10", "zstd:19", "zstd:-1", "zstd:x", "zstd 3", "zstd:1:2", "gzip:1"])
def test_parse_compress_rejects(text: str) -> None:
    with pytest.raises(UserError) as info:
        parse_compress(text)
    assert info.value.exit_code == 2
    assert "\n" not in str(info.value)


def test_config_file_tuning_compress(tmp_path: Path) -> None:
    path = tmp_path / "m.toml"
    path.write_text('store = "/s"\n[tuning]\ncompress = "zstd:3"\n')
    assert load_config_file(path) == {"store_url": "/s", "compress_level": 3}
    path.write_text('[tuning]\ncompress = "off"\n')
    assert load_config_file(path) == {"compress_level": None}
    for bad in ("compress = 3", "compress = true", 'compress = "lz4"', 'compress = "zstd:42"'):
        path.write_text(f"[tuning]\n{bad}\n")
        with pytest.raises(UserError) as info:
            load_config_file(path)
        assert info.value.exit_code == 2
        assert "tuning.compress" in str(info.value)


# --- transfer syntax detection -----------------------------------------------------------


def test_transfer_syntax_of_factory_file(ct_file: bytes) -> None:
    assert transfer_syntax(ct_file) == EXPLICIT_LE
    assert transfer_syntax(ct_file[:400]) == EXPLICIT_LE  # the file meta group is all it reads
    assert not is_precompressed_dicom(ct_file)


@pytest.mark.parametrize("ts", PRECOMPRESSED)
def test_precompressed_transfer_syntaxes(ts: str) -> None:
    data = part10(ts, compressible(64 * KiB))
    assert transfer_syntax(data) == ts
    assert is_precompressed_dicom(data)
    assert is_precompressed_dicom(part10(ts, with_version=False))


@pytest.mark.parametrize("ts", NOT_PRECOMPRESSED)
def test_uncompressed_transfer_syntaxes(ts: str) -> None:
    data = part10(ts, compressible(64 * KiB))
    assert transfer_syntax(data) == ts
    assert not is_precompressed_dicom(data)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\0" * 132,
        b"\0" * 128 + b"DICM",  # no meta elements
        b"\0" * 128 + b"DICX" + part10(PRECOMPRESSED[0])[132:],  # not Part 10
        part10(PRECOMPRESSED[0])[:-4],  # UID cut off
        b"\0" * 128 + b"DICM" + meta_element(8, 0x0016, b"UI", b"1.2"),  # no group 2
        b"\0" * 128 + b"DICM" + meta_element(2, 0x0010, b"OB", b"1.2.840.10008.1.2.4.50"),  # wrong VR
        b"\0" * 128 + b"DICM" + meta_element(2, 0x0010, b"UI", b"JPEG\0"),  # not a UID
        b"\0" * 128 + b"DICM" + struct.pack("<HH", 2, 1) + b"OB\0\0" + b"\xff\xff\xff\xff" + b"x" * 64,
    ],
)
def test_transfer_syntax_of_other_bytes_is_none(data: bytes) -> None:
    assert transfer_syntax(data) is None
    assert not is_precompressed_dicom(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_transfer_syntax_never_raises(tail: bytes) -> None:
    for data in (b"\0" * 128 + b"DICM" + tail, b"\0" * 128 + b"DICM" + struct.pack("<HH", 2, 0) + tail):
        result = transfer_syntax(data)
        assert result is None or isinstance(result, str)


def test_transfer_syntax_walk_is_bounded() -> None:
    # Meta elements that never end (a huge OB value) are not followed past the walk limit.
    data = b"\0" * 128 + b"DICM" + struct.pack("<HH", 2, 1) + b"OB\0\0" + struct.pack("<I", 10 * MiB) + b"\0" * 100
    assert transfer_syntax(data) is None


# --- compressing -------------------------------------------------------------------------


def test_compressible_chunk_round_trip(ct_file: bytes) -> None:
    comp = ChunkCompressor(1)
    frame = comp.compress(ct_file, 0)
    assert frame is not None
    assert len(frame) < 0.7 * len(ct_file)
    assert zstandard.frame_content_size(frame) == len(ct_file)  # content size is in the frame
    assert zstandard.ZstdDecompressor().decompress(frame) == ct_file  # a plain zstd decoder reads it
    assert decompress(frame, len(ct_file)) == ct_file
    st_ = comp.statistics()
    assert (st_.compressed, st_.skipped_dicom, st_.skipped_sample, st_.not_smaller) == (1, 0, 0, 0)
    assert (st_.plain_bytes, st_.stored_bytes) == (len(ct_file), len(frame))


def test_higher_level_compresses_more(ct_file: bytes) -> None:
    one = ChunkCompressor(1).compress(ct_file, 0)
    three = ChunkCompressor(3).compress(ct_file, 0)
    assert one is not None and three is not None
    assert len(three) < len(one)
    assert decompress(three, len(ct_file)) == ct_file


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview])
def test_compress_accepts_buffer_types(wrap: type) -> None:
    data = compressible(300 * KiB)
    frame = ChunkCompressor().compress(wrap(data), 2)
    assert frame is not None and decompress(frame, len(data)) == data


def test_incompressible_large_chunk_is_skipped_by_samples() -> None:
    comp = ChunkCompressor()
    assert comp.compress(os.urandom(4 * MiB), 1) is None
    assert comp.compress(os.urandom(compression.SAMPLED_MIN), 0) is None
    st_ = comp.statistics()
    assert (st_.compressed, st_.skipped_sample, st_.not_smaller, st_.plain_bytes) == (0, 2, 0, 0)


def test_incompressible_small_chunk_is_tried_and_stored_plain() -> None:
    comp = ChunkCompressor()
    assert comp.compress(os.urandom(compression.SAMPLED_MIN - 1), 0) is None
    assert comp.compress(b"x", 0) is None  # a frame is never smaller than one byte
    assert comp.compress(b"", 0) is None
    st_ = comp.statistics()
    assert (st_.compressed, st_.skipped_sample, st_.not_smaller) == (0, 0, 2)


def test_chunk_saving_less_than_the_minimum_is_stored_plain() -> None:
    # Half random, half zeros except a random tail: the samples (at 1/4, 1/2, 3/4) see zeros
    # and random, the whole chunk shrinks by ~1/3: compressed. With 95 % random it is not.
    size = 1 * MiB
    rng = random.Random(5)
    half = rng.randbytes(size // 2) + bytes(size // 2)
    mostly = rng.randbytes(size - size // 20) + bytes(size // 20)
    # Random except where the samples are taken: the samples shrink, the whole chunk by ~2 %.
    fooled = bytearray(rng.randbytes(size))
    step = size // (compression.SAMPLES + 1)
    for n in range(1, compression.SAMPLES + 1):
        fooled[n * step : n * step + compression.SAMPLE_BYTES] = bytes(compression.SAMPLE_BYTES)
    comp = ChunkCompressor()
    assert comp.compress(half, 1) is not None
    assert comp.compress(mostly, 1) is None
    assert comp.statistics().skipped_sample == 1
    assert comp.compress(fooled, 1) is None
    st_ = comp.statistics()
    assert (st_.compressed, st_.skipped_sample, st_.not_smaller) == (1, 1, 1)


@pytest.mark.parametrize("ts", PRECOMPRESSED)
def test_precompressed_dicom_chunk0_is_not_tried(ts: str) -> None:
    # The pixel data here is compressible: only the transfer syntax keeps it plain.
    data = part10(ts, compressible(600 * KiB))
    comp = ChunkCompressor()
    assert comp.compress(data, 0) is None
    assert comp.statistics().skipped_dicom == 1
    # The same bytes at another position are judged by content alone.
    assert comp.compress(data, 1) is not None


def test_uncompressed_dicom_chunk0_is_compressed(ct_file: bytes) -> None:
    comp = ChunkCompressor()
    assert comp.compress(part10(EXPLICIT_LE, compressible(600 * KiB)), 0) is not None
    assert comp.statistics().skipped_dicom == 0


def test_one_compressor_many_threads(ct_file: bytes) -> None:
    """Each concurrent call gets its own zstd context (a shared one crashes the interpreter),
    and contexts are reused: never more than there were concurrent calls."""
    comp = ChunkCompressor(1)
    inputs = [ct_file[i * 997 :] + bytes([i]) * 1000 for i in range(8)]
    results: dict[int, bytes | None] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(5):
                frame = comp.compress(inputs[i], i)
                assert frame is not None
                assert decompress(frame, len(inputs[i])) == inputs[i]
            results[i] = frame
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert sorted(results) == list(range(8))
    assert comp.statistics().compressed == 40
    assert 1 <= comp.contexts() <= 8


def test_compressor_level_is_checked() -> None:
    for level in (0, 10, -1):
        with pytest.raises(ValueError):
            ChunkCompressor(level)


# --- decompressing: never trust the frame ----------------------------------------------------


def _set_content_size(frame: bytes, new_size: int) -> bytes:
    """Rewrite a frame's Frame_Content_Size field (RFC 8878 section 3.1.1.1), same field width."""
    fhd = frame[4]
    fcs_flag, single_segment, did_flag = fhd >> 6, (fhd >> 5) & 1, fhd & 3
    pos = 5 + (0 if single_segment else 1) + [0, 1, 2, 4][did_flag]
    width = [1 if single_segment else 0, 2, 4, 8][fcs_flag]
    assert width, "frame has no content size field"
    value = new_size - 256 if width == 2 else new_size
    field = value.to_bytes(width, "little")
    return frame[:pos] + field + frame[pos + width :]


@pytest.fixture(scope="module")
def frame_and_plain() -> tuple[bytes, bytes]:
    plain = compressible(200 * KiB, seed=9)
    return zstandard.ZstdCompressor(level=1).compress(plain), plain


def test_decompress_round_trip(frame_and_plain: tuple[bytes, bytes]) -> None:
    frame, plain = frame_and_plain
    assert decompress(frame, len(plain)) == plain
    assert decompress(memoryview(frame), len(plain)) == plain


@pytest.mark.parametrize("delta", [-1, 1, -4096, 4096])
def test_decompress_wrong_expected_length(frame_and_plain: tuple[bytes, bytes], delta: int) -> None:
    frame, plain = frame_and_plain
    with pytest.raises(IntegrityError):
        decompress(frame, len(plain) + delta)


@pytest.mark.parametrize("delta", [-1, 1, -100])
def test_decompress_frame_that_lies_about_its_size(frame_and_plain: tuple[bytes, bytes], delta: int) -> None:
    """The declared size matches the metadata but the data is longer or shorter."""
    frame, plain = frame_and_plain
    forged = _set_content_size(frame, len(plain) + delta)
    assert zstandard.frame_content_size(forged) == len(plain) + delta
    with pytest.raises(IntegrityError):
        decompress(forged, len(plain) + delta)


def test_decompression_bomb_is_refused() -> None:
    bomb = zstandard.ZstdCompressor(level=1).compress(bytes(256 * MiB))
    assert len(bomb) < 64 * KiB
    with pytest.raises(IntegrityError):
        decompress(bomb, 4 * MiB)  # refused from the frame header, before any output


def test_decompression_bomb_declaring_the_metadata_length_is_refused() -> None:
    """A frame that declares plain_len but holds more stops at plain_len bytes of output."""
    bomb = _set_content_size(zstandard.ZstdCompressor(level=1).compress(bytes(64 * MiB)), 4 * MiB)
    assert zstandard.frame_content_size(bomb) == 4 * MiB
    with pytest.raises(IntegrityError):
        decompress(bomb, 4 * MiB)


def test_decompress_frame_without_content_size() -> None:
    plain = compressible(64 * KiB)
    frame = zstandard.ZstdCompressor(level=1, write_content_size=False).compress(plain)
    assert zstandard.frame_content_size(frame) == -1
    with pytest.raises(IntegrityError):
        decompress(frame, len(plain))


@pytest.mark.parametrize(
    "mangle",
    [
        lambda f: f + b"\0",  # trailing byte
        lambda f: f + f,  # a second frame
        lambda f: f[:-1],  # truncated
        lambda f: f[: len(f) // 2],
        lambda f: f[:4],
        lambda f: b"",
        lambda f: b"\x28\xb5\x2f",  # magic cut short
        lambda f: b"not a zstd frame at all, just bytes",
        lambda f: f[:20] + bytes([f[20] ^ 0xFF]) + f[21:],  # corrupt block data
    ],
)
def test_decompress_malformed_frames(frame_and_plain: tuple[bytes, bytes], mangle: object) -> None:
    frame, plain = frame_and_plain
    assert callable(mangle)
    with pytest.raises(IntegrityError):
        decompress(mangle(frame), len(plain))


def test_decompress_skippable_frame_is_refused(frame_and_plain: tuple[bytes, bytes]) -> None:
    frame, plain = frame_and_plain
    skippable = struct.pack("<II", 0x184D2A50, 4) + b"junk"
    with pytest.raises(IntegrityError):
        decompress(skippable + frame, len(plain))


# --- sealed form ---------------------------------------------------------------------------


def test_compressed_chunk_seals_and_opens(ct_file: bytes) -> None:
    frame = ChunkCompressor().compress(ct_file, 0)
    assert frame is not None
    blob = seal_chunk(DEK, ARCHIVE, FILE, 0, 1, frame, FLAG_ZSTD)
    assert blob[5] == FLAG_ZSTD
    assert len(blob) == len(frame) + 34
    payload, flags = open_chunk(DEK, ARCHIVE, FILE, 0, 1, blob)
    assert flags == FLAG_ZSTD
    assert decompress(payload, len(ct_file)) == ct_file


def test_compression_flag_is_authenticated(ct_file: bytes) -> None:
    """Clearing the flag of a compressed chunk (or setting it on a plain one) fails
    authentication: the frame is never served as plaintext, nor plaintext decompressed."""
    frame = ChunkCompressor().compress(ct_file, 0)
    assert frame is not None
    blob = seal_chunk(DEK, ARCHIVE, FILE, 0, 1, frame, FLAG_ZSTD)
    with pytest.raises(IntegrityError):
        open_chunk(DEK, ARCHIVE, FILE, 0, 1, blob[:5] + b"\0" + blob[6:])
    plain_blob = seal_chunk(DEK, ARCHIVE, FILE, 0, 1, ct_file)
    with pytest.raises(IntegrityError):
        open_chunk(DEK, ARCHIVE, FILE, 0, 1, plain_blob[:5] + bytes([FLAG_ZSTD]) + plain_blob[6:])
