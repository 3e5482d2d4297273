"""The full matrix behind every figure in README.md.

    python benchmarks/run_matrix.py                 # ~40 min on 2 cores; writes benchmarks/results/
    python benchmarks/run_matrix.py --skip-vit-base # DeiT-tiny only (~15 min)
    python benchmarks/run_matrix.py --only-vit-base # ViT-Base only, keeping the DeiT-tiny results in --out

1. The real DeiT-tiny from ../shared/models, on all 500 images of ../shared/imagenet-samples: calibrate on the 125 at
   sorted positions 0, 4, 8, ... and evaluate on the other 375. One build, one harness, one reference: every backend
   (ONNX Runtime, OpenVINO, CoreML emulated, TensorRT QDQ emulated) at every precision it has, and the stock recipes of
   each tool built from the same reference ONNX and the same calibration images (benchmarks/*_baselines.py).
2. A random-weight ViT-Base config (google/vit-base-patch16-224's shape and preprocessing) for speed, memory and
   conversion: calibration on 256 real images (peak memory measured), ONNX Runtime, OpenVINO and CoreML rows, then
   batch-1 latency of every row that runs here, interleaved round by round, so ratios come from one run on one machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from vitexport import api
from stock import ort_reader, relabel
from vitexport.artifacts import Artifact, write_manifest
from vitexport.data import ImageSet, Preprocessing
from vitexport.harness.latency import compare
from vitexport.harness.report import Report, render_markdown
from vitexport.progress import Progress

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


# ---------------------------------------------------------------- image splits


def link_images(files: list[Path], dest: Path, classes: Path | None) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for f in files:
        os.symlink(f, dest / f.name)
    if classes:
        shutil.copy(classes, dest / "classes.tsv")
    return dest


def shared_split(shared: Path, work: Path) -> tuple[Path, Path]:
    samples = shared / "imagenet-samples"
    files = sorted(samples.glob("*.JPEG"))
    calib = [f for i, f in enumerate(files) if i % 4 == 0]
    evals = [f for i, f in enumerate(files) if i % 4 != 0]
    return link_images(calib, work / "calib", samples / "classes.tsv"), link_images(evals, work / "eval", samples / "classes.tsv")


# ---------------------------------------------------------------- stock baselines


def _baseline(reference, out_dir: Path, name: str, model_path: Path, recipe: dict) -> Artifact:
    return write_manifest(out_dir, backend="onnxruntime", precision=name, main=model_path.name, recipe=recipe, **reference.manifest_fields())


def stock_static(max_images: int):
    def make(reference, calibration, tmp: Path) -> Artifact:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        out = tmp / "onnxruntime-int8-stock-static"
        out.mkdir()
        quantize_static(str(reference.path), str(out / "model.onnx"), ort_reader(calibration, reference.input_name, max_images), quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True, calibrate_method=CalibrationMethod.MinMax)
        return _baseline(reference, out, "int8-stock-static", out / "model.onnx", {"summary": f"stock: onnxruntime quantize_static QDQ, MinMax, per-channel, U8S8, every op type, {max_images} calibration images"})

    return make


def stock_dynamic(reference, calibration, tmp: Path) -> Artifact:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = tmp / "onnxruntime-int8-stock-dynamic"
    out.mkdir()
    quantize_dynamic(str(reference.path), str(out / "model.onnx"), weight_type=QuantType.QInt8)
    return _baseline(reference, out, "int8-stock-dynamic", out / "model.onnx", {"summary": "stock: onnxruntime quantize_dynamic, int8 weights, activations quantized at run time"})


def stock_int4_rtn(reference, calibration, tmp: Path) -> Artifact:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer, RTNWeightOnlyQuantConfig

    out = tmp / "onnxruntime-int4-stock-rtn"
    out.mkdir()
    q = MatMulNBitsQuantizer(onnx.load(str(reference.path)), bits=4, block_size=32, is_symmetric=True, algo_config=RTNWeightOnlyQuantConfig())
    q.process()
    q.model.save_model_to_file(str(out / "model.onnx"), use_external_data_format=False)
    return _baseline(reference, out, "int4-stock-rtn", out / "model.onnx", {"summary": "stock: onnxruntime MatMulNBits round-to-nearest, symmetric, block 32"})


# ---------------------------------------------------------------- ViT-Base config


def ort_int8_full_weights(reference, calibration, tmp: Path) -> Artifact:
    """vitexport's int8 with 8-bit weights (the x86-cpu-vnni profile, reduce_range = false), to show what 7-bit costs."""
    from vitexport.backends.onnxruntime import OnnxRuntimeBackend

    out = tmp / "onnxruntime-int8-8bit-weights"
    art = OnnxRuntimeBackend().build(reference, calibration, "int8", {"onnxruntime": {"int8": {"recipe": {"reduce_range": False}}}}, out)
    return relabel(art, "int8-8bit-weights", "vitexport int8 with full 8-bit weights (vitexport/targets/x86-cpu-vnni.toml, reduce_range = false): " + art.manifest["recipe"]["summary"])


