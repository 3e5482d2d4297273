"""Fingerprints of what the quantization recipes write, to check that a refactor changed no byte.

    PYTHONPATH=/path/to/checkout-a python benchmarks/recipe_bytes.py > a.txt
    PYTHONPATH=/path/to/checkout-b python benchmarks/recipe_bytes.py > b.txt
    diff a.txt b.txt        # nothing: both checkouts write the same models and summaries

A tiny random ViT (seeded, 32x32, as the tests build it) is exported once into --work, then quantized with int8
recipes that take every branch of the rewrite (default, TensorRT-like centred symmetric activations, mse + nearest
rounding, minmax + keep_float + SmoothQuant through V, per-tensor weights), each with its own float pass and with
the build's shared statistics, and with int4 (one-pass GPTQ, sequential GPTQ, RTN, keep_float + block 16). Each line:
the recipe, sha256 of the serialized model, sha256 of its JSON summary without timings. ~1 min on a shared 2-core host.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def _reference(work: Path) -> Path:
    path = work / "ref" / "model.onnx"
    if path.exists():
        return path
    import torch
    from transformers import ViTForImageClassification

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import TINY_LABELS, save_checkpoint, tiny_config
    from vitexport.export import export_reference
    from vitexport.model import ModelSpec

    torch.manual_seed(0)
    model = ViTForImageClassification(tiny_config(num_labels=4, id2label=TINY_LABELS, label2id={v: k for k, v in TINY_LABELS.items()})).eval()
    spec = ModelSpec.load(str(save_checkpoint(model, work / "tiny", 32)))
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    return export_reference(spec, work / "ref", x).path


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _summary_sha(summary: dict) -> str:
    def clean(o):
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items() if not k.endswith("_s")}
        return [clean(v) for v in o] if isinstance(o, list) else o

    return _sha(json.dumps(clean(summary), sort_keys=True, default=str).encode())


def main() -> None:
    import onnx

    from vitexport.quantization.calibration import collect_float_stats
    from vitexport.quantization.graph import find_linears
    from vitexport.quantization.int4 import Int4Recipe, quantize_int4
    from vitexport.quantization.int8 import Int8Recipe, quantize_int8

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/vitexport-recipe-bytes", help="folder for the tiny ViT and its ONNX (reused)")
    work = Path(ap.parse_args().work)
    # the reference is exported once: its bytes are the input, the same for both checkouts compared
    ref = onnx.load(str(_reference(work)))
    x = np.random.default_rng(1).standard_normal((24, 3, 32, 32)).astype(np.float32)
    batches = lambda: (x[i : i + 8] for i in range(0, len(x), 8))  # noqa: E731
    stats = collect_float_stats(ref, sorted({l.activation for l in find_linears(ref)}), batches, len(x))
    int8 = {
        "default": Int8Recipe(fallback_images=8),
        "tensorrt-like": Int8Recipe(symmetric_activations=True, center_activations=True, reduce_range=False, smoothquant_alpha=0.8, fallback_budget=0.2, fallback_images=8),
        "mse-rtn": Int8Recipe(calibration="mse", weight_rounding="rtn", fallback_budget=0.0),
        "minmax-nocomp-keep": Int8Recipe(calibration="minmax", compensate_activations=False, keep_float=("0:fc2",), smooth_attn_out=True, fallback_images=8),
        "per-tensor": Int8Recipe(per_channel=False, fallback_budget=0.0),
    }
    for name, recipe in int8.items():
        for shared, owned in ((None, False), (stats, False), (stats, True)):  # owned: a fresh copy, rewritten in place (the build's way)
            given = ref
            if owned:
                given = onnx.ModelProto()
                given.CopyFrom(ref)
            model, summary = quantize_int8(given, batches, recipe, stats=shared, owned=owned)
            print("int8", name, ("shared-stats" if shared else "own-pass") + (" owned" if owned else ""), _sha(model.SerializeToString()), _summary_sha(summary))
    int4 = {"gptq": Int4Recipe(), "sequential": Int4Recipe(sequential=True), "rtn": Int4Recipe(method="rtn"), "keep-block16": Int4Recipe(keep_float=("1",), block_sizes=(16,))}
    for name, recipe in int4.items():
        model, summary = quantize_int4(ref, batches if recipe.method == "gptq" else None, recipe, stats=stats if name == "gptq" else None)
        print("int4", name, _sha(model.SerializeToString()), _summary_sha(summary))


if __name__ == "__main__":
    main()
