"""int8 batch-1 latency of vitexport's int8 rows against the stock int8 of the same runtime (issue 13).

Builds, for DeiT-tiny (real weights, the run_matrix split: 125 calibration, 375 evaluation images) and for the
ViT-Base config (random weights, ``run_matrix.vit_base_checkpoint``, 32 calibration images: enough for latency):

- onnxruntime fp32 and int8 (vitexport's recipe) and onnxruntime's stock ``quantize_dynamic`` int8;
- openvino fp32 and int8 (vitexport's recipe) and NNCF's stock ``nncf.quantize`` (model_type=TRANSFORMER) int8;

then times each pair at batch 1 in short alternating units (``harness.latency.paired_ratio``: ours, stock, stock,
ours, 3 timed runs per turn after an untimed one) and writes ``--out``/int8-latency.json and .md: per pair the
median of the units' ratios ours / stock with its distribution-free 95 % interval. A ratio <= 1 means ours is no
slower; an interval that excludes 1 means the difference is measurable. OpenVINO's rows are paired twice: against
NNCF's IR forced to f32 (the report's row) and compiled as OpenVINO does by default on this host (bf16 on CPUs with
AMX or AVX512-BF16). Fidelity against fp32 (agreement, cosine, lost/gained) is the build's report on the evaluation
split, reported once.

    python benchmarks/int8_latency.py                  # both models, threads 2, 40 units per pair
    python benchmarks/int8_latency.py --skip-vit-base --blocks 60

On this shared 2-core host the ratios of 1-s interleaved rounds (what this script reported until 4c0db0e) spread
over 0.55-1.75 for one pair in one run; the units' medians hold within +-2 %.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from openvino_baselines import stock_nncf_int8  # noqa: E402
from perf_build import NNCF_DEFAULT, timed_runners  # noqa: E402
from run_matrix import link_images, shared_split, stock_dynamic, vit_base_checkpoint  # noqa: E402

from vitexport import api  # noqa: E402
from vitexport.data import ImageSet, Preprocessing  # noqa: E402
from vitexport.harness.report import cpu_name  # noqa: E402
from vitexport.progress import Progress  # noqa: E402

PAIRS = {
    "onnxruntime": ("onnxruntime-int8", "onnxruntime-int8-stock-dynamic"),
    "onnxruntime (calibrated static ranges)": ("onnxruntime-int8-static", "onnxruntime-int8-stock-dynamic"),
    "openvino / NNCF in f32": ("openvino-int8", "openvino-int8-stock-nncf"),
    "openvino / NNCF as OpenVINO compiles it by default": ("openvino-int8", NNCF_DEFAULT),
    "openvino (latency first) / NNCF in f32": ("openvino-int8-latency-first", "openvino-int8-stock-nncf"),
    "openvino (latency first) / NNCF as OpenVINO compiles it by default": ("openvino-int8-latency-first", NNCF_DEFAULT),
}


def onnxruntime_static(reference, calibration, tmp: Path):
    """vitexport's ONNX Runtime int8 with calibrated static activation ranges and the 10 % float fallback (the default
    before issue 13 made the ranges dynamic), side by side with the default."""
    from stock import relabel

    from vitexport.backends.onnxruntime import OnnxRuntimeBackend

    art = OnnxRuntimeBackend().build(reference, calibration, "int8", {"onnxruntime": {"int8": {"activations": "static"}}}, tmp / "onnxruntime-int8-static")
    return relabel(art, "int8-static", "vitexport int8, static ranges: " + art.manifest["recipe"]["summary"])


def openvino_latency_first(reference, calibration, tmp: Path):
    """vitexport's OpenVINO int8 with LATENCY_FIRST (1 % float fallback, 8-bit weights): the speed it buys, the
    fidelity it costs, side by side with the default."""
    from stock import relabel

    from vitexport.backends.openvino import LATENCY_FIRST, OpenVinoBackend

    art = OpenVinoBackend().build(reference, calibration, "int8", {"openvino": {"int8": LATENCY_FIRST}}, tmp / "openvino-int8-latency-first")
    return relabel(art, "int8-latency-first", "vitexport int8, latency first (LATENCY_FIRST): " + art.manifest["recipe"]["summary"])


def build(model: str, calib: Path, evals: Path, out: Path, threads: int, progress):
    """ours (fp32 + int8 of both runtimes, and OpenVINO's latency-first int8) and the two stock int8 rows, evaluated
    on ``evals``; no timing yet."""
    opts = api.BuildOptions(model=model, backend="onnxruntime,openvino", precisions=("fp32", "int8"), calib=str(calib), eval=str(evals), out=str(out), force=True, threads=threads, latency=False)
    return api.build(opts, progress, extra_builders=[stock_dynamic, stock_nncf_int8, openvino_latency_first, onnxruntime_static])


def summarize(report, evals: Path, threads: int, blocks: int, progress) -> dict:
    """Per pair: ours / stock, paired (harness.latency.paired_ratio); and the fidelity of each row."""
    from vitexport.harness.latency import paired_ratio

    sample = ImageSet.from_folder(evals, Preprocessing.from_dict(report.evaluation["preprocessing"]), limit=1).load(0)[None]
    run = timed_runners([(r.name, r.backend, r.path) for r in report.rows], threads, names={n for pair in PAIRS.values() for n in pair})
    ratios = {}
    for label, (ours, stock) in PAIRS.items():
        if ours in run and stock in run:
            progress.step(f"paired latency: {label}, {blocks} units")
            p = paired_ratio(run[ours], run[stock], sample, blocks=blocks)
            ratios[label] = {"ours": ours, "stock": stock, "median": round(p["median"], 4), "ci95": [round(x, 4) for x in p["ci95"]], "q25": round(p["q25"], 3), "q75": round(p["q75"], 3), "units": p["pairs"]}
    fidelity = {}
    for row in report.rows:
        a = row.accuracy or {}
        fidelity[row.name] = {k: a.get(k) for k in ("n", "agreement", "agreement_ci", "cosine", "top1", "lost", "gained") if k in a}
        fidelity[row.name]["size_mb"] = round(row.size_bytes / 1e6, 2)
    return {"ratios": ratios, "fidelity": fidelity}


def markdown(results: dict) -> str:
    lines = ["# int8 latency: vitexport's int8 against each runtime's stock int8", "", f"Command: `{results['command']}`", "", f"Host: {results['host']}, {results['threads']} threads, batch 1. {results['note']}", ""]
    for model, r in results["models"].items():
        lines += [f"## {model}", "", f"{r['calibration_images']} calibration images; fidelity on {r['evaluation_images']} evaluation images against fp32.", ""]
        lines += ["| pair | ours | stock | ours / stock, median of the units | 95 % interval | interquartile | units |", "|---|---|---|---|---|---|---|"]
        for label, q in r["ratios"].items():
            lines.append(f"| {label} | {q['ours']} | {q['stock']} | {q['median']:.3f} | {q['ci95'][0]:.3f}-{q['ci95'][1]:.3f} | {q['q25']:.2f}-{q['q75']:.2f} | {q['units']} |")
        lines += ["", "| row | agreement % | cosine | lost/gained | size MB |", "|---|---|---|---|---|"]
        for name, f in r["fidelity"].items():
            agree = f"{100 * f['agreement']:.1f}" if f.get("agreement") is not None else "–"
            cos = f"{f['cosine']:.4f}" if f.get("cosine") is not None else "–"
            lg = f"−{f['lost']}/+{f['gained']}" if f.get("lost") is not None else "–"
            lines.append(f"| {name} | {agree} | {cos} | {lg} | {f['size_mb']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def run_model(name: str, model: str, calib: Path, evals: Path, work: Path, args, progress) -> dict:
    progress.step(f"{name}: building ours and the stock int8 rows")
    report = build(model, calib, evals, work / name, args.threads, progress)
    out = summarize(report, evals, args.threads, args.blocks, progress)
    return {**out, "calibration_images": report.evaluation.get("calibration_images"), "evaluation_images": report.evaluation.get("images")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=str(REPO.parent / "shared"))
    ap.add_argument("--work", default=str(HERE / "out" / "int8-latency"), help="scratch folder (artifacts; under the ignored benchmarks/out/)")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--blocks", type=int, default=40, help="paired units per pair (harness.latency.paired_ratio)")
    ap.add_argument("--vit-base-calib", type=int, default=32)
    ap.add_argument("--skip-vit-base", action="store_true")
    ap.add_argument("--skip-deit", action="store_true")
    args = ap.parse_args()
    shared, work, out = Path(args.shared), Path(args.work), Path(args.out)
    shutil.rmtree(work, ignore_errors=True)
    progress = Progress(enabled=True)
    results = {"command": "python " + " ".join(["benchmarks/int8_latency.py", *sys.argv[1:]]), "host": f"{cpu_name()} ({platform.machine()})", "threads": args.threads, "note": "Ratios from short alternating units (harness.latency.paired_ratio): what moves a shared host moves both rows of a unit", "models": {}}
    t0 = time.time()
    if not args.skip_deit:
        calib, evals = shared_split(shared, work / "split")
        results["models"]["DeiT-tiny (real weights)"] = run_model("deit-tiny", str(shared / "models" / "deit-tiny-patch16-224"), calib, evals, work, args, progress)
    if not args.skip_vit_base:
        files = sorted((shared / "imagenet-samples").glob("*.JPEG"))
        vb_calib = link_images(files[: args.vit_base_calib], work / "split-vb" / "calib", None)
        vb_eval = link_images([f for i, f in enumerate(files) if i % 4 != 0][-32:], work / "split-vb" / "eval", None)
        ckpt = vit_base_checkpoint(work / "vit-base-random")
        results["models"]["ViT-Base config (random weights)"] = run_model("vit-base", str(ckpt), vb_calib, vb_eval, work, args, progress)
    results["seconds"] = round(time.time() - t0)
    out.mkdir(parents=True, exist_ok=True)
    (out / "int8-latency.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "int8-latency.md").write_text(markdown(results))
    print((out / "int8-latency.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
