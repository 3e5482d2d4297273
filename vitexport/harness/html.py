"""report.html: one self-contained page (inline CSS, a few lines of inline JS, inline SVG plots) that opens offline.

What a team choosing between artifacts looks at: the summary table (sortable, the reference row pinned first,
emulated and not-run rows marked), the gate's verdict, the accuracy/size and accuracy/latency trade-offs with their
Pareto fronts, the latency spread across interleaved rounds, build time and memory, each artifact's story (recipe,
sha256, tools, path), and the model, images and host the figures came from.

Plots are drawn by matplotlib (the optional extra `vitexport[report]`) as inline SVG with text drawn as paths, so no
font or network is needed to view them; without matplotlib the page has every table and says how to get the plots.
Every string that comes from outside (labels, folder names, notes) goes through html.escape.
"""

from __future__ import annotations

import html
import io
import logging
import re
from typing import Any, Mapping, Sequence

from .report import (
    LEGEND,
    THIS_HOST,
    Report,
    Row,
    caveats,
    cells,
    columns,
    evaluation_sentence,
    host_sentence,
    intervals,
    measured_on,
    ordered_rows,
    reference_row,
    where,
)

log = logging.getLogger(__name__)

# one colour per backend, the same in every plot (Okabe-Ito: distinguishable with colour blindness)
BACKEND_COLOURS = {"onnxruntime": "#0072B2", "openvino": "#E69F00", "coreml": "#009E73", "tensorrt": "#D55E00", "litert": "#CC79A7"}
_OTHER_COLOURS = ("#56B4E9", "#F0E442", "#000000", "#999999")


def e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def colour(backend: str) -> str:
    if backend in BACKEND_COLOURS:
        return BACKEND_COLOURS[backend]
    return _OTHER_COLOURS[sum(map(ord, backend)) % len(_OTHER_COLOURS)]


# ---------------------------------------------------------------- the figure each plot shows


def quality(r: Row, ref: Row | None) -> tuple[str, float | None, list[float] | None]:
    """The accuracy figure a trade-off plot shows for this report: Δ top-1 where labels exist, else agreement, else
    cosine (a backbone). Returns (axis label, value, 95 % interval) in the axis' units."""
    a = r.accuracy or {}
    ci = intervals(r, ref)
    ra = (ref.accuracy or {}) if ref else {}
    if a.get("top1") is not None and ra.get("top1") is not None:
        d = ci["top1_delta"] if r is not ref else [0.0, 0.0]
        return "Δ top-1 vs reference (points)", 100 * (a["top1"] - ra["top1"]), None if d is None else [100 * d[0], 100 * d[1]]
    if a.get("agreement") is not None:
        g = ci["agreement"] if r is not ref else [1.0, 1.0]
        return "agreement with reference (%)", 100 * a["agreement"], None if g is None else [100 * g[0], 100 * g[1]]
    if a.get("cosine") is not None:
        return "cosine to reference outputs", a["cosine"], None
    return "", None, None


