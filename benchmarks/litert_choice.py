"""How LiteRT int8 takes its activations, chosen on held-out CALIBRATION images only (never the evaluation split).

    pip install torch==2.13.0 -e ".[litert]"     # in its own venv, as benchmarks/litert.py
    python benchmarks/litert_choice.py            # ~10 min on 2 shared cores; writes benchmarks/results/litert-choice.*

The 125 calibration images of benchmarks/run_matrix.py's split (sorted positions 0, 4, 8, ... of ../shared/imagenet-samples)
are split again: 84 fit the recipe (ranges, SmoothQuant, GPTQ), the other 41 (every third) are held out to choose on.
Every candidate carries the same recipe decisions (same GPTQ codes, same clamps); they differ in how LiteRT's int8
FULLY_CONNECTED takes its activations:

- static: int8 input with the recipe's range, int8 output with ai-edge-quantizer's min/max range (TFLite's int8 kernel
  requantizes every output, which the ONNX QDQ model, whose MatMul gives float, never does);
- dynamic: int8 input quantized by the kernel at run time, float output;
- a16w8: int16 activations (in and out), int8 weights.

Reported against the fp32 reference's logits on the held-out images: top-1 agreement, cosine, relative logit error,
beside the core recipe's ONNX Runtime QDQ model (same fit images) and the float model with the recipe's weights; the
static model's error per int8 FC split into what its output rounding adds and what its input quantization adds; batch-1
latency at 1 thread, interleaved (shared host: compare ratios).

    python benchmarks/litert_choice.py --dynamic-recipe   # ~15 min; writes benchmarks/results/litert-choice-dynamic.*

chooses, on the same 41 held-out images, what the dynamic model carries (RECIPES below): GPTQ compensating the
static recipe's Q(X) (its percentile ranges), XNNPACK's per-row dynamic Q(X) (vitexport.quantization.int8.dynamic_row_qdq,
checked against the kernel by tests/test_litert.py), or nothing (plain GPTQ on float X^T X); with or without the
sensitivity fallback (scored with static ranges); clamps at the recipe's ranges or clamps that clip nothing. Adds the
mean KL of the softmax to fp32 and, per image, whether the cosine is higher or lower than the first int8 row's.
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from vitexport import backends as B  # noqa: E402
from vitexport.backends import litert as L  # noqa: E402

A8 = {"num_bits": 8, "symmetric": False, "granularity": "TENSORWISE", "dtype": "INT"}
A16 = {"num_bits": 16, "symmetric": True, "granularity": "TENSORWISE", "dtype": "INT"}


def images(shared: Path, work: Path, model: Path | None = None):
    """The checkpoint (DeiT-tiny unless ``model``) and its preprocessed fit / held-out calibration images."""
    from vitexport.data import ImageSet
    from vitexport.model import ModelSpec

    files = sorted((shared / "imagenet-samples").glob("*.JPEG"))
    calib = [f for i, f in enumerate(files) if i % 4 == 0]
    spec = ModelSpec.load(str(model or shared / "models" / "deit-tiny-patch16-224"))
    out = []
    for name, part in (("fit", [f for j, f in enumerate(calib) if j % 3 != 2]), ("held", [f for j, f in enumerate(calib) if j % 3 == 2])):
        (work / name).mkdir(parents=True)
        for f in part:
            (work / name / f.name).symlink_to(f)
        s = ImageSet.from_folder(str(work / name), spec.preprocessing, spec.id2label, None)
        out.append(np.stack([s.load(i) for i in range(len(s))]))
    return spec, out[0], out[1]


def candidates(spec, fit: np.ndarray, work: Path) -> tuple[dict[str, Path], Path]:
    """The reference ONNX, the ORT QDQ model and the LiteRT variants, all from the recipe run once on ``fit``."""
    import onnx
    import torch

    from vitexport.export import export_reference
    from vitexport.quantization import int8 as qi

    ref = export_reference(spec, work / "ref", fit[:16], opset=18, module=spec.load_torch())
    cal = B.Calibration(batches=lambda: (fit[i : i + 16] for i in range(0, len(fit), 16)), count=len(fit), source="fit")
    captured = {}
    core = qi.quantize_int8

    def keep(*a, **k):
        captured["q"] = core(*a, **k)
        return captured["q"]

    qi.quantize_int8 = keep  # the ORT QDQ model of the very same recipe run
    head = spec.load_torch()
    try:
        int8 = L._carry_int8_recipe(head, ref, cal, {})
    finally:
        qi.quantize_int8 = core
    onnx.save(captured["q"][0], str(work / "ort-int8.onnx"))
    L._clamp_inputs(head, int8.ranges)
    h, w = spec.input_shape[1:]
    fp = work / "float-recipe-weights.tflite"
    with L._quiet():
        L._convert(L._AppModule(head, spec.preprocessing).eval(), torch.rand(1, h, w, 3) * 255, fp)
    paths = {"onnxruntime int8 (QDQ)": work / "ort-int8.onnx", "litert float, recipe weights and clamps": fp}
    for kind in ("static", "dynamic", "a16w8"):
        paths[f"litert {kind}"] = work / f"{kind}.tflite"
        paths[f"litert {kind}"].write_bytes(variant(fp, int8, kind, cal, spec.preprocessing))
    return paths, ref.path


def variant(fp: Path, int8, kind: str, cal, pre) -> bytes:
    if kind != "a16w8":
        return L._quantize_carried(fp, int8, cal, pre, L.LiteRTOptions(int8_activations=kind))[0]
    from ai_edge_litert.tools import flatbuffer_utils as fbu

    g_model = fbu.read_model(str(fp))
    g = g_model.subgraphs[0]
    fcs = L._fc_modules(g_model, int8.codes, int8.scales)
    scopes = [re.escape(g.tensors[g.operators[i].outputs[0]].name.decode()) for i in fcs]
    cfg = {"activation_tensor_config": A16, "weight_tensor_config": L._INT8_OP_CONFIG["weight_tensor_config"], "compute_precision": "INTEGER", "explicit_dequantize": False}
    recipe = [{"regex": f"^(?:{'|'.join(scopes)});$", "operation": "FULLY_CONNECTED", "algorithm_key": "min_max_uniform_quantize", "op_config": cfg}]
    qsv = L._calibrate(fp, recipe, cal, pre, L.LiteRTOptions())
    for i, module in fcs.items():
        lo, hi = int8.ranges[module]
        qsv[g.tensors[g.operators[i].inputs[0]].name.decode()] = {"min": np.array(lo, np.float32), "max": np.array(hi, np.float32)}
    return L._place_codes(L._quantize(fp, recipe, qsv), fcs, int8)[0]


def logits(path: Path, x: np.ndarray, pre: dict) -> np.ndarray:
    if path.suffix == ".onnx":
        import onnxruntime as ort

        s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return np.concatenate([s.run(None, {s.get_inputs()[0].name: x[i : i + 8]})[0] for i in range(0, len(x), 8)])
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path))
    it.allocate_tensors()
    i, o = it.get_input_details()[0]["index"], it.get_output_details()[0]["index"]
    out = []
    for a in L.app_input(x, pre):
        it.set_tensor(i, a[None])
        it.invoke()
        out.append(np.array(it.get_tensor(o)).reshape(1, -1))
    return np.concatenate(out)


def compare(y: np.ndarray, r: np.ndarray) -> dict:
    cos = (y * r).sum(1) / np.linalg.norm(y, axis=1) / np.linalg.norm(r, axis=1)
    return {"agree": f"{int((y.argmax(1) == r.argmax(1)).sum())}/{len(r)}", "cosine_mean": round(float(cos.mean()), 5),
            "cosine_min": round(float(cos.min()), 4), "relative_logit_error": round(float(np.linalg.norm(y - r) / np.linalg.norm(r)), 4)}


def fc_error_split(path: Path, x: np.ndarray, pre: dict) -> dict:
    """For each int8 FC of a static model: ||int8 output - float output of the int8 input|| (what the output rounding
    adds) and ||float output of the int8 input - float output of the float input|| (what the input quantization adds),
    both over ||float output of the float input||, from the interpreter's intermediate tensors."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.interpreter import Interpreter
    from ai_edge_litert.tools import flatbuffer_utils as fbu

    m = fbu.read_model(str(path))
    g = m.subgraphs[0]
    producer = {o: op for op in g.operators for o in op.outputs}
    fcs = [op for op in g.operators if max(m.operatorCodes[op.opcodeIndex].builtinCode, m.operatorCodes[op.opcodeIndex].deprecatedBuiltinCode)
           == schema.BuiltinOperator.FULLY_CONNECTED and g.tensors[op.inputs[1]].type == schema.TensorType.INT8]
    it = Interpreter(model_path=str(path), experimental_preserve_all_tensors=True)
    it.allocate_tensors()

    def value(ti: int) -> np.ndarray:
        t, v = g.tensors[ti], np.array(it.get_tensor(ti)).astype(np.float64)
        if t.type == schema.TensorType.FLOAT32:
            return v
        s, z = np.asarray(t.quantization.scale), np.asarray(t.quantization.zeroPoint, np.float64)
        return (v - z[:, None]) * s[:, None] if v.ndim == 2 and s.size > 1 else (v - z) * s  # per-channel weights: axis 0

    split = np.zeros((len(fcs), 2))
    for a in L.app_input(x, pre):
        it.set_tensor(it.get_input_details()[0]["index"], a[None])
        it.invoke()
        for k, op in enumerate(fcs):
            w, b = value(op.inputs[1]), (value(op.inputs[2]) if len(op.inputs) > 2 and op.inputs[2] >= 0 else 0.0)
            xq = value(op.inputs[0]).reshape(-1, w.shape[1])
            xf = value(producer[op.inputs[0]].inputs[0]).reshape(-1, w.shape[1])  # the float tensor its QUANTIZE read
            yq, yf = xq @ w.T + b, xf @ w.T + b
            split[k] += [np.linalg.norm(value(op.outputs[0]).reshape(yq.shape) - yq) / np.linalg.norm(yf), np.linalg.norm(yq - yf) / np.linalg.norm(yf)]
    split /= len(x)
    return {"int8_fcs": len(fcs), "mean_output_rounding": round(float(split[:, 0].mean()), 4), "mean_input_quantization": round(float(split[:, 1].mean()), 4),
            "fcs_where_output_rounding_adds_more": int((split[:, 0] > split[:, 1]).sum()), "images": len(x)}


