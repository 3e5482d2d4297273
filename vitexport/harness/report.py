"""The Report: one row per artifact. JSON is the source of truth; Markdown, HTML and the terminal table only render it.

The table's columns are data (COLUMNS): a header, how to compute the cell from a row, whether the terminal shows it.
Every renderer takes its columns from there, so the terminal, report.md and report.html cannot disagree.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from . import stats
from .host import INT8_FEATURES, cpu_features, cpu_name, host_info  # noqa: F401  (re-exported: callers import them from here)

# 2: rows carry role (the fp32 reference row), sha256 and tools; derived ci95 and caveats; evaluation records the
# calibration/evaluation overlap; an optional gate section. vitexport/harness/report.schema.json describes it.
SCHEMA_VERSION = 2
SCHEMA_PATH = Path(__file__).with_name("report.schema.json")
REFERENCE = "reference"  # Row.role of the row every other row is compared with
THIS_HOST = "this host"


@dataclass(frozen=True)
class Row:
    name: str
    backend: str
    precision: str
    path: str
    size_bytes: int
    accuracy: Mapping[str, Any] | None = None  # top1, top5, agreement, cosine, n, n_labelled, emulated, lost, gained
    latency: Mapping[str, Any] | None = None  # batch, p50_ms, p90_ms, mean_ms, runs, threads, device, runtime, throughput_*, emulated
    memory: Mapping[str, Any] | None = None  # peak_mb, method
    build: Mapping[str, Any] | None = None  # seconds, peak_mb (above the start of the step), process_peak_mb
    recipe: Mapping[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    role: str = ""  # REFERENCE for the fp32 row the others are compared with
    sha256: str | None = None  # of the artifact's main file, as its manifest records it
    tools: Mapping[str, str] = field(default_factory=dict)  # the tool versions that made the artifact
    measured_on: Mapping[str, Any] | None = None  # None: this host; a --remote device: {"name", "ssh", "facts", "runtimes", ...}

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
    gate: Mapping[str, Any] = field(default_factory=dict)  # harness.gate.check(...).to_dict() when a gate was given
    # where the build's time and memory went: [{"stage", "seconds", "cpu_seconds", "rss_mb", "peak_mb"}] in order
    # (export, preprocessing, each artifact's calibration passes, GPTQ, sensitivity search, conversion, evaluation,
    # timing); rss_mb at the stage's end, peak_mb the high-water mark since its artifact started (Linux)
    stages: tuple[Mapping[str, Any], ...] = ()

    def to_dict(self) -> dict:
        ref = reference_row(self.rows)
        rows = []
        for r in self.rows:
            d = r.to_dict()
            d["ci95"] = intervals(r, ref)  # derived, written for build scripts; recomputed on every write
            d["caveats"] = caveats(r, self)
            rows.append(d)
        out = {
            "schema_version": self.schema_version,
            "created": self.created,
            "model": dict(self.model),
            "reference": dict(self.reference),
            "evaluation": dict(self.evaluation),
            "host": dict(self.host),
            "tools": dict(self.tools),
            "rows": rows,
            "stages": [dict(s) for s in self.stages],
        }
        if self.gate:
            out["gate"] = dict(self.gate)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str) + "\n"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Report":
        known = {f.name for f in dataclasses.fields(Row)}  # derived keys (ci95, caveats) are recomputed, not read
        rows = tuple(Row(**{**{k: v for k, v in r.items() if k in known}, "notes": tuple(r.get("notes", ()))}) for r in d["rows"])
        return cls(d["model"], rows, d.get("reference", {}), d.get("evaluation", {}), d.get("host", {}), d.get("tools", {}), d.get("created", ""), d.get("schema_version", SCHEMA_VERSION), d.get("gate", {}), tuple(d.get("stages", ())))


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------- the reference row


def is_reference_artifact(backend: str, precision: str) -> bool:
    """Which built artifact serves as the fp32 reference when one is built: ONNX Runtime fp32 runs the reference
    ONNX itself. Without one, api measures the reference ONNX as its own row."""
    return backend == "onnxruntime" and precision == "fp32"


def reference_row(rows: Sequence[Row]) -> Row | None:
    """The row every other row is compared with: the one marked so, else (reports before schema 2) the first measured fp32 row."""
    for r in rows:
        if r.role == REFERENCE:
            return r
    for r in rows:
        if r.precision == "fp32" and r.accuracy:
            return r
    return None


# ---------------------------------------------------------------- derived figures


def intervals(row: Row, ref: Row | None) -> dict[str, list[float] | None]:
    """95 % intervals (fractions) for top-1, agreement and Δ top-1 against the reference row; None where not defined."""
    a = row.accuracy or {}
    out: dict[str, list[float] | None] = {"top1": None, "agreement": None, "top1_delta": None}
    n_lab, n = a.get("n_labelled") or 0, a.get("n") or 0
    if a.get("top1") is not None and n_lab:
        out["top1"] = list(stats.wilson(round(a["top1"] * n_lab), n_lab))
    if a.get("agreement") is not None and n and row is not ref:
        out["agreement"] = list(stats.wilson(round(a["agreement"] * n), n))
    if a.get("lost") is not None and n_lab and ref is not None and row is not ref:
        out["top1_delta"] = list(stats.paired_delta(a["lost"], a["gained"], n_lab))
    return out


def where(row: Row) -> str:
    """measured / emulated / not run here: how the row's figures came about."""
    a, lat = row.accuracy or {}, row.latency or {}
    if not a and not lat:
        return "not run here"
    if a.get("emulated") or lat.get("emulated"):
        return "emulated"
    return "measured"