def pareto(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (lower x, higher y), sorted by x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


# ---------------------------------------------------------------- plots (matplotlib, optional)


def _svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    text = buf.getvalue()
    text = text[text.index("<svg") :]  # drop the XML prolog and DOCTYPE: the SVG sits inside HTML
    # fixed pixel size -> scale with the page (phones)
    return re.sub(r'<svg([^>]*?) width="[^"]*" height="[^"]*"', r'<svg\1 class="plot" preserveAspectRatio="xMidYMid meet"', text, count=1)


def _new_figure(width: float = 6.4, height: float = 4.0):
    # matplotlib's object API, not pyplot: no global figure state, and a caller's interactive backend is left alone
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    ax = fig.subplots()
    ax.grid(True, alpha=0.3)
    return fig, ax


def _tradeoff(rows: Sequence[Row], ref: Row | None, x_of, x_label: str, log_x: bool) -> str | None:
    pts = []
    for r in rows:
        label, y, ci = quality(r, ref)
        x = x_of(r)
        if y is not None and x:
            pts.append((r, x, y, ci, label))
    if len(pts) < 1:
        return None
    fig, ax = _new_figure()
    seen = set()
    for r, x, y, ci, _ in pts:
        emulated = where(r) == "emulated"
        err = None if not ci else [[max(y - ci[0], 0)], [max(ci[1] - y, 0)]]
        ax.errorbar(
            x, y, yerr=err, fmt="o" if not emulated else "D", ms=7, color=colour(r.backend), mfc="white" if emulated else colour(r.backend),
            capsize=3, lw=1, label=r.backend if r.backend not in seen else None, zorder=3,
        )
        seen.add(r.backend)
        ax.annotate(r.name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7, color="#333")
    front = pareto([(x, y) for _, x, y, _, _ in pts])
    if len(front) > 1:
        fx, fy = [pts[i][1] for i in front], [pts[i][2] for i in front]
        ax.step(fx, fy, where="post", color="#444", ls="--", lw=1, label="Pareto front", zorder=2)
    if log_x:
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # 20, not 2×10¹
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(x_label)
    ax.set_ylabel(pts[0][4])
    ax.legend(fontsize=8, loc="best")
    ax.set_title("open markers: emulated rows; bars: 95 % intervals", fontsize=8, color="#555")
    return _svg(fig)


def _latency_spread(rows: Sequence[Row]) -> str | None:
    timed = [r for r in rows if (r.latency or {}).get("p50_ms") is not None]
    if not timed:
        return None
    fig, ax = _new_figure(6.4, 0.5 + 0.45 * len(timed))
    for i, r in enumerate(timed):
        lat = r.latency or {}
        c = colour(r.backend)
        ax.plot([lat["p50_ms"], lat.get("p90_ms") or lat["p50_ms"]], [i, i], color=c, lw=6, alpha=0.35, solid_capstyle="butt")
        rounds = lat.get("round_p50_ms") or []
        ax.plot(rounds, [i] * len(rounds), "|", color=c, ms=14, mew=2)
        ax.plot([lat["p50_ms"]], [i], "o", color=c, ms=6)
    ax.set_yticks(range(len(timed)), [r.name for r in timed], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("batch-1 latency (ms): dot p50, bar p50–p90, ticks each interleaved round's median")
    return _svg(fig)


def _build_cost(rows: Sequence[Row]) -> str | None:
    built = [r for r in rows if r.build]
    if not built:
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.2, 0.6 + 0.4 * len(built)))
    a1, a2 = fig.subplots(1, 2, sharey=True)
    names = [r.name for r in built]
    cols = [colour(r.backend) for r in built]
    a1.barh(names, [r.build.get("seconds") or 0 for r in built], color=cols)
    a2.barh(names, [r.build.get("peak_mb") or 0 for r in built], color=cols)
    a1.set_xlabel("build time (s)")
    a2.set_xlabel("peak memory above the step's start (MB)")
    a1.invert_yaxis()
    a1.tick_params(axis="y", labelsize=8)
    for ax in (a1, a2):
        ax.grid(True, axis="x", alpha=0.3)
    return _svg(fig)


