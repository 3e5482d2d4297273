"""ONNX Runtime int8: how the linears the sensitivity search keeps out of static int8 should run, chosen on held-out
CALIBRATION images only (never the evaluation split); issue 13.

    python benchmarks/onnxruntime_int8_choice.py                 # ~6 min on 2 shared cores
    python benchmarks/onnxruntime_int8_choice.py --repeats 5     # more interleaved timing runs
    python benchmarks/onnxruntime_int8_choice.py --only "static (float fallback, budget 0.1)" "dynamic activations (default: budget 0, GPTQ on float X^T X)"

Round 1 (static activations, the fallback as float or blockwise int8) is benchmarks/results/onnxruntime-int8-choice-round1.md;
round 2 (dynamic activations) onnxruntime-int8-choice.md. Every row is evaluated one image per run (batch 1).

The same split as benchmarks/openvino_int8_choice.py: of the 125 calibration images of benchmarks/run_matrix.py's
split, 84 fit every candidate (ranges, SmoothQuant, GPTQ, fallback search) and onnxruntime's stock dynamic int8 is
built beside them; the other 41 (every third) are held out to choose on. Each candidate is an
``[options.onnxruntime.int8]`` table; reported against the fp32 reference's logits on the held-out images: top-1
agreement, cosine, KL(fp32 || int8) in nats, and batch-1 latency at 2 threads relative to the stock dynamic int8,
interleaved (``harness.latency.compare``), per repeat (shared host: compare the ratios, not the times).
DeiT-tiny's fallback linears are small (10 % of the MACs, a fifth of a float row's time at most), so its latency
ratios move little; benchmarks/int8_latency.py times the chosen settings on the ViT-Base config too.
Writes benchmarks/results/onnxruntime-int8-choice.json and .md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from vitexport import backends as B  # noqa: E402
from vitexport.backends.onnxruntime import INT8_SETTINGS, OnnxRuntimeBackend  # noqa: E402
from vitexport.harness.report import cpu_name  # noqa: E402

from litert_choice import images  # noqa: E402  the same 84 fit / 41 held-out split of the calibration images
from openvino_int8_choice import held_out_rows  # noqa: E402

CANDIDATES: dict[str, dict] = {
    "static (float fallback, budget 0.1)": {"activations": "static"},
    "static, blockwise int8 fallback, block 32": {"activations": "static", "fallback_kernel": "blockwise_int8"},
    "static, blockwise int8 fallback, block 64": {"activations": "static", "fallback_kernel": "blockwise_int8", "fallback_block_size": 64},
    "static, blockwise int8 fallback, budget 0.2": {"activations": "static", "fallback_kernel": "blockwise_int8", "recipe": {"fallback_budget": 0.2}},
    "static, float fallback, budget 0.05": {"activations": "static", "recipe": {"fallback_budget": 0.05}},
    "static, no fallback (budget 0)": {"activations": "static", "recipe": {"fallback_budget": 0.0}},
    "dynamic activations (default: budget 0, GPTQ on float X^T X)": {"activations": "dynamic"},
    "dynamic activations, GPTQ compensating static ranges": {"activations": "dynamic", "recipe": {"compensate_activations": True}},
    "dynamic activations, float fallback 0.1": {"activations": "dynamic", "recipe": {"fallback_budget": 0.1, "compensate_activations": True}},
    "dynamic activations, float fallback 0.05": {"activations": "dynamic", "recipe": {"fallback_budget": 0.05, "compensate_activations": True}},
}


def build_all(spec, fit, work: Path, names: list[str], threads: int) -> tuple[dict, dict]:
    """fp32, onnxruntime's stock dynamic int8 and every candidate, all calibrated on ``fit``."""
    from run_matrix import stock_dynamic

    from vitexport.export import export_reference

    ref = export_reference(spec, work / "ref", fit[:8], opset=18, module=spec.load_torch())
    cal = B.Calibration(batches=lambda: (fit[i : i + 16] for i in range(0, len(fit), 16)), count=len(fit), source="fit")
    be = OnnxRuntimeBackend()
    arts = {"fp32": be.build(ref, None, "fp32", {}, work / "fp32"), "stock dynamic": stock_dynamic(ref, cal, work)}
    for name in names:
        t = time.time()
        arts[name] = be.build(ref, cal, "int8", {"onnxruntime": {"int8": CANDIDATES[name]}}, work / f"c{len(arts)}")
        print(f"built {name} in {time.time() - t:.0f} s", file=sys.stderr)
    return {n: be.runner(a, threads) for n, a in arts.items()}, {n: a.manifest.get("recipe", {}) for n, a in arts.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=str(HERE.parent.parent / "shared"))
    ap.add_argument("--work", default="/tmp/vitexport-ort-int8-choice")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--only", nargs="*", help="candidate names (default: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=1.0)
    args = ap.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    spec, fit, held = images(Path(args.shared), work)
    names = args.only or list(CANDIDATES)
    runners, recipes = build_all(spec, fit, work, names, args.threads)
    rows = held_out_rows(runners, recipes, held, "stock dynamic", "stock", "fallback_mac_fraction", args)
    for n, row in rows.items():
        row["settings"] = CANDIDATES.get(n, "onnxruntime.quantization.quantize_dynamic, int8 weights")
    result = {"command": "python " + " ".join(["benchmarks/onnxruntime_int8_choice.py", *sys.argv[1:]]), "fit_images": len(fit), "held_out_images": len(held),
              "threads": args.threads, "defaults": INT8_SETTINGS, "host": cpu_name(), "rows": rows,
              "note": "held-out calibration images only; latency interleaved on a shared host: compare ratios"}
    out = Path(args.out)
    (out / "onnxruntime-int8-choice.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out / "onnxruntime-int8-choice.md").write_text(markdown(result))
    print((out / "onnxruntime-int8-choice.md").read_text())
    return 0


def markdown(result: dict) -> str:
    lines = [f"Produced by `{result['command']}`: {result['fit_images']} calibration images fit every candidate, {result['held_out_images']} held-out calibration images "
             "choose (never the evaluation split). DeiT-tiny, onnxruntime CPU, batch 1, "
             f"{result['threads']} threads; latency / stock dynamic int8 per interleaved run (shared host: ratios only).", "",
             "| candidate | fallback MACs | agreement % (disagree) | cosine | KL nats | latency / stock dynamic per run | median |", "|---|---|---|---|---|---|---|"]
    for n, r in result["rows"].items():
        per = ", ".join(f"{x:.2f}" for x in r["latency_vs_stock"])
        lines.append(f"| {n} | {100 * r['fallback_mac_fraction']:.1f}% | {100 * r['agreement']:.1f} ({r['disagree']}) | {r['cosine']:.4f} | {r['kl']:.4f} | {per} | {r['latency_vs_stock_median']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
