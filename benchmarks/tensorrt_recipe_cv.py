"""How the TensorRT int8 recipe is chosen without looking at the evaluation images.

The shared evaluation split has 375 labelled images: one image is 0.27 points of top-1, so comparing recipe variants
on it measures noise, and choosing the one that passes is fitting the test set. This study uses the 125 *calibration*
images only (every fourth file, as in run_matrix.py), two-fold:

- fold A (even positions) calibrates, fold B (odd) is held out, then the other way round;
- each held-out image is seen as ten views (the four corner crops and the centre crop of the checkpoint's own resize,
  each also mirrored), so 125 images give 1250 held-out inputs; labels are not needed, since the measure is agreement
  with the fp32 reference (plus KL and logit cosine, which move smoothly where agreement moves by whole images).

Every variant runs the same TensorRT-constrained QDQ (symmetric int8, per-channel weights, linear layers only) and the
same emulation as the product (onnxruntime, float fake-quant of the QDQ graph, float16 storage between kernels as in
the default --int8 --fp16 engine; --float32-engine for a strongly typed one). The fp32 reference stays float32. Usage:

    python benchmarks/tensorrt_recipe_cv.py [--variants current,mse,...] [--out benchmarks/results/tensorrt-recipe-cv.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vitexport.backends.tensorrt import INT8_RECIPE, EmulationRunner  # noqa: E402
from vitexport.data import load_rgb, list_images  # noqa: E402
from vitexport.export import export_reference  # noqa: E402
from vitexport.model import ModelSpec  # noqa: E402
from vitexport.quantization.int8 import Int8Recipe, quantize_int8  # noqa: E402
from vitexport.artifacts import save_onnx  # noqa: E402

# each variant: overrides on top of TensorRT's INT8_RECIPE
VARIANTS: dict[str, dict] = {
    "shipped": {},  # INT8_RECIPE as it is
    "no-centering": {"center_activations": False},
    "mse": {"calibration": "mse"},
    "percentile-99.99": {"percentile": 99.99},
    "smooth-attn-out": {"smooth_attn_out": True},
    "budget-0.1": {"fallback_budget": 0.1},
    "budget-0.3": {"fallback_budget": 0.3},
    "fallback-images-32": {"fallback_images": 32},
    "alpha-0.6": {"smoothquant_alpha": 0.6},
    "alpha-0.7": {"smoothquant_alpha": 0.7},
    "alpha-0.8": {"smoothquant_alpha": 0.8},
    "alpha-0.9": {"smoothquant_alpha": 0.9},
    "alpha-1.0": {"smoothquant_alpha": 1.0},
    "rtn-weights": {"weight_rounding": "rtn"},
    "fallback-images-32+alpha-0.6": {"fallback_images": 32, "smoothquant_alpha": 0.6},
    "fallback-images-32+smooth-attn-out": {"fallback_images": 32, "smooth_attn_out": True},
    "fallback-images-32+alpha-0.6+smooth-attn-out": {"fallback_images": 32, "smoothquant_alpha": 0.6, "smooth_attn_out": True},
    # issue 13, build time: GPTQ against the float statistics' X^T X (no quantized-input pass), a search on fewer images
    "float-grams": {"compensate_activations": False},
    "fallback-images-8": {"fallback_images": 8},
    "float-grams+fallback-images-8": {"compensate_activations": False, "fallback_images": 8},
}


def ten_views(pre, path: Path) -> np.ndarray:
    """Corner and centre crops of the checkpoint's resize, and their mirror images: [10, C, H, W]."""
    full = dataclasses.replace(pre, crop=None)(load_rgb(path))
    ch, cw = pre.crop or pre.resize
    _, h, w = full.shape
    offsets = [(0, 0), (0, w - cw), (h - ch, 0), (h - ch, w - cw), ((h - ch) // 2, (w - cw) // 2)]
    crops = [full[:, y : y + ch, x : x + cw] for y, x in offsets]
    return np.stack(crops + [c[:, :, ::-1] for c in crops]).astype(np.float32)


def run(runner, x: np.ndarray) -> np.ndarray:
    return np.concatenate([runner.run(x[i : i + 32]) for i in range(0, len(x), 32)])


def metrics(ref: np.ndarray, out: np.ndarray) -> dict:
    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    lr, lo = log_softmax(ref.astype(np.float64)), log_softmax(out.astype(np.float64))
    cos = (ref * out).sum(-1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(out, axis=-1))
    return {
        "n": len(ref),
        "disagree": int((ref.argmax(-1) != out.argmax(-1)).sum()),
        "kl": float((np.exp(lr) * (lr - lo)).sum(-1).mean()),
        "cosine": float(cos.mean()),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--float32-engine", action="store_true", help="emulate a strongly typed engine (float layers in fp32) instead of the default --int8 --fp16 one")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tensorrt-recipe-cv.json"))
    args = ap.parse_args()
    shared = Path(args.shared)
    spec = ModelSpec.load(shared / "models" / "deit-tiny-patch16-224")
    files = list_images(shared / "imagenet-samples")
    calib = [f for i, f in enumerate(files) if i % 4 == 0]  # the calibration split of run_matrix.py; eval never read
    folds = [calib[0::2], calib[1::2]]
    centre = [np.stack([spec.preprocessing(load_rgb(f)) for f in fold]) for fold in folds]
    views = [np.concatenate([ten_views(spec.preprocessing, f) for f in fold]) for fold in folds]

    float16 = not args.float32_engine
    results: dict = {"protocol": __doc__.split("\n\n")[1], "float16_storage": float16, "variants": {}}
    previous = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {}
    if previous.get("float16_storage") == float16:  # runs add up: same protocol, rows keyed by name, each with its recipe
        results["variants"] = previous.get("variants", {})
    with tempfile.TemporaryDirectory() as tmp:
        ref = export_reference(spec, Path(tmp) / "ref", centre[0][:8])
        fp32 = EmulationRunner(ref.path)
        ref_out = [run(fp32, v) for v in views]
        for name in args.variants.split(","):
            recipe = Int8Recipe(**{**INT8_RECIPE, **VARIANTS[name]})
            plain = lambda d: {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}  # noqa: E731
            row = {"overrides": VARIANTS[name], "recipe": plain({**INT8_RECIPE, **VARIANTS[name]}), "folds": []}
            t0 = time.time()
            for k in (0, 1):
                cal = centre[k]
                model, summary = quantize_int8(ref.load(), lambda cal=cal: (cal[i : i + 16] for i in range(0, len(cal), 16)), recipe)
                path = Path(tmp) / f"{name}-{k}.onnx"
                save_onnx(model, path, {})
                kept = sorted(a["activation"] for a in summary["sensitivity_fallback"]["kept_float"])
                row["folds"].append({**metrics(ref_out[1 - k], run(EmulationRunner(path, float16=float16), views[1 - k])), "kept_float": kept})
            f = row["folds"]
            n = sum(x["n"] for x in f)
            row.update(
                agreement=round(100 * (1 - sum(x["disagree"] for x in f) / n), 2),
                disagree=sum(x["disagree"] for x in f),
                n=n,
                kl=round(float(np.mean([x["kl"] for x in f])), 5),
                cosine=round(float(np.mean([x["cosine"] for x in f])), 5),
                seconds=round(time.time() - t0, 1),
            )
            results["variants"][name] = row
            print(f"{name:22s} agreement {row['agreement']:6.2f}% ({row['disagree']}/{n} differ)  KL {row['kl']:.5f}  cosine {row['cosine']:.5f}  {row['seconds']:.0f} s", flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
