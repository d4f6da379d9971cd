"""mifs.dicom_index.header: classifying a file and reading its identifying header from its
first bytes (parse_header), with pydicom itself as the oracle for every expected value.

Pure function tests: bytes in, ParseResult out. Real DICOM files: synthetic ones from
tests/dicom_factory.py and the test files pydicom ships (several transfer syntaxes, a bare
dataset without file meta, a DICOMDIR).
"""

from __future__ import annotations

import datetime
import io
import random
import struct
from pathlib import Path

import pydicom
import pydicom.uid
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset

from dicom_factory import Patient, StudySpec, make_dataset, study_files, to_bytes
from mifs.dicom_index.header import InstanceHeader, ParseResult, Verdict, parse_header

# pydicom warns about values it cannot decode (a prefix can cut a character set name in half);
# the daemon silences these, pytest's own warning capture would only make noise of them.
pytestmark = pytest.mark.filterwarnings(r"ignore::UserWarning:pydicom(\..*)?")

PYDICOM_FILES = {
    # name -> the transfer syntax the file is known to use
    "CT_small.dcm": pydicom.uid.ExplicitVRLittleEndian,
    "MR_small_implicit.dcm": pydicom.uid.ImplicitVRLittleEndian,
    "MR_small_bigendian.dcm": pydicom.uid.ExplicitVRBigEndian,
    "MR_small_RLE.dcm": pydicom.uid.RLELossless,
    "JPEG2000.dcm": pydicom.uid.JPEG2000,
    "MR_small_jpeg_ls_lossless.dcm": pydicom.uid.JPEGLSLossless,
    "image_dfl.dcm": pydicom.uid.DeflatedExplicitVRLittleEndian,
    "ExplVR_BigEndNoMeta.dcm": pydicom.uid.ExplicitVRBigEndian,  # bare dataset: no preamble, no meta
}
PIXEL_DATA_TAG = {True: b"\xe0\x7f\x10\x00", False: b"\x7f\xe0\x00\x10"}  # (7FE0,0010) LE / BE


# --- the oracle ----------------------------------------------------------------------------------


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, pydicom.multival.MultiValue):
        value = "\\".join(str(v) for v in value)
    return str(value).strip()


def _int_or_none(ds: Dataset, keyword: str) -> int | None:
    text = _text(ds, keyword)
    return int(text) if text else None


def iso_date(text: str) -> str | None:
    try:
        return datetime.datetime.strptime(text, "%Y%m%d").date().isoformat() if len(text) == 8 else None
    except ValueError:
        return None


def iso_time(text: str) -> str | None:
    text = text.split(".")[0]
    if len(text) != 6 or not text.isdigit():
        return None
    return f"{text[0:2]}:{text[2:4]}:{text[4:6]}"


def oracle(data: bytes) -> InstanceHeader:
    """What pydicom says the identifying header of `data` is (the whole file is read)."""
    ds = pydicom.dcmread(io.BytesIO(data), force=True)
    meta = getattr(ds, "file_meta", None)
    syntax = str(meta.TransferSyntaxUID) if meta is not None and "TransferSyntaxUID" in meta else None
    if syntax is None:
        implicit, little = ds.original_encoding
        syntax = {
            (True, True): pydicom.uid.ImplicitVRLittleEndian,
            (False, True): pydicom.uid.ExplicitVRLittleEndian,
            (False, False): pydicom.uid.ExplicitVRBigEndian,
        }[(bool(implicit), bool(little))]
    return InstanceHeader(
        patient_id=_text(ds, "PatientID"),
        patient_name=_text(ds, "PatientName"),
        study_uid=_text(ds, "StudyInstanceUID"),
        series_uid=_text(ds, "SeriesInstanceUID"),
        sop_uid=_text(ds, "SOPInstanceUID"),
        sop_class_uid=_text(ds, "SOPClassUID"),
        modality=_text(ds, "Modality"),
        study_date=iso_date(_text(ds, "StudyDate")),
        study_time=iso_time(_text(ds, "StudyTime")),
        accession_number=_text(ds, "AccessionNumber"),
        study_description=_text(ds, "StudyDescription"),
        series_number=_int_or_none(ds, "SeriesNumber"),
        instance_number=_int_or_none(ds, "InstanceNumber"),
        transfer_syntax=str(syntax),
    )


