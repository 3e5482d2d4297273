"""Could gradients predict the int8 sensitivity search's scores instead of its tail forwards? Measured on DeiT-tiny.

The search (quantization/fallback.py) scores each quantized input by the KL of the logits from float when that
input alone is quantized, running the network from the input's block to the logits on 16 calibration images: the
floating-point work of a whole forward per candidate and image, about half of it on average (compute_floor.py puts
ViT-Base's two searches at 15 TFLOP each). A second-order predictor needs no forward per candidate: for a small
change dz of the logits, KL(p || softmax(z + dz)) ~ 1/2 dz^T (diag(p) - p p^T) dz, and dz ~ sum over the input's
linears l of <dL/do_l, dO_l>, where dO_l = Q(X) W_q - X W is the change of linear l's output (the candidate's own
activation quantizer and rounded weights, exactly as the search applies them) and dL/do_l is the gradient of the
logits at l's output. With v ~ N(0, diag(p) - p p^T) per image (v = sqrt(p) xi - p (sqrt(p) . xi), xi ~ N(0, I)),
one backward of v . z gives <v, dz> for every candidate at once, so KL ~ 1/2 E_v[(sum_l <g_l, dO_l>)^2] over
``--samples`` draws per image: a few backward passes shared by every candidate and both recipes.

This records, during a real build of the OpenVINO and TensorRT int8 recipes on the 125 calibration images of
run_matrix.py's split, each search's inputs and scores (the selection never reads the evaluation split), predicts
every score from the PyTorch model's gradients (the working ONNX is smoothed, but the linears' outputs are the
same functions; matched by their biases), and reports: rank correlation, the predicted / measured ratio, whether
the predicted scores keep the same inputs float, and a screened search (measure only the top n by predicted KL per
MAC, keep the prediction for the rest): the smallest n that keeps the same set.

    python benchmarks/search_predictor.py [--samples 16] [--out benchmarks/results]   # ~3 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from run_matrix import shared_split  # noqa: E402

from vitexport import api  # noqa: E402
from vitexport.quantization import fallback, int8  # noqa: E402
from vitexport.quantization.calibration import stream_activations  # noqa: E402
from vitexport.quantization.graph import GraphIndex  # noqa: E402

BUDGETS = ((0.2, 3e-5), (0.2, 0.0), (0.1, 0.0))  # OpenVINO's default (budget, min_kl), TensorRT's, a tighter one


def record(shared: Path, work: Path) -> list[dict]:
    """Build the OpenVINO and TensorRT int8 recipes; per search: its model, images, candidates and measured scores."""
    searches, real = [], fallback.score_candidates

    def spy(model, x, groups, act_qdq, weight_codes, *a, **k):
        t0 = time.perf_counter()
        scores = real(model, x, groups, act_qdq, weight_codes, *a, **k)
        idx = GraphIndex(model)
        cands = {act: {"qdq": act_qdq(act), "linears": [(l, idx.const_array(l.node.input[1]), idx.const_array(l.bias) if l.bias else None, weight_codes(l, idx.const_array(l.node.input[1]))) for l in ls]}
                 for act, ls in groups.items()}
        searches.append({"model": model, "x": np.array(x), "cands": cands, "scores": dict(scores), "seconds": time.perf_counter() - t0})
        return scores

    fallback.score_candidates = spy
    try:
        calib, evals = shared_split(shared, work / "split")
        opts = api.BuildOptions(model=str(shared / "models" / "deit-tiny-patch16-224"), backend=["openvino", "tensorrt"], precisions=["int8"],
                                calib=str(calib), eval=str(evals), num_eval=8, out=str(work / "build"), force=True, latency=False)
        api.build(opts)
    finally:
        fallback.score_candidates = real
    return searches


def _bias_key(bias: np.ndarray) -> tuple:
    """A linear's bias, the same in the PyTorch model and the search's working ONNX (smoothing scales weights only)."""
    return tuple(np.round(np.asarray(bias, np.float64)[:8], 6))


def output_changes(search: dict, modules: dict) -> dict[str, list[tuple[str, np.ndarray]]]:
    """candidate -> [(torch module name, the change of its output on the search images when the candidate is quantized)]."""
    import torch

    x, cands = search["x"], search["cands"]
    acts: dict[str, list[np.ndarray]] = {}
    stream_activations(search["model"], list(cands), lambda: iter([x[i : i + 8] for i in range(0, len(x), 8)]), lambda n, a: acts.setdefault(n, []).append(np.array(a)))
    changes = {}
    for act, c in cands.items():
        xa = np.concatenate(acts[act])
        xq = int8.static_qdq(xa, *c["qdq"])
        out = []
        for l, w, bias, wq in c["linears"]:
            w, wq = (w.T, wq.T) if l.trans_b else (w, wq)
            out.append((modules[_bias_key(bias)], torch.from_numpy(xq @ wq - xa @ w).double()))
        changes[act] = out
    return changes


def predict(model, x: np.ndarray, changes: dict, samples: int) -> dict[str, float]:
    """1/2 E_v[(sum_l <dz/do_l . v, dO_l>)^2] per candidate, v ~ N(0, diag(p) - p p^T), ``samples`` draws per image."""
    import torch

    wanted = {n for out in changes.values() for n, _ in out}
    outputs, hooks = {}, []
    def keep(name):
        def hook(module, inputs, out):  # returns None: the output stays as it is
            out.retain_grad()
            outputs[name] = out

        return hook

    for name, m in model.named_modules():
        if name in wanted:
            hooks.append(m.register_forward_hook(keep(name)))
    try:
        z = model(pixel_values=torch.from_numpy(x)).logits
        p = torch.softmax(z.double(), -1).detach()
        sq = {act: torch.zeros(len(x), dtype=torch.float64) for act in changes}
        gen = torch.Generator().manual_seed(0)
        for _ in range(samples):
            xi, sp = torch.randn(p.shape, generator=gen, dtype=torch.float64), p.sqrt()
            v = sp * xi - p * (sp * xi).sum(-1, keepdim=True)
            for o in outputs.values():
                o.grad = None
            (z * v.float()).sum().backward(retain_graph=True)
            for act, out in changes.items():
                sq[act] += sum((outputs[n].grad.double() * d).flatten(1).sum(1) for n, d in out) ** 2
    finally:
        for h in hooks:
            h.remove()
    return {act: float(0.5 * (s / samples).mean()) for act, s in sq.items()}


def compare(measured: dict, predicted: dict, macs: dict) -> dict:
    from scipy.stats import spearmanr

    acts = list(measured)
    m, p = np.array([measured[a] for a in acts]), np.array([predicted[a] for a in acts])
    order = sorted(acts, key=lambda a: -predicted[a] / macs[a])
    res = {"candidates": len(acts), "spearman": round(float(spearmanr(m, p).correlation), 3),
           "predicted_over_measured_p10_p50_p90": [round(float(np.percentile(p / m, q)), 3) for q in (10, 50, 90)], "selections": []}
    for budget, min_kl in BUDGETS:
        kept = set(int8.select_fallback(measured, macs, budget, min_kl))
        guess = set(int8.select_fallback(predicted, macs, budget, min_kl))
        screen = next(n for n in range(1, len(acts) + 1)
                      if set(int8.select_fallback({a: measured[a] if a in order[:n] else predicted[a] for a in acts}, macs, budget, min_kl)) == kept)
        res["selections"].append({"budget": budget, "min_kl": min_kl, "kept": len(kept), "predicted_kept": len(guess), "same_set": guess == kept,
                                  "differ": len(kept ^ guess), "worst_predicted_rank_of_a_kept_input": max((order.index(a) + 1 for a in kept), default=0),
                                  "smallest_screen_with_the_same_set": screen})
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    ap.add_argument("--samples", type=int, default=16, help="draws of v per image")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    from transformers import ViTForImageClassification

    with tempfile.TemporaryDirectory() as tmp:
        searches = record(Path(args.shared), Path(tmp))
    model = ViTForImageClassification.from_pretrained(str(Path(args.shared) / "models" / "deit-tiny-patch16-224")).eval()
    import torch

    modules = {_bias_key(m.bias.detach().numpy()): n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    results = {"protocol": __doc__.split("\n\n")[1], "command": "python " + " ".join(["benchmarks/search_predictor.py", *sys.argv[1:]]), "samples": args.samples, "searches": []}
    for recipe, s in zip(("openvino", "tensorrt"), searches):
        t0 = time.perf_counter()
        predicted = predict(model, s["x"], output_changes(s, modules), args.samples)
        macs = {a: sum(int(w.size) for _, w, _, _ in c["linears"]) for a, c in s["cands"].items()}
        row = {"recipe": recipe, "search_seconds": round(s["seconds"], 1), "predictor_seconds": round(time.perf_counter() - t0, 1), **compare(s["scores"], predicted, macs)}
        results["searches"].append(row)
        print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "search-predictor.json").write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
