"""Quality gates (--min-agreement, --max-top1-drop) as data, and the one function that applies them.

A gate compares a figure measured on a finite image set with a bar. On the 94-image quick-eval set one image is
about a point of agreement, and an int8 row's agreement was seen to move between 94.7 % and 98.9 % when the inputs
changed by under 1e-6: a verdict whose 95 % interval contains the bar could flip on noise. Every check therefore
records its interval and whether it is decided (the whole interval on one side of the bar). The rule says when a
check fails:

- ``point`` (default): when the measured figure is beyond the bar; undecided checks are reported as such.
- ``interval``: only when the whole 95 % interval is beyond the bar (a failure that noise cannot explain).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping, Sequence

from .report import Row, intervals, reference_row

RULES = ("point", "interval")


@dataclass(frozen=True)
class Bar:
    """One gate: the option that sets it, the figure it reads (in points), and which side of the bar is good."""

    option: str
    flag: str
    what: str
    unit: str
    value: Callable[[Row, Row], float | None]  # (row, reference) -> the figure, in % or points
    interval: Callable[[Row, Row], Sequence[float] | None]  # the figure's 95 % interval, same units
    higher_is_better: bool


def _agreement(r: Row, ref: Row) -> float | None:
    v = (r.accuracy or {}).get("agreement")
    return None if v is None else 100 * v


def _agreement_ci(r: Row, ref: Row) -> Sequence[float] | None:
    ci = intervals(r, ref)["agreement"]
    return None if ci is None else [100 * ci[0], 100 * ci[1]]


def _drop(r: Row, ref: Row) -> float | None:
    a, b = (r.accuracy or {}).get("top1"), (ref.accuracy or {}).get("top1")
    return None if a is None or b is None else 100 * (b - a)


def _drop_ci(r: Row, ref: Row) -> Sequence[float] | None:
    ci = intervals(r, ref)["top1_delta"]
    return None if ci is None else [-100 * ci[1], -100 * ci[0]]


BARS: tuple[Bar, ...] = (
    Bar("min_agreement", "--min-agreement", "agreement", "%", _agreement, _agreement_ci, higher_is_better=True),
    Bar("max_top1_drop", "--max-top1-drop", "top-1 drop", " points", _drop, _drop_ci, higher_is_better=False),
)


@dataclass(frozen=True)
class Check:
    row: str
    option: str
    bar: float
    value: float
    ci95: list[float] | None
    decided: bool  # the whole interval lies on one side of the bar
    failed: bool  # under the gate's rule
    message: str


@dataclass(frozen=True)
class Gate:
    rule: str
    bars: Mapping[str, float | None]
    checks: tuple[Check, ...]

    @property
    def passed(self) -> bool:
        return not any(c.failed for c in self.checks)

    def failures(self) -> list[str]:
        return [c.message for c in self.checks if c.failed]

    def to_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "bars": dict(self.bars), "passed": self.passed, "checks": [asdict(c) for c in self.checks]}


def check(rows: Sequence[Row], bars: Mapping[str, float | None], rule: str = "point") -> Gate:
    """Apply the given bars ({option: value or None}) to every row but the reference, under `rule`."""
    if rule not in RULES:
        raise ValueError(f"unknown gate rule {rule!r}: one of {RULES}")
    ref = reference_row(rows)
    out = []
    for bar in BARS:
        limit = bars.get(bar.option)
        if limit is None or ref is None:
            continue
        for r in rows:
            if r is ref or not r.accuracy:
                continue
            v = bar.value(r, ref)
            if v is None:
                continue
            ci = bar.interval(r, ref)
            lo, hi = (ci[0], ci[1]) if ci else (v, v)
            good = (lambda x: x >= limit) if bar.higher_is_better else (lambda x: x <= limit)
            decided = good(lo) == good(hi)
            failed = not good(v) if rule == "point" else (not good(lo) and not good(hi))
            sign = "<" if bar.higher_is_better else ">"
            ok_sign = "≥" if bar.higher_is_better else "≤"
            ci_text = f" [95 % {lo:.1f}–{hi:.1f}]" if ci else ""
            msg = f"{r.name}: {bar.what} {v:.1f}{bar.unit}{ci_text} {sign if not good(v) else ok_sign} {limit:g}{bar.unit}"
            if not decided:
                msg += " (the interval contains the bar: noise could flip this verdict)"
            out.append(Check(r.name, bar.option, float(limit), round(v, 4), [round(lo, 4), round(hi, 4)] if ci else None, decided, failed, msg))
    return Gate(rule, {b.option: bars.get(b.option) for b in BARS}, tuple(out))
