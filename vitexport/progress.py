"""Progress on stderr for long steps; silent under --quiet / --json so stdout stays machine-readable.

``Stages`` names the steps of a build: each gets its own bar (with a total and an ETA where the step knows its
size) and its wall and process-CPU seconds recorded, so the report can say where the time went.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Callable, Iterator


class Progress:
    def __init__(self, enabled: bool = True, stream=None):
        self.enabled = enabled
        self.stream = stream or sys.stderr

    def step(self, message: str) -> None:
        if self.enabled:
            print(f"vitexport: {message}", file=self.stream, flush=True)

    @contextlib.contextmanager
    def bar(self, desc: str, total: int | None, unit: str = "img") -> Iterator[Callable[[int], None]]:
        """Yields tick(n). Bars with no total appear only once something ticks."""
        if not self.enabled:
            yield lambda n=1: None
            return
        try:
            from tqdm import tqdm
        except ImportError:  # a runtime-only install on a device (the README's minimum): steps, no bars
            self.step(desc)
            yield lambda n=1: None
            return

        state: dict[str, tqdm] = {}

        def tick(n: int = 1) -> None:
            if "bar" not in state:
                state["bar"] = tqdm(total=total, desc=desc, unit=unit, file=self.stream, leave=False, dynamic_ncols=True)
            state["bar"].update(n)

        try:
            yield tick
        finally:
            if "bar" in state:
                state["bar"].close()


class Stages:
    """Timed, named stages: ``with stages.stage("float statistics", total=125) as tick: ...``.

    Every stage shows its own bar and appends ``{"stage", "seconds", "cpu_seconds"}`` to ``records`` (shared by
    the ``child`` views, whose stage names carry their prefix, e.g. "onnxruntime int8: GPTQ").
    """

    def __init__(self, progress: Progress | None = None, prefix: str = "", records: list[dict] | None = None):
        self.progress = progress or Progress(enabled=False)
        self.prefix = prefix
        self.records: list[dict] = [] if records is None else records

    def child(self, prefix: str) -> "Stages":
        return Stages(self.progress, f"{self.prefix}{prefix}: ", self.records)

    @contextlib.contextmanager
    def stage(self, name: str, total: int | None = None, unit: str = "img") -> Iterator[Callable[[int], None]]:
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            with self.progress.bar(f"{self.prefix}{name}", total, unit) as tick:
                yield tick
        finally:
            record = {"stage": f"{self.prefix}{name}", "seconds": round(time.perf_counter() - t0, 3), "cpu_seconds": round(time.process_time() - c0, 3)}
            record.update(_memory_mb())
            self.records.append(record)


def _memory_mb() -> dict[str, float]:
    """Resident memory at a stage's end and the high-water mark so far (Linux; VmHWM is reset per artifact by
    harness.memory.PeakMemory): the stage where ``peak_mb`` jumps is where the build's peak memory is."""
    from .harness.memory import _status_kb

    rss, hwm = _status_kb("VmRSS"), _status_kb("VmHWM")
    return {} if rss is None or hwm is None else {"rss_mb": round(rss / 1024, 1), "peak_mb": round(hwm / 1024, 1)}


def stages_of(stages: "Stages | None") -> Stages:
    """The given stages, or silent ones that still time (library calls without a build around them)."""
    return stages if stages is not None else Stages()
