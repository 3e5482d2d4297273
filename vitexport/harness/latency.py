"""Latency and throughput: warm up, then time enough runs for stable percentiles."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Mapping

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
    rounds: int | None = None  # interleaved rounds the batch-1 runs were spread over
    spread: float | None = None  # slowest round median / fastest round median
    round_p50_ms: tuple[float, ...] | None = None  # each interleaved round's median (the report plots the spread)

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


def measure(runner, sample: np.ndarray, *, throughput_batch: int | None = 16, **timing) -> Latency:
    """Batch-1 latency percentiles of one runner on `sample[:1]`, and images/s at `throughput_batch`."""
    return measure_all({"_": runner}, sample, throughput_batch=throughput_batch, **timing)["_"]


def measure_all(
    runners: Mapping[str, Any],
    sample: np.ndarray,
    *,
    rounds: int = 3,
    seconds: float = 1.0,
    warmup_seconds: float = 1.0,
    throughput_batch: int | None = 16,
) -> dict[str, Latency]:
    """Batch-1 latency of several runners, interleaved round by round, then each one's throughput.

    Timing artifacts one after another lets drift on a shared host (other jobs, clock and thermal state) land on some
    rows and not others: measured rows of one table differed by up to 1.4x that way. Interleaved, every row sees the
    same conditions; percentiles pool each runner's runs over all rounds, ``spread`` is the slowest round's median
    over the fastest one's (how much to trust a ratio between rows).
    """
    per_round = _interleaved(runners, sample, rounds, seconds, warmup_seconds)
    out = {}
    for name, r in runners.items():
        t = np.concatenate(per_round[name]) * 1e3
        medians = [float(np.median(x)) for x in per_round[name]]
        ips = None
        if throughput_batch and throughput_batch > 1:
            reps = -(-throughput_batch // len(sample))
            xb = np.ascontiguousarray(np.concatenate([sample] * reps)[:throughput_batch], dtype=np.float32)
            r.run(xb)
            tb = _time_runs(r, xb, 3, seconds, 5 * seconds, 50)
            ips = float(throughput_batch / np.median(tb))
        out[name] = Latency(
            batch=1,
            p50_ms=float(np.percentile(t, 50)),
            p90_ms=float(np.percentile(t, 90)),
            mean_ms=float(t.mean()),
            runs=int(len(t)),
            threads=int(getattr(r, "threads", None) or os.cpu_count() or 1),
            device=getattr(r, "device", "?"),
            runtime=getattr(r, "runtime", "?"),
            throughput_batch=throughput_batch if ips else None,
            throughput_ips=ips,
            rounds=rounds,
            spread=float(max(medians) / min(medians)),
            round_p50_ms=tuple(round(1e3 * m, 4) for m in medians),
        )
    return out


def compare(runners: dict, sample: np.ndarray, rounds: int = 5, seconds: float = 2.0) -> dict[str, dict[str, float]]:
    """Batch-1 latency of several runners, interleaved round by round so drift and noise hit all alike.

    Returns {name: {"p50_ms": median over rounds of each round's median, "spread": max/min of the round medians}}.
    """
    per_round = _interleaved(runners, sample, rounds, seconds, warmup_seconds=0.5)
    out = {}
    for name, rs in per_round.items():
        v = [float(np.median(x)) * 1e3 for x in rs]
        out[name] = {"p50_ms": float(np.median(v)), "spread": float(max(v) / min(v))}
    return out


def paired_ratio(a, b, sample: np.ndarray, *, blocks: int = 40, runs: int = 3, warmup_seconds: float = 0.5, clock=time.perf_counter) -> dict:
    """Batch-1 latency of runner ``a`` over runner ``b``, from short alternating blocks: each of ``blocks`` units runs
    a, b, b, a, ``runs`` timed runs per turn after one untimed run, and gives median(a's runs) / median(b's runs).

    One-second rounds (``compare``) let the host's speed move between two rows' turns: on a 2-core shared host the
    same two artifacts' round ratios spread over 0.55-1.75 in one run. A unit lasts a fraction of a second, so what
    moves the host moves both; the median of the units' ratios and its distribution-free interval
    (stats.median_interval) say whether one row is faster, and by how much, without trusting any one round. The
    untimed run absorbs the switch (onnxruntime's threads of the session that just ran still spin for a while: timed,
    the ratios of the AB and BA halves fell apart into two clusters, 0.6 and 1.5), and the a-b-b-a order gives each
    row the same places in the unit."""
    from .stats import median_interval

    x1 = np.ascontiguousarray(sample[:1], dtype=np.float32)
    for r in (a, b):
        _time_runs(r, x1, 3, warmup_seconds, max(warmup_seconds, 5.0), 1000)
    ratios = []
    for _ in range(blocks):
        t: dict[str, list[float]] = {"a": [], "b": []}
        for key, r in (("a", a), ("b", b), ("b", b), ("a", a)):
            r.run(x1)
            for _ in range(runs):
                t0 = clock()
                r.run(x1)
                t[key].append(clock() - t0)
        ratios.append(float(np.median(t["a"]) / np.median(t["b"])))
    lo, hi = median_interval(ratios)
    return {"median": float(np.median(ratios)), "ci95": (float(lo), float(hi)), "pairs": blocks, "runs_per_block": runs,
            "q25": float(np.percentile(ratios, 25)), "q75": float(np.percentile(ratios, 75))}


def _interleaved(runners: Mapping[str, Any], sample: np.ndarray, rounds: int, seconds: float, warmup_seconds: float) -> dict[str, list[np.ndarray]]:
    """Warm every runner up, then time batch 1 round by round, every runner once per round: seconds per run, per round."""
    x1 = np.ascontiguousarray(sample[:1], dtype=np.float32)
    for r in runners.values():
        _time_runs(r, x1, 3, warmup_seconds, max(warmup_seconds, 5.0), 1000)
    per_round: dict[str, list[np.ndarray]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, r in runners.items():
            per_round[name].append(np.asarray(_time_runs(r, x1, 5, seconds, 4 * seconds, 1000)))
    return per_round
