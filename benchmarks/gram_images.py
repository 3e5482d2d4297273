"""How many calibration images the int8 recipes' quantized-input Gram matrices need, chosen on held-out images.

The int8 recipes run one pass per recipe over the calibration images to collect Q(X)^T Q(X) (GPTQ's Hessian) and
the compensation target, after the float pass that fixes the ranges; on ViT-Base at 256 images each such pass costs
about three minutes on a 2-core host. This measures what fewer images for that pass cost in fidelity, on DeiT-tiny:

- the 125 calibration images of run_matrix.py's split (every fourth file; the evaluation split is never read), two
  thirds fit the recipe (ranges, search and float statistics always from all of them), the other third (41 images)
  is held out;
- the Gram pass sees all fit images, or a subset (every 2nd / every 4th image, at several offsets, to see the spread
  that the choice of subset alone causes);
- each variant is scored against the fp32 reference on the held-out images: mean KL, logit cosine, agreement.

    python benchmarks/gram_images.py [--out benchmarks/results/gram-images.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from unittest import mock


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from compensation_target import RECIPES, held_out_split, metrics, run  # noqa: E402

from vitexport.export import export_reference  # noqa: E402
from vitexport.quantization import int8  # noqa: E402
from vitexport.quantization.calibration import collect_float_stats  # noqa: E402
from vitexport.quantization.graph import find_linears  # noqa: E402

SUBSETS = {"all": (1, 0), "1/2 (even)": (2, 0), "1/2 (odd)": (2, 1), "1/4 (0)": (4, 0), "1/4 (1)": (4, 1), "1/4 (2)": (4, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gram-images.json"))
    args = ap.parse_args()
    spec, fit, held = held_out_split(args.shared)
    batches = lambda: (fit[i : i + 16] for i in range(0, len(fit), 16))  # noqa: E731
    results: dict = {"protocol": __doc__.split("\n\n")[2], "fit_images": len(fit), "held_out_images": len(held), "rows": {}}
    real = int8._gptq_inputs
    with tempfile.TemporaryDirectory() as tmp:
        ref = export_reference(spec, Path(tmp) / "ref", fit[:8])
        ref_out = run(str(ref.path), held)
        model = ref.load()
        acts = list(dict.fromkeys(l.activation for l in find_linears(model)))
        stats = collect_float_stats(model, acts, batches, len(fit))
        for rname, recipe in RECIPES.items():
            for sname, (step, offset) in SUBSETS.items():
                sub = fit[offset::step]
                gram_batches = lambda sub=sub: (sub[i : i + 16] for i in range(0, len(sub), 16))  # noqa: E731

                def gptq_inputs(work, chosen, ranges, recipe, batches, memo, images, stages, progress, gb=gram_batches):
                    return real(work, chosen, ranges, recipe, gb, memo, images, stages, progress)

                with mock.patch.object(int8, "_gptq_inputs", gptq_inputs):
                    qmodel, _ = int8.quantize_int8(ref.load(), batches, recipe, stats=stats)
                row = {**metrics(ref_out, run(qmodel, held)), "gram_images": len(sub)}
                results["rows"][f"{rname}: {sname}"] = row
                print(f"{rname:12s} {sname:12s} {row}", flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