def vit_base_checkpoint(dest: Path) -> Path:
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    ViTForImageClassification(ViTConfig()).eval().save_pretrained(dest, safe_serialization=True)
    # google/vit-base-patch16-224's own preprocessor_config.json: resize straight to 224, mean = std = 0.5
    (dest / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": 224, "width": 224}, "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    return dest


def interleaved(report: Report, sample: np.ndarray, threads: int | None, rounds: int = 5, seconds: float = 2.0) -> dict:
    """Every row that runs on its real runtime here (emulated rows have no latency to compare)."""
    from vitexport import backends

    runners = {}
    for r in report.rows:
        try:
            runner = backends.get(r.backend).runner(Artifact.load(Path(r.path).parent), threads)
        except Exception as e:  # noqa: BLE001 - a row that cannot run here simply has no latency
            print(f"{r.name}: not timed ({e})", file=sys.stderr)
            continue
        if not runner.emulated:
            runners[r.name] = runner
    return compare(runners, sample, rounds=rounds, seconds=seconds)


def baselines(backends: list[str], images: int) -> list:
    """The stock recipe of each tool, for each backend in the run."""
    sys.path.insert(0, str(HERE))
    out = []
    if "onnxruntime" in backends:
        out += [stock_static(images), stock_dynamic, stock_int4_rtn, ort_int8_full_weights]
    if "openvino" in backends:
        from openvino_baselines import BASELINES

        out += BASELINES
    if "coreml" in backends:
        from coreml_baselines import stock_int4_rtn as coreml_int4_rtn, stock_int8_rtn as coreml_int8_rtn, stock_palette4

        out += [coreml_int8_rtn, coreml_int4_rtn, stock_palette4]
    if "tensorrt" in backends:
        from tensorrt_baselines import stock_tensorrt_qdq

        out += [stock_tensorrt_qdq(images)]
    return out


# ---------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=str(REPO.parent / "shared"), help="the shared folder (models/, imagenet-samples/)")
    ap.add_argument("--out", default=str(HERE / "results"), help="where results go")
    ap.add_argument("--work", default=str(HERE / "out"), help="scratch folder (artifacts)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-vit-base", action="store_true")
    ap.add_argument("--only-vit-base", action="store_true", help="rerun the ViT-Base part, keep the DeiT-tiny results already in --out")
    ap.add_argument("--summary-only", action="store_true", help="only rewrite --out/RESULTS.md from the reports and results.json already there")
    ap.add_argument("--vit-base-calib", type=int, default=256, metavar="N", help="calibration images for ViT-Base (default 256)")
    ap.add_argument("--backends", default="onnxruntime,openvino,coreml,tensorrt", metavar="LIST", help="DeiT-tiny backends")
    ap.add_argument("--precisions", default="fp32,fp16,int8,int8w,int4,palette4", metavar="LIST", help="DeiT-tiny precisions (each backend builds those it has)")
    ap.add_argument("--vit-base-backends", default="onnxruntime,openvino,coreml", metavar="LIST")
    ap.add_argument("--vit-base-precisions", default="fp32,fp16,int8,int4,palette4", metavar="LIST")
    args = ap.parse_args()
    shared, out, work = Path(args.shared), Path(args.out), Path(args.work)
    if args.summary_only:
        for name in ("deit-tiny", "vit-base"):
            if (out / f"{name}.report.json").exists():
                (out / f"{name}.report.md").write_text(render_markdown(Report.from_dict(json.loads((out / f"{name}.report.json").read_text()))))
        (out / "RESULTS.md").write_text(summary_markdown(out, json.loads((out / "results.json").read_text())))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    progress = Progress(enabled=True)
    # a partial run (--skip-vit-base / --only-vit-base) keeps the other model's results already in --out
    partial = args.only_vit_base or args.skip_vit_base
    previous = json.loads((out / "results.json").read_text()) if partial and (out / "results.json").exists() else {}
    results: dict = {**previous, "threads": args.threads}
    results["commands"] = previous.get("commands", []) + ["python " + " ".join(["benchmarks/run_matrix.py", *sys.argv[1:]])]
    shutil.rmtree(work / "vit-base" if args.only_vit_base else work / "deit-tiny" if args.skip_vit_base else work, ignore_errors=True)
    shutil.rmtree(work / "split", ignore_errors=True)
    shutil.rmtree(work / "split-vb", ignore_errors=True)
    shutil.rmtree(work / "vit-base-random", ignore_errors=True)
    if not args.only_vit_base:
        run_deit(shared, work, out, args, progress, results)
    if not args.skip_vit_base:
        run_vit_base(shared, work, out, args, progress, results)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "RESULTS.md").write_text(summary_markdown(out, results))
    print((out / "RESULTS.md").read_text())
    return 0


