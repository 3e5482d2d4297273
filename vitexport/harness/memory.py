"""Peak resident memory of a block of work, on Linux without a second process.

Writing 5 to /proc/self/clear_refs resets the kernel's high-water mark (VmHWM), so the peak of each
artifact's load-and-run is measured on its own rather than inheriting the build's peak.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


class PeakMemory:
    """`with PeakMemory() as m: ...` then `m.peak_mb` (peak RSS above the RSS at entry) and `m.method`."""

    def __enter__(self) -> "PeakMemory":
        self.method = "unavailable"
        self.peak_mb: float | None = None
        self._base = _status_kb("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.method = "VmHWM above starting RSS (Linux)"
        except OSError:
            self._maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.method = "ru_maxrss growth (lower bound)"
        return self

    def __exit__(self, *exc) -> bool:
        if self.method.startswith("VmHWM"):
            hwm = _status_kb("VmHWM")
            if hwm is not None and self._base is not None:
                self.peak_mb = max(hwm - self._base, 0) / 1024
        elif self.method.startswith("ru_maxrss"):
            grown = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self._maxrss, 0)
            self.peak_mb = grown / 2**20 if sys.platform == "darwin" else grown / 1024  # bytes on macOS, KiB on Linux
        return False

    @staticmethod
    def process_peak_mb() -> float | None:
        hwm = _status_kb("VmHWM")
        return hwm / 1024 if hwm is not None else None