def measured_on(row: Row) -> str:
    """Where the row was measured; remote-device rows may carry `measured_on` (a name or a host dict)."""
    m = getattr(row, "measured_on", None)
    if isinstance(m, Mapping):
        return str(m.get("name") or m.get("host") or m.get("cpu") or THIS_HOST)
    return str(m) if m else THIS_HOST


def caveats(row: Row, report: Report) -> list[str]:
    """What a reader must know before trusting the row's figures, beyond measured/emulated."""
    out = []
    lat, cores = row.latency or {}, (report.host or {}).get("cores")
    if lat.get("threads") and cores and measured_on(row) == THIS_HOST and lat["threads"] > cores:
        out.append(f"timed with {lat['threads']} threads on a {cores}-core host: threads compete for cores, so this latency is not the device's")
    if lat.get("emulated"):
        out.append("latency of an emulation on this host, not of the target's runtime")
    overlap = (report.evaluation or {}).get("calibration_overlap")
    if overlap and row.recipe.get("calibration_images"):
        out.append(f"{overlap} of its calibration images are also evaluation images: its accuracy is flattered")
    slower = slower_than_float(row, report)
    if slower:
        out.append(slower)
    return out


SLOWER_MARGIN = 1.05  # p50 over the float row's, and slower in every interleaved round: one noisy round cannot say it


def slower_than_float(row: Row, report: Report) -> str | None:
    """A quantized row slower than its own runtime's fp32 row timed beside it, on the same machine, in every
    interleaved round: on some CPUs int8 kernels do not pay (OpenVINO's int8 on AVX2 without VNNI ran 1.45x its fp32
    on DeiT-tiny), and a reader who picked int8 for speed must see it there, not in a ratio column."""
    lat = row.latency or {}
    if row.precision == "fp32" or lat.get("emulated") or not lat.get("p50_ms"):
        return None
    same = [r for r in report.rows if r.backend == row.backend and r.precision == "fp32" and measured_on(r) == measured_on(row)
            and (r.latency or {}).get("p50_ms") and not (r.latency or {}).get("emulated")]
    if not same:
        return None
    ref, ref_lat = same[0], same[0].latency
    if lat.get("threads") != ref_lat.get("threads") or lat.get("batch", 1) != ref_lat.get("batch", 1):
        return None
    ratio = lat["p50_ms"] / ref_lat["p50_ms"]
    mine, theirs = lat.get("round_p50_ms") or (), ref_lat.get("round_p50_ms") or ()
    if ratio < SLOWER_MARGIN or not mine or len(mine) != len(theirs) or any(a <= b for a, b in zip(mine, theirs)):
        return None
    return (f"{ratio:.2f}x the latency of {ref.name} ({lat['p50_ms']:.1f} against {ref_lat['p50_ms']:.1f} ms, slower in all "
            f"{len(mine)} interleaved rounds) on {measured_on(row)}: its quantized kernels do not pay there; it saves size, not time")


# ---------------------------------------------------------------- the table, as data


@dataclass(frozen=True)
class Ctx:
    ref: Row | None
    report: Report


