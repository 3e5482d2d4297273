"""Latency and throughput: warm up, then time enough runs for stable percentiles."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Latency:
    batch: int
    p50_ms: float
    p90_ms: float
    mean_ms: float
    runs: int
    threads: int
    device: str
    runtime: str
    throughput_batch: int | None = None
    throughput_ips: float | None = None  # images per second at throughput_batch

    def to_dict(self) -> dict:
        return asdict(self)


def _time_runs(runner, x: np.ndarray, min_runs: int, min_seconds: float, max_seconds: float, max_runs: int) -> list[float]:
    times: list[float] = []
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        runner.run(x)
        times.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - start
        if (len(times) >= min_runs and elapsed >= min_seconds) or elapsed >= max_seconds or len(times) >= max_runs:
            return times


def measure(
    runner,
    sample: np.ndarray,
    *,
    warmup_seconds: float = 1.0,
    min_runs: int = 20,
    min_seconds: float = 2.0,
    max_seconds: float = 20.0,
    throughput_batch: int | None = 16,
) -> Latency:
    """Batch-1 latency percentiles on `sample[:1]`, and images/s at `throughput_batch` (inputs tiled from `sample`)."""
    x1 = np.ascontiguousarray(sample[:1], dtype=np.float32)
    _time_runs(runner, x1, 3, warmup_seconds, max(warmup_seconds, 5.0), 1000)
    t = np.asarray(_time_runs(runner, x1, min_runs, min_seconds, max_seconds, 2000)) * 1e3
    ips = None
    if throughput_batch and throughput_batch > 1:
        reps = -(-throughput_batch // len(sample))
        xb = np.ascontiguousarray(np.concatenate([sample] * reps)[:throughput_batch], dtype=np.float32)
        runner.run(xb)
        tb = _time_runs(runner, xb, 3, min_seconds / 2, max_seconds / 2, 50)
        ips = float(throughput_batch / np.median(tb))
    return Latency(
        batch=1,
        p50_ms=float(np.percentile(t, 50)),
        p90_ms=float(np.percentile(t, 90)),
        mean_ms=float(t.mean()),
        runs=int(len(t)),
        threads=int(getattr(runner, "threads", None) or os.cpu_count() or 1),
        device=getattr(runner, "device", "?"),
        runtime=getattr(runner, "runtime", "?"),
        throughput_batch=throughput_batch if ips else None,
        throughput_ips=ips,
    )


def compare(runners: dict, sample: np.ndarray, rounds: int = 5, seconds: float = 2.0) -> dict[str, dict[str, float]]:
    """Batch-1 latency of several runners, interleaved round by round so drift and noise hit all alike.

    Returns {name: {"p50_ms": median over rounds of each round's median, "spread": max/min of the round medians}}.
    """
    x1 = np.ascontiguousarray(sample[:1], dtype=np.float32)
    for r in runners.values():
        _time_runs(r, x1, 3, 0.5, 5.0, 1000)
    per_round: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, r in runners.items():
            per_round[name].append(float(np.median(_time_runs(r, x1, 5, seconds, 4 * seconds, 1000))) * 1e3)
    return {name: {"p50_ms": float(np.median(v)), "spread": float(max(v) / min(v))} for name, v in per_round.items()}
