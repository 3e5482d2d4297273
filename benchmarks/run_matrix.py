"""The full matrix behind every figure in README.md.

    python benchmarks/run_matrix.py                 # ~15 min on 2 cores; writes benchmarks/results/
    python benchmarks/run_matrix.py --skip-vit-base # DeiT-tiny only

1. The real DeiT-tiny from ../shared/models, on all 500 images of ../shared/imagenet-samples: calibrate on the 125 at
   sorted positions 0, 4, 8, ... and evaluate on the other 375. Rows: vitexport's fp32 / int8 / int4, and stock recipes
   built from the same reference ONNX and measured by the same harness in the same run (ONNX Runtime static QDQ
   MinMax, ONNX Runtime dynamic int8, int4 round-to-nearest block 32).
2. A random-weight ViT-Base config (google/vit-base-patch16-224's shape and preprocessing) for speed and memory:
   calibration on 256 real images (peak memory measured), then batch-1 latency of every row interleaved round by
   round, so the int8/fp32 ratios come from one run on one machine.
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
from vitexport.artifacts import Artifact, write_manifest
from vitexport.backends.onnxruntime import OrtRunner
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
        from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.it = (x[i : i + 1] for x in calibration.batches() for i in range(len(x)))
                self.left = max_images

            def get_next(self):
                if self.left == 0:
                    return None
                self.left -= 1
                x = next(self.it, None)
                return None if x is None else {reference.input_name: x}

        out = tmp / "onnxruntime-int8-stock-static"
        out.mkdir()
        quantize_static(str(reference.path), str(out / "model.onnx"), Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True, calibrate_method=CalibrationMethod.MinMax)
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


def vit_base_checkpoint(dest: Path) -> Path:
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    ViTForImageClassification(ViTConfig()).eval().save_pretrained(dest, safe_serialization=True)
    # google/vit-base-patch16-224's own preprocessor_config.json: resize straight to 224, mean = std = 0.5
    (dest / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": 224, "width": 224}, "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    return dest


def interleaved(report: Report, sample: np.ndarray, threads: int | None) -> dict:
    runners = {r.name: OrtRunner(Path(r.path), threads) for r in report.rows}
    return compare(runners, sample, rounds=5, seconds=2.0)


# ---------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=str(REPO.parent / "shared"), help="the shared folder (models/, imagenet-samples/)")
    ap.add_argument("--out", default=str(HERE / "results"), help="where results go")
    ap.add_argument("--work", default=str(HERE / "out"), help="scratch folder (artifacts)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-vit-base", action="store_true")
    args = ap.parse_args()
    shared, out, work = Path(args.shared), Path(args.out), Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    progress = Progress(enabled=True)
    results: dict = {"command": "python benchmarks/run_matrix.py" + (" --skip-vit-base" if args.skip_vit_base else ""), "threads": args.threads}

    calib, evals = shared_split(shared, work / "split")
    t0 = time.time()
    deit = api.build(
        api.BuildOptions(model=str(shared / "models" / "deit-tiny-patch16-224"), calib=str(calib), eval=str(evals), out=str(work / "deit-tiny"), force=True, threads=args.threads),
        progress,
        extra_builders=[stock_static(125), stock_dynamic, stock_int4_rtn],
    )
    (out / "deit-tiny.report.json").write_text(deit.to_json())
    (out / "deit-tiny.report.md").write_text(render_markdown(deit))
    results["deit_tiny_seconds"] = round(time.time() - t0)

    if not args.skip_vit_base:
        t0 = time.time()
        ckpt = vit_base_checkpoint(work / "vit-base-random")
        files = sorted((shared / "imagenet-samples").glob("*.JPEG"))
        vb_calib = link_images(files[:256], work / "split-vb" / "calib", None)
        vb_eval = link_images([f for i, f in enumerate(files) if i % 4 != 0][-32:], work / "split-vb" / "eval", None)
        vitb = api.build(
            api.BuildOptions(model=str(ckpt), calib=str(vb_calib), eval=str(vb_eval), out=str(work / "vit-base"), force=True, threads=args.threads, latency=False),
            progress,
            extra_builders=[stock_static(32), stock_dynamic, stock_int4_rtn],
        )
        progress.step("ViT-Base: interleaved batch-1 latency of every row")
        sample = ImageSet.from_folder(vb_eval, Preprocessing.from_dict(vitb.evaluation["preprocessing"]), limit=1).load(0)[None]
        lat = interleaved(vitb, sample, args.threads)
        (out / "vit-base.report.json").write_text(vitb.to_json())
        (out / "vit-base.report.md").write_text(render_markdown(vitb))
        results["vit_base_latency"] = lat
        results["vit_base_seconds"] = round(time.time() - t0)

    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "RESULTS.md").write_text(summary_markdown(out, results))
    print((out / "RESULTS.md").read_text())
    return 0


def summary_markdown(out: Path, results: dict) -> str:
    lines = ["# Benchmark results", "", f"Produced by `{results['command']}` (see the docstring of benchmarks/run_matrix.py).", ""]
    deit = json.loads((out / "deit-tiny.report.json").read_text())
    from vitexport.harness.report import Report as R, table

    rep = R.from_dict(deit)
    h = deit["host"]
    lines += [f"## DeiT-tiny (real weights), {deit['evaluation']['images']} evaluation images, {deit['evaluation']['calibration_images']} calibration images", "", f"Host: {h['cpu']}, {h['cores']} cores.", ""]
    head, body = table(rep)
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"] + ["| " + " | ".join(r) + " |" for r in body]
    lines += ["", "Build time and peak memory above the start of each build step:", ""]
    lines += [f"- {r.name}: {r.build['seconds']:.0f} s, +{(r.build.get('peak_mb') or 0):.0f} MB" for r in rep.rows if r.build]
    if (out / "vit-base.report.json").exists():
        vb = R.from_dict(json.loads((out / "vit-base.report.json").read_text()))
        lat = results["vit_base_latency"]
        ref = lat.get("onnxruntime-fp32", {}).get("p50_ms")
        lines += ["", "## ViT-Base config (random weights): size, calibration memory, interleaved batch-1 latency", "", "| artifact | size MB | agreement % | cosine | build s | build peak MB (above start) | process peak MB | p50 ms | × fp32 latency | round spread |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in vb.rows:
            a, b, l = r.accuracy or {}, r.build or {}, lat.get(r.name, {})
            lines.append(
                f"| {r.name} | {r.size_bytes / 1e6:.1f} | {100 * (a.get('agreement') or 0):.1f} | {a.get('cosine') or 0:.4f} | {b.get('seconds', 0):.0f} | {(b.get('peak_mb') or 0):.0f} | {(b.get('process_peak_mb') or 0):.0f} | {l.get('p50_ms', float('nan')):.1f} | {l.get('p50_ms', float('nan')) / ref:.2f} | {l.get('spread', float('nan')):.2f} |"
            )
        lines += ["", f"Calibration images for ViT-Base int8/int4: {vb.evaluation['calibration_images']}; agreement on {vb.rows[0].accuracy['n'] if vb.rows[0].accuracy else '?'} images (random weights: labels mean nothing)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
