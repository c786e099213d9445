"""The AI result objects the service produces for a triaged instance, one registry entry per kind.

Adding a kind (say, a GSPS overlay) is one entry here and one builder in workers/results.py (`BUILDERS`, keyed by
the entry's name): the worker builds and stores it (queue gpu), the delivery task sends it (queue cpu), the outbox
re-sends it, and the API and the study page link it, all by kind, with no new column, migration or schema field.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from cxr_triage.settings import Settings


@dataclass(frozen=True)
class ResultKind:
    name: str  # stored in result_objects.kind (at most 16 characters)
    title: str  # how the study page names it
    enabled: Callable[[Settings], bool]  # whether the site produces it
    image: bool = False  # a picture: the worklist API serves it as PNG too, and the pages show it


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
    )
}


def enabled_kinds(settings: Settings) -> list[ResultKind]:
    """The kinds this site produces, in registry order."""
    return [kind for kind in RESULT_KINDS.values() if kind.enabled(settings)]