def latency(paths: dict[str, Path], rounds: int = 30) -> dict[str, float]:
    """Batch-1 p50 at 1 thread, the models interleaved round by round."""
    from ai_edge_litert.interpreter import Interpreter

    its = {}
    for name, p in paths.items():
        if p.suffix == ".tflite":
            its[name] = Interpreter(model_path=str(p), num_threads=1)
            its[name].allocate_tensors()
    x = (np.random.default_rng(0).random((1, 224, 224, 3)) * 255).astype(np.float32)
    times: dict[str, list[float]] = {n: [] for n in its}
    for r in range(rounds):
        for n, it in its.items():
            it.set_tensor(it.get_input_details()[0]["index"], x)
            t = time.perf_counter()
            it.invoke()
            if r >= 3:  # warm-up rounds
                times[n].append(time.perf_counter() - t)
    return {n: round(1000 * float(np.median(t)), 1) for n, t in times.items()}


# The recipe the dynamic int8 model carries (--dynamic-recipe): GPTQ's compensation target x sensitivity fallback.
# "static Q": Q(X) of the static recipe's percentile ranges (the QDQ model's own); "dynamic Q": each row quantized
# with its own range as XNNPACK's dynamically quantized FC does; "none": plain GPTQ on float X^T X.
RECIPES = {
    "compensate static Q, fallback 0.1": {},
    "compensate dynamic Q, fallback 0.1": {"activation_quantizer": "dynamic_row"},
    "no compensation, fallback 0.1": {"compensate_activations": False},
    "compensate static Q, no fallback": {"fallback_budget": 0.0},
    "compensate dynamic Q, no fallback": {"activation_quantizer": "dynamic_row", "fallback_budget": 0.0},
    "no compensation, no fallback": {"compensate_activations": False, "fallback_budget": 0.0},
    # the clamps at the static ranges only keep LayerNorm out of the FC weights; the kernel picks each row's range
    "compensate dynamic Q, fallback 0.1, wide clamps": {"activation_quantizer": "dynamic_row", "clamp": "wide"},
    "compensate static Q, fallback 0.1, wide clamps": {"clamp": "wide"},
}