def plots(report: Report) -> list[tuple[str, str]]:
    """(title, inline SVG) for every plot this report has data for; [] without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return []
    rows = ordered_rows(report)
    ref = reference_row(report.rows)
    out = []
    for title, svg in (
        ("Accuracy against size", lambda: _tradeoff(rows, ref, lambda r: r.size_bytes / 1e6, "size (MB, log scale)", True)),
        ("Accuracy against latency (rows measured on the real runtime)", lambda: _tradeoff([r for r in rows if where(r) == "measured"], ref, lambda r: (r.latency or {}).get("p50_ms"), "batch-1 p50 latency (ms)", False)),
        ("Latency spread across interleaved rounds", lambda: _latency_spread(rows)),
        ("Build time and peak memory per artifact", lambda: _build_cost(rows)),
    ):
        try:
            # text as paths: no font needed to view; a salt per plot keeps clip-path ids distinct within the page
            with matplotlib.rc_context({"svg.fonttype": "path", "svg.hashsalt": f"vitexport-{len(out)}-{title}"}):
                s = svg()
        except Exception as err:  # a plot that fails must not cost the user the report's tables
            log.warning("report.html: plot %r skipped: %s", title, err)
            s = None
        if s:
            out.append((title, s))
    return out


# ---------------------------------------------------------------- HTML


CSS = """
:root{--fg:#1d1d1f;--mut:#666;--bd:#ddd;--ref:#eef5ff;--emu:#fff8e6;--nr:#f4f4f4;--ok:#127a2f;--bad:#b3261e;--warn:#8a6100}
*{box-sizing:border-box}body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;color:var(--fg);margin:0 auto;max-width:1600px;padding:12px}
h1{font-size:1.35em;margin:.2em 0}h2{font-size:1.1em;margin:1.4em 0 .4em;border-bottom:1px solid var(--bd)}
.mut{color:var(--mut)}.scroll{overflow-x:auto;-webkit-overflow-scrolling:touch}
table{border-collapse:collapse;font-variant-numeric:tabular-nums;white-space:nowrap}th,td{padding:4px 8px;border-bottom:1px solid var(--bd);text-align:right}
th:first-child,td:first-child{text-align:left;position:sticky;left:0;background:inherit}
thead th{cursor:pointer;user-select:none;background:#fafafa}thead th[aria-sort=ascending]::after{content:" ▲"}thead th[aria-sort=descending]::after{content:" ▼"}
tr{background:#fff}tr.reference{background:var(--ref);font-weight:600}tr.emulated{background:var(--emu)}tr.emulated td:last-child{font-style:italic}
tr.notrun{background:var(--nr);color:var(--mut)}
.badge{display:inline-block;font-size:.75em;font-weight:600;border-radius:3px;padding:0 4px;margin-left:4px;vertical-align:1px}
.b-ref{background:#0072B2;color:#fff}.b-emu{background:#E69F00;color:#000}.b-nr{background:#999;color:#fff}
.gate{padding:8px 12px;border-radius:6px;margin:8px 0;border:1px solid}.gate.pass{border-color:var(--ok);color:var(--ok)}.gate.fail{border-color:var(--bad);color:var(--bad)}
.gate li.undecided{color:var(--warn)}.gate li{color:var(--fg)}
.plots{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(100%,480px),1fr));gap:12px}figure{margin:0}figcaption{font-weight:600;margin-bottom:4px}
svg.plot{width:100%;height:auto}
details{border:1px solid var(--bd);border-radius:6px;padding:6px 10px;margin:6px 0}summary{cursor:pointer;font-weight:600}
dl{display:grid;grid-template-columns:max-content 1fr;gap:2px 12px;margin:6px 0}dt{color:var(--mut)}dd{margin:0;overflow-wrap:anywhere}
code{font-size:.92em;overflow-wrap:anywhere}
@media (max-width:600px){body{padding:6px;font-size:13px}th,td{padding:3px 5px}}
"""

# Sort by the clicked column (numbers numerically, dashes last), the reference row always stays on top.
JS = """
(function(){
  var t=document.getElementById('summary'); if(!t) return;
  var heads=t.tHead.rows[0].cells;
  function val(td){var v=td.getAttribute('data-v'); if(v===null||v==='') return null; var n=Number(v); return isNaN(n)?v.toLowerCase():n;}
  Array.prototype.forEach.call(heads,function(th,col){
    th.addEventListener('click',function(){
      var asc=th.getAttribute('aria-sort')!=='ascending';
      Array.prototype.forEach.call(heads,function(h){h.removeAttribute('aria-sort');});
      th.setAttribute('aria-sort',asc?'ascending':'descending');
      var body=t.tBodies[0], rows=Array.prototype.slice.call(body.rows);
      var ref=rows.filter(function(r){return r.classList.contains('reference');});
      var rest=rows.filter(function(r){return !r.classList.contains('reference');});
      rest.sort(function(a,b){
        var x=val(a.cells[col]), y=val(b.cells[col]);
        if(x===null&&y===null) return 0; if(x===null) return 1; if(y===null) return -1;
        var c=(x<y)?-1:(x>y)?1:0; return asc?c:-c;});
      ref.concat(rest).forEach(function(r){body.appendChild(r);});
    });
  });
  // report.html#sort=size%20MB opens sorted by that column (a link in a review, and how the test checks sorting)
  var m=/^#sort=(.+)$/.exec(location.hash);
  if(m){var want=decodeURIComponent(m[1]); Array.prototype.forEach.call(heads,function(th){if(th.textContent===want) th.click();});}
  document.body.setAttribute('data-ready','1');
})();
"""


def _summary_table(report: Report) -> str:
    cols = columns(report)
    ref = reference_row(report.rows)
    head = "".join(f'<th scope="col" title="{e(c.title)}">{e(c.header)}</th>' for c in cols)
    body = []
    for r, row_cells in zip(ordered_rows(report), cells(report, cols)):
        w = where(r)
        cls = "reference" if r is ref else {"emulated": "emulated", "not run here": "notrun"}.get(w, "")
        tds = []
        for i, (text, v) in enumerate(row_cells):
            content = e(text)
            if i == 0:
                if r is ref:
                    content += '<span class="badge b-ref">reference</span>'
                if w == "emulated":
                    content += '<span class="badge b-emu">emulated</span>'
                if w == "not run here":
                    content += '<span class="badge b-nr">not run</span>'
            dv = "" if v is None else e(v if isinstance(v, str) else repr(float(v)))
            tds.append(f'<td data-v="{dv}">{content}</td>')
        body.append(f'<tr class="{cls}">' + "".join(tds) + "</tr>")
    return f'<div class="scroll"><table id="summary"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _gate_block(gate: Mapping[str, Any]) -> str:
    if not gate:
        return ""
    ok = gate.get("passed")
    bars = ", ".join(f"{e(k.replace('_', '-'))} {e(v)}" for k, v in (gate.get("bars") or {}).items() if v is not None)
    items = []
    for c in gate.get("checks", []):
        state = "failed" if c.get("failed") else "passed"
        cls = "undecided" if not c.get("decided") else ""
        items.append(f'<li class="{cls}">{e(state)}: {e(c["message"])}</li>')
    rule = "fails when the measured figure is beyond the bar" if gate.get("rule") == "point" else "fails only when the whole 95 % interval is beyond the bar"
    return (
        f'<div class="gate {"pass" if ok else "fail"}"><strong>Quality gate {"passed" if ok else "FAILED"}</strong> '
        f'({bars}; rule <code>{e(gate.get("rule"))}</code>: {e(rule)})<ul>{"".join(items)}</ul></div>'
    )


def _short(v: Any) -> str:
    """Numbers as a person reads them (1/255, not 0.00392156862745098)."""
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return "(" + ", ".join(_short(x) for x in v) + ")"
    return str(v)


def _dl(pairs: Sequence[tuple[str, Any]]) -> str:
    return "<dl>" + "".join(f"<dt>{e(k)}</dt><dd>{v}</dd>" for k, v in pairs if v not in (None, "", [])) + "</dl>"


def _artifact_details(report: Report) -> str:
    out = []
    for r in ordered_rows(report):
        rec = dict(r.recipe or {})
        lat = r.latency or {}
        pairs: list[tuple[str, Any]] = [
            ("recipe", e(rec.pop("summary", "") or "")),
            *[(k.replace("_", " "), e(v)) for k, v in rec.items()],
            ("where", e(where(r)) + ("" if measured_on(r) == THIS_HOST else f", on {e(measured_on(r))}")),
            ("path", f"<code>{e(r.path)}</code>" if r.path else "not kept"),
            ("sha256", f"<code>{e(r.sha256)}</code>" if r.sha256 else ""),
            ("tools", e(", ".join(f"{k} {v}" for k, v in (r.tools or {}).items()))),
            ("latency", e(f"{lat.get('device', '?')}, {lat.get('runtime', '?')}, {lat.get('threads', '?')} threads, {lat.get('runs', '?')} runs" + (f" over {lat['rounds']} interleaved rounds, round spread {lat['spread']:.2f}" if lat.get("rounds") and lat.get("spread") else "")) if lat else ""),
            ("memory", e(f"peak +{r.memory['peak_mb']:.0f} MB ({r.memory.get('what', '')}; {r.memory.get('method', '')})") if (r.memory or {}).get("peak_mb") is not None else ""),
            ("build", e(f"{r.build.get('seconds', 0):.1f} s, peak +{r.build.get('peak_mb') or 0:.0f} MB") if r.build else ""),
            ("notes", "<br>".join(e(n) for n in r.notes)),
            ("caveats", "<br>".join(e(c) for c in caveats(r, report))),
        ]
        out.append(f"<details><summary>{e(r.name)}</summary>{_dl(pairs)}</details>")
    return "".join(out)


def _hosts_side_by_side(report: Report) -> str:
    """The same artifact (by sha256, else name) measured on several hosts/devices: one line per artifact, one
    column group per place. Shown only when rows from more than one place exist."""
    places = list(dict.fromkeys(measured_on(r) for r in report.rows))
    if len(places) < 2:
        return ""
    ref = reference_row(report.rows)
    by_art: dict[str, dict[str, Row]] = {}
    for r in report.rows:
        by_art.setdefault(r.sha256 or r.name, {})[measured_on(r)] = r
    head = "<th>artifact</th>" + "".join(f"<th>{e(p)}: p50 ms</th><th>{e(p)}: agree %</th>" for p in places)
    body = []
    for rows in by_art.values():
        first = next(iter(rows.values()))
        tds = [f"<td>{e(first.name)}</td>"]
        for p in places:
            r = rows.get(p)
            lat = (r.latency or {}).get("p50_ms") if r else None
            agr = (r.accuracy or {}).get("agreement") if r else None
            tds.append(f"<td>{'–' if lat is None else f'{lat:.2f}'}</td><td>{'–' if agr is None or r is ref else f'{100 * agr:.1f}'}</td>")
        body.append("<tr>" + "".join(tds) + "</tr>")
    return f'<h2>The same artifacts on each host and device</h2><div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def render_html(report: Report) -> str:
    m, ev, h = report.model, report.evaluation or {}, report.host or {}
    title = f"vitexport report: {m.get('source', '?')}"
    figs = plots(report)
    if figs:
        plot_html = '<div class="plots">' + "".join(f"<figure><figcaption>{e(t)}</figcaption>{svg}</figure>" for t, svg in figs) + "</div>"
    else:
        plot_html = '<p class="mut">No plots: install the report extra (<code>pip install "vitexport[report]"</code>, which adds matplotlib) and rebuild the report.</p>'
    params = m.get("parameters")
    model_pairs = [
        ("checkpoint", f"<code>{e(m.get('source', '?'))}</code>"),
        ("architecture", e(f"{m.get('architecture', '?')} ({m.get('task', '?')})")),
        ("size", e(f"{params / 1e6:.1f} M parameters, {m.get('num_layers', '?')} layers, hidden {m.get('hidden_size', '?')}, input {m.get('image_size', '?')}×{m.get('image_size', '?')}") if params else ""),
        ("labels", e(f"{m.get('num_labels')} classes" + (", e.g. " + ", ".join(map(str, m["label_examples"])) if m.get("label_examples") else "")) if m.get("num_labels") else ""),
    ]
    v = (report.reference or {}).get("verification") or {}
    if v:
        model_pairs.append(("reference ONNX", e(f"opset {report.reference.get('opset', '?')}, checked against {v.get('against', 'PyTorch')} on {v.get('n')} images: max abs diff {v.get('max_abs_diff', 0):.2e}, top-1 agreement {100 * v.get('top1_agreement', 0):.1f} %")))
    pre = ev.get("preprocessing") or {}
    eval_pairs = [
        ("evaluation images", e(f"{ev.get('images')} from ") + f"<code>{e(ev.get('source'))}</code>" if ev.get("images") is not None else ""),
        ("labelled", e(f"{ev.get('labelled', 0)} (labels from {ev.get('label_source', 'none')})") if ev.get("images") is not None else ""),
        ("calibration images", (e(f"{ev['calibration_images']} from ") + f"<code>{e(ev.get('calibration_source'))}</code>") if ev.get("calibration_images") else ""),
        ("calibration ∩ evaluation", e(f"{ev['calibration_overlap']} images in both" + (": the quantized rows' accuracy is flattered" if ev["calibration_overlap"] else " (disjoint)")) if ev.get("calibration_overlap") is not None else ""),
        ("preprocessing", e(", ".join(f"{k} {_short(v)}" for k, v in pre.items() if v is not None)) if pre else ""),
        ("target profile", e(ev.get("target")) if ev.get("target") else ""),
    ]
    host_pairs = [
        ("CPU", e(h.get("cpu", "?"))),
        ("int8/bf16 features", e(", ".join(h.get("cpu_features") or []) or "none of the ones that matter")),
        ("cores", e(h.get("cores"))),
        ("machine, OS", e(f"{h.get('machine', '?')}, {h.get('os', '?')}")),
        ("python", e(h.get("python"))),
        ("tools", e(", ".join(f"{k} {v}" for k, v in (report.tools or {}).items()))),
    ]
    sentence = " ".join(s for s in (evaluation_sentence(report), host_sentence(h) if h else "") if s).replace("`", "")  # Markdown quotes
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{e(title)}</title><style>{CSS}</style></head>
<body>
<h1>{e(title)}</h1>
<p class="mut">{e(sentence)} Created {e(report.created)}; report schema {e(report.schema_version)}.</p>
{_gate_block(report.gate)}
<h2>Summary</h2>
{_summary_table(report)}
<p class="mut">{e(LEGEND)} Click a column to sort; the reference row stays first.</p>
<h2>Trade-offs</h2>
{plot_html}
{_hosts_side_by_side(report)}
<h2>Each artifact</h2>
{_artifact_details(report)}
<h2>Model, images, host</h2>
<h3>Model</h3>{_dl(model_pairs)}
<h3>Images</h3>{_dl(eval_pairs)}
<h3>Host</h3>{_dl(host_pairs)}
<script>{JS}</script>
</body></html>
"""
