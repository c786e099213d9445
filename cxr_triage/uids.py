"""DICOM UID validation: a UID is digits and dots, at most 64 characters (PS3.5 9.1)."""

import re

# Lenient on leading zeros (some devices emit them), strict on the character set, so a valid UID is always a
# safe path component: no slash, no "..", no NUL.
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)+$")


def is_valid_uid(value: object) -> bool:
    """True if `value` is a syntactically valid DICOM UID (and therefore safe as a file name)."""
    return isinstance(value, str) and 0 < len(value) <= 64 and _UID_RE.match(value) is not None


def require_uid(value: object, *, name: str) -> str:
    """Return `value` if it is a valid UID, else raise ValueError naming the attribute."""
    if not is_valid_uid(value):
        shown = repr(value)[:80]
        raise ValueError(f"{name} is not a valid DICOM UID: {shown}")
    assert isinstance(value, str)
    return value