def pydicom_file(name: str) -> bytes:
    path = get_testdata_file(name)
    assert path is not None, f"pydicom test file {name} is missing"
    return Path(path).read_bytes()


def assert_dicom(result: ParseResult, expected: InstanceHeader, what: str) -> None:
    assert result.verdict is Verdict.DICOM, f"{what}: {result}"
    assert result.header == expected, f"{what}:\n got      {result.header}\n expected {expected}"


def factory_file(**spec: object) -> bytes:
    return next(study_files(StudySpec(**spec))).data  # type: ignore[arg-type]


def first_tag_offset(data: bytes, tag: bytes) -> int:
    offset = data.find(tag)
    assert offset > 0, f"tag {tag.hex()} not found"
    return offset


# --- synthetic files: exact values ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("modality", "rows", "sop_class"),
    [("CT", 512, pydicom.uid.CTImageStorage), ("MR", 256, pydicom.uid.MRImageStorage),
     ("CR", 128, pydicom.uid.ComputedRadiographyImageStorage)],
)
def test_factory_files_exact_values(modality: str, rows: int, sop_class: str) -> None:
    spec = StudySpec(
        seed=31, patient=Patient("DOE^JANE", "PID-31"), modality=modality, series_count=2,
        images_per_series=3, rows=rows, columns=rows, study_description=f"{modality} STUDY 31",
        accession_number="ACC-31", study_date="20240115",
    )
    files = list(study_files(spec))
    assert len(files) == 6
    for n, item in enumerate(files):
        series_number, index = n // 3 + 1, n % 3
        result = parse_header(item.data, True)
        expected = InstanceHeader(
            patient_id="PID-31",
            patient_name="DOE^JANE",
            study_uid=item.study_instance_uid,
            series_uid=item.series_instance_uid,
            sop_uid=item.sop_instance_uid,
            sop_class_uid=str(sop_class),
            modality=modality,
            study_date="2024-01-15",
            study_time="08:30:00",
            accession_number="ACC-31",
            study_description=f"{modality} STUDY 31",
            series_number=series_number,
            instance_number=index + 1,
            transfer_syntax="1.2.840.10008.1.2.1",
        )
        assert_dicom(result, expected, f"{item.relpath}")
        assert result.error == ""
        assert oracle(item.data) == expected  # the oracle agrees with what we wrote


def test_all_instances_of_a_study_share_study_uid_and_differ_in_sop_uid() -> None:
    files = list(study_files(StudySpec(seed=5, modality="MR", series_count=2, images_per_series=4, rows=64, columns=64)))
    headers = [parse_header(f.data, True).header for f in files]
    assert all(h is not None for h in headers)
    assert {h.study_uid for h in headers if h} == {files[0].study_instance_uid}
    assert len({h.series_uid for h in headers if h}) == 2
    assert len({h.sop_uid for h in headers if h}) == 8
    assert [(h.series_number, h.instance_number) for h in headers if h] == [
        (s, i) for s in (1, 2) for i in (1, 2, 3, 4)
    ]


def _dataset(**changes: object) -> bytes:
    spec = StudySpec(seed=77, modality="MR", rows=16, columns=16, images_per_series=1)
    ds = make_dataset(spec, 1, 0)
    for keyword, value in changes.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return to_bytes(ds)


@pytest.mark.parametrize(
    ("study_date", "study_time", "want_date", "want_time"),
    [
        ("20240229", "235959", "2024-02-29", "23:59:59"),
        ("19991231", "000000.123456", "1999-12-31", "00:00:00"),  # fraction dropped
        ("20240230", "083000", None, "08:30:00"),  # no such day
        ("2024011", "8", None, None),  # too short
        ("", "", None, None),  # present but empty
        (None, None, None, None),  # absent
    ],
)
def test_dates_and_times(study_date: str | None, study_time: str | None, want_date: str | None, want_time: str | None) -> None:
    data = _dataset(StudyDate=study_date, StudyTime=study_time)
    result = parse_header(data, True)
    assert result.verdict is Verdict.DICOM, result
    assert result.header is not None
    assert (result.header.study_date, result.header.study_time) == (want_date, want_time)