Cell = tuple[str, "float | str | None"]  # text, sort value


@dataclass(frozen=True)
class Column:
    header: str
    cell: Callable[[Row, Ctx], Cell]
    terminal: bool  # shown in the terminal table
    title: str = ""  # what the column means (tooltip in HTML)
    blank: str = "–"  # a column whose every cell is this is left out


NA: Cell = ("–", None)


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def _ci(ci: Sequence[float] | None, signed: bool = False) -> str:
    if not ci:
        return ""
    f = "{:+.1f}" if signed else "{:.1f}"
    return " [" + f.format(100 * ci[0]) + (", " if signed else "–") + f.format(100 * ci[1]) + "]"


def _top1(r: Row, c: Ctx) -> Cell:
    v = (r.accuracy or {}).get("top1")
    return NA if v is None else (_pct(v) + _ci(intervals(r, c.ref)["top1"]), v)


def _d_top1(r: Row, c: Ctx) -> Cell:
    a = r.accuracy or {}
    ref_top1 = (c.ref.accuracy or {}).get("top1") if c.ref else None
    if a.get("top1") is None or ref_top1 is None:
        return NA
    if r is c.ref:
        return ("ref", 0.0)
    d = a["top1"] - ref_top1
    # two decimals: on a few hundred images one image is a quarter point, and -0.53 must not read as -0.5
    text = f"{100 * d:+.2f}" + _ci(intervals(r, c.ref)["top1_delta"], signed=True)
    if a.get("lost") is not None:
        text += f" (−{a['lost']}/+{a['gained']})"  # images lost / gained against the reference
    return (text, d)


def _agree(r: Row, c: Ctx) -> Cell:
    v = (r.accuracy or {}).get("agreement")
    if v is None:
        return NA
    return ("ref", 1.0) if r is c.ref else (_pct(v) + _ci(intervals(r, c.ref)["agreement"]), v)


def _num(get: Callable[[Row], float | None], fmt: str) -> Callable[[Row, Ctx], Cell]:
    def cell(r: Row, c: Ctx) -> Cell:
        v = get(r)
        return NA if v is None else (fmt.format(v), v)

    return cell


def _lat(key: str) -> Callable[[Row], float | None]:
    return lambda r: (r.latency or {}).get(key)


def _latency_cell(key: str) -> Callable[[Row, Ctx], Cell]:
    def cell(r: Row, c: Ctx) -> Cell:
        v = (r.latency or {}).get(key)
        if v is None:
            return NA
        return (f"{v:.2f}" + (" (emulated)" if (r.latency or {}).get("emulated") else ""), v)

    return cell


def _ratio(num: Callable[[Row], float | None], den: Callable[[Row], float | None]) -> Callable[[Row, Ctx], Cell]:
    """num(ref) / den(row): how many times smaller / faster than the reference."""

    def cell(r: Row, c: Ctx) -> Cell:
        a, b = (num(c.ref) if c.ref else None), den(r)
        if not a or not b:
            return NA
        return (f"{a / b:.2f}" if a / b < 10 else f"{a / b:.1f}", a / b)

    return cell


def _where(r: Row, c: Ctx) -> Cell:
    text = where(r)
    lat, cores = r.latency or {}, (c.report.host or {}).get("cores")
    if lat.get("threads") and cores and lat["threads"] > cores and measured_on(r) == THIS_HOST:
        text += f" ({lat['threads']} thr > {cores} cores)"
    return (text, text)


_size = lambda r: r.size_bytes  # noqa: E731

