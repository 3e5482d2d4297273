"""The cheaper calibration makes the same choices as the passes it replaced, on the real DeiT-tiny.

    python benchmarks/calibration_equivalence.py     # ~5 min CPU on 2 cores; writes benchmarks/results/calibration-equivalence.json

On the 125 calibration images of benchmarks/run_matrix.py's split (never the evaluation images), for the int8
recipes of ONNX Runtime, OpenVINO and TensorRT (same smoothing as each recipe):

- activation ranges: the histogram pass (``calibrate_ranges``, the old second pass) against the percentile read
  from the shared float statistics' tails (``percentile_range_from_tails``): how many of the ranges are identical;
- sensitivity search: one rewritten model and session per input, run in full (``sensitivity_scores_one_model_each``,
  the old search) against one gated session per block run from the block's input (``sensitivity_scores``): the KL
  of each input, the rank correlation, and whether the inputs left float are the same set; process CPU seconds of each.

    python benchmarks/calibration_equivalence.py --codes-vs 94b6c5c   # ~10 min CPU; writes results/codes-vs-94b6c5c.json

- GPTQ codes: the weight codes of ONNX Runtime int8, TensorRT int8 and int4 made by this tree and by another commit
  (e.g. 94b6c5c, the last one before the shared calibration), on the same reference ONNX and calibration images,
  each tree run in its own process: the fraction of codes that are identical.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run_matrix import shared_split  # noqa: E402


CODE_RECIPES = ("onnxruntime", "tensorrt", "int4")


def emit_codes(reference: str, images: str, out: str) -> None:
    """Weight codes of the int8 (ONNX Runtime, TensorRT) and int4 recipes of whichever vitexport is imported (this
    tree's or an older one's: only quantize_int8/quantize_int4's first three arguments are used)."""
    import onnx
    from onnx import numpy_helper

    from vitexport.backends.tensorrt import INT8_RECIPE
    from vitexport.quantization.int4 import Int4Recipe, quantize_int4
    from vitexport.quantization.int8 import Int8Recipe, quantize_int8

    x = np.load(images)
    batches = lambda: (x[i : i + 16] for i in range(0, len(x), 16))  # noqa: E731  (the build's batches)
    model = onnx.load(reference)
    codes = {}
    for name in CODE_RECIPES:
        if name == "int4":
            q, _ = quantize_int4(model, batches, Int4Recipe())
            keep = [t for t in q.graph.initializer if t.data_type == onnx.TensorProto.UINT8]
        else:
            q, _ = quantize_int8(model, batches, Int8Recipe() if name == "onnxruntime" else Int8Recipe(**INT8_RECIPE))
            keep = [t for t in q.graph.initializer if t.name.endswith("weight_quantized")]
        for t in keep:
            a = numpy_helper.to_array(t)
            codes[f"{name}/{t.name}"] = np.concatenate([a & 15, a >> 4]) if a.dtype == np.uint8 else a  # int4: both nibbles
    np.savez(out, **codes)


def codes_vs(rev: str, work: Path, reference: str, images: str) -> dict:
    """Run emit_codes in this tree and in ``rev`` (git archive into ``work``), each in its own process."""
    import subprocess
    import tarfile
    import io

    repo = HERE.parent
    old = work / f"tree-{rev}"
    if not old.exists():
        tar = subprocess.run(["git", "-C", str(repo), "archive", rev], check=True, capture_output=True).stdout
        tarfile.open(fileobj=io.BytesIO(tar)).extractall(old)
    files = {}
    for label, root in (("this tree", repo), (rev, old)):
        out = work / f"codes-{label.replace(' ', '-')}.npz"
        env = {**__import__("os").environ, "PYTHONPATH": str(root)}
        subprocess.run([sys.executable, __file__, "--emit-codes", str(out), "--reference", reference, "--images", images], check=True, env=env)
        files[label] = np.load(out)
    a, b = files["this tree"], files[rev]
    result = {"against": rev, "command": f"python benchmarks/calibration_equivalence.py --codes-vs {rev}", "recipes": {}}
    for name in CODE_RECIPES:
        keys = sorted(k for k in a.files if k.startswith(name + "/"))
        same = sum(int((a[k] == b[k]).sum()) for k in keys if k in b.files and a[k].shape == b[k].shape)
        total = sum(a[k].size for k in keys)
        result["recipes"][name] = {"codes": total, "identical": same, "identical_fraction": round(same / max(total, 1), 6), "tensors_missing_in_other": sum(k not in b.files for k in keys)}
        print(name, result["recipes"][name], flush=True)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=str(HERE.parent.parent / "shared"))
    ap.add_argument("--work", default=str(HERE / "out" / "equivalence"))
    ap.add_argument("--out", default=str(HERE / "results" / "calibration-equivalence.json"))
    ap.add_argument("--codes-vs", metavar="REV", help="compare GPTQ codes with another commit's (e.g. 94b6c5c) instead")
    ap.add_argument("--emit-codes", help=argparse.SUPPRESS)
    ap.add_argument("--reference", help=argparse.SUPPRESS)
    ap.add_argument("--images", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.emit_codes:  # the child process of --codes-vs
        emit_codes(args.reference, args.images, args.emit_codes)
        return 0
    import onnx

    from vitexport.backends.openvino import INT8_DEFAULTS
    from vitexport.backends.tensorrt import INT8_RECIPE
    from vitexport.data import ImageSet
    from vitexport.export import export_reference
    from vitexport.model import ModelSpec
    from vitexport.quantization.calibration import collect_float_stats, percentile_range_from_tails
    from vitexport.quantization.graph import find_linears
    from vitexport.quantization.int8 import (
        Int8Recipe, _channel_stats, _outlier_ratio, apply_smoothing, calibrate_ranges, compute_smooth_scales, find_smooth_groups,
        select_fallback_model, select_linears, sensitivity_scores, sensitivity_scores_one_model_each,
    )

    shared, work = Path(args.shared), Path(args.work)
    split = work / "split"
    calib, _ = (split / "calib", split / "eval") if split.exists() else shared_split(shared, split)
    spec = ModelSpec.load(str(shared / "models" / "deit-tiny-patch16-224"))
    images = ImageSet.from_folder(str(calib), spec.preprocessing, spec.id2label)
    x = np.stack([images.load(i) for i in range(len(images))])
    batches = lambda: (x[i : i + 16] for i in range(0, len(x), 16))  # noqa: E731
    ref = export_reference(spec, work / "reference", x[:8])
    if args.codes_vs:
        np.save(work / "calibration.npy", x)
        result = codes_vs(args.codes_vs, work, str(ref.path), str(work / "calibration.npy"))
        target = Path(args.out).with_name(f"codes-vs-{args.codes_vs}.json")
        target.write_text(json.dumps({"model": "DeiT-tiny", "calibration_images": len(x), **result}, indent=2) + "\n")
        return 0
    model = ref.load()
    acts = sorted({l.activation for l in find_linears(model) if l.role in ("qkv", "attn_out", "fc1", "fc2")})
    stats = collect_float_stats(model, acts, batches, len(x), gram=False)
    recipes = {
        "onnxruntime": Int8Recipe(),
        "openvino": Int8Recipe(**INT8_DEFAULTS["recipe"]),
        "tensorrt": Int8Recipe(**{k: tuple(v) if isinstance(v, list) else v for k, v in INT8_RECIPE.items()}),
    }
    out: dict = {"model": "DeiT-tiny", "calibration_images": len(x), "command": "python benchmarks/calibration_equivalence.py", "recipes": {}}
    for name, recipe in recipes.items():
        work_model = onnx.ModelProto()
        work_model.CopyFrom(model)
        chosen, _ = select_linears(find_linears(work_model), recipe)
        qacts = list(dict.fromkeys(l.activation for l in chosen))
        absmax = stats.absmax()
        groups = [g for g in find_smooth_groups(work_model, chosen, recipe) if _outlier_ratio(absmax[g.activation]) >= recipe.smooth_outlier_ratio]
        compute_smooth_scales(work_model, groups, absmax, recipe.smoothquant_alpha)
        apply_smoothing(work_model, groups)
        chosen, _ = select_linears(find_linears(work_model), recipe)
        scales = {g.activation: g.scales for g in groups}
        hist = calibrate_ranges(work_model, qacts, batches, recipe, _channel_stats(stats, qacts), scales)
        tails = {a: percentile_range_from_tails(stats, a, recipe.percentile, recipe.histogram_bins, scales.get(a)) for a in qacts}
        same = sum(tails[a] is not None and np.allclose(tails[a], hist[a], rtol=0, atol=0) for a in qacts)
        c0 = time.process_time()
        old = sensitivity_scores_one_model_each(work_model, chosen, hist, recipe, batches)
        c1 = time.process_time()
        new = sensitivity_scores(work_model, chosen, hist, recipe, batches)
        c2 = time.process_time()
        ks = list(old)
        ro, rn = np.argsort(np.argsort([old[k] for k in ks])), np.argsort(np.argsort([new[k] for k in ks]))
        kept_old = [k["activation"] for k in select_fallback_model(work_model, chosen, old, recipe.fallback_budget)]
        kept_new = [k["activation"] for k in select_fallback_model(work_model, chosen, new, recipe.fallback_budget)]
        out["recipes"][name] = {
            "ranges_identical": f"{same} of {len(qacts)}",
            "max_range_difference": max(float(np.max(np.abs(np.subtract(tails[a], hist[a])))) for a in qacts if tails[a] is not None),
            "fallback_kept_float_old": kept_old,
            "fallback_kept_float_new": kept_new,
            "fallback_same_set": sorted(kept_old) == sorted(kept_new),
            "kl_rank_correlation": float(np.corrcoef(ro, rn)[0, 1]),
            "kl_max_relative_difference": max(abs(new[k] - old[k]) / max(old[k], 1e-12) for k in ks),
            "search_cpu_s_old": round(c1 - c0, 1),
            "search_cpu_s_new": round(c2 - c1, 1),
            "kl": {k: [round(old[k], 7), round(new[k], 7)] for k in ks},
        }
        print(name, {k: v for k, v in out["recipes"][name].items() if k != "kl"}, flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
