"""DICOMweb STOW-RS (PS3.18 10.5): `POST /dicomweb/studies`, multipart/related; type="application/dicom".

Each part is streamed to a scratch file beside the spool, held to CXR_MAX_DATASET_BYTES, and taken through the
listener's intake path (listener/accept.py: checked, spooled with fsync, recorded, queued) as soon as it ends, so a
request never holds more than one instance on disk and none in memory. The answer comes after the last part: a Store
Instances Response (PS3.18 Annex I) that lists every instance, stored or failed with its Failure Reason.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import IO, Any, Final

from fastapi import APIRouter, Depends, HTTPException, Request, Response, status
from fastapi.security import HTTPAuthorizationCredentials
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset, read_file_meta_info
from pydicom.tag import Tag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MAX_BOUNDARY_LENGTH, MultipartParser, MultipartState, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from cxr_triage import dicom_status
from cxr_triage.logs import get_logger
from cxr_triage.settings import Settings
from cxr_triage.uids import is_valid_uid
from db.audit_models import AuditAction
from listener.accept import Arrival, Intake, Outcome, Parsed, TooLarge, read_file_within
from listener.dispatch import Dispatcher
from worklist.audit import audited, note
from worklist.auth import AuthUser
from worklist.deps import bearer_scheme, optional_user, request_settings

log = get_logger(__name__)
router = APIRouter(prefix="/dicomweb", tags=["dicomweb"])

DICOM_JSON: Final = "application/dicom+json"
SCRATCH_DIR: Final = ".stow"  # under the spool directory: a part becomes the spooled instance by a hard link
SCRATCH_MAX_AGE_S: Final = 24 * 3600  # scratch files older than this were left by a process that died
MAX_PREAMBLE: Final = 64 * 1024  # bytes before the first boundary (RFC 2046 preamble) we skip
MAX_PART_HEADERS: Final = 16  # Content-Type, Content-Length, Content-ID, Content-Location, ...
# RFC 2046 allows 70 characters; Orthanc's DICOMweb plugin sends 73 (two UUIDs). The parser's own maximum.
MAX_BOUNDARY: Final = MAX_BOUNDARY_LENGTH
RETRY_AFTER_S: Final = 30
PEEK_BYTES: Final = 64 * 1024  # of a refused part's data set, enough for its group 0008 (SOP Class/Instance UID)
SOP_INSTANCE_UID: Final = Tag("SOPInstanceUID")


class MalformedBody(Exception):
    """The body is not the multipart/related message its Content-Type announced."""


class TooManyParts(Exception):
    """The request carries more instances than CXR_STOW_MAX_INSTANCES."""


# --- the request's body, part by part ------------------------------------------------------------------------------


@dataclass
class Part:
    """One body part on its way to disk: at most `limit + 1` bytes are kept, `size` counts them all."""

    path: Path
    handle: IO[bytes]
    content_type: str = ""
    size: int = 0


class Parts:
    """A multipart/related body fed chunk by chunk (in a worker thread: the writes block): each part's bytes go to
    its own scratch file; `feed` returns the parts that ended, and once the body turns out malformed or to carry too
    many parts, `error` says so (the parts that ended before are still handed out). The parser bounds each part's
    headers in number and size; `close` removes whatever was not handed out."""

    def __init__(self, boundary: bytes, scratch: Path, *, part_limit: int, max_parts: int) -> None:
        self.scratch = scratch
        self.part_limit = part_limit
        self.max_parts = max_parts
        self.count = 0
        self.ended: list[Part] = []
        self.current: Part | None = None
        self.error: MalformedBody | TooManyParts | None = None
        self._delimiter = b"--" + boundary
        self._lead: bytearray | None = bytearray()  # until the first boundary: the preamble, skipped
        self._field = bytearray()
        self._value = bytearray()
        self.parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._begin,
                "on_part_data": self._data,
                "on_part_end": self._end,
                "on_header_field": lambda data, start, end: self._field.extend(data[start:end]),
                "on_header_value": lambda data, start, end: self._value.extend(data[start:end]),
                "on_header_end": self._header,
            },
            max_header_count=MAX_PART_HEADERS,
        )

    @property
    def complete(self) -> bool:
        """The closing boundary arrived."""
        return self._lead is None and self.parser.state == MultipartState.END

    def feed(self, chunk: bytes) -> list[Part]:
        if self.error is not None:
            return []
        if self._lead is not None:
            self._lead.extend(chunk)
            at = self._lead.find(self._delimiter)
            if at < 0:
                if len(self._lead) > MAX_PREAMBLE:
                    self.error = MalformedBody("no boundary where the body should start")
                return []
            chunk, self._lead = bytes(self._lead[at:]), None
        try:
            self.parser.write(chunk)
        except MultipartParseError as exc:
            self.error = MalformedBody(f"not a multipart body: {exc}")
        except TooManyParts as exc:
            self.error = exc
        ended, self.ended = self.ended, []
        return ended

    def _begin(self) -> None:
        self.count += 1
        if self.count > self.max_parts:
            raise TooManyParts(f"more than {self.max_parts} instances in one request")
        fd, name = tempfile.mkstemp(prefix="part-", suffix=".dcm", dir=self.scratch)
        self.current = Part(Path(name), os.fdopen(fd, "wb"))

    def _data(self, data: bytes, start: int, end: int) -> None:
        part = self.current
        assert part is not None
        room = self.part_limit + 1 - part.size
        if room > 0:
            part.handle.write(data[start : start + min(room, end - start)])
        part.size += end - start

    def _header(self) -> None:
        if self.current is not None and bytes(self._field).strip().lower() == b"content-type":
            self.current.content_type = bytes(self._value).decode("latin-1").strip()
        self._field.clear()
        self._value.clear()

    def _end(self) -> None:
        part = self.current
        assert part is not None
        part.handle.close()
        self.ended.append(part)
        self.current = None

    def close(self) -> None:
        for part in [*self.ended, *([self.current] if self.current else [])]:
            part.handle.close()
            part.path.unlink(missing_ok=True)
        self.ended, self.current = [], None


def sweep_scratch(scratch: Path, *, max_age_s: float = SCRATCH_MAX_AGE_S) -> int:
    """Remove scratch files a process that died left behind; returns how many."""
    removed = 0
    cutoff = time.time() - max_age_s
    for path in scratch.glob("part-*.dcm"):
        with contextlib.suppress(OSError):
            if path.stat().st_mtime < cutoff:
                path.unlink()
                removed += 1
    return removed


# --- one part through the intake path ------------------------------------------------------------------------------


def _media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def read_part(path: Path, limit: int) -> Parsed:
    """A STOW-RS part: a PS3.10 file, whose file meta information declares the SOP class, instance and syntax."""
    meta = read_file_meta_info(path)
    syntax = str(meta.get("TransferSyntaxUID", ""))
    ds = read_file_within(path, limit, deflated=syntax == DeflatedExplicitVRLittleEndian)
    ds.file_meta = meta
    return Parsed(
        ds,
        transfer_syntax_uid=syntax,
        declared_sop_class_uid=str(meta.get("MediaStorageSOPClassUID", "")),
        declared_sop_instance_uid=str(meta.get("MediaStorageSOPInstanceUID", "")),
    )


def peek_uids(path: Path) -> tuple[str, str]:
    """The SOP Class and Instance UIDs of a refused part, read from the start of its data set alone (at most
    PEEK_BYTES, inflated to at most as much: a refused part may be a deflate bomb), when they are valid UIDs: the
    response then names the instance. ("", "") otherwise: the response lists it among the other failures."""
    try:
        meta = read_file_meta_info(path)
        syntax = UID(str(meta.TransferSyntaxUID))
        with path.open("rb") as fh:
            fh.seek(128 + 4 + 12 + int(meta.FileMetaInformationGroupLength))
            head = fh.read(PEEK_BYTES)
        if syntax == DeflatedExplicitVRLittleEndian:
            head = zlib.decompressobj(-zlib.MAX_WBITS).decompress(head, PEEK_BYTES)
        ds = read_dataset(
            BytesIO(head),
            is_implicit_VR=syntax.is_implicit_VR,
            is_little_endian=syntax.is_little_endian,
            stop_when=lambda tag, vr, length: tag > SOP_INSTANCE_UID,
        )
        sop_class, sop_instance = ds.get("SOPClassUID"), ds.get("SOPInstanceUID")
    except Exception:
        return "", ""
    if is_valid_uid(sop_class) and is_valid_uid(sop_instance):
        return str(sop_class), str(sop_instance)
    return "", ""


def take_part(intake: Intake, part: Part, *, calling_aet: str) -> Outcome:
    """The part through the intake path, its scratch file removed after (once spooled, the spool holds a link)."""
    try:
        media_type = _media_type(part.content_type)
        if media_type not in ("", "application/dicom"):
            log.warning("store.rejected", calling_aet=calling_aet, reason="part is not application/dicom",
                        content_type=media_type[:64])  # fmt: skip
            return Outcome(dicom_status.CANNOT_UNDERSTAND, "refused: part is not application/dicom")

        def read(limit: int) -> Parsed:
            if part.size > limit:
                raise TooLarge(f"data set of {part.size} bytes, larger than {limit}")
            return read_part(part.path, limit)

        arrival = Arrival(
            read=read,
            source=part.path,
            encoded=None,
            calling_aet=calling_aet,
            declared_by="the file meta information",
        )
        outcome = intake.accept(arrival)
        if not outcome.sop_instance_uid and not outcome.stored:
            sop_class, sop_instance = peek_uids(part.path)
            outcome = Outcome(outcome.status, outcome.comment, sop_class_uid=sop_class, sop_instance_uid=sop_instance)
        return outcome
    finally:
        part.path.unlink(missing_ok=True)


# --- the Store Instances Response ----------------------------------------------------------------------------------


def _reference(outcome: Outcome) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = outcome.sop_class_uid
    item.ReferencedSOPInstanceUID = outcome.sop_instance_uid
    return item


def store_response(outcomes: Sequence[Outcome]) -> Dataset:
    """The Store Instances Response Module (PS3.18 Table I.1-1): every stored instance in Referenced SOP Sequence,
    every refused one in Failed SOP Sequence with its Failure Reason (the DICOM status of its refusal), and parts
    that could not be read far enough to name an instance in Other Failures Sequence."""
    response = Dataset()
    response.RetrieveURL = None  # type 2: empty, as there is no WADO-RS here to retrieve from
    referenced, failed, other = [], [], []
    for outcome in outcomes:
        if outcome.stored:
            item = _reference(outcome)
            item.RetrieveURL = None
            referenced.append(item)
        elif outcome.sop_instance_uid:
            item = _reference(outcome)
            item.FailureReason = outcome.status
            failed.append(item)
        else:
            item = Dataset()
            item.FailureReason = outcome.status
            other.append(item)
    if failed:
        response.FailedSOPSequence = failed
    if referenced:
        response.ReferencedSOPSequence = referenced
    if other:
        response.OtherFailuresSequence = other
    return response


def http_status(outcomes: Sequence[Outcome]) -> int:
    """PS3.18 Table 10.5.3-1: 200 all stored, 202 some stored, 409 none; 503 when none was stored and every refusal
    was for want of resources (0xA7xx: disk, database, free-space watermark), which the sender should retry later."""
    stored = sum(outcome.stored for outcome in outcomes)
    if stored == len(outcomes):
        return status.HTTP_200_OK
    if stored:
        return status.HTTP_202_ACCEPTED
    if all(outcome.status & 0xFF00 == dicom_status.OUT_OF_RESOURCES for outcome in outcomes):
        return status.HTTP_503_SERVICE_UNAVAILABLE
    return status.HTTP_409_CONFLICT


def _answer(outcomes: Sequence[Outcome], code: int, *, problem: str | None = None) -> Response:
    """The response data set; a request-level problem also in a Warning header (as PS3.18 8.3.5 uses it)."""
    headers: dict[str, str] = {}
    if problem:
        text = "".join(ch if " " <= ch <= "~" and ch not in '"\\' else "?" for ch in problem[:200])
        headers["Warning"] = f'299 cxr-triage "{text}"'
    if code == status.HTTP_503_SERVICE_UNAVAILABLE:
        headers["Retry-After"] = str(RETRY_AFTER_S)
    body = json.dumps(store_response(outcomes).to_json_dict())
    return Response(body, status_code=code, media_type=DICOM_JSON, headers=headers)


# --- the route -----------------------------------------------------------------------------------------------------


def stow_user(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer_scheme)) -> AuthUser:
    """The sender: a user with a bearer token (never a browser's session cookie) listed in CXR_STOW_USERS."""
    token = credentials.credentials if credentials is not None and credentials.scheme.lower() == "bearer" else None
    user = optional_user(request, token)
    if user is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "a bearer token is required", headers={"WWW-Authenticate": "Bearer"}
        )
    if user.username not in request_settings(request).stow_users:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "this user may not store instances (CXR_STOW_USERS)")
    return user


