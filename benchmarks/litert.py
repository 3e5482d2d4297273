"""Android targets on the real DeiT-tiny: LiteRT (.tflite on ai-edge-litert's XNNPACK interpreter) and ONNX Runtime
Mobile (.ort), beside the ONNX Runtime rows, in one build, one harness, one reference.

    pip install torch==2.13.0 -e ".[litert]"     # in its own venv: litert-torch pins typing-extensions < 4.13
    python benchmarks/litert.py                   # ~25 min on 2 shared cores; writes benchmarks/results/litert.*

Split as benchmarks/run_matrix.py makes it: the 500 images of ../shared/imagenet-samples, calibration on the 125 at
sorted positions 0, 4, 8, ..., evaluation on the other 375. No knob is chosen here: every row uses its recipe's
defaults (LiteRT int8: the core ViT-aware recipe with full 8-bit weights, which TFLite's int8 spec prescribes, GPTQ
compensating XNNPACK's per-row dynamic quantization and clamps that clip nothing, chosen on held-out calibration images
by benchmarks/litert_choice.py --dynamic-recipe), so the evaluation split is only measured, never tuned on.

Rows: onnxruntime fp32 (the reference) / int8; litert fp32 / fp16 / int8 (the recipe carried in, dynamic int8
activations: the default, chosen on held-out calibration images by benchmarks/litert_choice.py) / int8-static (the same
recipe with static int8 activations and int8 FC outputs) / int8-stock (ai-edge-quantizer's static_wi8_ai8 on the same
calibration images); onnxruntime fp32-mobile / int8-mobile (the .ort
files converted from the onnxruntime rows' .onnx). Batch-1 latency of every row is measured interleaved, round by round
(vitexport.harness.latency.measure_all), at --threads (default 1: the host is shared, one thread is the steadiest).
``ort_vs_onnx`` in litert.json compares each .ort's logits with its .onnx's, run as on this host and as on ARM.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from run_matrix import shared_split  # noqa: E402
from stock import relabel  # noqa: E402

from vitexport import api  # noqa: E402
from vitexport.artifacts import Artifact, write_manifest  # noqa: E402
from vitexport.harness.report import render_markdown  # noqa: E402
from vitexport.progress import Progress  # noqa: E402


def litert_stock_int8(reference, calibration, tmp: Path) -> Artifact:
    from vitexport.backends.litert import LiteRTBackend

    art = LiteRTBackend().build(reference, calibration, "int8", {"litert": {"int8_method": "stock"}}, tmp / "litert-int8-stock")
    return relabel(art, "int8-stock", "stock: " + art.manifest["recipe"]["summary"])


def litert_static_int8(reference, calibration, tmp: Path) -> Artifact:
    """The recipe with static int8 activations (int8 FC outputs): what litert-int8 was before dynamic activations."""
    from vitexport.backends.litert import LiteRTBackend

    art = LiteRTBackend().build(reference, calibration, "int8", {"litert": {"int8_activations": "static"}}, tmp / "litert-int8-static")
    return relabel(art, "int8-static", art.manifest["recipe"]["summary"])


def ort_mobile_check(dist: Path, model: str, eval_dir: Path, num_eval: int | None) -> dict:
    """Each .ort against its own .onnx on the evaluation images, the .onnx run two ways: as ONNX Runtime runs it on this
    x86 host (its NchwcTransformer rewrites the patch convolution into a blocked layout) and as it runs it on an ARM
    phone (no NCHWc; session.qdqisint8allowed=1): the graph the .ort converter bakes for target_platform arm."""
    import numpy as np
    import onnxruntime as ort

    from vitexport.data import ImageSet
    from vitexport.model import ModelSpec

    spec = ModelSpec.load(model)
    images = ImageSet.from_folder(str(eval_dir), spec.preprocessing, spec.id2label, None, limit=num_eval)
    x = np.stack([images.load(i) for i in range(len(images))])

    def logits(path: Path, arm: bool) -> np.ndarray:
        so = ort.SessionOptions()
        so.add_session_config_entry("session.qdqisint8allowed", "1" if arm else "0")
        s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"], disabled_optimizers=["NchwcTransformer"] if arm else [])
        return np.concatenate([s.run(None, {s.get_inputs()[0].name: x[i : i + 16]})[0] for i in range(0, len(x), 16)])

    out = {}
    for p in ("fp32", "int8"):
        folder = dist / f"onnxruntime-{p}-mobile"
        o = logits(folder / "model.ort", False)
        for how, y in (("onnx_as_on_this_host", logits(folder / "model.onnx", False)), ("onnx_as_on_arm", logits(folder / "model.onnx", True))):
            out.setdefault(p, {})[how] = {"images_whose_top1_differs": int((o.argmax(1) != y.argmax(1)).sum()), "max_abs_logit_difference": float(np.abs(o - y).max())}
    return out


def ort_mobile(precision: str):
    """The .ort conversion of the onnxruntime row already built in this run (same model, other file format)."""

    def make(reference, calibration, tmp: Path) -> Artifact:
        from vitexport.backends.onnxruntime import MOBILE_MODEL, MobileOptions, write_mobile

        src = Artifact.load(tmp / f"onnxruntime-{precision}")
        out = tmp / f"onnxruntime-{precision}-mobile"
        out.mkdir()
        shutil.copyfile(src.path, out / "model.onnx")
        recipe = dict(src.manifest["recipe"])
        recipe["mobile"] = write_mobile(out / "model.onnx", MobileOptions(mobile=True))
        recipe["summary"] = f"{recipe['summary']}; ONNX Runtime Mobile .ort (Fixed optimizations, arm)"
        return write_manifest(out, backend="onnxruntime", precision=f"{precision}-mobile", main=MOBILE_MODEL, recipe=recipe, **reference.manifest_fields())

    return make


def wilson(p: float, n: int, z: float = 1.96) -> list[float]:
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return [round(c - h, 4), round(c + h, 4)]


def delta_interval(lost: int, gained: int, n: int, z: float = 1.96) -> list[float]:
    """95% interval of the paired top-1 difference (points) from the discordant pairs (normal approximation)."""
    d = (gained - lost) / n
    var = max(((gained + lost) / n - d * d) / n, 0.0)
    return [round(100 * (d - z * math.sqrt(var)), 2), round(100 * (d + z * math.sqrt(var)), 2)]


def summarise(report) -> dict:
    ref = next(r for r in report.rows if r.name == "onnxruntime-fp32")
    rows = {}
    for r in report.rows:
        a, lat = r.accuracy or {}, r.latency or {}
        n = a.get("n_labelled") or 0
        row = {
            "size_mb": round(r.size_bytes / 1e6, 2),
            "top1": a.get("top1"), "agreement": a.get("agreement"), "cosine": a.get("cosine"),
            "lost": a.get("lost"), "gained": a.get("gained"), "emulated": a.get("emulated"),
            "latency_p50_ms": lat.get("p50_ms"), "latency_p90_ms": lat.get("p90_ms"),
            "summary": r.recipe.get("summary"),
        }
        if a.get("agreement") is not None:
            row["agreement_95"] = wilson(a["agreement"], a["n"])
        if a.get("top1") is not None and ref.accuracy and r.name != ref.name:
            row["delta_top1_pt"] = round(100 * (a["top1"] - ref.accuracy["top1"]), 2)
            row["delta_top1_95"] = delta_interval(a["lost"], a["gained"], n)
        rows[r.name] = row
    return rows


def table(summary: dict) -> str:
    """The README's Android table from results/litert.json (``python benchmarks/litert.py --table``)."""
    rows = summary["rows"]
    ref_p50 = rows["onnxruntime-fp32"]["latency_p50_ms"]
    lines = [
        f"Produced by `{summary['command']}` ({summary['evaluation_images']} evaluation images; batch-1 latency at {summary['threads']} thread, "
        "interleaved round by round on a 2-core host shared with other jobs: compare ratios).",
        "",
        "| artifact | size MB | top-1 % | Δ top-1 (95% interval) | lost/gained | agree % (95% interval) | cosine | p50 ms | × onnxruntime-fp32 latency |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        d = "–" if r.get("delta_top1_pt") is None else f"{r['delta_top1_pt']:+.2f} ({r['delta_top1_95'][0]:+.2f}, {r['delta_top1_95'][1]:+.2f})"
        ag = "–" if r.get("agreement") is None else f"{100 * r['agreement']:.1f} ({100 * r['agreement_95'][0]:.1f}–{100 * r['agreement_95'][1]:.1f})"
        lat = r.get("latency_p50_ms")
        lines.append(
            f"| {name} | {r['size_mb']:.1f} | {100 * r['top1']:.1f} | {d} | {r.get('lost', '–')}/{r.get('gained', '–')} | {ag} | {r['cosine']:.4f} | "
            f"{'–' if lat is None else f'{lat:.2f}'} | {'–' if lat is None or not ref_p50 else f'{lat / ref_p50:.2f}'} |"
        )
    for p, check in summary.get("ort_vs_onnx", {}).items():
        here, arm = check["onnx_as_on_this_host"], check["onnx_as_on_arm"]
        lines.append(f"\nonnxruntime-{p}-mobile (.ort, converted for arm) vs its .onnx: run as on this x86 host {here['images_whose_top1_differs']} top-1 differ "
                     f"(max |Δlogit| {here['max_abs_logit_difference']:.3g}); run as on ARM (no NCHWc) {arm['images_whose_top1_differs']} differ "
                     f"(max |Δlogit| {arm['max_abs_logit_difference']:.3g}).")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=str(REPO.parent / "shared"))
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--num-eval", type=int, default=None, help="fewer evaluation images (a quick check; the README's figures use all 375)")
    ap.add_argument("--table", action="store_true", help="print the README table from --out/litert.json and exit")
    args = ap.parse_args()
    if args.table:
        print(table(json.loads((Path(args.out) / "litert.json").read_text())), end="")
        return 0
    shared = Path(args.shared)
    work = Path(tempfile.mkdtemp(prefix="vitexport-litert-"))
    try:
        calib, evals = shared_split(shared, work / "images")
        opts = api.BuildOptions(
            model=str(shared / "models" / "deit-tiny-patch16-224"), backend="onnxruntime,litert", precisions=("fp32", "fp16", "int8"),
            calib=str(calib), eval=str(evals), num_eval=args.num_eval, out=str(work / "dist"), threads=args.threads, latency=True,
        )
        extra = [litert_static_int8, litert_stock_int8, ort_mobile("fp32"), ort_mobile("int8")]
        report = api.build(opts, Progress(enabled=True), extra_builders=extra)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "litert.report.json").write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
        (out / "litert.report.md").write_text(render_markdown(report))
        summary = {
            "command": "python benchmarks/litert.py" + (f" --threads {args.threads}" if args.threads != 1 else "") + (f" --num-eval {args.num_eval}" if args.num_eval else ""),
            "model": "deit-tiny-patch16-224 (../shared/models)",
            "split": "125 calibration / 375 evaluation images of ../shared/imagenet-samples (positions 0, 4, 8, ... calibrate)",
            "evaluation_images": report.evaluation["images"],
            "threads": args.threads,
            "host": report.host,
            "note": "latency: batch 1, interleaved round by round on a host shared with other jobs: compare ratios, not absolute times",
            "rows": summarise(report),
        }
        (out / "litert.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        summary["ort_vs_onnx"] = ort_mobile_check(work / "dist", opts.model, evals, args.num_eval)
        print("ort_vs_onnx", json.dumps(summary["ort_vs_onnx"]))
        (out / "litert.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        (out / "litert.md").write_text(table(summary))
        for name, r in summary["rows"].items():
            print(f"{name:32s} size {r['size_mb']:6.2f} MB  top1 {r['top1']}  agree {r['agreement']}  cos {r['cosine'] and round(r['cosine'], 5)}  "
                  f"Δ {r.get('delta_top1_pt')} {r.get('delta_top1_95')}  lost/gained {r['lost']}/{r['gained']}  p50 {r['latency_p50_ms']} ms")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
