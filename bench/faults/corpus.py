"""The bad-input corpus (issue 10, the fault suite): hostile and odd DICOM files, each with what must happen to it.

Usage (from the repository root):  python -m bench.faults.corpus --out DIR [--max-dataset-bytes N] [--salt S]

Writes DIR/<name>.dcm for every case and DIR/expected.json. Each file is built from the real radiographs in
tests/data/dicom/ (pixels of the NIH ChestX-ray14 film, downsampled to 256 x 256; the 12-bit JPEG Extended hip film
as it is), with pydicom where pydicom can write the malformation and as raw bytes where it cannot. Every patient
name and ID in the corpus is fake (`Fakename<n>^Corpus`, `FAKEID<n>`).

expected.json holds, per file:

- `sender`: `storescu` (dcmtk's storescu with deploy/dcmtk/storescu.cfg, profile CXR, can send it as it is) or
  `pynetdicom` (the bytes after the file meta are sent as they are, in a C-STORE whose SOP Class, SOP Instance and
  transfer syntax are `request`; a file without a file meta is sent whole: empty and non-DICOM files);
- `association`: `accepted`, or `context_rejected` (the listener does not accept the SOP class or transfer syntax);
- `status` (and `status_hex`): the C-STORE response status, `comment`: a substring of its Error Comment;
- `instance`: for a file answered Success, the instance's final state in the database, `status` (`done`,
  `failed`, `skipped`) and `reason` (a substring of `status_reason`; null: anything, none for `done`);
- `identifiers`: the fake patient strings of the file, which must never appear in the service's logs.
- `known_issue`: set where today's behaviour differs from the expectation (a bug to fix, described there); the
  expectation stays what is right.

The listener under test must run with `settings` of expected.json (CXR_MAX_DATASET_BYTES: the too-large file and
the deflate bomb are sized from it; keep it small, the too-large file is that big).
"""

from __future__ import annotations

import argparse
import io
import json
import struct
import warnings
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image
from pydicom import uid as U
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.pixels.utils import pack_bits

ROOT = Path(__file__).resolve().parents[2]
DICOM_DIR = ROOT / "tests" / "data" / "dicom"
NIH_CHEST = DICOM_DIR / "dx_chest_nih_cxr14_implicit_le_label-no-finding.dcm"  # 1024 x 1024, 8 bit
JPEG_EXTENDED_HIP = DICOM_DIR / "cr_hip_mono2_jpeg_extended_lossy_RG2_JPLY.dcm"  # 12-bit JPEG Extended, lossy

DEFAULT_MAX_DATASET_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_DECODED_PIXELS = 100_000_000  # cxr_triage/pixels.py DEFAULT_MAX_DECODED_PIXELS
SIZE = 256
DEEP_LEVELS = 1000
UID_PREFIX = "1.2.826.0.1.3680043.8.498."  # pydicom's root; generate_uid makes the rest from the case name

CR = U.ComputedRadiographyImageStorage
DX = U.DigitalXRayImageStorageForPresentation
DX_PROCESSING = U.DigitalXRayImageStorageForProcessing
SC = U.SecondaryCaptureImageStorage
MR = U.MRImageStorage
RT_IMAGE = U.RTImageStorage

SUCCESS, OUT_OF_RESOURCES, DOES_NOT_MATCH, CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xA900, 0xC000

# Explicit VR: these VRs have a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2).
LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})


@dataclass
class Expected:
    """What must happen to one file of the corpus (see the module docstring)."""

    file: str
    category: str
    description: str
    sender: str
    request: dict[str, str]
    association: str = "accepted"
    status: int | None = SUCCESS
    status_hex: str | None = None
    comment: str | None = None
    instance: dict[str, str | None] | None = None
    identifiers: list[str] = field(default_factory=list)
    known_issue: str | None = None


def tag_of(keyword: str) -> int:
    tag = pydicom.datadict.tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(keyword)
    return int(tag)


# --- raw explicit VR little endian ----------------------------------------------------------------------------------
def element(tag: int | str, vr: str, value: bytes, *, length: int | None = None) -> bytes:
    """One explicit VR little endian element, written as given (`length` may lie about `value`)."""
    number = tag_of(tag) if isinstance(tag, str) else tag
    size = len(value) if length is None else length
    head = struct.pack("<HH2s", number >> 16, number & 0xFFFF, vr.encode("latin-1"))
    if vr in LONG_VRS:
        return head + struct.pack("<HI", 0, size) + value
    return head + struct.pack("<H", size) + value


def walk(body: bytes) -> list[tuple[int, int, int]]:
    """(tag, start, end) of the top-level elements of an explicit VR little endian body with defined lengths."""
    out: list[tuple[int, int, int]] = []
    pos = 0
    while pos + 8 <= len(body):
        group, elem = struct.unpack_from("<HH", body, pos)
        vr = body[pos + 4 : pos + 6].decode("latin-1")
        if vr in LONG_VRS:
            (length,), header = struct.unpack_from("<I", body, pos + 8), 12
        else:
            (length,), header = struct.unpack_from("<H", body, pos + 6), 8
        if length == 0xFFFFFFFF:
            raise ValueError(f"undefined length at ({group:04X},{elem:04X}): not walked")
        end = pos + header + length
        out.append(((group << 16) | elem, pos, end))
        pos = end
    return out


def splice(body: bytes, tag: int | str, raw: bytes | None) -> bytes:
    """`body` with the element `tag` replaced by `raw` (inserted in tag order when absent; removed when None)."""
    number = tag_of(tag) if isinstance(tag, str) else tag
    for found, start, end in walk(body):
        if found == number:
            return body[:start] + (raw or b"") + body[end:]
        if found > number:
            return body if raw is None else body[:start] + raw + body[start:]
    return body if raw is None else body + raw


def element_span(body: bytes, tag: int | str) -> tuple[int, int]:
    number = tag_of(tag) if isinstance(tag, str) else tag
    for found, start, end in walk(body):
        if found == number:
            return start, end
    raise KeyError(f"{number:08X} not in the body")