def boundary_of(content_type: str) -> bytes:
    """The boundary of a multipart/related; type="application/dicom" body; 415 for another media type, 400
    without a boundary."""
    media_type, options = parse_options_header(content_type)
    if media_type != b"multipart/related":
        raise HTTPException(
            status.HTTP_415_UNSUPPORTED_MEDIA_TYPE, 'expected multipart/related; type="application/dicom"'
        )
    part_type = options.get(b"type", b"application/dicom").decode("latin-1")
    if _media_type(part_type) != "application/dicom":
        raise HTTPException(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE, "only application/dicom parts are accepted")
    boundary = options.get(b"boundary", b"")
    if not 0 < len(boundary) <= MAX_BOUNDARY:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "multipart/related without a valid boundary")
    return boundary


def accepts_dicom_json(accept: str) -> bool:
    """Whether the Accept header allows application/dicom+json (absent: yes)."""
    if not accept.strip():
        return True
    for media_range in accept.split(","):
        name, _, params = media_range.partition(";")
        quality = next((p.split("=", 1)[1] for p in params.split(";") if p.strip().lower().startswith("q=")), "1")
        try:
            acceptable = float(quality) > 0
        except ValueError:
            acceptable = False
        if acceptable and name.strip().lower() in (DICOM_JSON, "application/json", "application/*", "*/*"):
            return True
    return False


