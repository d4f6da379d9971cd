"""Reading the identifying header of one DICOM instance from the first bytes of a file.

Must not do I/O, touch the database or log values: it gets bytes and returns what they say (as
metadb.studies.InstanceFields, the shape the index stores).
This is pydicom's one home in mifs. Parsing stops after group 0020 (datasets are sorted by
tag, and every indexed attribute lives in groups 0008-0020), so pixel data and large trailing
sequences are never read; a prefix too short to reach that point asks for more bytes
(NEED_MORE) instead of guessing.
"""

from __future__ import annotations

import datetime
import enum
import io
import warnings
from dataclasses import dataclass
from typing import Any

import pydicom
import pydicom.config
from pydicom.tag import BaseTag

from mifs.metadb.studies import InstanceFields

# pydicom's validation messages can quote element values (PHI): never let them reach a log.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
warnings.filterwarnings("ignore", module=r"pydicom(\..*)?$")

LAST_INDEXED_GROUP = 0x0020
PREAMBLE = 128
MAGIC = b"DICM"
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
# First tag group of a dataset without preamble: file meta (0002) or identification (0008),
# little endian, or 0008 big endian (retired explicit VR big endian).
_BARE_STARTS = (b"\x02\x00", b"\x08\x00", b"\x00\x08")


class Verdict(enum.Enum):
    DICOM = "dicom"  # an image (or other) instance with study, series and SOP instance UIDs
    MALFORMED = "malformed"  # claims to be DICOM (Part 10 magic) but cannot be indexed
    NOT_DICOM = "not-dicom"  # anything else: index files, logs, temp files, DICOMDIR
    NEED_MORE = "need-more"  # the prefix ended before the header did


InstanceHeader = InstanceFields
"""What the index keeps of an instance; the type lives with the tables that store it."""


@dataclass(frozen=True)
class ParseResult:
    verdict: Verdict
    header: InstanceHeader | None = None
    error: str = ""  # for MALFORMED: what is wrong, never a value from the file


def is_part10(prefix: bytes) -> bool:
    return prefix[PREAMBLE : PREAMBLE + 4] == MAGIC


def parse_header(prefix: bytes, complete: bool) -> ParseResult:
    """Classify and parse a file from its first bytes; `complete` says they are the whole file."""
    part10 = is_part10(prefix)
    if not part10:
        if len(prefix) < PREAMBLE + 4 and not complete:
            return ParseResult(Verdict.NEED_MORE)
        if prefix[:2] not in _BARE_STARTS:
            return ParseResult(Verdict.NOT_DICOM)
    stopped = False

    def stop_when(tag: BaseTag, vr: str | None, length: int) -> bool:
        nonlocal stopped
        if tag.group > LAST_INDEXED_GROUP:
            stopped = True
        return stopped

    try:
        ds = pydicom.filereader.read_partial(io.BytesIO(prefix), stop_when=stop_when, force=not part10)
        header = _extract(ds)
    except Exception as exc:  # pydicom raises many kinds on garbage; none of them is ours
        if not complete and not stopped:
            return ParseResult(Verdict.NEED_MORE)
        if not part10:
            return ParseResult(Verdict.NOT_DICOM)
        return ParseResult(Verdict.MALFORMED, error=f"the header cannot be parsed ({exc.__class__.__name__})")
    if not stopped and not complete:
        return ParseResult(Verdict.NEED_MORE)
    if header is None:
        if not part10 or _media_sop_class(ds) == DICOMDIR_SOP_CLASS:
            return ParseResult(Verdict.NOT_DICOM)
        return ParseResult(Verdict.MALFORMED, error="no Study, Series or SOP Instance UID in the header")
    return ParseResult(Verdict.DICOM, header)


def _media_sop_class(ds: Any) -> str:
    meta = getattr(ds, "file_meta", None)
    return _text(meta, "MediaStorageSOPClassUID") if meta is not None else ""


def _text(ds: Any, keyword: str) -> str:
    try:
        value = ds.get(keyword)
    except Exception:
        return ""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or value.__class__.__name__ == "MultiValue":
        value = "\\".join(str(v) for v in value)
    return str(value).strip().strip("\0").strip()


def _integer(ds: Any, keyword: str) -> int | None:
    text = _text(ds, keyword).split("\\")[0]
    try:
        return int(float(text)) if text else None
    except (ValueError, OverflowError):
        return None


def _iso_date(text: str) -> str | None:
    digits = text.replace("-", "").replace(".", "").strip()
    if len(digits) != 8 or not digits.isdigit():
        return None
    try:
        return datetime.date(int(digits[:4]), int(digits[4:6]), int(digits[6:])).isoformat()
    except ValueError:
        return None


def _iso_time(text: str) -> str | None:
    digits = text.replace(":", "").split(".")[0].strip()
    if not digits.isdigit() or len(digits) not in (2, 4, 6):
        return None
    hh, mm, ss = digits[0:2], digits[2:4] or "00", digits[4:6] or "00"
    if int(hh) > 23 or int(mm) > 59 or int(ss) > 60:
        return None
    return f"{hh}:{mm}:{ss}"


def _extract(ds: Any) -> InstanceHeader | None:
    study_uid = _text(ds, "StudyInstanceUID")
    series_uid = _text(ds, "SeriesInstanceUID")
    meta = getattr(ds, "file_meta", None)
    sop_uid = _text(ds, "SOPInstanceUID") or (_text(meta, "MediaStorageSOPInstanceUID") if meta is not None else "")
    if not (study_uid and series_uid and sop_uid):
        return None
    syntax = _text(meta, "TransferSyntaxUID") if meta is not None else ""
    if not syntax:
        syntax = _guess_syntax(ds)
    return InstanceHeader(
        patient_id=_text(ds, "PatientID"),
        patient_name=_text(ds, "PatientName"),
        study_uid=study_uid,
        series_uid=series_uid,
        sop_uid=sop_uid,
        sop_class_uid=_text(ds, "SOPClassUID") or (_text(meta, "MediaStorageSOPClassUID") if meta is not None else ""),
        modality=_text(ds, "Modality").upper(),
        study_date=_iso_date(_text(ds, "StudyDate")),
        study_time=_iso_time(_text(ds, "StudyTime")),
        accession_number=_text(ds, "AccessionNumber"),
        study_description=_text(ds, "StudyDescription"),
        series_number=_integer(ds, "SeriesNumber"),
        instance_number=_integer(ds, "InstanceNumber"),
        transfer_syntax=syntax or None,
    )


def _guess_syntax(ds: Any) -> str:
    """The transfer syntax of a dataset without file meta, from how pydicom decoded it."""
    implicit = getattr(ds, "is_implicit_VR", None)
    little = getattr(ds, "is_little_endian", None)
    if implicit is None or little is None:
        implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit is True and little is True:
        return str(pydicom.uid.ImplicitVRLittleEndian)
    if implicit is False and little is True:
        return str(pydicom.uid.ExplicitVRLittleEndian)
    if implicit is False and little is False:
        return str(pydicom.uid.ExplicitVRBigEndian)
    return ""
