"""Free space on the spool's filesystem against the watermark below which the listener refuses new instances."""

from __future__ import annotations

import os
from dataclasses import dataclass

from cxr_triage.settings import Settings


@dataclass(frozen=True)
class SpoolSpace:
    free_bytes: int
    total_bytes: int
    watermark_bytes: int

    @property
    def below_watermark(self) -> bool:
        return self.free_bytes < self.watermark_bytes


def spool_space(settings: Settings) -> SpoolSpace:
    """Free and total bytes of the spool's filesystem (for an unprivileged writer) and the watermark: the larger of
    CXR_MIN_FREE_BYTES and CXR_MIN_FREE_PERCENT of the filesystem. Raises OSError if the spool cannot be read."""
    spool = settings.effective_spool_dir
    spool.mkdir(parents=True, exist_ok=True)
    stat = os.statvfs(spool)
    free, total = stat.f_bavail * stat.f_frsize, stat.f_blocks * stat.f_frsize
    watermark = max(settings.min_free_bytes, int(total * settings.min_free_percent / 100))
    return SpoolSpace(free_bytes=free, total_bytes=total, watermark_bytes=watermark)