def _intake(request: Request, settings: Settings) -> Intake:
    """The app's intake path (one dispatcher, so its broker back-off holds across requests), made at first use."""
    intake: Intake | None = getattr(request.app.state, "stow_intake", None)
    if intake is None:
        intake = Intake(settings, Dispatcher(settings))
        request.app.state.stow_intake = intake
        if removed := sweep_scratch(settings.effective_spool_dir / SCRATCH_DIR):
            log.info("stow.scratch_swept", files=removed)
    return intake


STORE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "Every instance stored (Referenced SOP Sequence).", "content": {DICOM_JSON: {}}},
    202: {"description": "Some stored, some refused (Failed SOP Sequence, each with its Failure Reason).",
          "content": {DICOM_JSON: {}}},
    400: {"description": "Not a multipart/related body, no instance in it, or the body ended early (the instances "
          "before are stored and listed; a Warning header says why).", "content": {DICOM_JSON: {}}},
    401: {"description": "No valid bearer token."},
    403: {"description": "The user is not one of CXR_STOW_USERS."},
    406: {"description": "The Accept header does not allow application/dicom+json."},
    409: {"description": "No instance stored (Failed SOP Sequence, Other Failures Sequence).",
          "content": {DICOM_JSON: {}}},
    413: {"description": "Larger than CXR_STOW_MAX_REQUEST_BYTES, or more than CXR_STOW_MAX_INSTANCES instances (the "
          "instances before the limit are stored and listed).", "content": {DICOM_JSON: {}}},
    415: {"description": 'Not multipart/related; type="application/dicom".'},
    503: {"description": "No instance stored, each for want of resources (disk, database): retry after Retry-After "
          "seconds.", "content": {DICOM_JSON: {}}},
}  # fmt: skip


