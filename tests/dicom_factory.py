"""Synthetic DICOM Part-10 files for tests and demos: realistic headers, recognisable pixels.

Deterministic for a given seed; needs pydicom only (no numpy). Must not import mifs.
Run `python tests/dicom_factory.py OUTDIR --count N` to write a demo study as
OUTDIR/<patient>/<study>/<series>/IMxxxxx.dcm.

Pixel data: a fixed 12-bit gradient, a noise band that differs per slice (so no two slices
are equal and compression behaves as on real images), and row 0 filled with
`pixel_marker(seed)` followed by the slice index, a byte string a test can search for.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import random
import struct
import sys
from array import array
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Iterator

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

UID_PREFIX = "1.2.826.0.1.3680043.8.498."  # pydicom's UID root, for test data only

# modality -> (SOP class, default rows, default columns)
MODALITIES: dict[str, tuple[str, int, int]] = {
    "CT": (CTImageStorage, 512, 512),  # 512 KiB of pixels per slice
    "MR": (MRImageStorage, 256, 256),
    "CR": (ComputedRadiographyImageStorage, 1024, 1024),
}

_MASK_12BIT_HIGH = bytes(b & 0x0F for b in range(256))


@dataclass(frozen=True)
class Patient:
    name: str = "DOE^JANE"
    patient_id: str = "PID00001"
    birth_date: str = "19700101"
    sex: str = "F"


@dataclass(frozen=True)
class StudySpec:
    """What to generate; every UID is derived from `seed` unless given."""

    seed: int = 0
    patient: Patient = field(default_factory=Patient)
    modality: str = "CT"
    series_count: int = 1
    images_per_series: int = 10
    rows: int | None = None
    columns: int | None = None
    study_description: str = "CT CHEST W/O CONTRAST"
    accession_number: str = ""
    study_uid: str = ""
    study_date: str = "20240115"


@dataclass(frozen=True)
class DicomFile:
    relpath: PurePosixPath  # patient/study/series/IMxxxxx.dcm
    data: bytes
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str


def make_uid(*parts: object) -> str:
    return str(generate_uid(prefix=UID_PREFIX, entropy_srcs=[repr(p) for p in parts]))


def pixel_marker(seed: int) -> bytes:
    """32 bytes that appear in row 0 of every slice generated with this seed."""
    return hashlib.sha256(b"mifs-test-pixel-marker:%d" % seed).digest()


@lru_cache(maxsize=8)
def _gradient(rows: int, columns: int) -> bytes:
    values = array("H", (((x * 8) + (y * 4) + ((x * y) >> 7)) & 0x0FFF for y in range(rows) for x in range(columns)))
    if sys.byteorder == "big":
        values.byteswap()
    return values.tobytes()


def pixel_data(seed: int, index: int, rows: int, columns: int) -> bytes:
    """Little-endian 12-in-16-bit pixels; deterministic in (seed, index)."""
    data = bytearray(_gradient(rows, columns))
    row_bytes = columns * 2
    head = (pixel_marker(seed) + struct.pack("<I", index)) * (row_bytes // 36 + 1)
    data[0:row_bytes] = head[:row_bytes]
    rng = random.Random(f"pixels:{seed}:{index}")
    band_start = (rows // 3) * row_bytes
    band_len = max(rows // 4, 1) * row_bytes
    data[band_start:band_start + band_len:2] = rng.randbytes(band_len // 2)
    data[band_start + 1:band_start + band_len:2] = rng.randbytes(band_len // 2).translate(_MASK_12BIT_HIGH)
    return bytes(data)


# Attributes of each modality's image module, by DICOM keyword.
MODALITY_ATTRIBUTES: dict[str, dict[str, str]] = {
    "CT": {"KVP": "120", "RescaleIntercept": "-1024", "RescaleSlope": "1", "RescaleType": "HU",
           "WindowCenter": "40", "WindowWidth": "400", "ConvolutionKernel": "STANDARD"},
    "MR": {"ScanningSequence": "SE", "SequenceVariant": "NONE", "EchoTime": "12",
           "RepetitionTime": "500", "MagneticFieldStrength": "1.5"},
    "CR": {"BodyPartExamined": "CHEST", "ViewPosition": "PA"},
}


def make_dataset(spec: StudySpec, series_number: int, index: int) -> Dataset:
    sop_class, default_rows, default_columns = MODALITIES[spec.modality]
    rows = spec.rows or default_rows
    columns = spec.columns or default_columns
    study_uid = spec.study_uid or make_uid("study", spec.seed)
    series_uid = make_uid("series", spec.seed, series_number)
    sop_uid = make_uid("instance", spec.seed, series_number, index)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = spec.study_date
    ds.StudyTime = "083000"
    ds.SeriesTime = f"08{30 + series_number % 30:02d}00"
    ds.ContentTime = f"08{30 + series_number % 30:02d}{index % 60:02d}"
    ds.AccessionNumber = spec.accession_number or f"ACC{spec.seed:07d}"
    ds.Modality = spec.modality
    ds.Manufacturer = "MIFS TEST FACTORY"
    ds.InstitutionName = "General Hospital"
    ds.ReferringPhysicianName = "HOUSE^GREGORY"
    ds.StudyDescription = spec.study_description
    ds.SeriesDescription = f"{spec.modality} SERIES {series_number}"
    ds.PatientName = spec.patient.name
    ds.PatientID = spec.patient.patient_id
    ds.PatientBirthDate = spec.patient.birth_date
    ds.PatientSex = spec.patient.sex
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = str(spec.seed % 100000)
    ds.SeriesNumber = series_number
    ds.InstanceNumber = index + 1
    ds.FrameOfReferenceUID = make_uid("frame", spec.seed, series_number)
    ds.PositionReferenceIndicator = ""
    ds.ImagePositionPatient = ["-250.0", "-250.0", f"{-index * 1.25:.2f}"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.SliceThickness = "1.25"
    ds.SliceLocation = f"{-index * 1.25:.2f}"
    ds.PixelSpacing = ["0.976562", "0.976562"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    for keyword, value in MODALITY_ATTRIBUTES[spec.modality].items():
        setattr(ds, keyword, value)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL" if spec.modality != "CR" else ""]
    ds.PixelData = pixel_data(spec.seed * 1000 + series_number, index, rows, columns)
    ds["PixelData"].VR = "OW"
    return ds


def to_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def study_files(spec: StudySpec) -> Iterator[DicomFile]:
    """Every file of the study, series by series, in instance order."""
    for series_number in range(1, spec.series_count + 1):
        for index in range(spec.images_per_series):
            ds = make_dataset(spec, series_number, index)
            relpath = PurePosixPath(
                f"{_safe(spec.patient.name)}_{_safe(spec.patient.patient_id)}",
                f"{spec.study_date}_{_safe(ds.AccessionNumber)}",
                f"{series_number:03d}_{spec.modality}",
                f"IM{index + 1:05d}.dcm",
            )
            yield DicomFile(relpath, to_bytes(ds), ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID)


def write_study(outdir: Path, spec: StudySpec) -> list[Path]:
    written = []
    for item in study_files(spec):
        path = outdir / item.relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(item.data)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a synthetic DICOM study (deterministic per seed).")
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--count", type=int, default=10, help="images per series")
    parser.add_argument("--series", type=int, default=1, help="number of series")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modality", choices=sorted(MODALITIES), default="CT")
    parser.add_argument("--patient-name", default="DOE^JANE")
    parser.add_argument("--patient-id", default="PID00001")
    args = parser.parse_args(argv)
    spec = StudySpec(
        seed=args.seed,
        patient=Patient(name=args.patient_name, patient_id=args.patient_id),
        modality=args.modality,
        series_count=args.series,
        images_per_series=args.count,
    )
    paths = write_study(args.outdir, spec)
    total = sum(p.stat().st_size for p in paths)
    print(f"wrote {len(paths)} files, {total} bytes, under {args.outdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
