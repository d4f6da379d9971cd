"""End-to-end: `mifs mount --compress zstd[:LEVEL]` stores CT images smaller and reads them back
byte for byte; already-compressed DICOM and incompressible files are stored as they are; an
archive written with compression is read by a mount without it, and the other way round.

Talks to mifs only through the CLI, the mounted filesystem and the store directory (chunk
objects are recognised by their magic; the flags byte at offset 5 says "zstd", docs/FORMAT.md
section 5).
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit

import dicom_factory
from mifs_e2e import (
    Archive,
    MiB,
    assert_bytes_equal,
    assert_cli_error,
    describe,
    is_fuse_mounted,
    pattern,
    read_file,
    run_mifs,
    write_file,
)

CHUNK_OVERHEAD = 18 + 16
FLAG_ZSTD = 0x01


def ct_files(seed: int, count: int) -> dict[str, bytes]:
    spec = dicom_factory.StudySpec(seed=seed, images_per_series=count)
    return {f"ct{seed}-{n:03d}.dcm": f.data for n, f in enumerate(dicom_factory.study_files(spec))}


def jpeg_file() -> bytes:
    """A DICOM file with the JPEG baseline transfer syntax whose "JPEG" data is in fact very
    compressible: only the transfer syntax can keep mifs from compressing it."""
    ds = dicom_factory.make_dataset(dicom_factory.StudySpec(seed=4, images_per_series=1), 1, 0)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([ds.PixelData[: 300 * 1024]])
    ds["PixelData"].VR = "OB"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    return dicom_factory.to_bytes(ds)


def new_objects(archive: Archive, before: set[str]) -> dict[str, bytes]:
    after = archive.chunk_objects()
    return {key: after[key].read_bytes() for key in set(after) - before}


def write_session(archive: Archive, files: dict[str, bytes], flags: list[str]) -> tuple[dict[str, object], dict[str, bytes]]:
    """Mount with `flags`, write `files`, take the status, unmount: (status, new objects)."""
    before = set(archive.chunk_objects())
    archive.mount(flags=flags)
    for name, data in files.items():
        write_file(archive.mountpoint / name, data)
    # Indexed before the unmount: the next mount would otherwise index objects a test tampered with.
    status = archive.wait_status(lambda s: s["index_backlog"] == 0, 30, "the indexer to catch up")
    archive.umount()
    return status, new_objects(archive, before)


def assert_files(archive: Archive, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        assert_bytes_equal(read_file(archive.mountpoint / name), data, name)


def test_compressed_and_plain_archives_read_by_any_mount(archive: Archive) -> None:
    ct = ct_files(11, 12)
    ct_bytes = sum(map(len, ct.values()))

    # 1. CT slices with --compress zstd: every chunk compressed, the whole stored < 60 %.
    status, objects = write_session(archive, ct, ["--compress", "zstd"])
    assert status["compression"] == "zstd:1"
    assert status["compressed_chunks"] == len(ct)
    assert status["compressed_plain_bytes"] == ct_bytes
    assert len(objects) == len(ct)
    assert all(blob[5] == FLAG_ZSTD for blob in objects.values())
    stored = sum(map(len, objects.values()))
    assert stored < 0.6 * ct_bytes, (stored, ct_bytes)
    assert status["compressed_stored_bytes"] + len(ct) * CHUNK_OVERHEAD == stored

    # 2. Same option: a JPEG-syntax DICOM file and random bytes are stored uncompressed.
    others = {"jpeg.dcm": jpeg_file(), "random.bin": os.urandom(MiB)}
    status, objects = write_session(archive, others, ["--compress", "zstd"])
    assert status["compressed_chunks"] == 0
    assert status["compress_skipped_dicom"] == 1
    assert status["compress_skipped_sample"] == 1
    assert len(objects) == 2
    assert all(blob[5] == 0 for blob in objects.values())
    assert sorted(map(len, objects.values())) == sorted(len(d) + CHUNK_OVERHEAD for d in others.values())

    # 3. A mount without the option reads the compressed chunks and writes plain ones.
    more_ct = ct_files(12, 3)
    archive.mount()
    assert archive.status_json()["compression"] == "off"
    assert_files(archive, ct)
    assert_files(archive, others)
    before = set(archive.chunk_objects())
    for name, data in more_ct.items():
        write_file(archive.mountpoint / name, data)
    archive.umount()
    objects = new_objects(archive, before)
    assert len(objects) == len(more_ct)
    assert all(blob[5] == 0 for blob in objects.values())
    assert sorted(map(len, objects.values())) == sorted(len(d) + CHUNK_OVERHEAD for d in more_ct.values())

    # 4. A mount at another level reads everything, and rewrites part of a compressed chunk
    #    (read-modify-write through decompression).
    everything = {**ct, **others, **more_ct}
    archive.mount(flags=["--compress", "zstd:3"])
    assert archive.status_json()["compression"] == "zstd:3"
    assert_files(archive, everything)
    name = next(iter(ct))
    patch = pattern("patch", 4096)
    with open(archive.mountpoint / name, "r+b") as fh:
        fh.seek(1000)
        fh.write(patch)
    everything[name] = ct[name][:1000] + patch + ct[name][1000 + len(patch):]
    assert_files(archive, {name: everything[name]})
    assert archive.status_json()["compressed_chunks"] == 1
    archive.umount()

    # 5. And once more without the option, from the store.
    archive.mount()
    assert_files(archive, everything)
    status = archive.status_json()
    assert status["stored_bytes"] < 0.75 * status["bytes"], (status["stored_bytes"], status["bytes"])
    archive.umount()


@pytest.mark.chunk_size("256KiB")
def test_multi_chunk_files(archive: Archive) -> None:
    """Files of several chunks: compressible ones are compressed chunk by chunk (a short
    last chunk too), a JPEG-syntax file's later chunks are judged by their content."""
    ct = next(iter(ct_files(13, 1).values()))  # 513 KiB: chunks 256 + 256 + 1 KiB
    jpeg = jpeg_file()  # ~301 KiB: chunk 0 skipped for its syntax, chunk 1 (45 KiB) compressed
    status, objects = write_session(archive, {"ct.dcm": ct, "jpeg.dcm": jpeg}, ["--compress", "zstd"])
    assert len(objects) == 5
    assert status["compress_skipped_dicom"] == 1
    assert status["compressed_chunks"] == 4
    assert sorted(blob[5] for blob in objects.values()) == [0, 1, 1, 1, 1]
    archive.mount()
    assert_files(archive, {"ct.dcm": ct, "jpeg.dcm": jpeg})
    archive.umount()


