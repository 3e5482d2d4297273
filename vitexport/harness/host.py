"""What the host is: CPU name, the CPU features that decide int8/bf16 arithmetic, cores, OS.

Rows measured on different hosts are only comparable when the report says what each host was.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

# CPU features that decide int8/bf16 arithmetic: with VNNI (or ARM dot products) u8*s8 sums accumulate in int32;
# without, ONNX Runtime's AVX2 kernel sums pairs in int16 (why int8 weights are 7-bit by default); BF16/AMX change
# what OpenVINO computes in by default. The same artifact can measure differently on hosts that differ here.
INT8_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16", "asimddp", "i8mm", "bf16")


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def cpu_name() -> str:
    for line in _cpuinfo():
        if line.startswith(("model name", "Model")):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "CPU"


def cpu_features() -> list[str]:
    """Which of INT8_FEATURES this CPU has (empty where /proc/cpuinfo is not there, e.g. macOS)."""
    flags: set[str] = set()
    for line in _cpuinfo():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    return [f for f in INT8_FEATURES if f in flags]


def host_info() -> dict[str, Any]:
    return {"cpu": cpu_name(), "cpu_features": cpu_features(), "machine": platform.machine(), "cores": os.cpu_count(), "os": platform.platform(), "python": platform.python_version()}