def test_non_ascii_patient_name_is_decoded_with_the_character_set() -> None:
    data = _dataset(SpecificCharacterSet="ISO_IR 100", PatientName="MÜLLER^JÖRG", StudyDescription="THORAX ÄP")
    header = parse_header(data, True).header
    assert header is not None
    assert (header.patient_name, header.study_description) == ("MÜLLER^JÖRG", "THORAX ÄP")
    assert header == oracle(data)
    utf8 = _dataset(SpecificCharacterSet="ISO_IR 192", PatientName="山田^太郎")
    header = parse_header(utf8, True).header
    assert header is not None and header.patient_name == "山田^太郎"


def test_missing_optional_attributes_are_empty_or_none() -> None:
    data = _dataset(PatientID=None, PatientName=None, AccessionNumber=None, StudyDescription=None,
                    SeriesNumber=None, InstanceNumber=None, StudyDate=None, StudyTime=None)
    result = parse_header(data, True)
    assert result.verdict is Verdict.DICOM, result
    h = result.header
    assert h is not None
    assert (h.patient_id, h.patient_name, h.accession_number, h.study_description) == ("", "", "", "")
    assert (h.series_number, h.instance_number, h.study_date, h.study_time) == (None, None, None, None)
    assert h == oracle(data)


def test_other_transfer_syntaxes_of_a_factory_dataset() -> None:
    """The same dataset written implicit VR little endian and explicit VR big endian."""
    spec = StudySpec(seed=12, modality="CT", rows=32, columns=32, images_per_series=1)
    for syntax, implicit, little in (
        (pydicom.uid.ImplicitVRLittleEndian, True, True),
        (pydicom.uid.ExplicitVRBigEndian, False, False),
    ):
        ds = make_dataset(spec, 1, 0)
        ds.file_meta.TransferSyntaxUID = syntax
        if not little:
            del ds.PixelData  # pydicom cannot byte-swap OW pixels it did not decode
        buf = io.BytesIO()
        pydicom.dcmwrite(buf, ds, implicit_vr=implicit, little_endian=little, enforce_file_format=True)
        data = buf.getvalue()
        expected = oracle(data)
        assert expected.transfer_syntax == str(syntax)
        assert_dicom(parse_header(data, True), expected, str(syntax))


# --- pydicom's test files ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PYDICOM_FILES))
def test_pydicom_test_files(name: str) -> None:
    data = pydicom_file(name)
    expected = oracle(data)
    assert expected.transfer_syntax == str(PYDICOM_FILES[name])
    assert expected.study_uid and expected.series_uid and expected.sop_uid
    assert_dicom(parse_header(data, True), expected, name)


