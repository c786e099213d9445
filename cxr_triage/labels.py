"""The triage classes, in the order every model's output uses."""

from typing import Final, Literal, get_args

Label = Literal["COVID-19", "Pneumonia", "No finding"]

COVID19: Final = "COVID-19"
PNEUMONIA: Final = "Pneumonia"
NO_FINDING: Final = "No finding"

CLASS_LABELS: Final[tuple[str, ...]] = get_args(Label)

DEMO_DISCLAIMER: Final = "Demo model - NOT FOR CLINICAL USE"


def label_index(label: str) -> int:
    """Index of `label` in CLASS_LABELS; raises ValueError with the known labels otherwise."""
    try:
        return CLASS_LABELS.index(label)
    except ValueError:
        raise ValueError(f"unknown label {label!r}; expected one of {CLASS_LABELS}") from None