@router.post(
    "/studies",
    operation_id="storeInstances",
    response_class=Response,
    responses=STORE_RESPONSES,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                'multipart/related; type="application/dicom"': {"schema": {"type": "string", "format": "binary"}}
            },
        }
    },
)
@audited(AuditAction.STORE_INSTANCES)
async def store_instances(request: Request, user: AuthUser = Depends(stow_user)) -> Response:
    """Store instances (DICOMweb STOW-RS, PS3.18 10.5) on the same path as a C-STORE: each is checked, spooled,
    recorded and queued for triage before the answer; non-chest instances are stored and skipped. The answer lists
    every instance: Referenced SOP Sequence (stored), Failed SOP Sequence with the Failure Reason (0xA700 out of
    resources, 0xA900 data set does not match its SOP class, 0xC000 cannot understand, 0x0122 SOP class not supported,
    0xC122 transfer syntax not supported)."""
    settings = request_settings(request)
    boundary = boundary_of(request.headers.get("content-type", ""))
    if not accepts_dicom_json(request.headers.get("accept", "")):
        raise HTTPException(status.HTTP_406_NOT_ACCEPTABLE, "the answer is application/dicom+json")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > settings.stow_max_request_bytes:
        raise HTTPException(
            status.HTTP_413_CONTENT_TOO_LARGE, f"request body larger than {settings.stow_max_request_bytes} bytes"
        )
    started = time.perf_counter()
    intake = await run_in_threadpool(_intake, request, settings)
    scratch = settings.effective_spool_dir / SCRATCH_DIR
    await run_in_threadpool(scratch.mkdir, parents=True, exist_ok=True)  # (again: an operator may have removed it)
    calling_aet = f"STOW:{user.username}"
    parts = Parts(boundary, scratch, part_limit=settings.max_dataset_bytes, max_parts=settings.stow_max_instances)
    outcomes: list[Outcome] = []
    code: int | None = None
    problem: str | None = None
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > settings.stow_max_request_bytes:
                raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, "request body too large")
            for part in await run_in_threadpool(parts.feed, chunk):
                outcomes.append(await run_in_threadpool(take_part, intake, part, calling_aet=calling_aet))
            if parts.error is not None:
                raise parts.error
        if not parts.complete:
            code, problem = status.HTTP_400_BAD_REQUEST, "the body ended before the closing boundary"
        elif not outcomes:
            code, problem = status.HTTP_400_BAD_REQUEST, "no instance in the request"
    except MalformedBody as exc:
        code, problem = status.HTTP_400_BAD_REQUEST, str(exc)
    except TooManyParts as exc:
        code, problem = status.HTTP_413_CONTENT_TOO_LARGE, str(exc)
    except HTTPException as exc:  # 413 from our count, or from the body size limit (worklist/limits.py)
        if exc.status_code != status.HTTP_413_CONTENT_TOO_LARGE:
            raise
        code, problem = exc.status_code, f"request body larger than {settings.stow_max_request_bytes} bytes"
    except ClientDisconnect:
        code, problem = status.HTTP_400_BAD_REQUEST, "the client went away before the end of the body"
    finally:
        await run_in_threadpool(parts.close)
    code = code or http_status(outcomes)
    stored = sum(outcome.stored for outcome in outcomes)
    studies = {outcome.study_instance_uid for outcome in outcomes if outcome.study_instance_uid}
    failures = sorted({f"{outcome.status:04X}" for outcome in outcomes if not outcome.stored})
    details = f"{stored} stored, {len(outcomes) - stored} failed" + (f" ({', '.join(failures)})" if failures else "")
    if len(studies) > 1:
        details += f"; {len(studies)} studies"
    note(request, study_instance_uid=studies.pop() if len(studies) == 1 else None, details=details)
    log.info("stow.answered", calling_aet=calling_aet, status=code, stored=stored, failed=len(outcomes) - stored,
             problem=problem, bytes=received, ms=round((time.perf_counter() - started) * 1000, 1))  # fmt: skip
    return _answer(outcomes, code, problem=problem)
