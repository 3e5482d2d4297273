"""LiteRT target (Android, the former TensorFlow Lite): one ``.tflite`` per precision that an app bundles as is.

The whole story of this target is here:

- **Conversion.** Google's maintained path from PyTorch, ``litert_torch.convert`` (the renamed ai-edge-torch), so
  like CoreML this backend reloads the checkpoint (from the source recorded in the reference's ModelSpec). Install it
  with ``pip install "vitexport[litert]"``: it brings ``ai-edge-litert`` (the interpreter) and ``ai-edge-quantizer``.
- **Input** is what an Android app has after resizing and centre-cropping a Bitmap: ``image``, float32 NHWC
  ``[1, H, W, 3]``, RGB values 0..255. The checkpoint's rescale, mean and std are inside the model (the first ops),
  so the app never re-implements them. Resize and centre crop are the app's job (metadata and manifest say how).
- **Output**: the logits over the checkpoint's own labels (softmax is the app's), or the embedding for a backbone.
- **Metadata**: the labels (``labels.txt``, one per line in class-index order) and a JSON entry ``vitexport`` (labels,
  preprocessing, input/output description) are stored in the flatbuffer's ``metadata`` table, and in the manifest.
  The TFLite Support "ModelMetadata" schema is not written: its writer (tflite-support) is unmaintained and has no
  wheels for current Pythons.
- **Precisions**: ``fp32``; ``fp16`` (float16 weights with DEQUANTIZE, what the GPU delegate consumes directly;
  ai-edge-quantizer's float casting); ``int8``: int8 on the linear layers as LiteRT's XNNPACK kernels run it (int8
  weights per channel, int8 activations), carrying the ViT-aware recipe's decisions (vitexport.quantization.int8:
  SmoothQuant folded into LayerNorm and weights, GPTQ-rounded weight codes, which inputs stay float), written through
  ai-edge-quantizer. Activations are dynamic by default (quantized at run time by the kernel, each row with its own
  range, float outputs, as ONNX's QDQ MatMul gives), and GPTQ then compensates that per-row quantization (the
  recipe's ``activation_quantizer = "dynamic_row"``, an exact emulation of XNNPACK's) with clamps that clip nothing:
  TFLite's static int8 FULLY_CONNECTED also requantizes its output to int8, which doubled the error on held-out
  calibration images (``int8_activations = "static"`` keeps it, with the recipe's ranges as clamps and int8 grids);
  ``int8_method = "stock"`` gives ai-edge-quantizer's own ``static_wi8_ai8`` recipe (every supported op, min/max
  ranges) instead, the baseline the recipe is measured against.
- **Measuring.** The runner is ``ai_edge_litert.interpreter.Interpreter``: the real LiteRT runtime with its default
  XNNPACK delegate, the CPU path of an Android phone, so rows are measured, not emulated. It does not cover the GPU
  delegate or an NPU. The model is batch 1 (as apps run it): a batch is run image by image.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import json
import logging
import os
import platform
import re
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..artifacts import Artifact, write_manifest
from ..errors import VitexportError
from . import Calibration, Capability, backend_options, quantize_int8_shared, recipe_from, recipe_overrides, require_calibration

log = logging.getLogger(__name__)

INSTALL_HINT = 'pip install "vitexport[litert]" (litert-torch, which brings ai-edge-litert and ai-edge-quantizer)'
RUNTIME_HINT = "pip install ai-edge-litert"
MODEL = "model.tflite"
LABELS = "labels.txt"
INPUT_NAME = "image"
METADATA_KEY = "vitexport"
INT8_METHODS = ("vitexport", "stock")
INT8_ACTIVATIONS = ("dynamic", "static")
# The core recipe's fields for dynamic int8 activations (under a profile's own ``recipe`` overrides): GPTQ compensates
# the error of XNNPACK's per-row quantization, not of the static recipe's ranges, which this model never applies.
# Chosen on held-out calibration images (benchmarks/litert_choice.py --dynamic-recipe): with the wide clamps below,
# KL to fp32 0.00057 vs 0.00073 for static compensation; plain GPTQ on float X^T X and no sensitivity fallback: worse.
DYNAMIC_RECIPE: Mapping[str, Any] = {"activation_quantizer": "dynamic_row"}
# Dynamic: the kernel takes each row's own range, so clipping at the static recipe's ranges only adds error (worst
# held-out image's cosine 0.9962 -> 0.9991 without it); the clamp stays, this wide, because it keeps the converter from
# folding a LayerNorm's gamma/beta into the next FC's weights (see _clamp_inputs).
WIDE_CLAMP = 1e30


@dataclasses.dataclass(frozen=True)
class LiteRTOptions:
    """Per-target settings (``[options.litert]`` in a targets/*.toml profile)."""

    int8_method: str = "vitexport"  # "vitexport": the ViT-aware recipe carried in | "stock": ai-edge-quantizer static_wi8_ai8
    calibration_threads: int = 0  # ai-edge-quantizer calibration threads (0: its default)
    # "dynamic": the recipe's linears take int8 activations quantized at run time by the kernel and give float outputs
    # (XNNPACK's dynamically quantized FULLY_CONNECTED), chosen on held-out calibration images
    # (benchmarks/litert_choice.py); "static": int8 in and out with calibrated ranges (TFLite requantizes each output
    # to int8 with its own range, which ONNX's QDQ MatMul never does: about as much error again as the input's)
    int8_activations: str = "dynamic"

    def __post_init__(self):
        if self.int8_method not in INT8_METHODS:
            raise VitexportError(f"litert int8_method must be one of {', '.join(INT8_METHODS)}, not {self.int8_method!r}")
        if self.int8_activations not in INT8_ACTIVATIONS:
            raise VitexportError(f"litert int8_activations must be one of {', '.join(INT8_ACTIVATIONS)}, not {self.int8_activations!r}")



class LiteRTBackend:
    name = "litert"
    capabilities = {
        "fp32": Capability(calibration=False, runs_here="measured"),
        "fp16": Capability(calibration=False, runs_here="measured"),
        "int8": Capability(calibration=True, runs_here="measured", recipe="vitexport.quantization.int8:Int8Recipe"),
    }
    precisions = tuple(capabilities)
    settings = LiteRTOptions  # [options.litert]
    summary = {"devices": "Android phones; the former TensorFlow Lite", "measured": "the real runtime: ai-edge-litert's interpreter, XNNPACK",
               "artifact": "`model.tflite` (NHWC RGB 0..255 in, preprocessing inside; labels and preprocessing in its metadata) + `labels.txt`"}

    def available(self) -> tuple[bool, str]:
        missing = [m for m in ("litert_torch", "ai_edge_litert", "ai_edge_quantizer") if importlib.util.find_spec(m) is None]
        if missing:
            return False, f"{', '.join(missing)} not installed: {INSTALL_HINT}"
        from importlib.metadata import version

        return True, f"litert-torch {version('litert-torch')}, ai-edge-litert {version('ai-edge-litert')}, ai-edge-quantizer {version('ai-edge-quantizer')}"

    # ------------------------------------------------------------------ build

    def build(self, reference, calibration: Calibration | None, precision: str, options: Mapping[str, Any], out_dir: Path, stages=None) -> Artifact:
        opts = self._check(precision, calibration, options)
        out_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        spec = reference.spec
        recipe = _io_recipe(spec)
        data = _convert_and_compress(reference, calibration, precision, options, opts, recipe, stages)
        data = _with_metadata(data, _metadata(reference, recipe))
        (out_dir / MODEL).write_bytes(data)
        (out_dir / LABELS).write_text("".join(f"{l}\n" for l in spec.labels_list()))
        recipe["ops"] = _op_counts(out_dir / MODEL)
        if calibration is not None and precision == "int8":
            recipe.update(calibration_images=calibration.count, calibration_source=calibration.source)
        recipe["build_s"] = round(time.perf_counter() - t0, 2)
        recipe["summary"] = describe(precision, recipe)
        h, w = spec.input_shape[1:]
        fields = reference.manifest_fields()
        fields["io"] = {**fields["io"], "input": INPUT_NAME, "input_shape": [1, h, w, 3], "input_kind": f"float32 NHWC RGB 0..255, {h}x{w} (resized/cropped by the app)",
                        "output": "logits" if spec.task == "classification" else "embedding", "labels_file": LABELS}
        return write_manifest(out_dir, backend=self.name, precision=precision, main=MODEL, recipe=recipe, extra_tools=("litert-torch", "ai-edge-litert", "ai-edge-quantizer"), **fields)

    def _check(self, precision: str, calibration: Calibration | None, options: Mapping[str, Any]) -> "LiteRTOptions":
        """Everything that can stop the build, before any slow work."""
        if precision not in self.precisions:
            raise VitexportError(f"litert has no precision {precision}: choose from {', '.join(self.precisions)}")
        ok, why = self.available()
        if not ok:
            raise VitexportError(f"backend litert is not available here: {why}")
        opts = recipe_from(LiteRTOptions, backend_options(options, self.name), "litert")
        if precision == "int8":
            require_calibration(calibration, "litert int8")
        return opts

    # ------------------------------------------------------------------ run

    def runner(self, artifact: Artifact, threads: int | None = None) -> "LiteRTRunner":
        if importlib.util.find_spec("ai_edge_litert") is None:
            raise VitexportError(f"ai-edge-litert is not installed: {RUNTIME_HINT}")
        return LiteRTRunner(artifact, threads)


def describe(precision: str, recipe: Mapping[str, Any]) -> str:
    if precision == "int8" and recipe.get("method") == "stock":
        return "LiteRT stock int8 (ai-edge-quantizer static_wi8_ai8, min/max ranges, every supported op), XNNPACK"
    if precision == "int8":
        i8 = recipe.get("int8", {})
        how = ("dynamic int8 activations (quantized by the kernel, float outputs)" if recipe.get("int8_activations") == "dynamic"
               else "static int8 activations (percentile ranges in, min/max ranges out)")
        return (f"LiteRT int8 linears with the ViT-aware recipe (GPTQ codes, SmoothQuant, {how}): {i8.get('quantized')} linears int8, "
                f"{i8.get('kept_float')} inputs kept float; XNNPACK")
    if precision == "fp16":
        return "LiteRT float16 weights (GPU delegate consumes them; CPU computes float32)"
    return "LiteRT float32, XNNPACK"


# ---------------------------------------------------------------------------------------------------------- building


def _io_recipe(spec) -> dict[str, Any]:
    """What the app feeds and reads (recorded in the manifest and the .tflite's metadata)."""
    pre = spec.preprocessing
    h, w = spec.input_shape[1:]
    return {
        "input": {
            "name": INPUT_NAME, "layout": "NHWC", "shape": [1, h, w, 3], "dtype": "float32", "values": "RGB 0..255",
            "inside": f"x * {pre.rescale} - mean, / std (the checkpoint's rescale, mean {list(pre.mean or ())}, std {list(pre.std or ())})",
            "not_inside": f"resize / centre crop to {h}x{w}: the app's job, as the checkpoint's processor does it (see preprocessing)",
        },
        "output": "logits (apply softmax for probabilities)" if spec.task == "classification" else "embedding",
        "batch": 1,
    }


def _convert_and_compress(reference, calibration: Calibration | None, precision: str, options: Mapping[str, Any], opts: LiteRTOptions,
                          recipe: dict[str, Any], stages=None) -> bytes:
    """The checkpoint (with the int8 recipe's float-side decisions) -> float .tflite -> the precision's .tflite bytes."""
    import torch

    spec = reference.spec
    pre = spec.preprocessing
    h, w = spec.input_shape[1:]
    head = spec.load_torch()
    int8 = None
    if precision == "int8" and opts.int8_method == "vitexport":
        int8 = _carry_int8_recipe(head, reference, calibration, options, stages, DYNAMIC_RECIPE if opts.int8_activations == "dynamic" else None)
        dynamic = opts.int8_activations == "dynamic"
        _clamp_inputs(head, {m: (-WIDE_CLAMP, WIDE_CLAMP) for m in int8.ranges} if dynamic else int8.ranges)
        recipe["int8"] = dict(int8.summary)
        recipe["int8"]["clamps"] = f"+-{WIDE_CLAMP:g} (clip nothing)" if dynamic else "the recipe's activation ranges"
    module = _AppModule(head, pre).eval()
    with _quiet(), tempfile.TemporaryDirectory() as tmp:
        tc = time.perf_counter()
        float_path = Path(tmp) / "float.tflite"
        _convert(module, torch.rand(1, h, w, 3) * 255, float_path)
        recipe["convert_s"] = round(time.perf_counter() - tc, 2)
        del module, head
        tq = time.perf_counter()
        data = _compress(float_path, precision, int8, calibration, pre, opts, recipe)
        recipe["quantize_s"] = round(time.perf_counter() - tq, 2)
    return data


def _compress(float_path: Path, precision: str, int8: "_CarriedInt8 | None", calibration: Calibration | None, pre, opts: LiteRTOptions,
              recipe: dict[str, Any]) -> bytes:
    if precision == "fp32":
        recipe["compression"] = "none"
        return float_path.read_bytes()
    if precision == "fp16":
        recipe["compression"] = "float16 weights (ai-edge-quantizer float_casting, explicit DEQUANTIZE), float32 compute on CPU"
        return _quantize(float_path, _FP16_RECIPE, None)
    if int8 is None:
        qsv = _calibrate(float_path, _STOCK_INT8_RECIPE, calibration, pre, opts)
        recipe["compression"] = "ai-edge-quantizer static_wi8_ai8: every supported op, int8 activations (min/max), int8 per-channel weights"
        recipe["method"] = "stock"
        return _quantize(float_path, _STOCK_INT8_RECIPE, qsv)
    data, placed = _quantize_carried(float_path, int8, calibration, pre, opts)
    recipe["int8"]["placed"] = placed
    recipe["int8"]["activations"] = _ACTIVATIONS[opts.int8_activations]
    recipe["compression"] = f"int8 FULLY_CONNECTED ({opts.int8_activations} int8 activations, int8 per-channel GPTQ weights): the ViT-aware recipe's linears"
    recipe["method"] = "vitexport"
    recipe["int8_activations"] = opts.int8_activations
    return data


_ACTIVATIONS = {
    "dynamic": "int8, quantized at run time by the kernel per row (XNNPACK dynamically quantized FULLY_CONNECTED), float output; "
               "GPTQ codes compensating that per-row quantization; inputs not clipped",
    "static": "int8 asymmetric per tensor: the recipe's uint8 ranges shifted by 128 (same grid); outputs requantized to int8 "
              "with ai-edge-quantizer's min/max ranges",
}


class _AppModule:
    """Factory for the converted module: NHWC RGB 0..255 in, the checkpoint's preprocessing as the first ops."""

    def __new__(cls, head, pre):
        import torch

        scale = float(pre.rescale) if pre.rescale else 1.0
        mean = torch.tensor(pre.mean or (0.0, 0.0, 0.0), dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(pre.std or (1.0, 1.0, 1.0), dtype=torch.float32).view(1, 3, 1, 1)

        class AppModule(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.head = head
                self.register_buffer("mean", mean)
                self.register_buffer("inv_std", 1.0 / std)

            def forward(self, image):
                x = image.permute(0, 3, 1, 2)
                return self.head((x * scale - self.mean) * self.inv_std)

        return AppModule()


def _convert(module, example, path: Path) -> None:
    import litert_torch

    try:
        edge = litert_torch.convert(module, sample_args=(), sample_kwargs={INPUT_NAME: example})
        edge.export(str(path))
    except Exception as e:  # the converter raises many types (torch.export, MLIR); one line says which step failed
        raise VitexportError(f"litert-torch could not convert the model: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}") from None


_FP16_RECIPE = [{
    "regex": ".*", "operation": "*", "algorithm_key": "float_casting",
    "op_config": {"weight_tensor_config": {"num_bits": 16, "dtype": "FLOAT"}, "compute_precision": "FLOAT", "explicit_dequantize": True},
}]
_INT8_OP_CONFIG = {
    "activation_tensor_config": {"num_bits": 8, "symmetric": False, "granularity": "TENSORWISE", "dtype": "INT"},
    "weight_tensor_config": {"num_bits": 8, "symmetric": True, "granularity": "CHANNELWISE", "dtype": "INT"},
    "compute_precision": "INTEGER", "explicit_dequantize": False,
}
# ai-edge-quantizer's recipe_manager.add_dynamic_config: int8 weights, activations quantized by the kernel
_DYNAMIC_INT8_OP_CONFIG = {"weight_tensor_config": _INT8_OP_CONFIG["weight_tensor_config"], "compute_precision": "INTEGER", "explicit_dequantize": False}
# ai-edge-quantizer's recipe.static_wi8_ai8(), written out so the stock row does not move if its defaults do
_STOCK_INT8_RECIPE = [{"regex": ".*", "operation": "*", "algorithm_key": "min_max_uniform_quantize", "op_config": _INT8_OP_CONFIG}]


def _quantize(float_path: Path, recipe: list[dict], qsv: dict | None) -> bytes:
    from ai_edge_quantizer import quantizer

    q = quantizer.Quantizer(str(float_path), recipe)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints a size/time report
        result = q.quantize(qsv, enable_progress_report=False) if qsv is not None else q.quantize(enable_progress_report=False)
    return bytes(result.quantized_model)


def app_input(batch: np.ndarray, pre) -> np.ndarray:
    """Preprocessed NCHW batch -> what the app feeds: NHWC RGB 0..255 (the model redoes the normalisation)."""
    mean = np.asarray(pre.get("mean") or (0.0, 0.0, 0.0), np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(pre.get("std") or (1.0, 1.0, 1.0), np.float32).reshape(1, 3, 1, 1)
    scale = float(pre.get("rescale") or 1.0)
    return np.ascontiguousarray(((np.asarray(batch, np.float32) * std + mean) / scale).transpose(0, 2, 3, 1))


def _signature_input(float_path: Path) -> tuple[str, str]:
    from ai_edge_litert.interpreter import Interpreter

    sigs = Interpreter(model_path=str(float_path)).get_signature_list()
    key = next(iter(sigs))
    return key, sigs[key]["inputs"][0]


def _calibrate(float_path: Path, recipe: list[dict], calibration: Calibration, pre, opts: LiteRTOptions) -> dict:
    """ai-edge-quantizer's own calibration (min/max of every tensor) over the calibration images, one at a time."""
    from ai_edge_quantizer import quantizer

    key, name = _signature_input(float_path)
    pre_d = pre.to_dict() if hasattr(pre, "to_dict") else pre
    samples = [{name: app_input(b[i : i + 1], pre_d)} for b in calibration.batches() for i in range(len(b))]
    q = quantizer.Quantizer(str(float_path), recipe)
    kw = {"num_threads": opts.calibration_threads} if opts.calibration_threads else {}
    return q.calibrate({key: samples}, **kw)


@dataclasses.dataclass(frozen=True)
class _CarriedInt8:
    """The ViT-aware recipe's decisions, keyed by torch Linear module name."""

    codes: Mapping[str, np.ndarray]  # [N, K] int8, torch Linear layout
    scales: Mapping[str, np.ndarray]  # [N] float32
    ranges: Mapping[str, tuple[float, float]]  # input range of each quantized linear (from its uint8 Q params)
    summary: Mapping[str, Any]


def _carry_int8_recipe(head, reference, calibration: Calibration, options: Mapping[str, Any], stages=None,
                      defaults: Mapping[str, Any] | None = None) -> _CarriedInt8:
    """Run the core int8 recipe on the reference ONNX and put its float-side decisions into ``head`` in place:
    SmoothQuant's LayerNorm/weight scaling and the GPTQ-rounded weights (codes * scale, exactly representable).
    Returns the codes, scales and activation ranges the LiteRT int8 model must carry. ``defaults``: this target's
    recipe fields (under the user's ``recipe`` overrides)."""
    from ..quantization.int8 import Int8Recipe

    # TFLite's int8 spec: weights symmetric in [-127, 127], int32 accumulation (XNNPACK QS8): no 7-bit workaround
    recipe = recipe_from(Int8Recipe, {"reduce_range": False, **(defaults or {}), **recipe_overrides(options, "litert", "int8")})
    if recipe.symmetric_activations and recipe.center_activations:
        raise VitexportError("litert int8 does not carry centred activations (center_activations): LiteRT's int8 activations are asymmetric")
    ref = reference.load()
    qmodel, summary = quantize_int8_shared(reference, calibration, recipe, stages)  # float statistics shared with the build's other int8 rows
    quantized = {r["node"] for r in summary["quantized"]}
    codes, scales, ranges, changed = _rewrite_parameters(head, ref, qmodel, quantized)
    if set(ranges) != set(codes) or len(ranges) != len(quantized):
        raise VitexportError("litert int8: quantized linears and their GPTQ codes do not match")
    return _CarriedInt8(codes, scales, ranges, _carried_summary(summary, len(codes), changed))


def _rewrite_parameters(head, ref, qmodel, quantized: set[str]) -> tuple[dict, dict, dict, int]:
    """Copy every LayerNorm/linear parameter of the quantized reference (SmoothQuant-scaled, GPTQ-rounded) into
    ``head``; return the int8 codes and scales per linear, each quantized linear's input range, and how many changed."""
    import torch
    from onnx import numpy_helper

    params_of = _node_parameters(head, ref)  # reference node -> {input position: (torch parameter, transposed?)}
    inits = {t.name: t for t in qmodel.graph.initializer}
    producer = {o: n for n in qmodel.graph.node for o in n.output}
    qnodes = {n.name: n for n in qmodel.graph.node if n.name}
    params = dict(head.named_parameters())
    codes_by, scales_by, ranges, changed = {}, {}, {}, 0
    for node_name, positions in params_of.items():
        q = qnodes.get(node_name)
        if q is None:
            raise VitexportError(f"litert int8: node {node_name} is missing from the quantized reference")
        for pos, (tname, transposed) in positions.items():
            arr, quant = _read_back(q.input[pos], inits, producer)
            with torch.no_grad():
                params[tname].copy_(torch.from_numpy(np.ascontiguousarray(arr.T if transposed else arr)).reshape(params[tname].shape))
            changed += 1
            if quant is not None:
                module = tname.rsplit(".", 1)[0]
                codes_by[module] = np.ascontiguousarray(quant[0].T if transposed else quant[0]).astype(np.int8)
                scales_by[module] = quant[1]
        if node_name in quantized:
            dq_act = producer[q.input[0]]
            s = float(numpy_helper.to_array(inits[dq_act.input[1]]))
            zp = int(numpy_helper.to_array(inits[dq_act.input[2]]))
            # the uint8 grid [0, 255] is the int8 grid [-128, 127] shifted by 128: the same range, the same codes
            ranges[positions[1][0].rsplit(".", 1)[0]] = ((0 - zp) * s, (255 - zp) * s)
    return codes_by, scales_by, ranges, changed


def _read_back(tensor: str, inits: Mapping[str, Any], producer: Mapping[str, Any]) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
    """A constant input of the quantized reference as float, with its (codes, scale) when a DequantizeLinear makes it."""
    from onnx import numpy_helper

    if tensor in inits:
        return numpy_helper.to_array(inits[tensor]).astype(np.float32), None
    dq = producer.get(tensor)
    if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
        raise VitexportError(f"litert int8: cannot read {tensor} back from the quantized reference")
    codes = numpy_helper.to_array(inits[dq.input[0]])
    scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float32)
    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
    shape = [1] * codes.ndim
    shape[axis] = -1
    return codes.astype(np.float32) * scale.reshape(shape), (codes, scale)


def _carried_summary(summary: Mapping[str, Any], quantized: int, changed: int) -> dict[str, Any]:
    fb = summary.get("sensitivity_fallback", {}).get("kept_float", [])
    return {
        "method": "vitexport.quantization.int8 (ViT-aware), carried into LiteRT",
        "recipe": summary["recipe"],
        "calibration": summary["calibration"],
        "smoothquant": {"alpha": summary["smoothquant"]["alpha"], "tensors": len(summary["smoothquant"]["tensors"])},
        "quantized": quantized,
        "kept_float": len(fb),
        "kept_float_inputs": [k.get("activation") for k in fb],
        "float_linears": [f["node"] + ": " + f["reason"] for f in summary["float"]],
        "torch_parameters_rewritten": changed,
        "weights": "int8 symmetric per-channel, GPTQ-rounded (full 8 bits: XNNPACK accumulates in int32)",
    }


def _node_parameters(head, ref) -> dict[str, dict[int, tuple[str, bool]]]:
    """Reference ONNX LayerNorm and linear nodes -> the torch parameters their constant inputs hold.

    Matched by execution order (torch forward hooks vs the exporter's topological order), then checked value by value:
    matching by value alone is ambiguous (identical LayerNorm parameters, which the exporter also deduplicates)."""
    import torch
    from onnx import numpy_helper

    from ..quantization.graph import GraphIndex, find_linears

    calls: list[tuple[str, Any]] = []
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: calls.append((n, mod)))
             for n, m in head.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.LayerNorm))]
    try:
        c, h, w = (d.dim_value for d in ref.graph.input[0].type.tensor_type.shape.dim[1:])
        with torch.no_grad():
            head(torch.zeros(1, c, h, w))
    finally:
        for hk in hooks:
            hk.remove()
    idx = GraphIndex(ref)
    lns = [n for n in ref.graph.node if n.op_type == "LayerNormalization"]
    linears = [l for l in find_linears(ref) if l.role != "patch_embed"]
    t_lns = [(n, m) for n, m in calls if isinstance(m, torch.nn.LayerNorm)]
    t_lin = [(n, m) for n, m in calls if isinstance(m, torch.nn.Linear)]
    if len(lns) != len(t_lns) or len(linears) != len(t_lin):
        raise VitexportError(f"litert int8: the reference has {len(lns)} LayerNorms and {len(linears)} linears, the checkpoint {len(t_lns)} and {len(t_lin)}")
    out: dict[str, dict[int, tuple[str, bool]]] = {}

    def check(onnx_name: str, param: str, array, transposed: bool) -> None:
        a = numpy_helper.to_array(idx.const_tensor(onnx_name)).astype(np.float32)
        t = array.detach().cpu().numpy().astype(np.float32)
        if (a.T if transposed else a).reshape(t.shape).tobytes() != t.tobytes():
            raise VitexportError(f"litert int8: the reference's {onnx_name} is not the checkpoint's {param}")

    for node, (name, mod) in zip(lns, t_lns):
        pos = {}
        for i, pname in ((1, "weight"), (2, "bias")):
            if len(node.input) > i and node.input[i] and getattr(mod, pname, None) is not None:
                check(node.input[i], f"{name}.{pname}", getattr(mod, pname), False)
                pos[i] = (f"{name}.{pname}", False)
        out[node.name] = pos
    for l, (name, mod) in zip(linears, t_lin):
        check(l.weight, f"{name}.weight", mod.weight, not l.trans_b)
        out[l.node.name] = {1: (f"{name}.weight", not l.trans_b)}
        if l.bias is not None and mod.bias is not None:
            users = [u for u in idx.consumers.get(l.node.output[0], []) if l.bias in u.input] if l.op_type == "MatMul" else [l.node]
            if len(users) == 1:
                check(l.bias, f"{name}.bias", mod.bias, False)
                out.setdefault(users[0].name, {})[list(users[0].input).index(l.bias)] = (f"{name}.bias", False)
    return out


def _clamp_inputs(head, ranges: Mapping[str, tuple[float, float]]) -> None:
    """Clamp each quantized linear's input to its int8 range, in float, before conversion.

    Quantizing saturates there anyway, so this changes nothing int8 computes. It is there because the LiteRT
    converter folds a LayerNorm's gamma/beta into the following FULLY_CONNECTED weights: the FC would then read the
    un-scaled normalised tensor, with other weights than GPTQ rounded and another range than the recipe measured.
    The clamp keeps the recipe's tensor (the LayerNorm output) as the FC's input, and its weights as they were."""
    import torch

    class Clamped(torch.nn.Module):
        def __init__(self, linear, lo: float, hi: float):
            super().__init__()
            self.linear, self.lo, self.hi = linear, lo, hi

        def forward(self, x):
            return self.linear(torch.clamp(x, self.lo, self.hi))

    for name, (lo, hi) in ranges.items():
        parent, _, child = name.rpartition(".")
        owner = head.get_submodule(parent) if parent else head
        setattr(owner, child, Clamped(getattr(owner, child), float(lo), float(hi)))


def _fc_modules(model, codes: Mapping[str, np.ndarray], scales: Mapping[str, np.ndarray]) -> dict[int, str]:
    """FULLY_CONNECTED op index -> torch module name, matched by weight values (the converter renames everything)."""
    from ai_edge_litert import schema_py_generated as schema

    g = model.subgraphs[0]
    by_bytes = {(tuple(c.shape), (c.astype(np.float32) * scales[m][:, None]).astype(np.float32).tobytes()): m for m, c in codes.items()}
    out = {}
    for i, op in enumerate(g.operators):
        oc = model.operatorCodes[op.opcodeIndex]
        if max(oc.builtinCode, oc.deprecatedBuiltinCode) != schema.BuiltinOperator.FULLY_CONNECTED:
            continue
        t = g.tensors[op.inputs[1]]
        buf = model.buffers[t.buffer].data
        if buf is None:
            continue
        arr = np.frombuffer(bytes(buf), np.float32) if t.type == schema.TensorType.FLOAT32 else None
        if arr is None:
            continue
        hit = by_bytes.get((tuple(t.shape), arr.tobytes()))
        if hit is not None:
            out[i] = hit
    return out


def _quantize_carried(float_path: Path, int8: _CarriedInt8, calibration: Calibration, pre, opts: LiteRTOptions) -> tuple[bytes, dict[str, Any]]:
    """int8 on exactly the recipe's linears with its GPTQ weight codes; static: with its activation ranges too."""
    from ai_edge_litert.tools import flatbuffer_utils as fbu

    model = fbu.read_model(str(float_path))
    g = model.subgraphs[0]
    fcs = _fc_modules(model, int8.codes, int8.scales)
    if set(fcs.values()) != set(int8.codes):
        missing = sorted(set(int8.codes) - set(fcs.values()))
        raise VitexportError(f"litert int8: {len(missing)} quantized linears not found in the converted model (e.g. {missing[:1]})")
    name = lambda i: g.tensors[i].name.decode()  # noqa: E731
    scopes = [re.escape(name(g.operators[i].outputs[0])) for i in fcs]
    # ai-edge-quantizer matches a regex against each op's scope (its output tensor names, ';'-joined, trailing ';')
    regex = f"^(?:{'|'.join(scopes)});$"
    if opts.int8_activations == "dynamic":  # no activation ranges to give: the kernel quantizes each row as it comes
        return _place_codes(_quantize(float_path, [{"regex": regex, "operation": "FULLY_CONNECTED", "algorithm_key": "min_max_uniform_quantize",
                                                    "op_config": _DYNAMIC_INT8_OP_CONFIG}], None), fcs, int8)
    recipe = [{"regex": regex, "operation": "FULLY_CONNECTED", "algorithm_key": "min_max_uniform_quantize", "op_config": _INT8_OP_CONFIG}]
    qsv = _calibrate(float_path, recipe, calibration, pre, opts)  # the FC outputs' ranges (int8 in TFLite, float in ONNX)
    for i, module in fcs.items():
        lo, hi = int8.ranges[module]
        qsv[name(g.operators[i].inputs[0])] = {"min": np.array(lo, np.float32), "max": np.array(hi, np.float32)}
    data = _quantize(float_path, recipe, qsv)
    return _place_codes(data, fcs, int8)


def _place_codes(data: bytes, fcs: Mapping[int, str], int8: _CarriedInt8) -> tuple[bytes, dict[str, Any]]:
    """Put the recipe's exact GPTQ codes into the quantized FULLY_CONNECTED weights (the quantizer re-rounds the
    dequantized values; where a channel's largest code is not 127 its scale, and so its rounding, would differ)."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils as fbu

    model = fbu.read_model_from_bytearray(bytearray(data))
    g = model.subgraphs[0]
    ops = [i for i, op in enumerate(g.operators)
           if max(model.operatorCodes[op.opcodeIndex].builtinCode, model.operatorCodes[op.opcodeIndex].deprecatedBuiltinCode) == schema.BuiltinOperator.FULLY_CONNECTED]
    int8_fcs = [i for i in ops if g.tensors[g.operators[i].inputs[1]].type == schema.TensorType.INT8]
    if len(int8_fcs) != len(fcs):
        raise VitexportError(f"litert int8: ai-edge-quantizer made {len(int8_fcs)} int8 FULLY_CONNECTED ops, the recipe has {len(fcs)}")
    # the quantizer inserts QUANTIZE/DEQUANTIZE ops but keeps the FC ops in order
    modules = [fcs[i] for i in sorted(fcs)]
    differing = rescaled = 0
    for i, module in zip(int8_fcs, modules):
        op = g.operators[i]
        wt, bt, xt = g.tensors[op.inputs[1]], (g.tensors[op.inputs[2]] if len(op.inputs) > 2 and op.inputs[2] >= 0 else None), g.tensors[op.inputs[0]]
        codes, scale = int8.codes[module], int8.scales[module]
        current = np.frombuffer(bytes(model.buffers[wt.buffer].data), np.int8).reshape(codes.shape)
        differing += int((current != codes).sum())
        old = np.asarray(wt.quantization.scale, np.float32)
        if not np.allclose(old, scale, rtol=1e-6, atol=0):
            rescaled += 1
            if bt is not None and bt.type == schema.TensorType.INT32:  # bias scale is input scale x weight scale
                s_in = float(np.asarray(xt.quantization.scale)[0])
                bias = np.frombuffer(bytes(model.buffers[bt.buffer].data), np.int32).astype(np.float64) * s_in * old
                model.buffers[bt.buffer].data = np.round(bias / (s_in * scale.astype(np.float64))).astype(np.int32).view(np.uint8)
                bt.quantization.scale = list((s_in * scale.astype(np.float64)).astype(np.float32))
            wt.quantization.scale = list(scale)
        model.buffers[wt.buffer].data = np.ascontiguousarray(codes).view(np.uint8).reshape(-1)
    out = bytes(fbu.convert_object_to_bytearray(model))
    return out, {"int8_fully_connected": len(int8_fcs), "codes_placed": int(sum(c.size for c in int8.codes.values())),
                 "codes_the_quantizer_rounded_differently": differing, "channels_scales_replaced_in_layers": rescaled}


def _metadata(reference, recipe: Mapping[str, Any]) -> dict[str, Any]:
    spec = reference.spec
    return {
        "model": spec.summary(reference.num_parameters),
        "task": spec.task,
        "preprocessing": spec.preprocessing.to_dict(),
        "input": recipe["input"],
        "output": recipe["output"],
        "labels_file": LABELS,
        "labels": spec.labels_list(),
    }


def _with_metadata(data: bytes, meta: Mapping[str, Any]) -> bytes:
    """Add ``vitexport`` (JSON) and ``labels.txt`` entries to the flatbuffer's metadata table (Interpreter ignores them;
    any flatbuffer reader, and ``ai_edge_litert`` tools, can read them back)."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils as fbu

    model = fbu.read_model_from_bytearray(bytearray(data))
    for key, payload in ((METADATA_KEY, json.dumps(meta, default=str).encode()), (LABELS, "".join(f"{l}\n" for l in meta["labels"]).encode())):
        buf = schema.BufferT()
        buf.data = np.frombuffer(payload, np.uint8)
        model.buffers.append(buf)
        entry = schema.MetadataT()
        entry.name = key
        entry.buffer = len(model.buffers) - 1
        model.metadata = (model.metadata or []) + [entry]
    return bytes(fbu.convert_object_to_bytearray(model))


def read_metadata(path: Path) -> dict[str, Any]:
    """The ``vitexport`` metadata entry of a .tflite written by this backend."""
    from ai_edge_litert.tools import flatbuffer_utils as fbu

    model = fbu.read_model(str(path))
    for m in model.metadata or []:
        if (m.name.decode() if isinstance(m.name, bytes) else m.name) == METADATA_KEY:
            return json.loads(bytes(model.buffers[m.buffer].data).decode())
    raise VitexportError(f"{path} has no {METADATA_KEY} metadata: rebuild it with vitexport")


def _op_counts(path: Path) -> dict[str, int]:
    """Operator histogram of the .tflite (which ops are int8 is visible as QUANTIZE/DEQUANTIZE counts)."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils as fbu

    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    model = fbu.read_model(str(path))
    counts: dict[str, int] = {}
    for op in model.subgraphs[0].operators:
        oc = model.operatorCodes[op.opcodeIndex]
        n = names.get(max(oc.builtinCode, oc.deprecatedBuiltinCode), "CUSTOM")
        counts[n] = counts.get(n, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


class _quiet:
    """litert-torch logs progress and torch.export warns: keep them out of the build's output (debug log keeps them)."""

    def __enter__(self):
        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore")
        self._buf = io.StringIO()
        self._out = contextlib.redirect_stdout(self._buf)
        self._err = contextlib.redirect_stderr(self._buf)
        self._out.__enter__()
        self._err.__enter__()
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        return self

    def __exit__(self, *exc):
        self._err.__exit__(*exc)
        self._out.__exit__(*exc)
        log.debug("litert-torch: %s", self._buf.getvalue()[-2000:])
        self._w.__exit__(*exc)
        return False


# ---------------------------------------------------------------------------------------------------------- running


class LiteRTRunner:
    """The .tflite on ai-edge-litert's Interpreter with its default XNNPACK delegate: measured, not emulated."""

    emulated = False

    def __init__(self, artifact: Artifact, threads: int | None = None):
        from importlib.metadata import version

        from ai_edge_litert.interpreter import Interpreter

        self.pre = artifact.manifest.get("preprocessing", {})
        try:
            self.interpreter = Interpreter(model_path=str(artifact.path), num_threads=threads or None)
            self.interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as e:
            raise VitexportError(f"LiteRT cannot load {artifact.path}: {str(e).splitlines()[0][:200]} (rebuild the artifact)") from None
        inp, out = self.interpreter.get_input_details()[0], self.interpreter.get_output_details()[0]
        self.input_index, self.output_index = inp["index"], out["index"]
        # a fully integer model (the stock recipe) has int8 input/output: quantize and dequantize as an app would
        self.input_q = (inp["dtype"], *inp["quantization"]) if inp["dtype"] != np.float32 else None
        self.output_q = out["quantization"] if out["dtype"] != np.float32 else None
        self.threads = threads
        self.runtime = f"ai-edge-litert {version('ai-edge-litert')} (XNNPACK)"
        from ..harness.report import cpu_name

        self.device = f"{cpu_name()} ({platform.machine()}), LiteRT CPU (XNNPACK delegate)"

    def run(self, batch: np.ndarray) -> np.ndarray:
        x = app_input(batch, self.pre)
        outs = []
        if self.input_q is not None:
            dtype, scale, zp = self.input_q
            info = np.iinfo(dtype)
            x = np.clip(np.round(x / scale) + zp, info.min, info.max).astype(dtype)
        for i in range(len(x)):  # batch-1 model, as an app runs it
            self.interpreter.set_tensor(self.input_index, x[i : i + 1])
            self.interpreter.invoke()
            y = np.array(self.interpreter.get_tensor(self.output_index)).reshape(1, -1)
            outs.append(((y.astype(np.float32) - self.output_q[1]) * self.output_q[0]) if self.output_q is not None else y)
        return np.concatenate(outs)