def dynamic_candidates(spec, fit: np.ndarray, work: Path) -> tuple[dict[str, Path], dict[str, dict], Path]:
    """One dynamic-activation LiteRT model per RECIPES entry, all fit on ``fit`` (float statistics, ranges and the
    sensitivity scores shared through one Calibration's memo), plus the float model as the first row."""
    import torch

    from vitexport.export import export_reference

    ref = export_reference(spec, work / "ref", fit[:16], opset=18, module=spec.load_torch())
    cal = B.Calibration(batches=lambda: (fit[i : i + 16] for i in range(0, len(fit), 16)), count=len(fit), source="fit")
    h, w = spec.input_shape[1:]
    paths, summaries = {}, {}
    fp = work / "float.tflite"
    with L._quiet():
        L._convert(L._AppModule(spec.load_torch(), spec.preprocessing).eval(), torch.rand(1, h, w, 3) * 255, fp)
    paths["litert float (fp32 weights, no clamps)"] = fp
    chosen = [a for a in sys.argv[1:] if not a.startswith("--")]  # names of RECIPES to run (default: all)
    for k, (name, overrides) in enumerate(RECIPES.items()):
        if chosen and name not in chosen:
            continue
        head = spec.load_torch()
        recipe = {key: v for key, v in overrides.items() if key != "clamp"}
        int8 = L._carry_int8_recipe(head, ref, cal, {"litert": {"int8": {"recipe": {"reduce_range": False, **recipe}}}})
        L._clamp_inputs(head, int8.ranges if overrides.get("clamp", "recipe") == "recipe" else {m: (-L.WIDE_CLAMP, L.WIDE_CLAMP) for m in int8.ranges})
        path = work / f"recipe-{k}.float.tflite"
        with L._quiet():
            L._convert(L._AppModule(head, spec.preprocessing).eval(), torch.rand(1, h, w, 3) * 255, path)
        paths[name] = work / f"recipe-{k}.tflite"
        paths[name].write_bytes(L._quantize_carried(path, int8, cal, spec.preprocessing, L.LiteRTOptions(int8_activations="dynamic"))[0])
        summaries[name] = {"overrides": overrides, "quantized": int8.summary["quantized"], "kept_float_inputs": int8.summary["kept_float_inputs"]}
    return paths, summaries, ref.path


