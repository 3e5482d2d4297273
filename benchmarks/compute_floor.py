"""How far the int8 build's two costliest stages are from the float32 arithmetic they must do (issue 13).

    python benchmarks/perf_build.py --only-vit-base --work W ...   # leaves W/vit-base/report.json and the fp32 ONNX
    python benchmarks/compute_floor.py --work W --model vit-base   # ~1 min on 2 cores

The float-statistics pass runs the float reference over every calibration image and sums X^T X of every
quantized input; each sensitivity search runs, for each quantized input, the network from that input's block to
the logits over the search images (quantization/fallback.py). Both are float32 by design: the Gram matrices decide
GPTQ's codes (their summation order alone moves a few), and a search score is the KL of one input's int8 error, so
the arithmetic under it must be much finer than int8. This counts the floating-point work of each stage from the
model's shapes, measures right after the build how fast this host runs the same kernels (onnxruntime's fp32
forward of the reference ONNX at the search's batch of 8, numpy's X^T X of the same shapes, and perf_build's GEMM
gauge), and sets the stage's seconds in the build's report against the floor those rates give. A ratio near 1
means the stage is bound by its float32 arithmetic: only less arithmetic (fewer candidate-image forwards) or a
coarser number format can make it faster, not tidier code.

Writes benchmarks/results/compute-floor-<model>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from perf_build import host_speed  # noqa: E402

BATCH = 8  # the search's and the float pass's onnxruntime batch


def shapes(config: dict) -> dict:
    """ViT geometry from a Hugging Face config: tokens, width, MLP width, blocks, labels."""
    patches = (config.get("image_size", 224) // config.get("patch_size", 16)) ** 2
    return {"tokens": patches + 1, "d": config["hidden_size"], "m": config["intermediate_size"], "blocks": config["num_hidden_layers"],
            "labels": config.get("num_labels") or max(len(config.get("id2label") or {}), 1), "patch_macs": patches * config["hidden_size"] * 3 * config.get("patch_size", 16) ** 2}


def block_macs(s: dict) -> int:
    """Multiply-accumulates of one encoder block for one image: q, k, v, output, fc1, fc2 and the two attention products."""
    t, d, m = s["tokens"], s["d"], s["m"]
    return t * (4 * d * d + 2 * d * m) + 2 * t * t * d


def forward_macs(s: dict) -> int:
    return s["patch_macs"] + s["blocks"] * block_macs(s) + s["d"] * s["labels"]


def search_macs(s: dict, images: int) -> int:
    """One recipe's search: its 4 candidates per block (q/k/v's shared input, attention output, fc1, fc2) each run from
    their block's input to the logits on ``images`` images, plus the pass that captures the blocks' inputs."""
    tails = sum(4 * ((s["blocks"] - b) * block_macs(s) + s["d"] * s["labels"]) for b in range(s["blocks"]))
    return images * (tails + forward_macs(s))


def gram_flops(s: dict, rows: int) -> int:
    """X^T X of each block's distinct quantized inputs (q/k/v share one) over ``rows`` token rows, counted as the
    symmetric product's own work (rows x K x (K + 1))."""
    d, m = s["d"], s["m"]
    return s["blocks"] * rows * (3 * d * (d + 1) + m * (m + 1))


def median_seconds(call, runs: int) -> float:
    """Median wall seconds of ``call()`` over ``runs`` calls, after one untimed warm-up call."""
    call()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def ort_rate(onnx_path: Path, flops_per_image: int, threads: int, runs: int) -> float:
    """GFLOP/s of onnxruntime's fp32 forward of the reference ONNX at batch 8 (median of ``runs`` after a warm-up)."""
    from vitexport.ort_session import ort_session

    sess = ort_session(str(onnx_path), threads, spinning=False)
    name = sess.get_inputs()[0].name
    x = np.random.default_rng(0).random((BATCH, 3, 224, 224), np.float32)
    return BATCH * flops_per_image / median_seconds(lambda: sess.run(None, {name: x}), runs) / 1e9


