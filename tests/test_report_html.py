"""report.html as a person sees it (a real browser on a real DeiT-tiny report), the intervals and gates behind it,
the reference row every report has, and the report defects a new user ran into."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import CALIB, DEIT, EVAL, validate_report
from vitexport.cli import main
from vitexport.harness import gate, stats
from vitexport.harness.report import REFERENCE, Report, Row, render_markdown, render_terminal

EVIL_LABEL = "<script>alert(1)</script>"


# ---------------------------------------------------------------- statistics and gates (known answers)


def test_wilson_and_paired_intervals_match_published_values():
    lo, hi = stats.wilson(81, 263)  # Newcombe (1998), Stat. Med. 17:857, the Wilson example: 0.2553 to 0.3662
    assert (round(lo, 4), round(hi, 4)) == (0.2553, 0.3662)
    assert stats.wilson(94, 94)[1] == pytest.approx(1.0) and stats.wilson(94, 94)[0] < 0.97  # 100 % of 94 is not proof
    lo, hi = stats.paired_delta(lost=40, gained=20, n=160)  # R PropCIs::diffpropci.mp(b=40, c=20, n=160)
    assert (round(lo, 5), round(hi, 5)) == (-0.21602, -0.0309)
    lo, hi = stats.paired_delta(0, 0, 94)  # nothing flipped: still an interval, not a point
    assert lo < -0.01 and hi > 0.01 and lo == pytest.approx(-hi)


def _row(name: str, n: int, agree_k: int | None, top1_k: int | None, lost: int = 0, gained: int = 0, **kw) -> Row:
    acc = {"n": n, "top1": None if top1_k is None else top1_k / n, "top5": None, "agreement": None if agree_k is None else agree_k / n, "cosine": 0.99, "n_labelled": n if top1_k is not None else 0, "emulated": False, "lost": lost, "gained": gained}
    return Row(name=name, backend=name.split("-")[0], precision=name.split("-")[1], path=f"/x/{name}/model.onnx", size_bytes=1_000_000, accuracy=acc, **kw)


def test_gate_says_when_a_verdict_lies_within_the_noise():
    ref = _row("onnxruntime-fp32", 94, 94, 75, role=REFERENCE)
    close = _row("onnxruntime-int8", 94, 91, 74, lost=2, gained=1)  # 96.8 % agreement: the bar 97 is inside its interval
    bad = _row("onnxruntime-int4", 94, 80, 60, lost=16, gained=1)  # 85 %: the whole interval is below 97
    rows = (ref, close, bad)
    point = gate.check(rows, {"min_agreement": 97.0, "max_top1_drop": None}, "point")
    by = {c.row: c for c in point.checks}
    assert set(by) == {"onnxruntime-int8", "onnxruntime-int4"}  # the reference is not gated against itself
    assert by["onnxruntime-int8"].failed and not by["onnxruntime-int8"].decided
    assert by["onnxruntime-int4"].failed and by["onnxruntime-int4"].decided
    interval = gate.check(rows, {"min_agreement": 97.0}, "interval")
    assert [c.row for c in interval.checks if c.failed] == ["onnxruntime-int4"] and not interval.passed
    drop = gate.check(rows, {"max_top1_drop": 1.0}, "interval")
    assert [c.row for c in drop.checks if c.failed] == ["onnxruntime-int4"]  # 16 lost of 94: beyond noise
    text = render_markdown(Report(model={}, rows=rows, gate=point.to_dict()))
    assert "onnxruntime-int8: agreement 96.8% [95 % 91.0–98.9] < 97% (the interval contains the bar" in text


def test_terminal_shows_what_each_kind_of_report_has():
    # a backbone: no labels, no agreement; cosine is its quality figure
    bb = Row("onnxruntime-int8", "onnxruntime", "int8", "/x", 10, accuracy={"n": 8, "top1": None, "top5": None, "agreement": None, "cosine": 0.9912, "n_labelled": 0, "emulated": False})
    ref = Row("onnxruntime-fp32", "onnxruntime", "fp32", "/y", 20, accuracy={**bb.accuracy, "cosine": 1.0}, role=REFERENCE)
    out = render_terminal(Report(model={}, rows=(ref, bb)))
    assert "cosine" in out.splitlines()[0] and "0.9912" in out and "top-1" not in out
    # a bench: latency p50, p90 and throughput; emulated timings say so; more threads than cores is a caveat
    lat = {"batch": 1, "p50_ms": 3.25, "p90_ms": 4.5, "mean_ms": 3.4, "runs": 50, "threads": 8, "device": "cpu", "runtime": "x", "throughput_batch": 16, "throughput_ips": 321.0, "emulated": True}
    bench = Report(model={}, rows=(Row("coreml-fp16", "coreml", "fp16", "/z", 5, latency=lat),), host={"cores": 2})
    out = render_terminal(bench)
    head = out.splitlines()[0]
    assert "p90 ms" in head and "img/s" in head and "4.50" in out and "321.0" in out
    assert "3.25 (emulated)" in out and "emulated (8 thr > 2 cores)" in out
    assert "8 threads on a 2-core host" in out and "not of the target's runtime" in out


def test_a_quantized_row_slower_than_its_float_row_says_so_only_when_every_round_agrees():
    def lat(rounds, **kw):
        return {"batch": 1, "p50_ms": float(np.median(rounds)), "p90_ms": max(rounds), "mean_ms": float(np.mean(rounds)), "runs": 30, "threads": 2,
                "device": "CPU", "runtime": "openvino", "rounds": len(rounds), "round_p50_ms": tuple(rounds), **kw}

    fp32 = Row("openvino-fp32", "openvino", "fp32", "/a", 20, latency=lat([26.0, 26.5, 25.8]))
    ort = Row("onnxruntime-fp32", "onnxruntime", "fp32", "/o", 20, latency=lat([40.0, 40.0, 40.0]), role=REFERENCE)
    slow = Row("openvino-int8", "openvino", "int8", "/b", 5, latency=lat([38.0, 38.4, 37.9]))  # AVX2 without VNNI
    noisy = Row("openvino-int4", "openvino", "int4", "/c", 4, latency=lat([30.0, 25.0, 30.0]))  # one round faster
    emulated = Row("openvino-fp16", "openvino", "fp16", "/d", 10, latency=lat([40.0, 40.0, 40.0], emulated=True))
    other_threads = Row("openvino-int8w", "openvino", "int8w", "/e", 6, latency=lat([40.0, 40.0, 40.0], threads=1))
    report = Report(model={}, rows=(ort, fp32, slow, noisy, emulated, other_threads), host={"cores": 2})
    said = {r["name"]: [c for c in r["caveats"] if "do not pay" in c] for r in report.to_dict()["rows"]}
    assert said["openvino-int8"] and "1.46x the latency of openvino-fp32" in said["openvino-int8"][0] and "all 3 interleaved rounds" in said["openvino-int8"][0]
    assert not any(said[n] for n in ("openvino-int4", "openvino-fp16", "openvino-int8w", "openvino-fp32", "onnxruntime-fp32"))
    assert "saves size, not time" in render_terminal(report) and "saves size, not time" in render_markdown(report)


# ---------------------------------------------------------------- builds of the tiny ViT


@pytest.fixture(scope="module")
def no_fp32_profile(tiny_vit, image_folder, tmp_path_factory) -> Path:
    """An OpenVINO build without ONNX Runtime fp32 (like the iphone and jetson profiles): calibration images are
    the evaluation images (an overlap to record), 64 threads on this host (a caveat), latency timed."""
    out = tmp_path_factory.mktemp("nofp32") / "dist"
    argv = ["build", "--model", str(tiny_vit), "--eval", str(image_folder), "--calib", str(image_folder), "--out", str(out), "--quiet", "--backend", "openvino", "--precision", "fp32,int4", "--threads", "64"]
    assert main(argv) == 0
    return out


def test_reference_row_is_always_measured_and_first(no_fp32_profile):
    report = json.loads((no_fp32_profile / "report.json").read_text())
    rows = report["rows"]
    assert rows[0]["role"] == "reference" and rows[0]["precision"] == "fp32" and rows[0]["accuracy"]["top1"] is not None
    assert rows[0]["path"] == "" and "not kept" in rows[0]["recipe"]["summary"]
    assert [r["name"] for r in rows[1:]] == ["openvino-fp32", "openvino-int4"]
    head, *body = (no_fp32_profile / "report.md").read_text().split("| artifact |")[1].split("\n")[:5]
    int4 = next(line for line in body if line.startswith("| openvino-int4"))
    cols = [c.strip() for c in ("| artifact |" + head).split("|")[1:-1]]
    cells = [c.strip() for c in int4.split("|")[1:-1]]
    assert cells[cols.index("Δ top-1")] != "–" and cells[cols.index("×smaller")] != "–" and "[" in cells[cols.index("agree %")]
    assert rows[2]["sha256"] and rows[2]["tools"].get("openvino")


def test_overlap_and_thread_caveats_are_recorded(no_fp32_profile):
    report = json.loads((no_fp32_profile / "report.json").read_text())
    assert report["evaluation"]["calibration_overlap"] == 24
    int4 = report["rows"][2]
    assert any("also evaluation images" in c for c in int4["caveats"])
    assert any("64 threads" in c for r in report["rows"] for c in r["caveats"])
    md = (no_fp32_profile / "report.md").read_text()
    assert "24 of which are also evaluation images" in md and "other images" not in md


def test_eval_against_a_non_onnxruntime_reference(no_fp32_profile, image_folder, tmp_path, capsys):
    out = tmp_path / "ev"
    argv = ["eval", str(no_fp32_profile / "openvino-int4"), "--images", str(image_folder), "--reference", str(no_fp32_profile / "openvino-fp32"), "--out", str(out), "--json"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    validate_report(printed)
    ref, row = printed["rows"]
    assert ref["name"] == "openvino-fp32" and ref["role"] == "reference"
    assert row["accuracy"]["agreement"] is not None and row["accuracy"]["cosine"] > 0.9 and row["ci95"]["agreement"]
    assert {p.name for p in out.iterdir()} == {"report.json", "report.md", "report.html"}


def test_bench_of_an_emulated_artifact_marks_its_timings(tiny_vit, image_folder, tmp_path, capsys):
    dist = tmp_path / "trt"
    assert main(["build", "--model", str(tiny_vit), "--eval", str(image_folder), "--out", str(dist), "--quiet", "--no-latency", "--backend", "tensorrt", "--precision", "fp16"]) == 0
    out = tmp_path / "bench"
    assert main(["bench", str(dist / "tensorrt-fp16"), "--batch", "2", "--out", str(out)]) == 0
    term = capsys.readouterr().out
    assert "(emulated)" in term and "p90 ms" in term and "img/s" in term
    row = json.loads((out / "report.json").read_text())["rows"][0]
    assert row["latency"]["emulated"] is True
    page = (out / "report.html").read_text()
    assert "badge b-emu" in page and "(emulated)" in page


def test_eval_out_refuses_to_overwrite(no_fp32_profile, image_folder, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["eval", str(no_fp32_profile / "openvino-fp32"), "--images", str(image_folder), "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"


def test_html_without_matplotlib_still_has_the_tables(no_fp32_profile):
    code = f"""