def run_deit(shared: Path, work: Path, out: Path, args, progress: Progress, results: dict) -> None:
    calib, evals = shared_split(shared, work / "split")
    t0 = time.time()
    backends = args.backends.split(",")
    deit = api.build(
        api.BuildOptions(model=str(shared / "models" / "deit-tiny-patch16-224"), backend=args.backends, precisions=tuple(args.precisions.split(",")), calib=str(calib), eval=str(evals), out=str(work / "deit-tiny"), force=True, threads=args.threads),
        progress,
        extra_builders=baselines(backends, 125),
    )
    (out / "deit-tiny.report.json").write_text(deit.to_json())
    (out / "deit-tiny.report.md").write_text(render_markdown(deit))
    # The report's own timing is interleaved too (3 rounds of 1 s); this second pass, 3 rounds of 1.5 s after every
    # build and evaluation is over, is the one the summary quotes.
    progress.step("DeiT-tiny: interleaved batch-1 latency of every row that runs here")
    sample = ImageSet.from_folder(evals, Preprocessing.from_dict(deit.evaluation["preprocessing"]), limit=1).load(0)[None]
    results["deit_tiny_latency"] = interleaved(deit, sample, args.threads, rounds=3, seconds=1.5)
    results["deit_tiny_seconds"] = round(time.time() - t0)


def run_vit_base(shared: Path, work: Path, out: Path, args, progress: Progress, results: dict) -> None:
    t0 = time.time()
    ckpt = vit_base_checkpoint(work / "vit-base-random")
    files = sorted((shared / "imagenet-samples").glob("*.JPEG"))
    vb_calib = link_images(files[: args.vit_base_calib], work / "split-vb" / "calib", None)
    vb_eval = link_images([f for i, f in enumerate(files) if i % 4 != 0][-32:], work / "split-vb" / "eval", None)
    vitb = api.build(
        api.BuildOptions(model=str(ckpt), backend=args.vit_base_backends, calib=str(vb_calib), eval=str(vb_eval), out=str(work / "vit-base"), force=True, threads=args.threads, latency=False, precisions=tuple(args.vit_base_precisions.split(","))),
        progress,
        # stock static QDQ keeps every intermediate tensor: 32 images is what fits (the reason for streaming calibration)
        extra_builders=[stock_static(32), stock_dynamic] + ([stock_int4_rtn] if "int4" in args.vit_base_precisions else []),
    )
    progress.step("ViT-Base: interleaved batch-1 latency of every row")
    sample = ImageSet.from_folder(vb_eval, Preprocessing.from_dict(vitb.evaluation["preprocessing"]), limit=1).load(0)[None]
    lat = interleaved(vitb, sample, args.threads)
    (out / "vit-base.report.json").write_text(vitb.to_json())
    (out / "vit-base.report.md").write_text(render_markdown(vitb))
    results["vit_base_latency"] = lat
    results["vit_base_seconds"] = round(time.time() - t0)