def test_pydicom_test_files_known_values() -> None:
    """A few values spelled out, so that an oracle gone wrong cannot hide a parser gone wrong."""
    ct = parse_header(pydicom_file("CT_small.dcm"), True).header
    assert ct == InstanceHeader(
        patient_id="1CT1", patient_name="CompressedSamples^CT1",
        study_uid="1.3.6.1.4.1.5962.1.2.1.20040119072730.12322",
        series_uid="1.3.6.1.4.1.5962.1.3.1.1.20040119072730.12322",
        sop_uid="1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2", modality="CT", study_date="2004-01-19",
        study_time="07:27:30", accession_number="", study_description="e+1", series_number=1,
        instance_number=1, transfer_syntax="1.2.840.10008.1.2.1",
    )
    mr = {name: parse_header(pydicom_file(name), True).header for name in
          ("MR_small_implicit.dcm", "MR_small_bigendian.dcm", "MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm")}
    # one MR instance in four encodings: the same header but for the transfer syntax
    assert {h.sop_uid for h in mr.values() if h} == {"1.3.6.1.4.1.5962.1.1.4.1.1.20040826185059.5457"}
    assert {(h.patient_id, h.modality, h.study_date, h.study_time) for h in mr.values() if h} == {
        ("4MR1", "MR", "2004-08-26", "18:50:59")}
    assert sorted(h.transfer_syntax or "" for h in mr.values() if h) == sorted(
        ["1.2.840.10008.1.2", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.80"])
    nm = parse_header(pydicom_file("JPEG2000.dcm"), True).header
    assert nm is not None
    assert (nm.modality, nm.instance_number, nm.study_description, nm.transfer_syntax) == (
        "NM", 3, "Whole Body Bone", "1.2.840.10008.1.2.4.91")
    dfl = parse_header(pydicom_file("image_dfl.dcm"), True).header
    assert dfl is not None
    assert (dfl.modality, dfl.study_date, dfl.series_number, dfl.transfer_syntax) == (
        "OT", None, None, "1.2.840.10008.1.2.1.99")
    bare = parse_header(pydicom_file("ExplVR_BigEndNoMeta.dcm"), True).header
    assert bare is not None
    assert (bare.study_uid, bare.series_uid, bare.sop_uid, bare.modality, bare.study_date) == (
        "1.2.333.4444.5.6.7.8.9", "1.2.333.4444.5.6.7.8.99", "1.2.333.4444.5.6.7.8", "RTPLAN", "2015-05-15")


def test_dicomdir_is_not_an_instance() -> None:
    data = pydicom_file("DICOMDIR")
    assert data[128:132] == b"DICM"
    assert parse_header(data, True).verdict is Verdict.NOT_DICOM


def test_bare_factory_dataset_without_preamble_or_meta_is_indexed() -> None:
    spec = StudySpec(seed=44, modality="MR", rows=16, columns=16, images_per_series=1)
    ds = make_dataset(spec, 1, 0)
    del ds.file_meta
    ds.preamble = None
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, implicit_vr=True, little_endian=True, enforce_file_format=False)
    data = buf.getvalue()
    assert data[:2] == b"\x08\x00" and data[128:132] != b"DICM"
    expected = oracle(data)
    assert expected.transfer_syntax == pydicom.uid.ImplicitVRLittleEndian
    assert_dicom(parse_header(data, True), expected, "bare implicit VR dataset")


# --- prefixes ----------------------------------------------------------------------------------------


def prefix_lengths(size: int, dense: int) -> list[int]:
    """Every length up to `dense`, every 7th up to 4 KiB, then a spread up to the whole file."""
    lengths = list(range(0, min(size, dense) + 1))
    lengths += list(range(dense + 1, min(size, 4096), 7))
    lengths += list(range(4096, size, max(1, (size - 4096) // 200)))
    return sorted(set(lengths + [size - 1, size]) - {-1})


def check_prefixes(data: bytes, expected: InstanceHeader, dense: int, what: str) -> int:
    """Every prefix (complete=False) gives NEED_MORE or the very same header as the whole file;
    once DICOM, longer prefixes stay DICOM. Returns the shortest length that gave DICOM."""
    first: int | None = None
    problems = []
    for length in prefix_lengths(len(data), dense):
        result = parse_header(data[:length], False)
        if result.verdict is Verdict.NEED_MORE:
            if first is not None:
                problems.append(f"{length}: NEED_MORE after DICOM at {first}")
            continue
        if result.verdict is not Verdict.DICOM:
            problems.append(f"{length}: {result.verdict} ({result.error})")
        elif result.header != expected:
            problems.append(f"{length}: a different header {result.header}")
        elif first is None:
            first = length
    assert not problems, f"{what}: wrong results for prefixes:\n" + "\n".join(problems[:10])
    assert first is not None, f"{what}: no prefix gave DICOM, not even the whole file"
    return first


def test_prefixes_of_a_large_factory_file() -> None:
    data = factory_file(seed=3, modality="CT")  # 512x512: ~513 KiB of pixels after a ~1.3 KiB header
    expected = oracle(data)
    assert_dicom(parse_header(data, True), expected, "whole file")
    # The first element after group 0020 is (0028,0002) SamplesPerPixel, US: 8-byte element
    # header. Group 0020 cannot be known to be over before that tag has been seen.
    group_0028 = first_tag_offset(data, b"\x28\x00\x02\x00US")
    first = check_prefixes(data, expected, group_0028 + 64, "CT 512x512")
    assert group_0028 <= first <= group_0028 + 8, f"first DICOM at {first}, group 0028 starts at {group_0028}"
    # everything up to the pixel data element is more than enough: pixels are never needed
    pixels = first_tag_offset(data, PIXEL_DATA_TAG[True])
    assert pixels > group_0028
    assert_dicom(parse_header(data[:pixels], False), expected, "prefix up to the pixel data")
    assert_dicom(parse_header(data[:4096], False), expected, "first 4 KiB")
    assert_dicom(parse_header(data[:65536], False), expected, "first 64 KiB")


@pytest.mark.parametrize("name", sorted(PYDICOM_FILES))
def test_prefixes_of_pydicom_test_files(name: str) -> None:
    data = pydicom_file(name)
    expected = oracle(data)
    first = check_prefixes(data, expected, 600, name)
    if name == "image_dfl.dcm":
        return  # the dataset is deflated: the tags are not visible in the raw bytes
    little = PYDICOM_FILES[name] != pydicom.uid.ExplicitVRBigEndian
    pixels = data.find(PIXEL_DATA_TAG[little])
    if pixels > 0:
        assert first <= pixels, f"{name}: needed {first} bytes, the pixel data starts at {pixels}"
        assert_dicom(parse_header(data[:pixels], False), expected, f"{name} up to the pixel data")


def test_prefix_shorter_than_preamble_needs_more() -> None:
    data = factory_file(seed=3, modality="MR", rows=64, columns=64)
    for length in (0, 1, 64, 127, 128, 131):
        assert parse_header(data[:length], False).verdict is Verdict.NEED_MORE, length


# --- pixel data is never read ------------------------------------------------------------------------


def test_garbage_or_truncated_pixel_data_still_parses() -> None:
    data = factory_file(seed=9, modality="CT")
    expected = oracle(data)
    pixel_tag = first_tag_offset(data, PIXEL_DATA_TAG[True])
    value = pixel_tag + 12  # tag, "OW", 2 reserved bytes, 4-byte length
    assert struct.unpack("<I", data[pixel_tag + 8:value])[0] == len(data) - value
    rng = random.Random(9)
    variants = {
        "pixels replaced by random bytes": data[:value] + rng.randbytes(len(data) - value),
        "truncated in the pixel data": data[:value + 1000],
        "truncated right after the pixel data header": data[:value],
        "truncated inside the pixel data header": data[:pixel_tag + 6],
        "pixel data length says 2 GiB": data[:pixel_tag + 8] + struct.pack("<I", 0x7FFFFFF0) + data[value:value + 100],
        "pixel data length undefined": data[:pixel_tag + 8] + b"\xff\xff\xff\xff" + rng.randbytes(5000),
        "random bytes from group 0028 on": data[:first_tag_offset(data, b"\x28\x00\x02\x00US") + 8] + rng.randbytes(20000),
    }
    for what, variant in variants.items():
        assert_dicom(parse_header(variant, True), expected, what)
    # a prefix of a file whose pixels are garbage is enough as well
    assert_dicom(parse_header(variants["pixels replaced by random bytes"][:8192], False), expected, "prefix")


def test_instance_without_anything_after_group_0020() -> None:
    """A complete file that ends with group 0020 (no image module, no pixels) is an instance."""
    data = factory_file(seed=10, modality="MR", rows=16, columns=16)
    end = first_tag_offset(data, b"\x28\x00\x02\x00US")
    expected = oracle(data)
    assert_dicom(parse_header(data[:end], True), expected, "file ending after group 0020")
    assert parse_header(data[:end], False).verdict is Verdict.NEED_MORE  # more may follow


# --- malformed ---------------------------------------------------------------------------------------


def part10_meta_only(sop_instance_uid: str = "1.2.3.4.5") -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = pydicom.uid.CTImageStorage
    meta.MediaStorageSOPInstanceUID = pydicom.uid.UID(sop_instance_uid)
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def assert_malformed(result: ParseResult, what: str) -> None:
    assert result.verdict is Verdict.MALFORMED, f"{what}: {result}"
    assert result.header is None, what
    assert result.error, f"{what}: a malformed result must say what is wrong"


@pytest.mark.parametrize("seed", range(6))
def test_dicm_magic_followed_by_garbage_is_malformed(seed: int) -> None:
    rng = random.Random(seed)
    data = rng.randbytes(128) + b"DICM" + rng.randbytes(rng.choice([1, 7, 100, 5000, 300_000]))
    assert_malformed(parse_header(data, True), f"seed {seed}")
    # with only a prefix of it, never DICOM and never NOT_DICOM
    assert parse_header(data[:4096], False).verdict in (Verdict.MALFORMED, Verdict.NEED_MORE)


def test_truncated_right_after_the_preamble() -> None:
    data = factory_file(seed=21, modality="MR", rows=64, columns=64)
    assert_malformed(parse_header(data[:132], True), "preamble + DICM only")
    assert parse_header(data[:132], False).verdict is Verdict.NEED_MORE
    # the file meta group cut in half
    assert_malformed(parse_header(data[:150], True), "cut inside the file meta")


def test_part10_without_uids_is_malformed() -> None:
    assert_malformed(parse_header(part10_meta_only(), True), "file meta only, no dataset")
    secret_name = "SECRET^PATIENT^NAME"
    for missing in ("StudyInstanceUID", "SeriesInstanceUID"):
        data = _dataset(PatientName=secret_name, PatientID="SECRET-ID-99", **{missing: None})
        result = parse_header(data, True)
        assert_malformed(result, f"no {missing}")
        assert secret_name not in result.error and "SECRET-ID-99" not in result.error, result.error
        assert "1.2.826.0.1.3680043.8.498" not in result.error, f"error quotes a UID: {result.error}"


def test_corrupt_deflated_dataset_is_malformed() -> None:
    data = bytearray(pydicom_file("image_dfl.dcm"))
    # the deflated dataset starts right after the file meta group (0002,0000 gives its length);
    # wreck the start of the stream, where the identifying attributes are
    assert data[132:140] == b"\x02\x00\x00\x00UL\x04\x00"
    meta_end = 144 + struct.unpack("<I", data[140:144])[0]
    data[meta_end:meta_end + 400] = random.Random(1).randbytes(400)
    result = parse_header(bytes(data), True)
    assert result.verdict is Verdict.MALFORMED, result
    assert result.error


# --- not DICOM ---------------------------------------------------------------------------------------

SQLITE_HEADER = b"SQLite format 3\x00" + struct.pack(">HBBBBBBIIIIIIIIIIII", 4096, 1, 1, 0, 64, 32, 32, *([0] * 12))
PNG_HEADER = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x02\x00\x00\x00\x02\x00\x08\x00\x00\x00\x00"


@pytest.mark.parametrize(
    "what",
    ["empty", "text log", "sqlite", "png", "random", "random starting like a dataset", "zeros", "short text"],
)
def test_not_dicom(what: str) -> None:
    rng = random.Random(what)
    data = {
        "empty": b"",
        "text log": b"".join(b"2024-01-15 08:30:%02d INFO received study\n" % i for i in range(60)),
        "sqlite": SQLITE_HEADER + rng.randbytes(4096 * 3),
        "png": PNG_HEADER + rng.randbytes(10_000),
        "random": b"\x13\x37" + rng.randbytes(100_000),
        "random starting like a dataset": b"\x08\x00" + rng.randbytes(8000),
        "zeros": bytes(4096),
        "short text": b"hello\n",
    }[what]
    result = parse_header(data, True)
    assert result.verdict is Verdict.NOT_DICOM, f"{what}: {result}"
    assert result.header is None
    if len(data) >= 4096:
        prefix = parse_header(data[:4096], False).verdict
        if what == "random starting like a dataset":  # could be a bare dataset with a long element
            assert prefix in (Verdict.NOT_DICOM, Verdict.NEED_MORE), what
        else:  # neither magic nor a dataset start: more bytes cannot change the verdict
            assert prefix is Verdict.NOT_DICOM, what


def test_text_that_mentions_dicm_is_not_dicom() -> None:
    data = b"x" * 128 + b"DICX" + b"DICM" * 100
    assert parse_header(data, True).verdict is Verdict.NOT_DICOM


def test_parse_is_pure() -> None:
    """Same bytes, same result; the input is not modified (bytes and a bytearray copy)."""
    data = factory_file(seed=4, modality="MR", rows=32, columns=32)
    copy = bytearray(data)
    first = parse_header(data, True)
    assert parse_header(bytes(copy), True) == first
    assert bytes(copy) == data
