"""DICOM DIMSE status codes returned by the listener, named in one place (PS3.4 Annex B, PS3.7 C)."""

from typing import Final

from pydicom.dataset import Dataset

SUCCESS: Final = 0x0000
# Refused: Out of Resources (C-STORE, PS3.4 B.2.3). Senders treat it as transient and retry.
OUT_OF_RESOURCES: Final = 0xA700
# Error: Data Set does not match SOP Class (e.g. an image storage instance without Pixel Data).
DATASET_DOES_NOT_MATCH_SOP_CLASS: Final = 0xA900
# Error: Cannot understand (the data set could not be parsed, or its UIDs are invalid).
CANNOT_UNDERSTAND: Final = 0xC000


def with_comment(code: int, comment: str) -> Dataset:
    """A C-STORE response status with an Error Comment (0000,0902): the sender's log says why, not only the code."""
    response = Dataset()
    response.Status = code
    response.ErrorComment = comment[:64]  # LO: at most 64 characters
    return response
