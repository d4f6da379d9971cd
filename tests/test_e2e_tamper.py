"""End-to-end: a tampered, swapped, replayed, truncated or missing chunk object gives EIO for
its own range only; everything else keeps reading (and writing) correctly.

Talks to mifs only through the CLI, the mounted filesystem and the store directory, which the
tests edit while the archive is unmounted, as an attacker with access to the store could.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from pathlib import Path

import pytest

from mifs_e2e import Archive, pattern, read_chunks_direct, read_file, write_file

pytestmark = [
    pytest.mark.chunk_size("64KiB"),
    pytest.mark.expect_log(
        r"ERROR .*integrity failure: object data/[0-9a-f]{2}/[0-9a-f]{32} \(inode \d+, chunk \d+, generation \d+\) from \w+",
        r"WARNING .*cached copy of object data/[0-9a-f]{2}/[0-9a-f]{32} failed authentication; fetching it again",
        r"ERROR .*chunk object of inode \d+ index \d+ is missing from the store",
    ),
]

CHUNKS_A = 6
CHUNKS_B = 4


@dataclass
class TwoFiles:
    a: bytes
    b: bytes
    objects_a: dict[str, bytes]  # key -> sealed bytes, chunk order unknown
    objects_b: dict[str, bytes]


def write_two_files(archive: Archive) -> TwoFiles:
    """A and B written in separate sessions, so each one's objects are known."""
    c = archive.chunk_size
    a, b = pattern("file A", CHUNKS_A * c), pattern("file B", CHUNKS_B * c)
    objects_a = archive.write_in_own_session("A", a)
    objects_b = archive.write_in_own_session("B", b)
    assert len(objects_a) == CHUNKS_A and len(objects_b) == CHUNKS_B, (sorted(objects_a), sorted(objects_b))
    return TwoFiles(a, b, objects_a, objects_b)


def outcomes(path: Path, expected: bytes, chunk_size: int) -> list[str]:
    """Per chunk: "ok" (right bytes), "EIO", or what else went wrong."""
    result = []
    for index, got in enumerate(read_chunks_direct(path, chunk_size)):
        want = expected[index * chunk_size:(index + 1) * chunk_size]
        if isinstance(got, OSError):
            result.append("EIO" if got.errno == errno.EIO else f"error {got!r}")
        else:
            result.append("ok" if got == want else f"WRONG BYTES ({len(got)} bytes)")
    return result


def check_after_tamper(archive: Archive, files: TwoFiles, bad_a: int, bad_b: int = 0) -> None:
    """Remount; exactly bad_a chunks of A and bad_b of B give EIO, the rest read correctly,
    a whole-file read of a damaged file fails with EIO, and the archive still takes writes."""
    archive.mount()
    mp, c = archive.mountpoint, archive.chunk_size
    got_a, got_b = outcomes(mp / "A", files.a, c), outcomes(mp / "B", files.b, c)
    assert sorted(set(got_a + got_b)) <= ["EIO", "ok"], f"A: {got_a}, B: {got_b}"
    assert (got_a.count("EIO"), got_b.count("EIO")) == (bad_a, bad_b), f"A: {got_a}, B: {got_b}"
    for name, bad in (("A", bad_a), ("B", bad_b)):
        if bad:
            with pytest.raises(OSError) as exc_info:
                read_file(mp / name)
            assert exc_info.value.errno == errno.EIO
    # the rest of the archive keeps working, also for writing
    write_file(mp / "C", b"written after the tamper")
    assert read_file(mp / "C") == b"written after the tamper"
    archive.remount()
    assert read_file(mp / "C") == b"written after the tamper"
    if not bad_b:
        assert read_file(mp / "B") == files.b


def flip(data: bytes, offset: int) -> bytes:
    out = bytearray(data)
    out[offset] ^= 0x01
    return bytes(out)


def test_flipped_bits_give_eio(archive: Archive) -> None:
    files = write_two_files(archive)
    keys = sorted(files.objects_a)
    blob = files.objects_a[keys[0]]
    archive.replace_object(keys[0], flip(blob, len(blob) // 2), also_cache=False)  # ciphertext
    blob = files.objects_a[keys[1]]
    archive.replace_object(keys[1], flip(blob, len(blob) - 1), also_cache=True)  # tag, cache too
    blob = files.objects_a[keys[2]]
    archive.replace_object(keys[2], flip(blob, 8), also_cache=False)  # nonce
    check_after_tamper(archive, files, bad_a=3)


def test_chunks_swapped_within_a_file_give_eio(archive: Archive) -> None:
    files = write_two_files(archive)
    k1, k2 = sorted(files.objects_a)[:2]
    archive.replace_object(k1, files.objects_a[k2], also_cache=False)
    archive.replace_object(k2, files.objects_a[k1], also_cache=False)
    check_after_tamper(archive, files, bad_a=2)


def test_chunks_swapped_between_files_give_eio(archive: Archive) -> None:
    files = write_two_files(archive)
    ka, kb = sorted(files.objects_a)[0], sorted(files.objects_b)[0]
    archive.replace_object(ka, files.objects_b[kb], also_cache=True)
    archive.replace_object(kb, files.objects_a[ka], also_cache=True)
    check_after_tamper(archive, files, bad_a=1, bad_b=1)


def test_replayed_old_generation_gives_eio(archive: Archive) -> None:
    files = write_two_files(archive)
    c = archive.chunk_size
    index = 2
    new_bytes = pattern("new generation", c)
    before = archive.chunk_objects()
    archive.mount()
    with open(archive.mountpoint / "A", "r+b") as fh:
        fh.seek(index * c)
        fh.write(new_bytes)
    archive.umount()
    after = archive.chunk_objects()
    added, removed = set(after) - set(before), set(before) - set(after)
    assert len(added) == 1, f"rewriting one chunk made {len(added)} new objects"
    assert len(removed) == 1 and removed <= set(files.objects_a), \
        f"the previous generation should be deleted after the commit: removed {removed}"
    (new_key,) = added
    (old_key,) = removed
    # put the old generation's bytes back under the live name
    archive.replace_object(new_key, files.objects_a[old_key], also_cache=True)
    files.a = files.a[:index * c] + new_bytes + files.a[(index + 1) * c:]
    check_after_tamper(archive, files, bad_a=1)
    got = outcomes(archive.mountpoint / "A", files.a, c)
    assert got[index] == "EIO", got


def test_truncated_and_extended_objects_give_eio(archive: Archive) -> None:
    files = write_two_files(archive)
    k1, k2, k3 = sorted(files.objects_b)[:3]
    archive.replace_object(k1, files.objects_b[k1][:-1], also_cache=False)  # one byte short
    archive.replace_object(k2, files.objects_b[k2][:10], also_cache=True)  # shorter than a header
    archive.replace_object(k3, files.objects_b[k3] + b"\0" * 16, also_cache=False)  # extended
    check_after_tamper(archive, files, bad_a=0, bad_b=3)


def test_missing_object_gives_eio(archive: Archive) -> None:
    files = write_two_files(archive)
    key = sorted(files.objects_a)[0]
    archive.replace_object(key, None, also_cache=False)
    check_after_tamper(archive, files, bad_a=1)
