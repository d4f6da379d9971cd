"""Optional zstd compression of chunk plaintext before sealing, and its bounded decompression.

Pure and synchronous (callers run it in worker threads; every zstd call releases the GIL); must
not touch the store, keys, files or the event loop. `zstandard`'s one home. Byte layout:
docs/FORMAT.md section 5 (a chunk with FLAG_ZSTD holds one zstd frame, RFC 8878, with its
content size set).

What is compressed: a chunk is compressed only if that saves at least MIN_SAVING of it, else it
is sealed as plain bytes. Two cheap checks avoid spending a full compression on data that will
not shrink: chunk 0 of a DICOM Part-10 file whose transfer syntax is already compressed (JPEG,
JPEG-LS, JPEG 2000, RLE, deflate, MPEG/HEVC video: a walk of the file meta group, no pydicom)
is skipped without trying; any other chunk of at least SAMPLED_MIN bytes is first probed by
compressing a few small samples, and skipped if they do not shrink.

Threads: a zstandard compressor or decompressor must never be used by two threads at once
(a shared compressor crashed the interpreter). A compression takes a compressor from a free
list for the duration of the call (a new one when none is free), so there are never more
compressors than concurrent calls (at most the crypto limiter's 4), whichever threads trio
hands out; each holds ~1.3 MiB at level 1, ~15 MiB at level 9. Decompressors are small
(~0.1 MiB) and kept one per thread.
"""

from __future__ import annotations

import re
import struct
import threading
from dataclasses import dataclass

import zstandard

from mifs.config import ZSTD_DEFAULT_LEVEL, ZSTD_MAX_LEVEL, ZSTD_MIN_LEVEL
from mifs.errors import IntegrityError

MIN_SAVING = 0.10
"""A compressed chunk is kept only if it is at least this fraction smaller than the plaintext."""
SAMPLE_BYTES = 8 * 1024
SAMPLES = 3
SAMPLED_MIN = 16 * SAMPLE_BYTES
"""Chunks at least this large are probed with SAMPLES samples before being compressed whole."""
SAMPLE_MIN_SAVING = 0.03
"""Samples that shrink less than this say "incompressible" (small samples compress worse than
the whole chunk, so this bar is lower than MIN_SAVING)."""

