"""Could the int8 sensitivity search score on fewer images and keep the same choices? Measured on DeiT-tiny.

The search (quantization/fallback.py) scores every quantized input by the mean KL from float over 16 calibration
images, then keeps the inputs with the most KL per multiply-accumulate float within the recipe's budget. On ViT-Base
it is compute-bound (about 100 s per recipe on 2 cores). This records, during a real build of the ONNX Runtime,
TensorRT and OpenVINO int8 recipes on the 125 calibration images of run_matrix.py's split (the evaluation split is
never read), each candidate's KL on each of the 16 images, and replays the selection:

- on the first m images only (m = 2, 4, 8): is the chosen set the same as with 16?
- two-stage: score on m images, drop the candidates whose ratio is below 1/f of the m-image selection's boundary,
  score the rest on all 16: same set, and how many candidates were dropped (the saving)?

    python benchmarks/search_images.py [--out benchmarks/results/search-images.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from run_matrix import shared_split  # noqa: E402

from vitexport import api  # noqa: E402
from vitexport.quantization import fallback, int8  # noqa: E402
from vitexport.quantization.divergence import kl_per_row  # noqa: E402
from vitexport.quantization.graph import GraphIndex  # noqa: E402


def _select(scores: dict, macs: dict, budget: float) -> set:
    return set(int8.select_fallback(scores, macs, budget))


def record(shared: Path, work: Path) -> list[dict]:
    """Run the three int8 recipes once; per selection: budget, MACs and each candidate's per-image KLs."""
    per_image: list[dict[str, np.ndarray]] = []
    selections: list[dict] = []
    real_kl, real_select, real_score = fallback._kl, int8.select_fallback_model, fallback.score_candidates
    rows: list[np.ndarray] = []

    def kl(ref, out):
        rows.append(kl_per_row(ref, out))
        return real_kl(ref, out)

    def score(model, x, groups, *a, **k):
        rows.clear()
        res = real_score(model, x, groups, *a, **k)
        per_image.append(dict(zip(res, rows)))  # scored in the order of the returned dict
        return res

    def select(model, chosen, scores, budget):
        idx, groups = GraphIndex(model), int8._fallback_groups(chosen)
        macs = {a: sum(int(np.prod(idx.const_shape(l.node.input[1]) or ())) for l in ls) for a, ls in groups.items()}
        # the search this selection ranks (OpenVINO's reuses ONNX Runtime's, TensorRT's has the same input names)
        per = next(p for p in per_image if set(p) == set(scores) and all(abs(p[a].mean() - scores[a]) <= 1e-6 * abs(scores[a]) + 1e-15 for a in p))
        kept = real_select(model, chosen, scores, budget)
        selections.append({"budget": budget, "macs": macs, "per_image": per, "kept": sorted(k["activation"] for k in kept)})
        return kept

    fallback._kl, int8.select_fallback_model, fallback.score_candidates = kl, select, score
    try:
        calib, evals = shared_split(shared, work / "split")
        opts = api.BuildOptions(model=str(shared / "models" / "deit-tiny-patch16-224"), backend=["onnxruntime", "tensorrt", "openvino"], precisions=["int8"],
                                calib=str(calib), eval=str(evals), num_eval=8, out=str(work / "build"), force=True, latency=False)
        api.build(opts)
    finally:
        fallback._kl, int8.select_fallback_model, fallback.score_candidates = real_kl, real_select, real_score
    return selections


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "search-images.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        selections = record(Path(args.shared), Path(tmp))
    results = {"protocol": __doc__.split("\n\n")[1], "recipes": []}
    for s, name in zip(selections, ["onnxruntime", "tensorrt", "openvino"]):
        acts = list(s["per_image"])
        p = np.array([s["per_image"][a] for a in acts])
        full = dict(zip(acts, p.mean(1)))
        kept = _select(full, s["macs"], s["budget"])
        assert kept == set(s["kept"]), "replayed selection differs from the build's"
        boundary = min(full[a] / s["macs"][a] for a in kept)
        row = {"recipe": name, "budget": s["budget"], "candidates": len(acts), "kept": len(kept), "images": int(p.shape[1]), "subsets": []}
        for m in (2, 4, 8):
            coarse = dict(zip(acts, p[:, :m].mean(1)))
            kc = _select(coarse, s["macs"], s["budget"])
            bc = min(coarse[a] / s["macs"][a] for a in kc)
            two = []
            for f in (2, 4, 8):
                dropped = [a for a in acts if coarse[a] / s["macs"][a] < bc / f]
                mixed = {a: coarse[a] if a in dropped else full[a] for a in acts}
                two.append({"f": f, "dropped": len(dropped), "same_set": _select(mixed, s["macs"], s["budget"]) == kept,
                            "closest_dropped_to_boundary": round(max((full[a] / s["macs"][a] for a in dropped), default=0.0) / boundary, 3)})
            row["subsets"].append({"images": m, "same_set": kc == kept, "changed": sorted(kc ^ kept), "two_stage": two})
        results["recipes"].append(row)
        print(json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
