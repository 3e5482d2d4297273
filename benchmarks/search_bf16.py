"""Could the int8 sensitivity search run its forwards in bf16? Speed and choices, measured on DeiT-tiny.

The search (quantization/fallback.py) is float32 arithmetic bound on ViT-Base (15 TFLOP per recipe, 1.07x this
host's float32 floor). On a CPU with AVX512-BF16 or AMX a bf16 GEMM runs several times faster, so the search's
forwards in bf16 would be the one change left that could halve it. This scores the search's 48 candidates of
DeiT-tiny (each linear input: LayerNorm 1 -> query/key/value, attention context -> output projection, LayerNorm 2
-> fc1, GELU -> fc2, one per block) the search's way (the mean over calibration images of KL(float || only this input
fake-quantized to 8 bits), the same quantizer in both modes: asymmetric per tensor over the 0.01-99.99th
percentiles of these images) twice, paired candidate by candidate:

- float32: every forward in float32 (what the search computes);
- bf16: every forward, the unquantized reference's too, under torch.autocast(bfloat16) (what a bf16 search would).

and replays int8.select_fallback at the ONNX Runtime/OpenVINO (0.1) and TensorRT (0.2) budgets on both. Only
calibration images are read (run_matrix.py's split); the HF model in torch, not the build's ONNX graph, so the
scores are this script's, not a build's.

    python benchmarks/search_bf16.py [--images 16] [--out benchmarks/results/search-bf16.json]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from run_matrix import shared_split  # noqa: E402

from vitexport.harness.host import cpu_features  # noqa: E402
from vitexport.quantization.divergence import kl_divergence  # noqa: E402
from vitexport.quantization.int8 import select_fallback  # noqa: E402

# module names in the block, as transformers 4.x (first) and 5.x name them
ROLES = {"attention.attention.query": "ln1", "attention.attention.key": "ln1", "attention.attention.value": "ln1",
         "attention.output.dense": "context", "intermediate.dense": "ln2", "output.dense": "gelu",
         "attention.q_proj": "ln1", "attention.k_proj": "ln1", "attention.v_proj": "ln1", "attention.o_proj": "context",
         "mlp.fc1": "ln2", "mlp.fc2": "gelu"}


def candidates(model: torch.nn.Module) -> dict[str, list[torch.nn.Linear]]:
    """{input name: the linears it feeds}, per block, in the search's order."""
    out: dict[str, list[torch.nn.Linear]] = {}
    for name, mod in model.named_modules():
        m = re.search(r"\.layers?\.(\d+)\.(.+)$", name)
        if isinstance(mod, torch.nn.Linear) and m and m.group(2) in ROLES:
            out.setdefault(f"{ROLES[m.group(2)]}_{m.group(1)}", []).append(mod)
    return out


def _capture(model, groups, x) -> dict[str, tuple[float, float]]:
    """Per candidate, the 0.01th and 99.99th percentiles of its float32 input over ``x``."""
    seen: dict[str, np.ndarray] = {}
    hooks = [ls[0].register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(n, a[0].detach().numpy().ravel())) for n, ls in groups.items()]
    with torch.no_grad():
        model(pixel_values=x)
    for h in hooks:
        h.remove()
    return {n: (float(np.percentile(v, 0.01)), float(np.percentile(v, 99.99))) for n, v in seen.items()}


def _fake_quant(lo: float, hi: float):
    scale = max(hi - lo, 1e-8) / 255.0
    zero = round(-lo / scale)
    return lambda t: (torch.clamp(torch.round(t.float() / scale) + zero, 0, 255) - zero).mul(scale).to(t.dtype)


def _logits(model, x, bf16: bool) -> np.ndarray:
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return model(pixel_values=x).logits.float().numpy()


def score(model, groups, ranges, x) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """({mode: {candidate: mean KL}}, {mode: seconds}), the two modes alternating candidate by candidate."""
    scores: dict[str, dict[str, float]] = {"float32": {}, "bf16": {}}
    seconds = {"float32": 0.0, "bf16": 0.0}
    refs = {m: _logits(model, x, m == "bf16") for m in scores}
    for name, linears in groups.items():
        q = _fake_quant(*ranges[name])
        hooks = [lin.register_forward_pre_hook(lambda m, a: (q(a[0]),)) for lin in linears]
        for mode in scores:
            t = time.perf_counter()
            out = _logits(model, x, mode == "bf16")
            seconds[mode] += time.perf_counter() - t
            scores[mode][name] = kl_divergence(refs[mode], out)  # the search's own score
        for h in hooks:
            h.remove()
    return scores, seconds