# DICOM transfer syntaxes whose pixel data is already compressed (PS3.5 section 10 and
# Annex A.4): every JPEG-family syntax (baseline, extended, lossless, JPEG-LS, JPEG 2000 and
# HTJ2K, JPIP, JPEG XL) and the video syntaxes (MPEG-2, MPEG-4, HEVC) share the prefix
# 1.2.840.10008.1.2.4.; RLE, deflated explicit VR LE and deflated image frames stand alone.
_COMPRESSED_TS_PREFIX = "1.2.840.10008.1.2.4."
_COMPRESSED_TS = frozenset({"1.2.840.10008.1.2.5", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.8.1"})
_PREAMBLE = 128
_MAGIC = b"DICM"
_META_WALK_LIMIT = 64 * 1024
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_UID_RE = re.compile(rb"^[0-9.]{1,64}$")

def transfer_syntax(prefix: bytes | bytearray | memoryview) -> str | None:
    """The Transfer Syntax UID (0002,0010) of a DICOM Part-10 file from its first bytes, or
    None when the bytes are not a Part-10 file or its file meta group cannot be walked.

    The file meta group is always explicit VR little endian (PS3.10 section 7.1), so this
    walks its elements; it reads at most _META_WALK_LIMIT bytes and never looks past group 2.
    """
    view = memoryview(prefix)
    if bytes(view[_PREAMBLE : _PREAMBLE + 4]) != _MAGIC:
        return None
    pos = _PREAMBLE + 4
    limit = min(len(view), _META_WALK_LIMIT)
    while pos + 8 <= limit:
        group, element = struct.unpack_from("<HH", view, pos)
        if group != 0x0002:
            return None
        vr = bytes(view[pos + 4 : pos + 6])
        if vr in _LONG_VRS:
            if pos + 12 > limit:
                return None
            (length,) = struct.unpack_from("<I", view, pos + 8)
            value_at = pos + 12
        else:
            (length,) = struct.unpack_from("<H", view, pos + 6)
            value_at = pos + 8
        if length == 0xFFFFFFFF:
            return None  # undefined length has no place in the file meta group
        if element == 0x0010:
            if vr != b"UI" or value_at + length > limit:
                return None
            uid = bytes(view[value_at : value_at + length]).rstrip(b"\0 ")
            return uid.decode("ascii") if _UID_RE.match(uid) else None
        pos = value_at + length
    return None


def is_precompressed_dicom(prefix: bytes | bytearray | memoryview) -> bool:
    """True if these are the first bytes of a DICOM file whose pixel data is already compressed."""
    uid = transfer_syntax(prefix)
    return uid is not None and (uid.startswith(_COMPRESSED_TS_PREFIX) or uid in _COMPRESSED_TS)


@dataclass(frozen=True)
class CompressorStatistics:
    compressed: int
    """Chunks sealed compressed."""
    skipped_dicom: int
    """Chunks 0 of files with an already-compressed transfer syntax, not tried."""
    skipped_sample: int
    """Chunks whose samples did not shrink, not tried."""
    not_smaller: int
    """Chunks compressed but kept plain (saving below MIN_SAVING)."""
    plain_bytes: int
    """Plaintext bytes of the chunks sealed compressed."""
    stored_bytes: int
    """Their compressed bytes."""


class ChunkCompressor:
    """Compresses chunk plaintext for one mount at one zstd level; safe to call from any
    number of worker threads at once (one zstd context per concurrent call, reused)."""

    def __init__(self, level: int = ZSTD_DEFAULT_LEVEL) -> None:
        if not ZSTD_MIN_LEVEL <= level <= ZSTD_MAX_LEVEL:
            raise ValueError("zstd level out of range")
        self.level = level
        self._lock = threading.Lock()  # guards the free list and the counters
        self._free: list[zstandard.ZstdCompressor] = []
        self._counts = [0, 0, 0, 0, 0, 0]

    def _take(self) -> zstandard.ZstdCompressor:
        with self._lock:
            if self._free:
                return self._free.pop()
        return zstandard.ZstdCompressor(level=self.level, write_content_size=True)

    def _give_back(self, cctx: zstandard.ZstdCompressor) -> None:
        with self._lock:
            self._free.append(cctx)

    def _count(self, slot: int, plain: int = 0, stored: int = 0) -> None:
        with self._lock:
            self._counts[slot] += 1
            self._counts[4] += plain
            self._counts[5] += stored

    def compress(self, data: bytes | bytearray | memoryview, index: int) -> bytes | None:
        """One zstd frame of `data` (chunk number `index` of its file), or None when the chunk
        should be sealed as it is."""
        size = len(data)
        if size == 0:
            return None
        if index == 0 and is_precompressed_dicom(data):
            self._count(1)
            return None
        cctx = self._take()  # this call's own: never used by two threads at once
        try:
            if size >= SAMPLED_MIN and not self._samples_shrink(cctx, data):
                self._count(2)
                return None
            frame = cctx.compress(data)
        finally:
            self._give_back(cctx)
        if len(frame) > size - int(size * MIN_SAVING):
            self._count(3)
            return None
        self._count(0, size, len(frame))
        return frame

    @staticmethod
    def _samples_shrink(cctx: zstandard.ZstdCompressor, data: bytes | bytearray | memoryview) -> bool:
        view = memoryview(data)
        step = len(view) // (SAMPLES + 1)
        stored = 0
        for n in range(1, SAMPLES + 1):
            stored += len(cctx.compress(view[n * step : n * step + SAMPLE_BYTES]))
        return stored <= SAMPLES * SAMPLE_BYTES * (1 - SAMPLE_MIN_SAVING)

    def statistics(self) -> CompressorStatistics:
        with self._lock:
            return CompressorStatistics(*self._counts)

    def contexts(self) -> int:
        """How many compressors exist now (none is in use when nobody compresses)."""
        with self._lock:
            return len(self._free)


_decompressors = threading.local()


def decompress(frame: bytes | memoryview, plain_len: int) -> bytes:
    """The plaintext of a chunk sealed with FLAG_ZSTD, which must be exactly plain_len bytes
    (the metadata's length): IntegrityError for anything else (not one complete zstd frame,
    no or another content size, trailing bytes, corrupt data). Never allocates more than
    plain_len bytes of output, whatever the frame claims."""
    dctx: zstandard.ZstdDecompressor | None = getattr(_decompressors, "dctx", None)
    if dctx is None:
        dctx = _decompressors.dctx = zstandard.ZstdDecompressor()
    try:
        declared = zstandard.frame_content_size(frame)
    except zstandard.ZstdError:
        raise IntegrityError("compressed chunk is not a zstd frame") from None
    if declared != plain_len:
        raise IntegrityError("compressed chunk declares a length other than the metadata's")
    try:
        plaintext = dctx.decompress(frame, max_output_size=plain_len, allow_extra_data=False)
    except zstandard.ZstdError:
        raise IntegrityError("compressed chunk does not decompress") from None
    if len(plaintext) != plain_len:
        raise IntegrityError("compressed chunk decompresses to a length other than the metadata's")
    return plaintext