def matmul_share(onnx_path: Path, threads: int) -> float:
    """Fraction of onnxruntime's kernel time at batch 8 spent in MatMul / FusedMatMul / Gemm (its own profiler)."""
    import tempfile

    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.enable_profiling, opts.profile_file_prefix = threads, True, str(Path(tmp) / "prof")
        sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).random((BATCH, 3, 224, 224), np.float32)
        for _ in range(2):
            sess.run(None, {sess.get_inputs()[0].name: x})
        events = json.loads(Path(sess.end_profiling()).read_text())
    kernels = [(e["args"].get("op_name", ""), e["dur"]) for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    return sum(d for op, d in kernels if op in ("MatMul", "FusedMatMul", "Gemm")) / max(sum(d for _, d in kernels), 1)


def syrk_seconds(rows: int, k: int, runs: int) -> float:
    """Seconds of numpy's X^T X (GramSums.add's call) of a [rows, k] float32 batch, median of ``runs``."""
    x = np.random.default_rng(0).standard_normal((rows, k), dtype=np.float32)
    out = np.empty((k, k), np.float32)
    return median_seconds(lambda: np.matmul(x.T, x, out=out), runs)


def search_images(artifact: Path) -> int:
    """How many images the artifact's sensitivity search scored on, from its manifest."""
    return int(json.loads((artifact / "manifest.json").read_text())["recipe"]["sensitivity_fallback"]["images"])


def stage_seconds(report: dict, contains: str) -> list[float]:
    return [round(s["seconds"], 1) for s in report["stages"] if contains in s["stage"]]


def measure(work: Path, model: str, threads: int, runs: int) -> dict:
    root = work / model
    report = json.loads((root / "report.json").read_text())
    config = json.loads((Path(report["model"]["source"]) / "config.json").read_text())
    s = shapes(config)
    calib = report["evaluation"]["calibration_images"]
    fwd = 2 * forward_macs(s)
    gauge = host_speed()
    rate = ort_rate(root / "onnxruntime-fp32" / "model.onnx", fwd, threads, runs)
    rows = BATCH * s["tokens"]
    # X^T X's time is linear in its rows: the last, partial batch counts for its share
    syrk = calib / BATCH * s["blocks"] * (3 * syrk_seconds(rows, s["d"], runs) + syrk_seconds(rows, s["m"], runs))
    gram = gram_flops(s, calib * s["tokens"])
    res = {"model": model, "shapes": s, "calibration_images": calib, "threads": threads,
           "gemm_gauge_gflops": round(gauge, 1), "ort_fp32_batch8_gflops": round(rate, 1),
           "ort_matmul_share": round(matmul_share(root / "onnxruntime-fp32" / "model.onnx", threads), 3), "syrk_gflops": round(gram / syrk / 1e9, 1), "stages": []}
    float_floor = calib * fwd / rate / 1e9 + syrk
    res["stages"].append({"stage": "float statistics (forward + X^T X)", "tflop": round((calib * fwd + gram) / 1e12, 2),
                          "floor_s": round(float_floor, 1), "measured_s": stage_seconds(report, "float statistics")})
    for recipe in ("openvino", "tensorrt"):
        images = search_images(root / f"{recipe}-int8")
        search = 2 * search_macs(s, images)
        res["stages"].append({"stage": f"{recipe} int8 sensitivity search ({images} images)", "tflop": round(search / 1e12, 2),
                              "floor_s": round(search / rate / 1e9, 1), "measured_s": stage_seconds(report, f"{recipe} int8: sensitivity search")})
    for st in res["stages"]:
        st["measured_over_floor"] = [round(m / st["floor_s"], 2) for m in st["measured_s"]]
    return res


def drift_warning(gauge_then: list[float], gauge_now: float) -> str | None:
    """A line saying the ratios are not the build's when the host's speed moved by over 15 % since it ran: this
    host's GEMM rate moved by 40 % within an hour, so rates are only comparable with stage times measured beside them."""
    if not gauge_then or abs(gauge_now / (sum(gauge_then) / len(gauge_then)) - 1) <= 0.15:
        return None
    return (f"**The host's speed moved since the build** (GEMM gauge {' and '.join(map(str, gauge_then))} GFLOP/s then, {gauge_now} now): "
            "these ratios are not that build's; run this right after perf_build.py.")


def markdown(res: dict, command: str, host: str, gauge_then) -> str:
    lines = [f"# Compute floor of the int8 build's float32 stages: {res['model']} (benchmarks/compute_floor.py)", "",
             f"Command: `{command}`. Host: {host}, {res['threads']} threads. Stage seconds are the build's own "
             f"(`{res['model']}/report.json` of the perf_build.py run; its GEMM gauge read {' and '.join(map(str, gauge_then)) or '?'} GFLOP/s); the rates "
             f"were measured after it: GEMM gauge {res['gemm_gauge_gflops']} GFLOP/s, onnxruntime's fp32 forward of the reference at batch {BATCH} "
             f"{res['ort_fp32_batch8_gflops']} GFLOP/s ({res['ort_matmul_share']:.0%} of its kernel time in MatMul), numpy's X^T X {res['syrk_gflops']} GFLOP/s of useful work. "
             f"{res['calibration_images']} calibration images.", "",
             "The floor counts the float32 arithmetic only: not the float pass's per-column tails (the exact order statistics "
             "its percentile ranges need under any later channel scaling), its copies of every fetched linear input, or the "
             "search's session building and KL.", "",
             *([w, ""] if (w := drift_warning(gauge_then, res["gemm_gauge_gflops"])) else []),
             "| stage | work, TFLOP | floor at these rates, s | measured, s | measured / floor |", "|---|---|---|---|---|"]
    for st in res["stages"]:
        lines.append(f"| {st['stage']} | {st['tflop']} | {st['floor_s']} | {', '.join(map(str, st['measured_s']))} | {', '.join(map(str, st['measured_over_floor']))} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="a perf_build.py --work folder")
    ap.add_argument("--model", default="vit-base", choices=("vit-base", "deit-tiny"))
    ap.add_argument("--perf-json", help="that run's perf-build.json (for the GEMM gauge it read)")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    from vitexport.harness.host import host_info

    root = Path(args.work) / args.model
    for p in (root / "report.json", root / "onnxruntime-fp32" / "model.onnx"):
        if not p.is_file():
            sys.exit(f"{p} is missing: run benchmarks/perf_build.py with --work {args.work} first")
    res = measure(Path(args.work), args.model, args.threads, args.runs)
    gauge_then = json.loads(Path(args.perf_json).read_text()).get(args.model, {}).get("host_gflops_before_after", []) if args.perf_json else []
    command = "python " + " ".join(["benchmarks/compute_floor.py", *sys.argv[1:]])
    md = markdown(res, command, host_info()["cpu"], gauge_then)
    res["command"] = command
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"compute-floor-{args.model}.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / f"compute-floor-{args.model}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
