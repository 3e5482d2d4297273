"""What running the last block on the read rows only (quantization/unread_rows.py) buys, on its own, per runtime.

Every ONNX-based artifact (ONNX Runtime, OpenVINO, TensorRT; fp32, int8, int4) now runs the row-wise part of the last
block (attention output projection, residual adds, LayerNorm, MLP) on the class token's row only, the one the
classifier reads. This script takes ONNX graphs built *without* the pass (an earlier build's artifacts, or any ONNX
of the same shape), applies it, and for each graph reports, on the same 8 random inputs, how far the logits moved
(max abs difference, lowest cosine, top-1 agreement) and the batch-1 latency of the pass's graph over the original,
paired (harness.latency.paired_ratio: units of four short turns, median with a distribution-free 95 % interval),
2 threads. Each ``--openvino`` graph is converted by OpenVINO both ways instead and timed in f32.

The stock int8 graph (onnxruntime's quantize_dynamic of the reference) is in the list on purpose: the pass applies to
it just as well, so this is the share of any "ours / stock" latency ratio that comes from the pass rather than from
the int8 recipe.

    python benchmarks/unread_rows.py --graph deit-fp32=W/deit-tiny/onnxruntime-fp32/model.onnx ... \
        [--openvino deit-fp32=W/deit-tiny/onnxruntime-fp32/model.onnx ...] [--blocks 40] [--out benchmarks/results/unread-rows.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

from vitexport.harness.latency import paired_ratio
from vitexport.harness.report import cpu_name
from vitexport.quantization.unread_rows import drop_unread_rows


class _Ort:
    def __init__(self, model: onnx.ModelProto, threads: int):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        self.s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        self.name = self.s.get_inputs()[0].name

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.s.run(None, {self.name: x})[0]


class _OpenVino:
    def __init__(self, model: onnx.ModelProto, threads: int):
        import openvino as ov

        with tempfile.TemporaryDirectory() as tmp:
            onnx.save_model(model, f"{tmp}/m.onnx")
            ir = ov.convert_model(f"{tmp}/m.onnx")
        self.req = ov.Core().compile_model(ir, "CPU", {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"}).create_infer_request()

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.req.infer({0: x})[0].copy()


def measure(name: str, path: Path, runner, x: np.ndarray, threads: int, blocks: int) -> dict:
    full = onnx.load(str(path))
    pruned = onnx.ModelProto()
    pruned.CopyFrom(full)
    done = drop_unread_rows(pruned)
    if done is None:
        return {"graph": name, "path": str(path), "skipped": "nothing to drop (already pruned, or no read of leading rows)"}
    a, b = runner(full, threads), runner(pruned, threads)
    ya, yb = a.run(x), b.run(x)
    cos = (ya * yb).sum(1) / np.linalg.norm(ya, axis=1) / np.linalg.norm(yb, axis=1)
    ratio = paired_ratio(b, a, x, blocks=blocks)
    return {
        "graph": name, "path": str(path), "runtime": runner.__name__.strip("_").lower(), "dropped": done.summary(),
        "max_abs_diff": float(np.abs(ya - yb).max()), "min_cosine": float(cos.min()), "top1_agreement": float((ya.argmax(1) == yb.argmax(1)).mean()),
        "latency_pruned_over_full": ratio,
    }


def render(result: dict) -> str:
    lines = [
        "# The read rows only (benchmarks/unread_rows.py)", "",
        f"Command: `{result['command']}`. Host: {result['host']}, {result['threads']} threads, batch 1, {result['blocks']} paired units per graph.", "",
        "| graph | runtime | MatMuls on the read rows | max abs diff of logits | lowest cosine | pruned / full latency, median [95 %] |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["graphs"]:
        if "skipped" in r:
            lines.append(f"| {r['graph']} | – | – | – | – | skipped: {r['skipped']} |")
            continue
        q = r["latency_pruned_over_full"]
        lines.append(f"| {r['graph']} | {r['runtime']} | {r['dropped']['matmuls_on_read_rows']} | {r['max_abs_diff']:.2g} | {r['min_cosine']:.6f} | {q['median']:.3f} [{q['ci95'][0]:.3f}-{q['ci95'][1]:.3f}] |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--graph", action="append", required=True, metavar="NAME=ONNX", help="an ONNX graph built without the pass")
    p.add_argument("--openvino", action="append", default=[], metavar="NAME=ONNX", help="also time this graph converted by OpenVINO, f32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--blocks", type=int, default=40)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "unread-rows.json")
    args = p.parse_args()
    x = np.random.default_rng(0).standard_normal((8, 3, args.image_size, args.image_size)).astype(np.float32)
    graphs = []
    for runner, specs in ((_Ort, args.graph), (_OpenVino, args.openvino)):
        for spec in specs:
            name, path = spec.split("=", 1)
            graphs.append(measure(name, Path(path), runner, x, args.threads, args.blocks))
            print(json.dumps(graphs[-1]), file=sys.stderr)
    result = {"command": "python benchmarks/unread_rows.py " + " ".join(sys.argv[1:]), "host": f"{cpu_name()} ({platform.machine()})", "threads": args.threads, "blocks": args.blocks, "graphs": graphs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(render(result))
    print(render(result))


if __name__ == "__main__":
    main()