def kl_to_reference(y: np.ndarray, r: np.ndarray) -> float:
    """Mean KL(softmax(reference) || softmax(candidate)) over images."""
    lr = r - r.max(1, keepdims=True)
    lr -= np.log(np.exp(lr).sum(1, keepdims=True))
    ly = y - y.max(1, keepdims=True)
    ly -= np.log(np.exp(ly).sum(1, keepdims=True))
    return float((np.exp(lr) * (lr - ly)).sum(1).mean())


def main_dynamic(shared: Path, out: Path) -> int:
    with tempfile.TemporaryDirectory(prefix="vitexport-litert-choice-") as tmp:
        work = Path(tmp)
        spec, fit, held = images(shared, work)
        paths, summaries, ref_path = dynamic_candidates(spec, fit, work)
        pre = spec.preprocessing.to_dict()
        ref = logits(ref_path, held, pre)
        rows = {}
        for name, p in paths.items():
            y = logits(p, held, pre)
            rows[name] = {**compare(y, ref), "kl": round(kl_to_reference(y, ref), 6), "per_image_cosine": [round(float(c), 6) for c in
                          (y * ref).sum(1) / np.linalg.norm(y, axis=1) / np.linalg.norm(ref, axis=1)], **summaries.get(name, {})}
        for name, ms in latency(paths).items():
            rows[name]["p50_ms_1_thread"] = ms
    result = {"command": "python benchmarks/litert_choice.py --dynamic-recipe", "fit_images": len(fit), "held_out_images": len(held), "rows": rows,
              "note": "held-out calibration images only; every int8 row: dynamic int8 activations; latency interleaved on a shared host: compare ratios"}
    names = [a for a in sys.argv[1:] if not a.startswith("--")]
    stem = "litert-choice-dynamic" + ("-subset" if names else "")  # a run of named RECIPES only keeps the full table
    if names:
        result["command"] += " " + " ".join(f"'{n}'" for n in names)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"Produced by `python benchmarks/litert_choice.py --dynamic-recipe`: {len(fit)} calibration images fit each recipe, {len(held)} held-out "
             "calibration images choose (the evaluation split is not used). LiteRT int8 with dynamic activations, against the fp32 reference's logits; "
             "KL: mean KL(reference || candidate) of the softmax; p50: batch 1, 1 thread, interleaved, shared 2-core host.", "",
             "| recipe carried | int8 linears | inputs kept float | agree | KL | cosine mean (min) | relative logit error | higher / lower cosine than the first int8 row | p50 ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    base = np.array(rows[next(iter(RECIPES))]["per_image_cosine"]) if next(iter(RECIPES)) in rows else None
    for name, r in rows.items():
        c = np.array(r["per_image_cosine"])
        paired = f"{int((c > base).sum())} / {int((c < base).sum())}" if base is not None and r.get("quantized") else "–"
        lines.append(f"| {name} | {r.get('quantized', 0)} | {len(r.get('kept_float_inputs', []))} | {r['agree']} | {r['kl']:.6f} | {r['cosine_mean']:.5f} "
                     f"({r['cosine_min']:.4f}) | {r['relative_logit_error']:.4f} | {paired} | {r.get('p50_ms_1_thread', '–')} |")
    lines[0] = lines[0].replace("`python benchmarks/litert_choice.py --dynamic-recipe`", f"`{result['command']}`")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def main() -> int:
    shared = HERE.parent.parent / "shared"
    out = HERE / "results"
    if "--dynamic-recipe" in sys.argv[1:]:
        return main_dynamic(shared, out)
    with tempfile.TemporaryDirectory(prefix="vitexport-litert-choice-") as tmp:
        work = Path(tmp)
        spec, fit, held = images(shared, work)
        paths, ref_path = candidates(spec, fit, work)
        pre = spec.preprocessing.to_dict()
        ref = logits(ref_path, held, pre)
        rows = {name: compare(logits(p, held, pre), ref) for name, p in paths.items()}
        lat = latency(paths)
        for name, ms in lat.items():
            rows[name]["p50_ms_1_thread"] = ms
        split = fc_error_split(paths["litert static"], held[:8], pre)
    result = {"command": "python benchmarks/litert_choice.py", "fit_images": len(fit), "held_out_images": len(held), "rows": rows, "static_fc_error_split": split,
              "note": "held-out calibration images only; latency interleaved on a shared host: compare ratios"}
    (out / "litert-choice.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"Produced by `python benchmarks/litert_choice.py`: {len(fit)} calibration images fit the recipe, {len(held)} held-out calibration images "
             "choose (the evaluation split is not used). Against the fp32 reference's logits; p50: batch 1, 1 thread, interleaved, shared 2-core host.", "",
             "| candidate | agree | cosine mean (min) | relative logit error | p50 ms |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['agree']} | {r['cosine_mean']:.5f} ({r['cosine_min']:.4f}) | {r['relative_logit_error']:.4f} | {r.get('p50_ms_1_thread', '–')} |")
    lines += ["", f"Static int8, per int8 FC over {split['images']} held-out images (error relative to the float output): output rounding adds "
              f"{split['mean_output_rounding']:.4f}, input quantization {split['mean_input_quantization']:.4f} on average; output rounding adds more in "
              f"{split['fcs_where_output_rounding_adds_more']} of {split['int8_fcs']} FCs."]
    (out / "litert-choice.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