def gemm_speedup(rows: int, k: int, n: int, repeats: int = 20) -> float:
    """float32 / bf16 seconds of one [rows, k] @ [k, n] product on torch's threads (fc1's shape: what bf16 could give)."""
    secs = []
    for dt in (torch.float32, torch.bfloat16):
        a, b = torch.randn(rows, k, dtype=dt), torch.randn(k, n, dtype=dt)
        for _ in range(3):
            a @ b
        t = time.perf_counter()
        for _ in range(repeats):
            a @ b
        secs.append(time.perf_counter() - t)
    return secs[0] / secs[1]


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def study(model_dir: Path, calib: Path, images: int) -> dict:
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    torch.set_num_threads(2)
    model = AutoModelForImageClassification.from_pretrained(model_dir).eval()
    processor = AutoImageProcessor.from_pretrained(model_dir)
    files = sorted(calib.glob("*.JPEG"))[:images]
    x = processor([Image.open(f).convert("RGB") for f in files], return_tensors="pt")["pixel_values"]
    groups = candidates(model)
    if len(groups) != 4 * model.config.num_hidden_layers:
        raise SystemExit(f"found {len(groups)} linear inputs, expected 4 per block: module names this script does not know")
    ranges = _capture(model, groups, x)
    scores, seconds = score(model, groups, ranges, x)
    macs = {n: sum(lin.weight.numel() for lin in ls) for n, ls in groups.items()}
    names = list(groups)
    f32, b16 = (np.array([scores[m][n] for n in names]) for m in ("float32", "bf16"))
    ref_kl = kl_divergence(_logits(model, x, False), _logits(model, x, True))
    out = {"model": model_dir.name, "images": len(files), "candidates": len(names), "host_cpu": cpu_features(),
           "seconds": {m: round(s, 2) for m, s in seconds.items()}, "bf16_speedup": round(seconds["float32"] / seconds["bf16"], 2),
           "fc1_gemm_bf16_speedup": round(gemm_speedup(x.shape[0] * ((model.config.image_size // model.config.patch_size) ** 2 + 1), model.config.hidden_size, model.config.intermediate_size), 2),
           "kl_float32_vs_bf16_unquantized": round(ref_kl, 6),
           "score_float32_percentiles_10_50_90": [float(f"{v:.3g}") for v in np.percentile(f32, [10, 50, 90])],
           "bf16_over_float32_percentiles_10_50_90": [round(float(v), 3) for v in np.percentile(b16 / f32, [10, 50, 90])],
           "spearman": round(_spearman(f32, b16), 4), "budgets": []}
    for budget in (0.1, 0.2):
        a = select_fallback(scores["float32"], macs, budget)
        b = select_fallback(scores["bf16"], macs, budget)
        out["budgets"].append({"budget": budget, "kept_float32": sorted(a), "kept_bf16": sorted(b), "same_set": set(a) == set(b), "changed": sorted(set(a) ^ set(b))})
    out["scores"] = {n: {"float32": float(f"{scores['float32'][n]:.4g}"), "bf16": float(f"{scores['bf16'][n]:.4g}")} for n in names}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    ap.add_argument("--model", default=None, help="HF checkpoint folder (default: the shared DeiT-tiny)")
    ap.add_argument("--images", type=int, default=16, help="calibration images scored (the search's 16)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "search-bf16.json"))
    args = ap.parse_args()
    shared = Path(args.shared)
    model = Path(args.model) if args.model else shared / "models" / "deit-tiny-patch16-224"
    with tempfile.TemporaryDirectory() as tmp:
        calib, _ = shared_split(shared, Path(tmp) / "split")
        res = {"protocol": __doc__.split("\n\n")[1:3], **study(model, calib, args.images)}
    print(json.dumps({k: v for k, v in res.items() if k not in ("scores", "protocol")}, indent=1))
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