@pytest.mark.expect_log(
    r"ERROR .*integrity failure: object data/[0-9a-f]{2}/[0-9a-f]{32} \(inode \d+, chunk \d+, generation \d+\) from \w+",
    r"WARNING .*cached copy of object data/[0-9a-f]{2}/[0-9a-f]{32} failed authentication; fetching it again",
)
def test_tampered_compressed_chunks_give_eio(archive: Archive) -> None:
    """A compressed chunk whose flag is cleared, or whose ciphertext is flipped, is an
    integrity failure (EIO) for that file only; the frame never reaches a reader as data."""
    files = ct_files(16, 3)
    objects: dict[str, str] = {}
    for name, data in files.items():
        _, new = write_session(archive, {name: data}, ["--compress", "zstd"])
        assert len(new) == 1 and next(iter(new.values()))[5] == FLAG_ZSTD
        objects[name] = next(iter(new))
    flag_cleared, flipped, intact = files
    blob = (archive.store / objects[flag_cleared]).read_bytes()
    archive.replace_object(objects[flag_cleared], blob[:5] + b"\0" + blob[6:], also_cache=True)
    blob = (archive.store / objects[flipped]).read_bytes()
    middle = len(blob) // 2
    archive.replace_object(objects[flipped], blob[:middle] + bytes([blob[middle] ^ 1]) + blob[middle + 1:], also_cache=True)
    archive.mount()
    for name in (flag_cleared, flipped):
        with pytest.raises(OSError) as info:
            read_file(archive.mountpoint / name)
        assert info.value.errno == errno.EIO, name
    assert_files(archive, {intact: files[intact]})
    assert archive.status_json()["integrity_failures"] >= 2
    archive.umount()


def test_compress_from_config_file_and_flag_override(archive: Archive, tmp_path: Path) -> None:
    config = tmp_path / "mifs.toml"
    config.write_text('[tuning]\ncompress = "zstd:2"\n')
    archive.mount(flags=["--config", config])
    assert archive.status_json()["compression"] == "zstd:2"
    write_file(archive.mountpoint / "ct.dcm", next(iter(ct_files(15, 1).values())))
    human = archive.run_cli("status", archive.mountpoint)
    assert human.returncode == 0, describe(human)
    line = [ln for ln in human.stdout.splitlines() if ln.startswith("compression")]
    assert len(line) == 1 and "zstd:2: 1 chunks since mount" in line[0], describe(human)
    archive.umount()
    archive.mount(flags=["--config", config, "--compress", "off"])
    assert archive.status_json()["compression"] == "off"
    archive.umount()


@pytest.mark.parametrize("value", ["lz4", "zstd:0", "zstd:10", "zstd:fast", ""])
def test_bad_compress_flag_is_one_error_line(archive: Archive, value: str) -> None:
    result = run_mifs("mount", archive.store, archive.mountpoint, "--key-file", archive.key_file,
                      "--cache-dir", archive.cache_dir, "--compress", value)
    assert_cli_error(result, 2)
    assert "compression" in result.stderr or "zstd level" in result.stderr, describe(result)
    assert not is_fuse_mounted(archive.mountpoint)


def test_bad_compress_in_config_is_one_error_line(archive: Archive, tmp_path: Path) -> None:
    config = tmp_path / "mifs.toml"
    config.write_text("[tuning]\ncompress = 1\n")
    result = run_mifs("mount", archive.store, archive.mountpoint, "--key-file", archive.key_file,
                      "--cache-dir", archive.cache_dir, "--config", config)
    assert_cli_error(result, 2)
    assert "tuning.compress" in result.stderr, describe(result)
    assert not is_fuse_mounted(archive.mountpoint)


def test_s3_cold_read_of_compressed_study(s3_archive: Archive) -> None:
    """Chunks written compressed to S3 are fetched, authenticated and decompressed by a mount
    without the option and with an empty cache."""
    ct = ct_files(14, 8)
    s3_archive.mount(flags=["--compress", "zstd"])
    for name, data in ct.items():
        write_file(s3_archive.mountpoint / name, data)
    status = s3_archive.status_json()
    assert status["compressed_chunks"] == len(ct)
    s3_archive.umount()  # waits for the uploads
    s3_archive.wipe_cache()
    s3_archive.mount()
    status = s3_archive.status_json()
    assert status["compression"] == "off"
    assert status["stored_bytes"] < 0.6 * status["bytes"], (status["stored_bytes"], status["bytes"])
    chunks_dir = s3_archive.cache_dir / "chunks"
    assert not chunks_dir.exists() or not [p for p in chunks_dir.rglob("*") if p.is_file()], "the cache is not empty"
    assert_files(s3_archive, ct)  # every chunk from the store
    s3_archive.umount()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