def summary_markdown(out: Path, results: dict) -> str:
    lines = ["# Benchmark results", "", "Produced by " + " then ".join(f"`{c}`" for c in results["commands"]) + " (see the docstring of benchmarks/run_matrix.py).", ""]
    deit = json.loads((out / "deit-tiny.report.json").read_text())
    from vitexport.harness.report import Report as R, table

    rep = R.from_dict(deit)
    h = deit["host"]
    lines += [f"## DeiT-tiny (real weights), {deit['evaluation']['images']} evaluation images, {deit['evaluation']['calibration_images']} calibration images", "", f"Host: {h['cpu']} ({', '.join(h.get('cpu_features') or ['cpu features not recorded'])}), {h['cores']} cores.", ""]
    head, body = table(rep)
    drop = {head.index(c) for c in ("p50 ms", "p90 ms", "×faster", "img/s")}  # sequential timings: see the next table
    head, body = [c for i, c in enumerate(head) if i not in drop], [[c for i, c in enumerate(r) if i not in drop] for r in body]
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"] + ["| " + " | ".join(r) + " |" for r in body]
    lat = results.get("deit_tiny_latency")
    if lat:
        ort = lat.get("onnxruntime-fp32", {}).get("p50_ms")
        lines += ["", "Batch-1 latency of every row that runs on its real runtime here, interleaved round by round (so the ratios come from one run on one machine); emulated rows have no latency here.", "",
                  "| artifact | p50 ms | × onnxruntime-fp32 latency | × its backend's fp32 latency | round spread |", "|---|---|---|---|---|"]
        for name, l in lat.items():
            own = lat.get(f"{name.split('-')[0]}-fp32", {}).get("p50_ms")
            lines.append(f"| {name} | {l['p50_ms']:.2f} | {l['p50_ms'] / ort:.2f} | {l['p50_ms'] / own:.2f} | {l['spread']:.2f} |" if ort and own else f"| {name} | {l['p50_ms']:.2f} | – | – | {l['spread']:.2f} |")
    lines += ["", "Build time and peak memory above the start of each build step:", ""]
    lines += [f"- {r.name}: {r.build['seconds']:.0f} s, +{(r.build.get('peak_mb') or 0):.0f} MB" for r in rep.rows if r.build]
    if (out / "vit-base.report.json").exists():
        vb = R.from_dict(json.loads((out / "vit-base.report.json").read_text()))
        lat = results["vit_base_latency"]
        ref = lat.get("onnxruntime-fp32", {}).get("p50_ms")
        lines += ["", "## ViT-Base config (random weights): size, calibration memory, interleaved batch-1 latency", "", "| artifact | size MB | agreement % | cosine | build s | build peak MB (above start) | process peak MB | p50 ms | × fp32 latency | round spread |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in vb.rows:
            a, b, l = r.accuracy or {}, r.build or {}, lat.get(r.name, {})
            timed = f"{l['p50_ms']:.1f} | {l['p50_ms'] / ref:.2f} | {l['spread']:.2f}" if l and ref else "— | — | —"
            emu = " (emulated)" if a.get("emulated") else ""
            lines.append(
                f"| {r.name} | {r.size_bytes / 1e6:.1f} | {100 * (a.get('agreement') or 0):.1f}{emu} | {a.get('cosine') or 0:.4f} | {b.get('seconds', 0):.0f} | {(b.get('peak_mb') or 0):.0f} | {(b.get('process_peak_mb') or 0):.0f} | {timed} |"
            )
        lines += ["", f"Calibration images for ViT-Base int8/int4: {vb.evaluation['calibration_images']}; agreement on {vb.rows[0].accuracy['n'] if vb.rows[0].accuracy else '?'} images (random weights: labels mean nothing)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