# --- encoding -------------------------------------------------------------------------------------------------------
def encode_body(ds: Dataset, transfer_syntax: str = U.ExplicitVRLittleEndian) -> bytes:
    """The data set (no file meta) encoded in `transfer_syntax`; deflated for Deflated Explicit VR Little Endian."""
    syntax = U.UID(transfer_syntax)
    fp = DicomBytesIO()
    fp.is_implicit_VR = syntax == U.ImplicitVRLittleEndian
    fp.is_little_endian = syntax != U.ExplicitVRBigEndian
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_dataset(fp, ds)
    data = fp.getvalue()
    if syntax == U.DeflatedExplicitVRLittleEndian:
        return deflate(data)
    return bytes(data)


def deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return packer.compress(data) + packer.flush()


def file_meta(sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
    """Preamble, "DICM" and a file meta group that says `sop_class`, `sop_instance` (written as given) and syntax."""
    meta = FileMetaDataset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        meta.MediaStorageSOPClassUID = U.UID(sop_class)
        meta.MediaStorageSOPInstanceUID = U.UID(sop_instance)
        meta.TransferSyntaxUID = U.UID(transfer_syntax)
        meta.ImplementationClassUID = U.PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = "CXR_BAD_CORPUS"
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, False
        write_file_meta_info(fp, meta, enforce_standard=True)
    return b"\x00" * 128 + b"DICM" + fp.getvalue()


def split_file(data: bytes) -> tuple[bytes, bytes] | None:
    """(preamble + file meta, data set bytes) of a DICOM file; None when it has no file meta ("DICM" at 128)."""
    if len(data) < 144 or data[128:132] != b"DICM" or data[132:136] != b"\x02\x00\x00\x00":
        return None
    (group_length,) = struct.unpack_from("<I", data, 140)
    end = 144 + group_length
    return data[:end], data[end:]


# --- the source pixels ----------------------------------------------------------------------------------------------
@cache
def chest_pixels(size: int = SIZE) -> np.ndarray:
    """The NIH chest film, block-averaged to size x size, as 12-bit unsigned values in uint16."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        src = pydicom.dcmread(NIH_CHEST).pixel_array.astype(np.float32)
    factor = src.shape[0] // size
    small = src[: size * factor, : size * factor].reshape(size, factor, size, factor).mean(axis=(1, 3))
    out: np.ndarray = (small * 16).astype(np.uint16)
    return out


def png_bytes() -> bytes:
    out = io.BytesIO()
    Image.fromarray((chest_pixels(64) >> 4).astype(np.uint8)).save(out, format="PNG")
    return out.getvalue()


def jpeg_bytes(pixels8: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels8).save(out, format="JPEG", quality=90)
    return out.getvalue()


# --- the corpus -----------------------------------------------------------------------------------------------------
class Corpus:
    """Builds the files into `out` and collects their expectations."""

    def __init__(self, out: Path, *, salt: str, max_dataset_bytes: int) -> None:
        self.out = out
        self.salt = salt
        self.max_dataset_bytes = max_dataset_bytes
        self.expected: list[Expected] = []

    # identifiers ------------------------------------------------------------------------------------------------
    def uid(self, name: str, part: str) -> str:
        return str(U.generate_uid(prefix=UID_PREFIX, entropy_srcs=[self.salt, name, part]))

    def fake(self, name: str) -> tuple[str, str]:
        """The fake patient name and ID of a case (numbered in order of creation)."""
        number = len(self.expected) + 1
        return f"Fakename{number:03d}^Corpus", f"FAKEID{number:03d}"

    # data sets --------------------------------------------------------------------------------------------------
    def base(self, name: str, *, sop_class: str = CR, size: int = SIZE) -> Dataset:
        """A valid frontal chest CR (256 x 256, 12 bits stored in 16) with window and rescale: triaged `done`."""
        patient_name, patient_id = self.fake(name)
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["DERIVED", "SECONDARY"]
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = self.uid(name, "sop")
        ds.StudyDate, ds.StudyTime = "20260101", "120000"
        ds.AccessionNumber = f"FAKEACC{len(self.expected) + 1:03d}"
        ds.Modality = "CR"
        ds.StudyDescription = "Bad-input corpus"
        ds.SeriesDescription = name
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.BodyPartExamined = "CHEST"
        ds.ViewPosition = "PA"
        ds.StudyInstanceUID = self.uid(name, "study")
        ds.SeriesInstanceUID = self.uid(name, "series")
        ds.SeriesNumber, ds.InstanceNumber = 1, 1
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = size, size
        ds.PixelSpacing = [0.7, 0.7]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.WindowCenter, ds.WindowWidth = "2048", "4096"
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "US"
        ds.PixelData = chest_pixels(size).tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = U.ExplicitVRLittleEndian
        return ds

    # writing ----------------------------------------------------------------------------------------------------
    def add(
        self,
        name: str,
        category: str,
        description: str,
        data: bytes,
        *,
        sender: str,
        request: tuple[str, str, str],
        association: str = "accepted",
        status: int | None = SUCCESS,
        comment: str | None = None,
        instance: tuple[str, str | None] | None = None,
        identifiers: list[str] | None = None,
        known_issue: str | None = None,
    ) -> None:
        if any(e.file == f"{name}.dcm" for e in self.expected):
            raise ValueError(f"duplicate case {name}")
        if association != "accepted":
            status = None
        (self.out / f"{name}.dcm").write_bytes(data)
        self.expected.append(
            Expected(
                file=f"{name}.dcm",
                category=category,
                description=description,
                sender=sender,
                request={"sop_class_uid": request[0], "sop_instance_uid": request[1], "transfer_syntax": request[2]},
                association=association,
                status=status,
                status_hex=None if status is None else f"0x{status:04X}",
                comment=comment,
                instance=None if instance is None else {"status": instance[0], "reason": instance[1]},
                identifiers=identifiers if identifiers is not None else [],
                known_issue=known_issue,
            )
        )

    def add_dataset(
        self,
        ds: Dataset,
        category: str,
        description: str,
        *,
        syntax: str | None = None,
        edit: Callable[[bytes], bytes] | None = None,
        sender: str = "storescu",
        request_class: str | None = None,
        request_instance: str | None = None,
        **expect: Any,
    ) -> None:
        """Encode `ds` (optionally edit the encoded body as raw bytes) and add it; the name is its SeriesDescription."""
        name = str(ds.SeriesDescription)
        syntax = syntax or str(ds.file_meta.TransferSyntaxUID)
        body = encode_body(ds, syntax)
        if edit is not None:
            body = edit(body)
        sop_class = request_class or str(ds.get("SOPClassUID", CR))
        sop_instance = request_instance or str(ds.get("SOPInstanceUID", ""))
        data = file_meta(sop_class, sop_instance, syntax) + body
        identifiers = [str(ds.PatientName).split("^")[0], str(ds.PatientID)] if "PatientID" in ds else []
        self.add(
            name,
            category,
            description,
            data,
            sender=sender,
            request=(sop_class, sop_instance, syntax),
            identifiers=identifiers,
            **expect,
        )

    def write_expected(self) -> Path:
        path = self.out / "expected.json"
        document = {
            "version": 1,
            "about": "bad-input corpus of issue 10; generated by python -m bench.faults.corpus",
            "settings": {
                "CXR_MAX_DATASET_BYTES": self.max_dataset_bytes,
                "CXR_MAX_DECODED_PIXELS": DEFAULT_MAX_DECODED_PIXELS,
            },
            "files": [asdict(e) for e in self.expected],
        }
        path.write_text(json.dumps(document, indent=2) + "\n")
        return path


# --- the cases ------------------------------------------------------------------------------------------------------
DONE = ("done", None)


def failed(reason: str) -> tuple[str, str]:
    return ("failed", reason)


def skipped(reason: str) -> tuple[str, str]:
    return ("skipped", reason)


def raw_value(keyword: str, vr: str, value: bytes, *, length: int | None = None) -> Callable[[bytes], bytes]:
    """An edit that writes `keyword` as the raw `value` with `vr` (and a declared `length`, if it lies)."""
    return lambda body: splice(body, keyword, element(keyword, vr, value, length=length))


def text(value: str) -> bytes:
    data = value.encode("latin-1")
    return data + b" " if len(data) % 2 else data


def controls(c: Corpus) -> None:
    c.add_dataset(c.base("control_explicit_le"), "control", "valid CR chest PA, Explicit VR LE", instance=DONE)
    ds = c.base("control_implicit_dx", sop_class=DX)
    ds.Modality = "DX"
    c.add_dataset(
        ds, "control", "valid DX for presentation, Implicit VR LE", syntax=U.ImplicitVRLittleEndian, instance=DONE
    )
    ds = c.base("control_dx_for_processing", sop_class=DX_PROCESSING)
    ds.Modality = "DX"
    c.add_dataset(ds, "control", "valid DX for processing", instance=DONE)
    ds = c.base("control_monochrome1")
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.PixelData = (4095 - chest_pixels()).astype(np.uint16).tobytes()
    c.add_dataset(ds, "control", "valid MONOCHROME1 (inverted data)", instance=DONE)
    ds = c.base("control_secondary_capture_rgb", sop_class=SC)
    grey = (chest_pixels() >> 4).astype(np.uint8)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    del ds.WindowCenter, ds.WindowWidth, ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType
    ds.PixelData = np.stack([grey, grey, (grey * 0.9).astype(np.uint8)], axis=-1).tobytes()
    c.add_dataset(ds, "control", "valid colour Secondary Capture of a chest film (RGB)", instance=DONE)
    ds = c.base("control_multiframe_two_frames")
    ds.NumberOfFrames = 2
    ds.PixelData = chest_pixels().tobytes() + (4095 - chest_pixels()).astype(np.uint16).tobytes()
    c.add_dataset(ds, "multi-frame", "NumberOfFrames 2 with two frames of data: first frame triaged", instance=DONE)
    ds = c.base("control_private_tags")
    block = ds.private_block(0x0029, "CXR CORPUS PRIVATE", create=True)
    block.add_new(0x01, "LO", "private text")
    block.add_new(0x02, "UN", b"\x01\x02\x03\x04")
    block.add_new(0x03, "SQ", [Dataset()])
    c.add_dataset(ds, "private", "private creator, LO, UN and SQ private elements", instance=DONE)
    ds = c.base("private_big_ob")
    block = ds.private_block(0x0029, "CXR CORPUS PRIVATE", create=True)
    block.add_new(0x10, "OB", bytes(range(256)) * (c.max_dataset_bytes // 2 // 256))
    c.add_dataset(ds, "private", "private OB element of half the data set limit", instance=DONE)


def transfer_syntaxes(c: Corpus) -> None:
    pixels = chest_pixels()
    for name, syntax, ratios in (
        ("syntax_jpeg2000_lossless", U.JPEG2000Lossless, None),
        ("syntax_jpeg2000_lossy", U.JPEG2000, [20.0]),
        ("syntax_rle_lossless", U.RLELossless, None),
        ("syntax_jpegls_lossless", U.JPEGLSLossless, None),
    ):
        ds = c.base(name)
        ds.compress(syntax, pixels, generate_instance_uid=False, j2k_cr=ratios)
        c.add_dataset(ds, "transfer syntax", f"valid chest encoded as {U.UID(syntax).name}", instance=DONE)
    ds = c.base("syntax_jpeg_baseline_8bit")
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.WindowCenter, ds.WindowWidth = "128", "256"
    ds.PixelData = encapsulate([jpeg_bytes((pixels >> 4).astype(np.uint8))])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = U.JPEGBaseline8Bit
    c.add_dataset(ds, "transfer syntax", "valid chest, JPEG Baseline 8-bit (Pillow)", instance=DONE)
    ds = c.base("syntax_deflated")
    c.add_dataset(
        ds,
        "transfer syntax",
        "valid chest, Deflated Explicit VR LE",
        syntax=U.DeflatedExplicitVRLittleEndian,
        instance=DONE,
    )
    # The real 12-bit JPEG Extended hip film, relabelled as a chest PA so that it reaches the decoder.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(JPEG_EXTENDED_HIP)
    patient_name, patient_id = c.fake("syntax_jpeg_extended_12bit")
    ds.PatientName, ds.PatientID = patient_name, patient_id
    for keyword in ("PatientBirthDate", "OtherPatientIDs", "InstitutionName", "ReferringPhysicianName"):
        if keyword in ds:
            del ds[keyword]
    ds.BodyPartExamined, ds.ViewPosition, ds.SeriesDescription = "CHEST", "PA", "syntax_jpeg_extended_12bit"
    ds.SOPInstanceUID = c.uid("syntax_jpeg_extended_12bit", "sop")
    ds.StudyInstanceUID = c.uid("syntax_jpeg_extended_12bit", "study")
    ds.SeriesInstanceUID = c.uid("syntax_jpeg_extended_12bit", "series")
    c.add_dataset(
        ds,
        "transfer syntax",
        "real 12-bit JPEG Extended (Process 2 and 4) film, relabelled CHEST/PA: no installed decoder reads it",
        instance=failed("cannot decode pixel data (1.2.840.10008.1.2.4.51)"),
    )
    ds = c.base("syntax_big_endian")
    ds.PixelData = pixels.astype(">u2").tobytes()
    c.add_dataset(
        ds,
        "transfer syntax",
        "Explicit VR Big Endian (retired, not accepted)",
        syntax=U.ExplicitVRBigEndian,
        sender="pynetdicom",
        association="context_rejected",
    )
    ds = c.base("syntax_jpeg2000_part2")
    ds.compress(U.JPEG2000Lossless, pixels, generate_instance_uid=False)
    c.add_dataset(
        ds,
        "transfer syntax",
        "JPEG 2000 Part 2 Multi-component (not accepted)",
        syntax=U.JPEG2000MCLossless,
        sender="pynetdicom",
        association="context_rejected",
    )
    ds = c.base("syntax_implicit_body_explicit_context")
    c.add_dataset(
        ds,
        "odd VR",
        "Implicit VR body sent in an Explicit VR Little Endian context (pydicom detects the encoding: triaged)",
        edit=lambda _: encode_body(ds, U.ImplicitVRLittleEndian),
        sender="pynetdicom",
        instance=DONE,
    )


def pixel_start(body: bytes) -> int:
    return element_span(body, "PixelData")[0]


def truncated(c: Corpus) -> None:
    c.add_dataset(
        c.base("truncated_in_header"),
        "truncated",
        "cut in the middle of the header, after the SOP Instance UID, before the Study UID",
        edit=lambda body: body[: element_span(body, "SOPInstanceUID")[1] + 11],
        sender="pynetdicom",
        status=CANNOT_UNDERSTAND,
    )
    c.add_dataset(
        c.base("truncated_before_pixel_data"),
        "truncated",
        "cut just before the Pixel Data element",
        edit=lambda body: body[: pixel_start(body)],
        sender="pynetdicom",
        status=DOES_NOT_MATCH,
    )
    c.add_dataset(
        c.base("truncated_in_pixel_data_header"),
        "truncated",
        "cut inside the Pixel Data element's header (tag and VR only)",
        edit=lambda body: body[: pixel_start(body) + 6],
        sender="pynetdicom",
        status=DOES_NOT_MATCH,
    )
    c.add_dataset(
        c.base("truncated_mid_pixel_data"),
        "truncated",
        "cut half-way through the pixel data (declared length kept)",
        edit=lambda body: body[: pixel_start(body) + 12 + SIZE * SIZE],
        sender="pynetdicom",
        instance=failed("cannot decode pixel data"),
    )
    c.add_dataset(
        c.base("truncated_last_byte"),
        "truncated",
        "last byte of the pixel data missing",
        edit=lambda body: body[:-1],
        sender="pynetdicom",
        instance=failed("cannot decode pixel data"),
    )


def pixel_data(c: Corpus) -> None:
    ds = c.base("no_pixel_data")
    del ds.PixelData
    c.add_dataset(ds, "no pixel data", "CR image without Pixel Data", status=DOES_NOT_MATCH, comment=None)
    ds = c.base("pixel_data_short")
    ds.PixelData = chest_pixels().tobytes()[: SIZE * SIZE]
    c.add_dataset(
        ds,
        "no pixel data",
        "well-formed Pixel Data element with half the declared pixels",
        instance=failed("cannot decode pixel data"),
    )
    ds = c.base("pixel_data_empty")
    ds.PixelData = b""
    c.add_dataset(
        ds,
        "no pixel data",
        "Pixel Data present with length 0",
        sender="pynetdicom",
        instance=failed("no pixel data: PixelData is empty"),
    )
    ds = c.base("pixel_data_float_only")
    del ds.PixelData
    ds.FloatPixelData = chest_pixels().astype(np.float32).tobytes()
    c.add_dataset(
        ds,
        "no pixel data",
        "Float Pixel Data instead of Pixel Data in a CR",
        sender="pynetdicom",
        status=DOES_NOT_MATCH,
    )
    ds = c.base("pixel_data_corrupt_jpeg")
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xe0 this is not a JPEG stream \xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = U.JPEGBaseline8Bit
    c.add_dataset(
        ds,
        "no pixel data",
        "JPEG Baseline fragment that is not a JPEG stream",
        instance=failed("cannot decode pixel data (1.2.840.10008.1.2.4.50)"),
    )


def sop_classes(c: Corpus) -> None:
    ds = c.base("sop_class_mr", sop_class=MR)
    ds.Modality = "MR"
    c.add_dataset(
        ds, "wrong SOP class", "MR Image Storage (not accepted)", sender="pynetdicom", association="context_rejected"
    )
    ds = c.base("sop_class_rt_image", sop_class=RT_IMAGE)
    ds.Modality = "RTIMAGE"
    c.add_dataset(
        ds, "wrong SOP class", "RT Image Storage (not accepted)", sender="pynetdicom", association="context_rejected"
    )
    ds = c.base("sop_class_mr_in_cr_request", sop_class=MR)
    ds.Modality = "MR"
    c.add_dataset(
        ds,
        "wrong SOP class",
        "data set says MR Image Storage, the C-STORE request says CR",
        sender="pynetdicom",
        request_class=CR,
        status=DOES_NOT_MATCH,
    )
    ds = c.base("sop_instance_differs_from_request")
    c.add_dataset(
        ds,
        "wrong SOP class",
        "data set SOP Instance UID differs from the C-STORE request's",
        sender="pynetdicom",
        request_instance=c.uid("sop_instance_differs_from_request", "other"),
        status=DOES_NOT_MATCH,
    )
    ds = c.base("sop_class_missing")
    del ds.SOPClassUID
    c.add_dataset(
        ds,
        "wrong SOP class",
        "no SOP Class UID in the data set",
        sender="pynetdicom",
        request_class=CR,
        status=DOES_NOT_MATCH,
    )
    ds = c.base("modality_mr_in_cr")
    ds.Modality = "MR"
    c.add_dataset(ds, "intake", "CR SOP class with Modality MR", instance=skipped("modality MR"))


def sizes(c: Corpus) -> None:
    ds = c.base("huge_declared_rows_columns")
    ds.Rows, ds.Columns = 60000, 60000
    ds.PixelData = b"\x00" * 4
    c.add_dataset(
        ds,
        "huge declared size",
        "declares 60000 x 60000 x 16 bits (7.2 GB) and carries 4 bytes",
        instance=failed("over the limit of 100,000,000 (CXR_MAX_DECODED_PIXELS)"),
    )
    ds = c.base("huge_declared_rgb_64bit")
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 65535, 65535, 3, "RGB"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PlanarConfiguration = 64, 64, 63, 0
    ds.PixelData = b"\x00" * 8
    c.add_dataset(
        ds,
        "huge declared size",
        "declares 65535 x 65535 RGB at 64 bits and carries 8 bytes",
        sender="pynetdicom",
        instance=failed("declared image size 65535 x 65535 x 3 sample(s) x 64 bits"),
    )
    ds = c.base("huge_declared_frames")
    ds.NumberOfFrames = 100000
    c.add_dataset(
        ds,
        "huge declared size",
        "NumberOfFrames 100000 with one frame of data",
        instance=failed("The number of bytes of pixel data is less than expected"),
    )
    # Larger than CXR_MAX_DATASET_BYTES, smaller than twice it (beyond that the connection is cut).
    side = int((c.max_dataset_bytes * 1.1 / 2) ** 0.5) + 1
    ds = c.base("dataset_too_large")
    ds.Rows = ds.Columns = side
    ds.PixelData = np.resize(chest_pixels(), (side, side)).astype(np.uint16).tobytes()
    c.add_dataset(
        ds,
        "huge declared size",
        f"{side} x {side} x 16 bits: a data set over CXR_MAX_DATASET_BYTES",
        status=OUT_OF_RESOURCES,
        comment="larger than",
    )
    # A deflate bomb: four times the limit of zeros, a few hundred KB on the wire.
    ds = c.base("deflate_bomb")
    side = int((4 * c.max_dataset_bytes / 2) ** 0.5)
    ds.Rows = ds.Columns = side
    del ds.PixelData
    head = encode_body(ds) + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, side * side * 2)
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    chunks = [packer.compress(head)]
    zeros, left = bytes(1 << 20), side * side * 2
    while left:
        chunks.append(packer.compress(zeros[: min(left, len(zeros))]))
        left -= min(left, len(zeros))
    chunks.append(packer.flush())
    bomb = b"".join(chunks)
    c.add_dataset(
        ds,
        "deflate bomb",
        f"Deflated Explicit VR: {len(bomb):,} bytes that inflate to {side * side * 2:,}",
        syntax=U.DeflatedExplicitVRLittleEndian,
        edit=lambda _: bomb,
        sender="pynetdicom",
        status=OUT_OF_RESOURCES,
        comment="inflated data set larger than",
    )
    for name, keyword, value in (("zero_rows", "Rows", 0), ("zero_columns", "Columns", 0)):
        ds = c.base(name)
        c.add_dataset(
            ds,
            "zero size",
            f"{keyword} 0 (pixel data present)",
            edit=raw_value(keyword, "US", struct.pack("<H", value)),
            sender="pynetdicom",
            instance=failed("Rows and Columns must be at least 1"),
        )
    ds = c.base("missing_rows")
    del ds.Rows
    c.add_dataset(ds, "zero size", "no Rows element", instance=failed("no Rows in the data set"))


def multiframe(c: Corpus) -> None:
    for name, value, reason in (
        ("multiframe_zero", b"0 ", "invalid NumberOfFrames 0: must be at least 1"),
        ("multiframe_abc", b"abc ", "invalid NumberOfFrames 'abc': not an integer"),
        ("multiframe_negative", b"-2", "invalid NumberOfFrames -2: must be at least 1"),
    ):
        ds = c.base(name)
        c.add_dataset(
            ds,
            "multi-frame",
            f"NumberOfFrames {value.decode().strip()!r}",
            edit=raw_value("NumberOfFrames", "IS", value),
            instance=failed(reason),
        )


def uids(c: Corpus) -> None:
    cases: list[tuple[str, str, str, bool]] = [
        # name, keyword, value, also in the C-STORE request (SOP Instance UID only)
        ("uid_letters", "SOPInstanceUID", "1.2.826.0.1.3680043.8.498.abc", True),
        ("uid_too_long", "SOPInstanceUID", "1.2.826.0.1.3680043.8.498." + "1" * 60, False),
        ("uid_empty_sop_instance", "SOPInstanceUID", "", False),
        ("uid_empty_study", "StudyInstanceUID", "", False),
        ("uid_traversal_study", "StudyInstanceUID", "../../etc", False),
        ("uid_traversal_sop_instance", "SOPInstanceUID", "1.2/../3", True),
        ("uid_absolute_path_study", "StudyInstanceUID", "/tmp/cxr-corpus-escape", False),
    ]
    for name, keyword, value, in_request in cases:
        ds = c.base(name)
        valid = str(ds.SOPInstanceUID)
        c.add_dataset(
            ds,
            "bad UID",
            f"{keyword} {value!r}" + (" (also in the C-STORE request)" if in_request else ""),
            edit=raw_value(keyword, "UI", text(value).replace(b" ", b"\x00")),
            sender="pynetdicom",
            request_instance=value if in_request else valid,
            status=CANNOT_UNDERSTAND,
        )


def odd_vrs(c: Corpus) -> None:
    ds = c.base("vr_rows_as_ul")
    c.add_dataset(
        ds,
        "odd VR",
        "Rows written with VR UL (4 bytes) instead of US",
        edit=raw_value("Rows", "UL", struct.pack("<I", SIZE)),
        sender="pynetdicom",
        instance=DONE,
    )
    ds = c.base("vr_rows_three_bytes")
    c.add_dataset(
        ds,
        "odd VR",
        "Rows (US) with a value length of 3",
        edit=raw_value("Rows", "US", b"\x00\x01\x00"),
        sender="pynetdicom",
        instance=failed("Rows"),
    )
    ds = c.base("vr_length_past_end")
    c.add_dataset(
        ds,
        "odd VR",
        "Study Description declares 2 GB: the rest of the data set is swallowed",
        edit=lambda body: splice(body, "StudyDescription", element("StudyDescription", "UT", b"x", length=0x7FFFFFF0)),
        sender="pynetdicom",
        status=CANNOT_UNDERSTAND,
    )
    ds = c.base("vr_unknown_code")
    c.add_dataset(
        ds,
        "odd VR",
        "a private element with the unknown VR 'ZZ'",
        edit=lambda body: splice(body, 0x00291001, element(0x00291001, "ZZ", b"zzzz")),
        sender="pynetdicom",
        instance=DONE,
    )
    ds = c.base("vr_odd_length_name")
    name, _ = c.fake("vr_odd_length_name")
    c.add_dataset(
        ds,
        "odd VR",
        "Patient's Name with an odd value length",
        edit=raw_value("PatientName", "PN", name.encode()[:-1] if len(name) % 2 == 0 else name.encode()),
        sender="pynetdicom",
        instance=DONE,
    )
    ds = c.base("vr_undefined_length_text")
    c.add_dataset(
        ds,
        "odd VR",
        "Series Description (LO) with undefined length 0xFFFF",
        edit=lambda body: splice(body, "SeriesDescription", element("SeriesDescription", "LO", b"", length=0xFFFF)),
        sender="pynetdicom",
        status=CANNOT_UNDERSTAND,
    )
    # Written as raw bytes (undefined lengths): pydicom's writer copies every level into its parent.
    nested = element("CodeValue", "SH", b"deep")
    for _ in range(DEEP_LEVELS):
        item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + nested + struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
        nested = element("ContentSequence", "SQ", item, length=0xFFFFFFFF) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    c.add_dataset(
        c.base("vr_deep_sequence"),
        "odd VR",
        f"Content Sequence nested {DEEP_LEVELS} levels deep",
        edit=lambda body: splice(body, "ContentSequence", nested),
        sender="pynetdicom",
        status=CANNOT_UNDERSTAND,
    )


def photometric(c: Corpus) -> None:
    for name, value, samples, expect in (
        ("photometric_rgb_one_sample", "RGB", 1, DONE),
        ("photometric_rgb_grey_data", "RGB", 3, failed("cannot decode pixel data")),
        ("photometric_palette_no_lut", "PALETTE COLOR", 1, failed("cannot apply the Palette Color LUT")),
        ("photometric_ybr_full_422_grey", "YBR_FULL_422", 1, failed("'YBR_FULL_422' is incorrect")),
        ("photometric_garbage", "HELLO", 1, failed("Unknown (0028,0004) 'Photometric Interpretation' value 'HELLO'")),
    ):
        ds = c.base(name)
        ds.SamplesPerPixel = samples
        if samples == 3:
            ds.PlanarConfiguration = 0
        c.add_dataset(
            ds,
            "wrong photometric",
            f"PhotometricInterpretation {value!r}, SamplesPerPixel {samples}, grey data",
            edit=raw_value("PhotometricInterpretation", "CS", text(value)),
            instance=expect,
        )
    ds = c.base("photometric_palette_with_lut")
    ds.PhotometricInterpretation = "PALETTE COLOR"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    del ds.WindowCenter, ds.WindowWidth
    ds.PixelData = (chest_pixels() >> 4).astype(np.uint8).tobytes()
    for colour in ("Red", "Green", "Blue"):
        ds[f"{colour}PaletteColorLookupTableDescriptor"] = pydicom.DataElement(
            tag_of(f"{colour}PaletteColorLookupTableDescriptor"), "US", [256, 0, 16]
        )
        ramp = (np.arange(256, dtype=np.uint16) * (257 if colour != "Blue" else 200)).tobytes()
        ds[f"{colour}PaletteColorLookupTableData"] = pydicom.DataElement(
            tag_of(f"{colour}PaletteColorLookupTableData"), "OW", ramp
        )
    c.add_dataset(ds, "wrong photometric", "PALETTE COLOR with a 256-entry palette (a grey ramp)", instance=DONE)
    ds = c.base("photometric_missing")
    del ds.PhotometricInterpretation
    c.add_dataset(ds, "wrong photometric", "no PhotometricInterpretation", instance=failed("cannot decode"))


def bits(c: Corpus) -> None:
    ds = c.base("bits_allocated_1")
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 1, 0
    del ds.WindowCenter, ds.WindowWidth
    ds.PixelData = pack_bits(chest_pixels() > 2048)
    c.add_dataset(ds, "bits", "BitsAllocated 1 (bit-packed, matching data)", instance=DONE)
    ds = c.base("bits_allocated_32")
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 32, 32, 31
    ds.PixelData = (chest_pixels().astype(np.uint32) << 16).tobytes()
    del ds.WindowCenter, ds.WindowWidth
    c.add_dataset(ds, "bits", "BitsAllocated 32 (matching data)", instance=DONE)
    ds = c.base("bits_allocated_64")
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 64, 64, 63
    ds.PixelData = chest_pixels().astype(np.uint64).tobytes()
    c.add_dataset(ds, "bits", "BitsAllocated 64 (matching data)", instance=DONE)
    ds = c.base("bits_allocated_32_short_data")
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 32, 32, 31
    c.add_dataset(ds, "bits", "BitsAllocated 32 with 16-bit data", instance=failed("cannot decode pixel data"))
    ds = c.base("bits_allocated_12")
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 12, 12, 11
    c.add_dataset(ds, "bits", "BitsAllocated 12 (native, not a multiple of 8)", instance=failed("cannot decode"))
    ds = c.base("bits_stored_over_allocated")
    ds.BitsStored, ds.HighBit = 24, 23
    c.add_dataset(ds, "bits", "BitsStored 24 > BitsAllocated 16", instance=failed("cannot decode"))


def garbage(c: Corpus) -> None:
    cases: list[tuple[str, str, str, bytes, tuple[str, str | None]]] = [
        ("window_center_abc", "WindowCenter", "DS", b"abc ", failed("invalid WindowCenter 'abc': not a number")),
        ("window_width_nan", "WindowWidth", "DS", b"nan ", failed("invalid WindowWidth 'nan': not a finite number")),
        ("window_width_huge", "WindowWidth", "DS", b"1e300 ", DONE),
        ("window_center_multi_garbage", "WindowCenter", "DS", b"2048\\abc", DONE),
        ("rescale_slope_overflow", "RescaleSlope", "DS", b"1e999 ", failed("invalid RescaleSlope '1e999'")),
        ("rescale_slope_zero", "RescaleSlope", "DS", b"0 ", DONE),
        ("rescale_intercept_abc", "RescaleIntercept", "DS", b"abc ", failed("invalid RescaleIntercept 'abc'")),
        ("rescale_intercept_huge", "RescaleIntercept", "DS", b"-1e308", failed("not finite after rescale")),
        ("pixel_spacing_garbage", "PixelSpacing", "DS", b"abc\\-1 ", DONE),
        ("samples_per_pixel_zero", "SamplesPerPixel", "US", struct.pack("<H", 0), failed("invalid SamplesPerPixel 0")),
        ("view_position_garbage", "ViewPosition", "CS", b"%%ZZ", skipped("view position %%ZZ")),
        ("body_part_escape_sequence", "BodyPartExamined", "CS", b"\x1b[2J\x07X", skipped("body part ?[2J?X")),
        ("modality_garbage", "Modality", "CS", b"??", skipped("modality ??")),
        ("modality_empty", "Modality", "CS", b"", skipped("modality absent")),
        ("requested_priority_garbage", "RequestedProcedurePriority", "SH", b"VERY URGENT!", DONE),
        ("study_date_garbage", "StudyDate", "DA", b"2026-13-45", DONE),
        ("series_uid_garbage", "SeriesInstanceUID", "UI", b"not-a-uid\x00", DONE),
        ("specific_character_set_unknown", "SpecificCharacterSet", "CS", b"ISO_IR 999", DONE),
    ]
    for name, keyword, vr, value, expect in cases:
        ds = c.base(name)
        shown = value.decode("latin-1")
        c.add_dataset(
            ds,
            "garbage in a read tag",
            f"{keyword} = {shown!r}",
            edit=raw_value(keyword, vr, value),
            sender="pynetdicom" if len(value) % 2 or b"\x00" in value else "storescu",
            instance=expect,
        )
    # A sender that puts the patient's name where the pipeline quotes a value: the reason must not carry it.
    ds = c.base("window_center_is_patient_name")
    name = str(ds.PatientName).split("^")[0]
    c.add_dataset(
        ds,
        "garbage in a read tag",
        "WindowCenter holds the patient's name (the reason must not quote it)",
        edit=raw_value("WindowCenter", "DS", text(name)),
        instance=failed("invalid WindowCenter '[redacted]'"),
    )
    ds = c.base("modality_lut_sequence_broken")
    lut = Dataset()
    lut.LUTDescriptor = [4096, 0, 16]
    lut.ModalityLUTType = "US"
    lut.add_new("LUTData", "OW", b"\x00\x01")
    ds.ModalityLUTSequence = [lut]
    c.add_dataset(
        ds,
        "garbage in a read tag",
        "Modality LUT Sequence with 1 entry where 4096 are declared",
        instance=failed("Modality LUT Sequence"),
    )
    ds = c.base("voi_lut_sequence_broken")
    lut = Dataset()
    lut.LUTDescriptor = [4096, 0, 16]
    lut.add_new("LUTData", "OW", b"\x00\x01")
    ds.VOILUTSequence = [lut]
    c.add_dataset(
        ds,
        "garbage in a read tag",
        "VOI LUT Sequence with 1 entry where 4096 are declared",
        instance=failed("VOI LUT Sequence"),
    )


def intake(c: Corpus) -> None:
    ds = c.base("lateral_view")
    ds.ViewPosition = "LL"
    c.add_dataset(ds, "intake", "ViewPosition LL", instance=skipped("lateral view (LL)"))
    ds = c.base("lateral_from_description")
    del ds.ViewPosition, ds.BodyPartExamined
    ds.StudyDescription = "XR CHEST LAT"
    c.add_dataset(ds, "intake", "lateral named only by the description", instance=skipped("lateral view"))
    ds = c.base("non_chest_body_part")
    ds.BodyPartExamined = "HIP"
    c.add_dataset(ds, "intake", "BodyPartExamined HIP", instance=skipped("body part HIP"))
    ds = c.base("non_chest_anatomic_region")
    del ds.BodyPartExamined
    region = Dataset()
    region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning = "72696002", "SCT", "Knee"
    ds.AnatomicRegionSequence = [region]
    c.add_dataset(ds, "intake", "AnatomicRegionSequence: knee", instance=skipped("anatomic region KNEE"))


def patients(c: Corpus) -> None:
    ds = c.base("patient_name_control_chars_wrong_charset")
    name, patient_id = str(ds.PatientName), str(ds.PatientID)
    family = name.split("^")[0]
    # Latin-1 bytes and control characters, under a character set (UTF-8) that says otherwise.
    value = family.encode() + b"\xe9\xff\x1b[31m\x07\x08\x7f^Corpus\xc3"
    c.add_dataset(
        ds,
        "patient",
        "Patient's Name with ESC, BEL, BS, DEL and invalid UTF-8 under ISO_IR 192",
        edit=lambda body: splice(
            splice(body, "SpecificCharacterSet", element("SpecificCharacterSet", "CS", b"ISO_IR 192")),
            "PatientName",
            element("PatientName", "PN", value + (b" " if len(value) % 2 else b"")),
        ),
        sender="pynetdicom",
        instance=DONE,
    )
    c.expected[-1].identifiers = [family, patient_id]
    ds = c.base("patient_name_with_nul")
    family = str(ds.PatientName).split("^")[0]
    c.add_dataset(
        ds,
        "patient",
        "Patient's Name and Study Description with NUL bytes inside",
        edit=lambda body: splice(
            splice(body, "PatientName", element("PatientName", "PN", family.encode() + b"\x00X^Corpus\x00")),
            "StudyDescription",
            element("StudyDescription", "LO", b"Bad\x00input"),
        ),
        sender="pynetdicom",
        instance=DONE,
    )
    ds = c.base("patient_name_very_long")
    family = str(ds.PatientName).split("^")[0]
    ds.PatientName = family + "^" + "Verylongfakegivenname" * 500
    c.add_dataset(ds, "patient", "Patient's Name of 10,500 characters", sender="pynetdicom", instance=DONE)
    c.expected[-1].identifiers = [family, "Verylongfakegivenname"]


def not_dicom(c: Corpus) -> None:
    request = (CR, c.uid("empty_file", "sop"), U.ExplicitVRLittleEndian)
    c.add(
        "empty_file",
        "not DICOM",
        "an empty file (an empty data set on the wire)",
        b"",
        sender="pynetdicom",
        request=request,
        status=CANNOT_UNDERSTAND,
    )
    request = (CR, c.uid("not_dicom_png", "sop"), U.ExplicitVRLittleEndian)
    c.add(
        "not_dicom_png",
        "not DICOM",
        "a PNG file sent as the data set",
        png_bytes(),
        sender="pynetdicom",
        request=request,
        status=CANNOT_UNDERSTAND,
    )
    request = (CR, c.uid("not_dicom_text", "sop"), U.ExplicitVRLittleEndian)
    c.add(
        "not_dicom_text",
        "not DICOM",
        "a text file sent as the data set",
        b"This is not a DICOM file.\n" * 40,
        sender="pynetdicom",
        request=request,
        status=CANNOT_UNDERSTAND,
    )


BUILDERS: tuple[Callable[[Corpus], None], ...] = (
    controls,
    transfer_syntaxes,
    truncated,
    pixel_data,
    sop_classes,
    sizes,
    multiframe,
    uids,
    odd_vrs,
    photometric,
    bits,
    garbage,
    intake,
    patients,
    not_dicom,
)


def generate(out: Path, *, max_dataset_bytes: int = DEFAULT_MAX_DATASET_BYTES, salt: str = "cxr-triage") -> Path:
    """Write the corpus and expected.json into `out` (created); returns the path of expected.json."""
    out.mkdir(parents=True, exist_ok=True)
    corpus = Corpus(out, salt=salt, max_dataset_bytes=max_dataset_bytes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's warnings about the values it is asked to write
        for build in BUILDERS:
            build(corpus)
    return corpus.write_expected()


def write_good_file(path: Path, *, salt: str) -> str:
    """A valid frontal chest CR like the corpus's control, with UIDs of its own (from `salt` and the file name), to
    send between the hostile files; returns its SOP Instance UID."""
    corpus = Corpus(path.parent, salt=salt, max_dataset_bytes=DEFAULT_MAX_DATASET_BYTES)
    ds = corpus.base(path.stem)
    path.write_bytes(file_meta(CR, str(ds.SOPInstanceUID), U.ExplicitVRLittleEndian) + encode_body(ds))
    return str(ds.SOPInstanceUID)


def load_expected(path: Path) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(path.read_text())
    return document


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output directory (created)")
    parser.add_argument(
        "--max-dataset-bytes",
        type=int,
        default=DEFAULT_MAX_DATASET_BYTES,
        help="CXR_MAX_DATASET_BYTES of the listener under test (sizes the too-large file and the deflate bomb)",
    )
    parser.add_argument("--salt", default="cxr-triage", help="changes every UID (to send the corpus again as new)")
    args = parser.parse_args(argv)
    path = generate(args.out, max_dataset_bytes=args.max_dataset_bytes, salt=args.salt)
    files = load_expected(path)["files"]
    categories: dict[str, int] = {}
    for entry in files:
        categories[entry["category"]] = categories.get(entry["category"], 0) + 1
    print(f"{len(files)} files in {args.out}, expectations in {path}")
    for category, count in sorted(categories.items()):
        print(f"  {category:24s} {count}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