COLUMNS: tuple[Column, ...] = (
    Column("artifact", lambda r, c: (r.name, r.name), True, "backend-precision; the reference row is the fp32 every other row is compared with"),
    Column("measured on", lambda r, c: (measured_on(r), measured_on(r)), True, "host or device the row was measured on", blank=THIS_HOST),
    Column("size MB", lambda r, c: (f"{r.size_bytes / 1e6:.1f}", r.size_bytes), True, "size of the artifact's model files"),
    Column("×smaller", _ratio(_size, _size), False, "reference size / this size"),
    Column("top-1 %", _top1, True, "top-1 against the labels [95 % Wilson interval]"),
    Column("Δ top-1", _d_top1, True, "points against the reference [95 % paired interval] (−images lost/+gained)"),
    Column("top-5 %", lambda r, c: NA if (r.accuracy or {}).get("top5") is None else (_pct(r.accuracy["top5"]), r.accuracy["top5"]), False, "top-5 against the labels"),
    Column("agree %", _agree, True, "top-1 agreement with the reference outputs [95 % Wilson interval]"),
    Column("cosine", _num(lambda r: (r.accuracy or {}).get("cosine"), "{:.4f}"), True, "mean cosine similarity of the outputs with the reference outputs"),
    Column("p50 ms", _latency_cell("p50_ms"), True, "batch-1 median latency, interleaved with the other rows"),
    Column("p90 ms", _latency_cell("p90_ms"), True, "batch-1 90th percentile latency"),
    Column("×faster", _ratio(_lat("p50_ms"), _lat("p50_ms")), False, "reference p50 / this p50"),
    Column("img/s", _num(_lat("throughput_ips"), "{:.1f}"), True, "throughput at the throughput batch"),
    Column("peak MB", _num(lambda r: (r.memory or {}).get("peak_mb"), "{:.0f}"), False, "peak resident memory above the start, load + run"),
    Column("measured", _where, True, "measured on the real runtime, emulated (the target's arithmetic on another runtime), or not run here"),
)


def columns(report: Report, terminal: bool = False, hide_blank: bool = True) -> list[Column]:
    ctx = Ctx(reference_row(report.rows), report)
    keep = [c for c in COLUMNS if c.terminal or not terminal]
    # optional columns (blank other than "–", e.g. "measured on") appear only when a row has something to say
    return [c for i, c in enumerate(keep) if i == 0 or not (hide_blank or c.blank != "–") or any(c.cell(r, ctx)[0] != c.blank for r in report.rows)]


def cells(report: Report, cols: Sequence[Column]) -> list[list[Cell]]:
    ctx = Ctx(reference_row(report.rows), report)
    return [[c.cell(r, ctx) for c in cols] for r in ordered_rows(report)]


def ordered_rows(report: Report) -> list[Row]:
    """The reference row first, then the others in build order."""
    ref = reference_row(report.rows)
    return ([ref] if ref else []) + [r for r in report.rows if r is not ref]


def table(report: Report, terminal: bool = False, hide_blank: bool = False) -> tuple[list[str], list[list[str]]]:
    """The comparison table as header + string cells (all columns by default), shared by every renderer."""
    cols = columns(report, terminal, hide_blank)
    return [c.header for c in cols], [[t for t, _ in row] for row in cells(report, cols)]


# ---------------------------------------------------------------- Markdown and terminal


def evaluation_sentence(report: Report) -> str:
    ev = report.evaluation
    if not ev:
        return ""
    calib = ""
    if ev.get("calibration_images"):
        overlap = ev.get("calibration_overlap")
        calib = f"; calibrated on {ev['calibration_images']} images from `{ev.get('calibration_source')}`" + (
            f", {overlap} of which are also evaluation images (the quantized rows' accuracy is flattered)" if overlap else (", none of them evaluation images" if overlap == 0 else "")
        )
    return f"Evaluated on {ev.get('images', '?')} images from `{ev.get('source', '?')}` ({ev.get('labelled', 0)} labelled, labels from {ev.get('label_source', 'none')}){calib}."


def host_sentence(h: Mapping[str, Any]) -> str:
    feats = h.get("cpu_features")
    return f"Host: {h.get('cpu', '?')}" + (f" ({', '.join(feats) or 'none of ' + ', '.join(INT8_FEATURES)})" if feats is not None else "") + f", {h.get('cores', '?')} cores, {h.get('os', '?')}."


LEGEND = (
    "The reference row is the fp32 reference ONNX run by ONNX Runtime (or the artifact given as --reference); every other "
    "row is compared with it on the same images. Δ top-1 is in points against it, with (−lost/+gained) the labelled "
    "images the artifact gets wrong that the reference gets right and the reverse; agreement is top-1 agreement with the "
    "reference outputs. [brackets] are 95 % intervals: Wilson for top-1 and agreement, Agresti–Min's paired interval for "
    "Δ top-1; cosine (stable where agreement moves by whole images) stands beside them. Latency is batch 1, timed "
    "interleaved with the other rows; *emulated* rows reproduce the target's arithmetic on another runtime."
)


