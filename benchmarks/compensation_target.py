"""Which GPTQ compensation target the int8 recipes keep, chosen on held-out calibration images only.

The int8 recipes correct each weight for its input's quantization error: W' = W + (Q^T Q)^-1 Q^T (X - Q) W. The
calibration pass used to keep Q^T X ([K, K]) and form Q^T X - Q^T Q afterwards; for a layer narrower than its input
(fc2: 3072 -> 768 on ViT-Base) it now keeps Q^T (X - Q) W ([K, N]) directly: a quarter of the memory, half the
multiply-adds, and no cancellation between two float32 sums. Both are the same quantity in exact arithmetic; they
round differently, and GPTQ turns that into a few different codes. This compares them on DeiT-tiny:

- the 125 calibration images of run_matrix.py's split (every fourth file; the evaluation split is never read), two
  thirds fit the recipe, the other third (41 images) is held out;
- each variant is scored against the fp32 reference on the held-out images: mean KL, logit cosine, agreement.

    python benchmarks/compensation_target.py [--out benchmarks/results/compensation-target.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vitexport.backends.tensorrt import INT8_RECIPE  # noqa: E402
from vitexport.data import list_images, load_rgb  # noqa: E402
from vitexport.export import export_reference  # noqa: E402
from vitexport.model import ModelSpec  # noqa: E402
from vitexport.ort_session import ort_session  # noqa: E402
from vitexport.quantization import int8  # noqa: E402

RECIPES = {"onnxruntime": int8.Int8Recipe(), "tensorrt": int8.Int8Recipe(**INT8_RECIPE)}


def run(model, x: np.ndarray) -> np.ndarray:
    sess = ort_session(model, user_model=False)
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i : i + 16]})[0] for i in range(0, len(x), 16)])


def metrics(ref: np.ndarray, out: np.ndarray) -> dict:
    def logp(z):
        z = z - z.max(1, keepdims=True)
        return z - np.log(np.exp(z).sum(1, keepdims=True))

    lr, lo = logp(ref), logp(out)
    cos = (ref * out).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(out, axis=1)
    return {"kl": round(float((np.exp(lr) * (lr - lo)).sum(1).mean()), 6), "cosine_mean": round(float(cos.mean()), 5),
            "cosine_min": round(float(cos.min()), 4), "agree": int((ref.argmax(1) == out.argmax(1)).sum()), "n": len(ref)}


def held_out_split(shared: str) -> tuple[ModelSpec, np.ndarray, np.ndarray]:
    """(DeiT-tiny's spec, fit images, held-out images): run_matrix.py's 125 calibration images (every fourth file,
    never the evaluation split), preprocessed, two thirds to fit and every third one held out."""
    spec = ModelSpec.load(Path(shared) / "models" / "deit-tiny-patch16-224")
    calib = [f for i, f in enumerate(list_images(Path(shared) / "imagenet-samples")) if i % 4 == 0]
    x = np.stack([spec.preprocessing(load_rgb(f)) for f in calib]).astype(np.float32)
    return spec, x[[i for i in range(len(x)) if i % 3 != 2]], x[[i for i in range(len(x)) if i % 3 == 2]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "compensation-target.json"))
    args = ap.parse_args()
    spec, fit, held = held_out_split(args.shared)
    batches = lambda: (fit[i : i + 16] for i in range(0, len(fit), 16))  # noqa: E731
    results: dict = {"protocol": __doc__.split("\n\n")[2], "fit_images": len(fit), "held_out_images": len(held), "rows": {}}
    with tempfile.TemporaryDirectory() as tmp:
        ref = export_reference(spec, Path(tmp) / "ref", fit[:8])
        ref_out = run(str(ref.path), held)
        for rname, recipe in RECIPES.items():
            for target in ("Q^T X", "Q^T (X - Q) W"):
                old = target == "Q^T X"  # no layer takes the narrow path: every target is Q^T X, as before
                with mock.patch.object(int8, "_compensation_right", (lambda *a, **k: {}) if old else int8._compensation_right):
                    model, _ = int8.quantize_int8(ref.load(), batches, recipe)
                row = metrics(ref_out, run(model, held))
                results["rows"][f"{rname}: {target}"] = row
                print(f"{rname:12s} {target:14s} {row}", flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