import sys, json
sys.modules['matplotlib'] = None  # as if not installed
from vitexport.harness.report import Report
from vitexport.harness.html import render_html
page = render_html(Report.from_dict(json.load(open({str(no_fp32_profile / 'report.json')!r}))))
assert '<table id="summary">' in page and '<svg' not in page and 'vitexport[report]' in page
print('ok')
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


# ---------------------------------------------------------------- the real DeiT-tiny report in a real browser


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None and os.geteuid() == 0 and shutil.which("apt-get"):  # CI runs as root on Debian without it
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], capture_output=True, timeout=1200)
        exe = shutil.which("chromium")
    if exe is None:
        pytest.skip("no chromium here and cannot install it (not root, or no apt-get)")
    return exe


def browse(page: Path, *args: str, fragment: str = "") -> subprocess.CompletedProcess:
    """Open a file in headless chromium (offline: no network is ever needed) and return what it printed."""
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run", "--enable-logging=stderr", "--v=0", *args, page.resolve().as_uri() + fragment]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def deit_report(tmp_path_factory) -> Path:
    """The shipped DeiT-tiny with a hostile label, from a folder whose name holds markup: ONNX Runtime and OpenVINO
    rows measured and timed, CoreML rows emulated, 24 evaluation images (no calibration: the build stays quick)."""
    root = tmp_path_factory.mktemp("deit")
    model = root / "deit"
    shutil.copytree(DEIT, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["id2label"]["0"] = EVIL_LABEL
    (model / "config.json").write_text(json.dumps(cfg))
    images = root / "eval <b>bold"
    images.mkdir()
    for p in sorted(EVAL.iterdir())[:25]:
        shutil.copy(p, images / p.name)  # 24 images + classes.tsv
    if not (images / "classes.tsv").exists():
        shutil.copy(EVAL / "classes.tsv", images / "classes.tsv")
    out = root / "dist"
    argv = ["build", "--model", str(model), "--eval", str(images), "--calib", str(CALIB), "--out", str(out), "--quiet",
            "--backend", "onnxruntime,openvino,coreml", "--precision", "fp32,fp16", "--min-agreement", "99"]
    assert main(argv) in (0, 1)  # the gate's verdict is the report's business here
    return out


def test_real_report_escapes_labels_and_folder_names(deit_report):
    page = (deit_report / "report.html").read_text()
    assert EVIL_LABEL not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<b>bold" not in page and "eval &lt;b&gt;bold" in page
    assert page.count("<script>") == 1  # the report's own sorting script, nothing else
    assert not re.findall(r'(?:src|href)="(?!#)', page)  # self-contained: nothing to fetch (SVG links are internal #ids)


def test_real_report_opens_in_a_browser_without_errors(deit_report, tmp_path):
    page = deit_report / "report.html"
    res = browse(page, "--dump-dom")
    dom = res.stdout
    assert res.returncode == 0, res.stderr[-2000:]
    assert 'data-ready="1"' in dom  # the inline script ran to its end
    errors = [line for line in res.stderr.splitlines() if "Uncaught" in line or ("CONSOLE" in line and "error" in line.lower())]
    assert not errors, errors
    rows = re.findall(r'<tr class="([^"]*)">', dom.split('id="summary"')[1].split("</table>")[0])
    assert rows[0] == "reference" and rows.count("emulated") == 2 and len(rows) == 5  # ORT fp32 (the reference); OpenVINO, CoreML fp32 and fp16
    assert dom.count("<svg") >= 3  # size and latency trade-offs, latency spread, build cost
    assert "<b>bold" not in dom and "&lt;b&gt;bold" in dom  # the folder name is text in the live DOM too
    assert "Quality gate" in dom


def test_sorting_keeps_the_reference_row_first(deit_report):
    dom = browse(deit_report / "report.html", "--dump-dom", fragment="#sort=size%20MB").stdout
    table = dom.split('id="summary"')[1].split("</table>")[0]
    names = re.findall(r'<tr class="[^"]*"><td data-v="([^"]*)"', table)
    sizes = [float(v) for v in re.findall(r'<tr class="[^"]*"><td[^>]*>.*?</td><td data-v="([^"]*)"', table)]
    report = json.loads((deit_report / "report.json").read_text())
    ref = next(r["name"] for r in report["rows"] if r["role"] == "reference")
    assert names[0] == ref and sizes[1:] == sorted(sizes[1:]) and 'aria-sort="ascending"' in table


def test_screenshot_is_a_picture_of_the_report(deit_report, tmp_path):
    shot = tmp_path / "report.png"
    res = browse(deit_report / "report.html", f"--screenshot={shot}", "--window-size=1280,1600", "--hide-scrollbars")
    assert shot.is_file(), res.stderr[-2000:]
    px = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
    assert px.shape[:2] == (1600, 1280) and px.std() > 20  # not a blank page


def test_rows_from_other_devices_are_shown_side_by_side():
    """A row may carry `measured_on` (remote devices): it gets a column, and the same artifact on several hosts one line."""
    import dataclasses

    from vitexport.harness.html import render_html

    @dataclasses.dataclass(frozen=True)
    class RemoteRow(Row):
        measured_on: str | None = None

    lat = {"batch": 1, "p50_ms": 12.5, "p90_ms": 13.0, "mean_ms": 12.6, "runs": 40, "threads": 4, "device": "cpu", "runtime": "onnxruntime"}
    ref = _row("onnxruntime-fp32", 94, 94, 75, role=REFERENCE, sha256="a" * 64)
    here = _row("onnxruntime-int8", 94, 92, 74, lost=1, sha256="b" * 64, latency=lat)
    pi = RemoteRow(**{**dataclasses.asdict(here), "notes": (), "latency": {**lat, "p50_ms": 88.25}, "measured_on": "raspberry-pi-5 <rev 1>"})
    page = render_html(Report(model={}, rows=(ref, here, pi), host={"cores": 2}))
    assert "<th" in page and ">measured on</th>" in page and "raspberry-pi-5 &lt;rev 1&gt;" in page
    side = page.split("The same artifacts on each host and device")[1].split("</table>")[0]
    assert side.count("<tr>") == 3 and "88.25" in side and "12.50" in side  # header + two artifacts, int8 on both
