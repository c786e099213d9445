"""The AI result objects the service produces for a triaged instance, one registry entry per kind.

Adding a kind (say, a GSPS overlay) is one entry here and one builder in workers/results.py (`BUILDERS`, keyed by
the entry's name): the worker builds and stores it (queue gpu), the delivery task sends it (queue cpu) over the
kind's transport, the outbox re-sends it, and the API and the study page link it, all by kind, with no new column,
migration or schema field.

A kind names how it leaves (`transport`: DICOM C-STORE, HL7 v2 over MLLP, FHIR over HTTP; workers/delivery.py has
one sender per transport, configured by the settings in `DESTINATION_SETTINGS`) and when it is made (`trigger`):
with each live result, by the worker from the image and the ensemble, or when a study's effective priority changes,
recorded in the database by db/worklist_repo.py and built from the database when it is sent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from cxr_triage.settings import Settings


class Transport(StrEnum):
    """How a result object reaches its destination."""

    DICOM = "dicom"  # DIMSE C-STORE to the PACS (workers/sender.py)
    HL7 = "hl7"  # HL7 v2.5.1 over MLLP to the RIS (workers/hl7.py)
    FHIR = "fhir"  # a FHIR transaction Bundle POSTed over HTTP(S) (workers/fhir.py)


class Trigger(StrEnum):
    """When an object of a kind is made."""

    RESULT = "result"  # with each live result, by the worker (queue gpu): workers/results.py RESULT_BUILDERS
    # when a study's effective priority changes (and, where `per_result` says so, with each live result): recorded by
    # db/repo.py add_study_messages in the transaction that changes it, built when sent: workers/delivery.py
    STUDY = "study"


# The settings that configure each transport's destination; the first one switches it on (empty = not sent).
DESTINATION_SETTINGS: Final[dict[Transport, tuple[str, ...]]] = {
    Transport.DICOM: (
        "results_destination_aet",
        "results_destination_host",
        "results_destination_port",
        "results_destination_tls",
        "results_tls_ca",
    ),
    Transport.HL7: (
        "hl7_host",
        "hl7_port",
        "hl7_message",
        "hl7_sending_application",
        "hl7_sending_facility",
        "hl7_receiving_application",
        "hl7_receiving_facility",
        "hl7_timeout_s",
        "hl7_tls",
        "hl7_tls_ca",
    ),
    Transport.FHIR: ("fhir_base_url", "fhir_token", "fhir_timeout_s", "fhir_tls_ca"),
}


def _never(settings: Settings) -> bool:
    return False


@dataclass(frozen=True)
class ResultKind:
    name: str  # stored in result_objects.kind (at most 16 characters)
    title: str  # how the study page names it
    enabled: Callable[[Settings], bool]  # whether the site produces it
    image: bool = False  # a picture: the worklist API serves it as PNG too, and the pages show it
    transport: Transport = Transport.DICOM
    trigger: Trigger = Trigger.RESULT
    content_type: str = "application/dicom"  # of the stored object (result_objects.content_type)
    # Trigger.STUDY only: also one object for each live result, not only when the study's priority changes.
    per_result: Callable[[Settings], bool] = _never

    def __post_init__(self) -> None:
        if not 0 < len(self.name) <= 16:
            raise ValueError(f"a result kind's name must be 1-16 characters, got {self.name!r}")
        if self.image and self.transport is not Transport.DICOM:
            raise ValueError(f"result kind {self.name!r}: only a DICOM object can be a picture")

    @property
    def destination_settings(self) -> tuple[str, ...]:
        return DESTINATION_SETTINGS[self.transport]


RESULT_KINDS: Final[dict[str, ResultKind]] = {
    kind.name: kind
    for kind in (
        ResultKind("sr", "Structured report", enabled=lambda settings: True),
        ResultKind(
            "heatmap",
            "Heatmap of the model's evidence",
            enabled=lambda settings: settings.results_heatmap,
            image=True,
        ),
        ResultKind(
            "hl7",
            "HL7 message to the RIS",
            enabled=lambda settings: bool(settings.hl7_host),
            transport=Transport.HL7,
            trigger=Trigger.STUDY,
            content_type="x-application/hl7-v2+er7",
            per_result=lambda settings: settings.hl7_message == "oru",
        ),
        ResultKind(
            "fhir",
            "FHIR DiagnosticReport",
            enabled=lambda settings: bool(settings.fhir_base_url),
            transport=Transport.FHIR,
            content_type="application/fhir+json",
        ),
    )
}


def enabled_kinds(settings: Settings, trigger: Trigger | None = None) -> list[ResultKind]:
    """The kinds this site produces (made on `trigger`, if given), in registry order."""
    return [
        kind
        for kind in RESULT_KINDS.values()
        if kind.enabled(settings) and (trigger is None or kind.trigger is trigger)
    ]
