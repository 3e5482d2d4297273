"""How concentrated each linear input's range is in a few channels (issue 13: can a kept-float linear go int8?).

OpenVINO int8's default keeps 11 DeiT-tiny inputs float (19.4 % of the linear MACs), which is most of its 4-9 %
latency gap to NNCF's int8. Splitting a few outlier channels out of a per-tensor range (LLM.int8-style), or
SmoothQuant on fc2's GELU input, helps only where a handful of channels set the range. This runs the float
reference on calibration images (never the evaluation split), fetches every MatMul input that a LayerNorm or GELU
produces (before the recipe's SmoothQuant, which narrows LayerNorm outputs further), and reports per input: the tensor's absmax and 99.999th percentile, each channel's absmax (median, 90th
percentile), the largest over the median, and how many channels exceed 4x the median.

    python benchmarks/channel_outliers.py --model ../shared/models/deit-tiny-patch16-224 --images 32

Writes ``--out``/channel-outliers.json and .md.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from run_matrix import shared_split  # noqa: E402  the run_matrix split: its calibration half only

from vitexport.data import ImageSet  # noqa: E402
from vitexport.model import ModelSpec  # noqa: E402


def inputs_stats(model_path: Path, x: np.ndarray) -> dict[str, dict]:
    import onnx
    import onnxruntime as ort

    m = onnx.load(str(model_path))
    producer = {o: n for n in m.graph.node for o in n.output}
    # GELU is exported as x * 0.5 * (1 + erf(...)): its output is a Mul that feeds fc2
    wanted = sorted({n.input[0] for n in m.graph.node if n.op_type == "MatMul" and n.input[0] in producer
                     and producer[n.input[0]].op_type in ("LayerNormalization", "Mul")})
    for a in wanted:
        m.graph.output.append(onnx.helper.make_tensor_value_info(a, onnx.TensorProto.FLOAT, None))
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = s.run(wanted, {s.get_inputs()[0].name: x.astype(np.float32)})
    rows = {}
    for a, o in zip(wanted, outs):
        o = o.reshape(-1, o.shape[-1])
        cmax = np.abs(o).max(0)
        med = float(np.median(cmax))
        rows[a] = {"producer": "GELU" if producer[a].op_type == "Mul" else "LayerNorm", "absmax": float(np.abs(o).max()), "p99_999": float(np.percentile(o, 99.999)),
                   "channel_absmax_median": med, "channel_absmax_p90": float(np.percentile(cmax, 90)), "max_over_median": float(cmax.max() / med),
                   "channels_over_4x_median": int((cmax > 4 * med).sum()), "channels": int(o.shape[-1])}
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=str(HERE.parent.parent / "shared"))
    ap.add_argument("--model", help="checkpoint folder (default: the shared DeiT-tiny)")
    ap.add_argument("--images", type=int, default=32, help="calibration images to run")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args()
    shared = Path(args.shared)
    model = Path(args.model) if args.model else shared / "models" / "deit-tiny-patch16-224"
    from vitexport.export import export_reference

    spec = ModelSpec.load(str(model))
    with tempfile.TemporaryDirectory() as tmp:
        calib, _ = shared_split(shared, Path(tmp) / "split")
        images = ImageSet.from_folder(str(calib), spec.preprocessing, spec.id2label, None)
        x = np.stack([images.load(i) for i in range(min(args.images, len(images)))])
        ref = export_reference(spec, Path(tmp) / "ref", x[:8], opset=18, module=spec.load_torch())
        rows = inputs_stats(ref.path, x)
    result = {"command": "python " + shlex.join(["benchmarks/channel_outliers.py", *sys.argv[1:]]), "model": str(model), "images": len(x), "inputs": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "channel-outliers.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"Produced by `{result['command']}` on {result['images']} calibration images of {model.name}.", "",
             "| input | from | absmax | p99.999 | channel absmax: median | p90 | max / median | channels > 4x median |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {a} | {r['producer']} | {r['absmax']:.2f} | {r['p99_999']:.2f} | {r['channel_absmax_median']:.2f} | {r['channel_absmax_p90']:.2f} | {r['max_over_median']:.1f} | {r['channels_over_4x_median']} of {r['channels']} |"
              for a, r in rows.items()]
    (out / "channel-outliers.md").write_text("\n".join(lines) + "\n")
    print((out / "channel-outliers.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
