"""The Report: one row per artifact. JSON is the source of truth; Markdown and the terminal table only render it."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Row:
    name: str
    backend: str
    precision: str
    path: str
    size_bytes: int
    accuracy: Mapping[str, Any] | None = None  # top1, top5, agreement, cosine, n, n_labelled, emulated
    latency: Mapping[str, Any] | None = None  # batch, p50_ms, p90_ms, mean_ms, runs, threads, device, runtime, throughput_*
    memory: Mapping[str, Any] | None = None  # peak_mb, method
    build: Mapping[str, Any] | None = None  # seconds, peak_mb (above the start of the step), process_peak_mb
    recipe: Mapping[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        d = asdict(self)
        d["notes"] = list(self.notes)
        return d


@dataclass(frozen=True)
class Report:
    model: Mapping[str, Any]
    rows: tuple[Row, ...]
    reference: Mapping[str, Any] = field(default_factory=dict)
    evaluation: Mapping[str, Any] = field(default_factory=dict)
    host: Mapping[str, Any] = field(default_factory=dict)
    tools: Mapping[str, str] = field(default_factory=dict)
    created: str = ""
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict:
        return {
            "schema_version": self.schema_version,
            "created": self.created,
            "model": dict(self.model),
            "reference": dict(self.reference),
            "evaluation": dict(self.evaluation),
            "host": dict(self.host),
            "tools": dict(self.tools),
            "rows": [r.to_dict() for r in self.rows],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str) + "\n"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Report":
        rows = tuple(Row(**{**r, "notes": tuple(r.get("notes", ()))}) for r in d["rows"])
        return cls(d["model"], rows, d.get("reference", {}), d.get("evaluation", {}), d.get("host", {}), d.get("tools", {}), d.get("created", ""), d.get("schema_version", SCHEMA_VERSION))

    def write(self, out_dir: Path) -> None:
        # UTF-8 whatever the locale; a path that is not valid UTF-8 is written escaped rather than failing the build
        (out_dir / "report.json").write_text(self.to_json(), encoding="utf-8", errors="backslashreplace")
        (out_dir / "report.md").write_text(render_markdown(self), encoding="utf-8", errors="backslashreplace")


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


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------- rendering


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def _reference_row(report: Report) -> Row | None:
    for r in report.rows:
        if r.precision == "fp32" and r.accuracy:
            return r
    return None


def table(report: Report) -> tuple[list[str], list[list[str]]]:
    """The comparison table as header + string cells, shared by Markdown and the terminal."""
    ref = _reference_row(report)
    ref_top1 = ref.accuracy.get("top1") if ref and ref.accuracy else None
    ref_p50 = ref.latency.get("p50_ms") if ref and ref.latency else None
    ref_size = ref.size_bytes if ref else None
    head = ["artifact", "size MB", "×smaller", "top-1 %", "Δ top-1", "top-5 %", "agree %", "cosine", "p50 ms", "p90 ms", "×faster", "img/s", "peak MB", "measured"]
    body = []
    for r in report.rows:
        a, lat, mem = r.accuracy or {}, r.latency or {}, r.memory or {}
        top1 = a.get("top1")
        # two decimals: on a few hundred images one image is a quarter point, and -0.53 must not read as -0.5
        d_top1 = "–" if top1 is None or ref_top1 is None else f"{100 * (top1 - ref_top1):+.2f}"
        if a.get("lost") is not None and (a["lost"] or a["gained"]):
            d_top1 += f" (−{a['lost']}/+{a['gained']})"  # images lost / gained against the reference
        p50 = lat.get("p50_ms")
        if not a and not lat:
            where = "not run here"
        elif a.get("emulated"):
            where = "emulated"
        else:
            where = "measured"
        body.append(
            [
                r.name,
                f"{r.size_bytes / 1e6:.1f}",
                "–" if not ref_size else f"{ref_size / max(r.size_bytes, 1):.1f}",
                _pct(top1),
                d_top1,
                _pct(a.get("top5")),
                _pct(a.get("agreement")),
                "–" if a.get("cosine") is None else f"{a['cosine']:.4f}",
                "–" if p50 is None else f"{p50:.2f}",
                "–" if lat.get("p90_ms") is None else f"{lat['p90_ms']:.2f}",
                "–" if p50 is None or not ref_p50 else f"{ref_p50 / p50:.2f}",
                "–" if lat.get("throughput_ips") is None else f"{lat['throughput_ips']:.1f}",
                "–" if mem.get("peak_mb") is None else f"{mem['peak_mb']:.0f}",
                where,
            ]
        )
    return head, body


def render_markdown(report: Report) -> str:
    m, ev, ref = report.model, report.evaluation, report.reference
    lines = [f"# vitexport report: {m.get('source', '?')}", ""]
    params = m.get("parameters")
    lines.append(
        f"{m.get('architecture', '?')} ({m.get('task', '?')}), {params / 1e6:.1f} M parameters, "
        f"input {m.get('image_size', '?')}×{m.get('image_size', '?')}."
        if params
        else f"{m.get('architecture', '?')} ({m.get('task', '?')})."
    )
    if ev:
        lines.append(
            f"Evaluated on {ev.get('images', '?')} images from `{ev.get('source', '?')}` "
            f"({ev.get('labelled', 0)} labelled, labels from {ev.get('label_source', 'none')})"
            + (f"; calibrated on {ev['calibration_images']} other images from `{ev.get('calibration_source')}`." if ev.get("calibration_images") else ".")
        )
    v = ref.get("verification") or {}
    if v:
        lines.append(f"Reference ONNX (opset {ref.get('opset', '?')}) checked against {v.get('against', 'PyTorch')} on {v.get('n')} images: max abs diff {v.get('max_abs_diff', 0):.2e}, top-1 agreement {100 * v.get('top1_agreement', 0):.1f}%.")
    h = report.host
    if h:
        feats = h.get("cpu_features")
        lines.append(f"Host: {h.get('cpu', '?')}" + (f" ({', '.join(feats) or 'none of ' + ', '.join(INT8_FEATURES)})" if feats is not None else "") + f", {h.get('cores', '?')} cores, {h.get('os', '?')}.")
    lines += ["", "Δ top-1 is in points against the fp32 row, with (−lost/+gained) the labelled images the artifact gets wrong that fp32 gets right and the reverse; agreement is top-1 agreement with the fp32 reference outputs; latency is batch 1, timed interleaved with the other rows; *emulated* rows reproduce the target's arithmetic on another runtime.", ""]
    head, body = table(report)
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join("---" for _ in head) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in body]
    lines.append("")
    for r in report.rows:
        details = []
        rec = r.recipe or {}
        if rec.get("summary"):
            details.append(str(rec["summary"]))
        if r.build:
            details.append(f"built in {r.build.get('seconds', 0):.0f} s, peak memory +{r.build.get('peak_mb') or 0:.0f} MB")
        if r.latency:
            rounds = f" over {r.latency['rounds']} interleaved rounds (round spread {r.latency['spread']:.2f})" if r.latency.get("rounds") else ""
            details.append(f"latency on {r.latency.get('device', '?')}, {r.latency.get('runtime', '?')}, {r.latency.get('threads', '?')} threads, {r.latency.get('runs', '?')} runs{rounds}")
        details += list(r.notes)
        if details:
            lines.append(f"- **{r.name}** (`{r.path}`): " + "; ".join(details))
    return "\n".join(lines) + "\n"


def render_terminal(report: Report) -> str:
    head, body = table(report)
    keep = [0, 1, 3, 4, 6, 8, 10, 12, 13]  # one screen wide
    rows = [[head[i] for i in keep]] + [[r[i] for i in keep] for r in body]
    widths = [max(len(r[i]) for r in rows) for i in range(len(keep))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    out = [fmt(rows[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows[1:]]
    return "\n".join(out)