def render_markdown(report: Report) -> str:
    m, ref = report.model, report.reference
    lines = [f"# vitexport report: {m.get('source', '?')}", ""]
    params = m.get("parameters")
    lines.append(
        f"{m.get('architecture', '?')} ({m.get('task', '?')}), {params / 1e6:.1f} M parameters, "
        f"input {m.get('image_size', '?')}×{m.get('image_size', '?')}."
        if params
        else f"{m.get('architecture', '?')} ({m.get('task', '?')})."
    )
    if report.evaluation:
        lines.append(evaluation_sentence(report))
    v = ref.get("verification") or {}
    if v:
        lines.append(f"Reference ONNX (opset {ref.get('opset', '?')}) checked against {v.get('against', 'PyTorch')} on {v.get('n')} images: max abs diff {v.get('max_abs_diff', 0):.2e}, top-1 agreement {100 * v.get('top1_agreement', 0):.1f}%.")
    if report.host:
        lines.append(host_sentence(report.host))
    lines += ["", LEGEND, ""]
    head, body = table(report, hide_blank=True)
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join("---" for _ in head) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in body]
    lines.append("")
    if report.gate:
        lines += [gate_sentence(report.gate), ""]
    if report.stages:
        top = sorted(report.stages, key=lambda s: -s.get("seconds", 0))[:5]
        lines += ["Longest build stages (wall s / CPU s; all stages in report.json): " + "; ".join(f"{s['stage']} {s['seconds']:.1f} / {s.get('cpu_seconds', 0):.1f}" for s in top) + ".", ""]
    for r in ordered_rows(report):
        details = []
        rec = r.recipe or {}
        if rec.get("summary"):
            details.append(str(rec["summary"]))
        if r.build:
            details.append(f"built in {r.build.get('seconds', 0):.0f} s, peak memory +{r.build.get('peak_mb') or 0:.0f} MB")
        if r.latency:
            rounds = f" over {r.latency['rounds']} interleaved rounds (round spread {r.latency['spread']:.2f})" if r.latency.get("rounds") and r.latency.get("spread") else ""
            details.append(f"latency on {r.latency.get('device', '?')}, {r.latency.get('runtime', '?')}, {r.latency.get('threads', '?')} threads, {r.latency.get('runs', '?')} runs{rounds}")
        details += list(r.notes) + caveats(r, report)
        if details:
            lines.append(f"- **{r.name}**" + (f" (`{r.path}`)" if r.path else "") + ": " + "; ".join(details))
    return "\n".join(lines) + "\n"


def gate_sentence(gate: Mapping[str, Any]) -> str:
    verdict = "passed" if gate.get("passed") else "FAILED"
    bars = ", ".join(f"{k} {v}" for k, v in (gate.get("bars") or {}).items() if v is not None)
    text = f"Quality gate ({bars}; rule: {gate.get('rule')}): {verdict}."
    failed = [c["message"] for c in gate.get("checks", []) if c.get("failed")]
    unsure = [c["message"] for c in gate.get("checks", []) if not c.get("failed") and not c.get("decided")]
    if failed:
        text += " Failed: " + "; ".join(failed) + "."
    if unsure:
        text += " Passed: " + "; ".join(unsure) + "."
    return text


def render_terminal(report: Report) -> str:
    """One table a screen wide: the terminal columns that have something to say for these rows (a bench shows
    latency and throughput, a backbone its cosine), then the caveats and the gate."""
    cols = columns(report, terminal=True)
    body = [[t for t, _ in row] for row in cells(report, cols)]
    rows = [[c.header for c in cols]] + body
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    out = [fmt(rows[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows[1:]]
    notes = [f"{r.name}: {c}" for r in ordered_rows(report) for c in caveats(r, report)]
    if any(c.header in ("top-1 %", "agree %") for c in cols):
        notes.append("[..] = 95 % interval")
    out += ["", *notes] if notes else []
    if report.gate:
        g = report.gate
        bars = ", ".join(f"{k} {v}" for k, v in (g.get("bars") or {}).items() if v is not None)
        out += ["", f"quality gate ({bars}; rule {g.get('rule')}): {'passed' if g.get('passed') else 'FAILED'}"]
        out += [f"  {'failed' if c.get('failed') else 'passed'}: {c['message']}" for c in g.get("checks", []) if c.get("failed") or not c.get("decided")]
    return "\n".join(out)
