"""ONNX Runtime target (x86/ARM CPU hosts, Raspberry Pi): fp32, int8, int4 weight-only (MatMulNBits).

int8 is the shared recipe's weights (SmoothQuant, GPTQ) with each quantized linear and its bias written as the
``com.microsoft.MatMulIntegerToFloat`` that onnxruntime would make of the QDQ pattern at load time, bias included
(onnxruntime leaves the bias ``Add`` outside; see ``fold_bias_into_integer_matmuls``). By default its inputs are
quantized with ranges taken at run time (``dynamic_activation_ranges``); ``activations = "static"`` keeps the
calibrated ranges and the float fallback (``INT8_SETTINGS``).

``[options.onnxruntime] mobile = true`` (the android-ort profile) makes ONNX Runtime Mobile artifacts: the same
model converted to the ``.ort`` format (which a minimal/mobile ONNX Runtime build loads), the operator config for a
reduced-size build, and what onnxruntime's own mobile usability checker says about NNAPI/CoreML partitioning.

The whole story of this target is here: what each precision is, how it is built from the reference
ONNX, and how it runs. The quantization recipes themselves live in `vitexport.quantization`,
shared with other backends that consume QDQ ONNX.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..artifacts import Artifact, save_onnx, write_manifest
from ..errors import VitexportError
from ..harness.report import cpu_name
from . import Calibration, Capability, backend_options, precision_options, quantize_int8_shared, read_rows_only, recipe_from, recipe_overrides, reference_on_read_rows, require_calibration, shared_int4

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MobileOptions:
    """``[options.onnxruntime]`` in a profile: whether to also write the ONNX Runtime Mobile (.ort) artifact."""

    mobile: bool = False
    # "Fixed" bakes the CPU EP's optimizations in (onnxruntime's advice for the CPU EP, which its checker recommends
    # for ViTs: NNAPI/CoreML split them into many partitions); "Runtime" leaves them to the device (NNAPI/CoreML EPs)
    optimization_style: str = "Fixed"
    target_platform: str = "arm"  # Android/iOS phones; "amd64" for x86 Android images
    check_usability: bool = True

    def __post_init__(self):
        if self.optimization_style not in ("Fixed", "Runtime"):
            raise VitexportError(f"onnxruntime optimization_style must be Fixed or Runtime, not {self.optimization_style!r}")
        if self.target_platform not in ("arm", "amd64"):
            raise VitexportError(f"onnxruntime target_platform must be arm or amd64, not {self.target_platform!r}")



# [options.onnxruntime.int8] besides `recipe`: how the linears the sensitivity search keeps out of static int8 run.
# "float": float MatMuls (the default: the most faithful). "blockwise_int8": MatMulNBits with 8-bit weights per block
# of `fallback_block_size` along K and accuracy_level 4, so onnxruntime quantizes their inputs per row and block at run
# time and multiplies in int8: finer than any static range, and on x86 1.4-1.7x faster than float (ViT-Base profile). It needs
# onnxruntime >= 1.22 on x86 and >= 1.23 on ARM64 CPUs with dot-product instructions (not a Raspberry Pi 4's A72).
INT8_SETTINGS: dict[str, Any] = {"activations": "dynamic", "fallback_kernel": "float", "fallback_block_size": 32}
FALLBACK_KERNELS = ("float", "blockwise_int8")
ACTIVATIONS = ("static", "dynamic")
# the core recipe's defaults under each activation mode (a profile's `recipe = {...}` still overrides them). Dynamic
# ranges need no float fallback (the search measures static ranges' damage, and a float linear costs 3-4 int8 ones)
# and GPTQ rounds against the float inputs' X^T X: compensating for the static ranges' error, which these inputs do
# not have, measured worse (41 held-out calibration images, benchmarks/onnxruntime_int8_choice.py: KL 0.0030 without,
# 0.0034 with), and it saves the build its quantized-input pass
INT8_RECIPE: dict[str, dict[str, Any]] = {"static": {}, "dynamic": {"fallback_budget": 0.0, "compensate_activations": False}}


def int8_settings(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``[options.onnxruntime.int8]`` without its recipe, over the defaults; a bad key or value is one clear error."""
    mine = {k: v for k, v in precision_options(options, "onnxruntime", "int8").items() if k != "recipe"}
    unknown = set(mine) - set(INT8_SETTINGS)
    if unknown:
        raise VitexportError(f"unknown [options.onnxruntime.int8] option(s) {', '.join(sorted(unknown))}: known are recipe, {', '.join(INT8_SETTINGS)}")
    settings = {**INT8_SETTINGS, **mine}
    if settings["activations"] not in ACTIVATIONS:
        raise VitexportError(f"onnxruntime activations must be one of {', '.join(ACTIVATIONS)}, not {settings['activations']!r}")
    if settings["fallback_kernel"] not in FALLBACK_KERNELS:
        raise VitexportError(f"onnxruntime fallback_kernel must be one of {', '.join(FALLBACK_KERNELS)}, not {settings['fallback_kernel']!r}")
    b = settings["fallback_block_size"]
    if not isinstance(b, int) or b < 16 or b & (b - 1):
        raise VitexportError(f"onnxruntime fallback_block_size must be a power of two >= 16 (MatMulNBits), not {b!r}")
    return settings


class OnnxRuntimeBackend:
    name = "onnxruntime"
    capabilities = {
        "fp32": Capability(calibration=False, runs_here="measured"),
        "int8": Capability(calibration=True, runs_here="measured", recipe="vitexport.quantization.int8:Int8Recipe", settings=INT8_SETTINGS),
        "int4": Capability(calibration=True, runs_here="measured", recipe="vitexport.quantization.int4:Int4Recipe"),
    }
    precisions = tuple(capabilities)
    settings = MobileOptions  # [options.onnxruntime]; threads come from the profile's top level
    summary = {"devices": "x86/ARM CPUs, Raspberry Pi", "artifact": "`model.onnx` (int8: QuantizeLinear + `MatMulIntegerToFloat`, `MatMulNBits` int4); with `mobile = true` also `model.ort` + reduced-build operator config", "measured": "the real runtime"}

    def available(self) -> tuple[bool, str]:
        try:
            import onnxruntime
        except ImportError:
            return False, "onnxruntime is not installed: pip install onnxruntime"
        return True, f"onnxruntime {onnxruntime.__version__}"

    def build(self, reference, calibration: Calibration | None, precision: str, options: Mapping[str, Any], out_dir: Path, stages=None) -> Artifact:
        out_dir.mkdir(parents=True, exist_ok=True)
        target = out_dir / "model.onnx"
        if precision == "fp32":
            rows = reference_on_read_rows(reference, target)
            recipe: dict[str, Any] = {"kind": "float32 reference", "opset": reference.opset, "verification": dict(reference.verification), "read_rows": rows}
        elif precision == "int8":
            from ..quantization.int8 import Int8Recipe

            settings = int8_settings(options)
            recipe_obj = recipe_from(Int8Recipe, {**INT8_RECIPE[settings["activations"]], **recipe_overrides(options, self.name, "int8")})
            model, recipe = quantize_int8_shared(reference, require_calibration(calibration, precision), recipe_obj, stages)
            kernels = fold_bias_into_integer_matmuls(model)
            if settings["activations"] == "dynamic":
                kernels["activations"] = dynamic_activation_ranges(model)
                recipe = {**recipe, "activations": "uint8 asymmetric, per-tensor range of each input at run time (DynamicQuantizeLinear)"}
            if settings["fallback_kernel"] == "blockwise_int8":
                fallback = {n for k in recipe.get("sensitivity_fallback", {}).get("kept_float", []) for n in k["nodes"]}
                kernels["fallback"] = blockwise_int8_fallback(model, fallback, settings["fallback_block_size"])
            recipe = {**recipe, "kernels": kernels, "read_rows": read_rows_only(model)}
            save_onnx(model, target, reference.metadata())
        elif precision == "int4":
            from ..quantization.int4 import Int4Recipe

            recipe_obj = recipe_from(Int4Recipe, recipe_overrides(options, self.name, "int4"))
            model, recipe = shared_int4(reference, require_calibration(calibration, precision), recipe_obj, stages=stages)
            recipe = {**recipe, "read_rows": read_rows_only(model)}
            save_onnx(model, target, reference.metadata())
        else:
            raise VitexportError(f"onnxruntime has no precision {precision}: choose from {', '.join(self.precisions)}")
        if calibration is not None and precision != "fp32":
            recipe = {**recipe, "calibration_images": calibration.count, "calibration_source": calibration.source}
        recipe["summary"] = describe(precision, recipe)
        main = target.name
        mobile = recipe_from(MobileOptions, backend_options(options, self.name), "onnxruntime")
        if mobile.mobile:
            recipe["mobile"] = write_mobile(target, mobile)
            recipe["summary"] += f"; ONNX Runtime Mobile .ort ({mobile.optimization_style} optimizations, {mobile.target_platform})"
            main = MOBILE_MODEL
        return write_manifest(out_dir, backend=self.name, precision=precision, main=main, recipe=recipe, **reference.manifest_fields())

    def runner(self, artifact: Artifact, threads: int | None = None) -> "OrtRunner":
        ok, why = self.available()
        if not ok:
            raise VitexportError(why)
        return OrtRunner(artifact.path, threads)


class OrtRunner:
    """Runs an ONNX model on this host's CPU with ONNX Runtime: the real runtime, so nothing is emulated."""

    emulated = False
    runtime = "onnxruntime"

    def __init__(self, path: Path, threads: int | None = None, emulated: bool = False):
        import onnxruntime as ort

        from ..ort_session import ort_session

        self.session = ort_session(path, threads)
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self.threads = threads
        self.emulated = emulated
        self.runtime = f"onnxruntime {ort.__version__}"
        self.device = f"{cpu_name()} ({platform.machine()}), CPUExecutionProvider"
        self.per_image = runtime_ranges(path)

    def run(self, batch: np.ndarray) -> np.ndarray:
        if self.per_image and len(batch) > 1:
            return np.concatenate([self.run(batch[i : i + 1]) for i in range(len(batch))])
        return self.session.run([self.output_name], {self.input_name: batch})[0]


def runtime_ranges(path: Path) -> bool:
    """Whether the model quantizes activations with ranges taken at run time (DynamicQuantizeLinear, onnxruntime's
    DynamicQuantizeMatMul). Such a range spans the whole batch, so an image's logits would depend on the images
    batched with it: these models are evaluated one image per run, as a batch-1 deployment runs them. Op types are
    plain strings in the protobuf, so this needs no onnx (devices do not have it)."""
    needle, tail = b"DynamicQuantize", b""
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 24)  # weights can be hundreds of MB: scan, do not load
            if not chunk:
                return False
            if needle in tail + chunk:
                return True
            tail = chunk[-len(needle):]


def describe(precision: str, recipe: Mapping[str, Any]) -> str:
    """One line for the report; the whole recipe stays in the manifest."""
    if precision == "int8":
        fb = recipe.get("sensitivity_fallback", {}).get("kept_float", [])
        c = recipe.get("counts", {})
        dynamic = recipe.get("kernels", {}).get("activations", {}).get("mode") == "dynamic"
        ranges = "" if dynamic else f" ({recipe.get('calibration', {}).get('method')} ranges)"
        return (
            f"int8 (MatMulIntegerToFloat, bias folded): {recipe.get('activations')} activations{ranges}, "
            f"{recipe.get('weights')} weights with GPTQ rounding; {c.get('quantized')} linears int8, "
            f"{len(fb)} inputs left float by measured sensitivity ({100 * sum(k['mac_fraction'] for k in fb):.1f}% of linear MACs)"
        )
    if precision == "int4":
        return f"int4 weight-only MatMulNBits: {recipe.get('method')}, block sizes {recipe.get('block_sizes')}, {recipe.get('quantized')} linears int4, head float"
    return "float32 reference ONNX"


def fold_bias_into_integer_matmuls(model: onnx.ModelProto) -> dict[str, Any]:
    """Each quantized linear ``DQ(x) -> MatMul <- DQ(W)`` and its bias ``Add`` become one
    ``com.microsoft.MatMulIntegerToFloat`` that takes the bias, in place.

    onnxruntime makes that same node from the QDQ pattern when it loads the model, but leaves the bias ``Add``
    outside it: one more pass over every linear's output (ViT-Base: 72 of them, about 4 % of the int8 row's time;
    its stock dynamic int8 folds them). The QDQ model other runtimes read is untouched: this is the ONNX Runtime
    artifact only. The integer product and scales are the ones onnxruntime's QDQ pass uses; the bias is added inside
    the kernel, so logits move by float rounding only (measured: 5e-7 on DeiT-tiny's).
    """
    from onnx import helper

    from ..quantization.graph import MS_DOMAIN, GraphIndex, ensure_ms_opset

    idx = GraphIndex(model)
    fused: dict[int, onnx.NodeProto] = {}  # the bias Add's place -> the fused node
    gone: set[int] = set()
    for n in idx.graph.node:
        parts = _integer_linear(idx, n)
        if parts is None:
            continue
        dq_x, dq_w, add, bias = parts
        fused[id(add)] = helper.make_node(
            "MatMulIntegerToFloat", [dq_x.input[0], dq_w.input[0], dq_x.input[1], dq_w.input[1], dq_x.input[2], dq_w.input[2], bias],
            [add.output[0]], name=f"{n.name}_bias_folded", domain=MS_DOMAIN)
        gone.add(id(n))
    nodes = [fused.get(id(n), n) for n in idx.graph.node if id(n) not in gone]
    used = {i for n in nodes for i in n.input} | idx.graph_outputs
    nodes = [n for n in nodes if not (n.op_type == "DequantizeLinear" and n.output[0] not in used)]  # the weights' and inputs' DQs now unread
    _replace_nodes(model, nodes)
    if fused:
        ensure_ms_opset(model)
    return {"bias_folded_integer_matmuls": len(fused), "op": "com.microsoft.MatMulIntegerToFloat"}


def dynamic_activation_ranges(model: onnx.ModelProto) -> dict[str, Any]:
    """Each activation ``QuantizeLinear`` whose readers are all folded ``MatMulIntegerToFloat`` nodes becomes a
    ``DynamicQuantizeLinear`` (uint8, the input's own min/max at run time), in place; its readers take that scale and
    zero point instead of the calibrated ones. The weights stay the recipe's (SmoothQuant, GPTQ). It is what
    onnxruntime's stock dynamic int8 runs (the same kernels, so the same speed), with those weights."""
    from onnx import TensorProto, helper

    from ..quantization.graph import GraphIndex, drop_unused_constants

    idx = GraphIndex(model)
    done = 0
    for q in idx.graph.node:
        users = idx.consumers.get(q.output[0], []) if q.op_type == "QuantizeLinear" else []
        if not users or any(u.op_type != "MatMulIntegerToFloat" or u.input[0] != q.output[0] for u in users):
            continue
        zp = idx.initializers.get(q.input[2]) if len(q.input) > 2 else None
        if zp is None or zp.data_type != TensorProto.UINT8:  # DynamicQuantizeLinear is uint8 only
            continue
        scale, zero = f"{q.output[0]}_dynamic_scale", f"{q.output[0]}_dynamic_zero_point"
        q.CopyFrom(helper.make_node("DynamicQuantizeLinear", [q.input[0]], [q.output[0], scale, zero], name=f"{q.name}_dynamic"))
        for u in users:
            u.input[2], u.input[4] = scale, zero
        done += 1
    drop_unused_constants(model)  # the calibrated scales and zero points
    return {"mode": "dynamic", "op": "DynamicQuantizeLinear (uint8, per tensor)", "quantized_inputs": done}


def blockwise_int8_fallback(model: onnx.ModelProto, nodes: set[str], block: int) -> dict[str, Any]:
    """The float linears named in ``nodes`` (MatMul with a weight initializer, and its bias Add) become
    ``com.microsoft.MatMulNBits`` with ``bits=8``, in place: symmetric round-to-nearest codes per block of ``block``
    along K (8-bit: the weight error is small next to the activations'), ``accuracy_level=4`` (inputs quantized to int8
    per row and block at run time)."""
    from onnx import helper, numpy_helper

    from ..quantization.graph import MS_DOMAIN, GraphIndex, drop_unused_constants, ensure_ms_opset

    idx = GraphIndex(model)
    g, inits = idx.graph, idx.initializers
    done: dict[int, onnx.NodeProto] = {}
    gone: set[int] = set()
    for n in g.node:
        readers = idx.consumers.get(n.output[0], [])
        if n.name not in nodes or n.op_type != "MatMul" or n.input[1] not in inits or len(readers) != 1 or readers[0].op_type != "Add":
            continue
        add = readers[0]
        bias = next((i for i in add.input if i != n.output[0]), None)
        w = numpy_helper.to_array(inits[n.input[1]]).astype(np.float32)
        if bias not in inits or w.ndim != 2 or list(inits[bias].dims) != [w.shape[1]]:
            continue
        (k, cols), kp = w.shape, -(-w.shape[0] // block) * block
        wb = np.pad(w.T, ((0, 0), (0, kp - k))).reshape(cols, kp // block, block)
        scale = (np.abs(wb).max(axis=2) / 127.0).astype(np.float32)
        scale[scale == 0] = 1.0
        codes = (np.clip(np.rint(wb / scale[:, :, None]), -127, 127) + 128).astype(np.uint8)  # no zero point input: 128
        tag = f"{n.name}_w8"
        g.initializer.extend([numpy_helper.from_array(codes, tag + "_B"), numpy_helper.from_array(scale.reshape(-1), tag + "_scales")])
        done[id(add)] = helper.make_node("MatMulNBits", [n.input[0], tag + "_B", tag + "_scales", "", "", bias], [add.output[0]], name=tag,
                                         domain=MS_DOMAIN, K=k, N=cols, bits=8, block_size=block, accuracy_level=4)
        gone.add(id(n))
    _replace_nodes(model, [done.get(id(n), n) for n in g.node if id(n) not in gone])
    drop_unused_constants(model)
    if done:
        ensure_ms_opset(model)
    return {"kernel": "blockwise_int8", "op": "com.microsoft.MatMulNBits (bits 8, accuracy_level 4)", "block_size": block, "linears": len(done)}


def _replace_nodes(model: onnx.ModelProto, nodes: list) -> None:
    g = model.graph
    del g.node[:]
    g.node.extend(nodes)


def _integer_linear(idx, n):
    """(DQ of x, DQ of W, bias Add, bias name) when ``n`` is a quantized linear whose only reader adds a constant
    1-D bias, else None."""
    inits = idx.initializers
    if n.op_type != "MatMul" or n.output[0] in idx.graph_outputs:
        return None
    dq_x, dq_w = idx.producer.get(n.input[0]), idx.producer.get(n.input[1])
    if dq_x is None or dq_w is None or dq_x.op_type != "DequantizeLinear" or dq_w.op_type != "DequantizeLinear":
        return None
    if len(dq_x.input) < 3 or len(dq_w.input) < 3 or not all(i in inits for i in dq_w.input) or any(i not in inits for i in dq_x.input[1:]):
        return None
    if len(inits[dq_w.input[0]].dims) != 2 or len(inits[dq_x.input[1]].dims) != 0:  # per-tensor x, 2-D W: what the kernel takes
        return None
    readers = idx.consumers.get(n.output[0], [])
    if len(readers) != 1 or readers[0].op_type != "Add":
        return None
    add = readers[0]
    bias = next((i for i in add.input if i != n.output[0]), None)
    if bias not in inits or list(inits[bias].dims) != [inits[dq_w.input[0]].dims[1]]:
        return None
    return dq_x, dq_w, add, bias


# ------------------------------------------------------------------------------------------- ONNX Runtime Mobile

MOBILE_MODEL = "model.ort"
MOBILE_OPS_CONFIG = "required_operators.config"
MOBILE_USABILITY = "mobile_usability.txt"


def write_mobile(onnx_path: Path, opts: MobileOptions) -> dict[str, Any]:
    """Convert ``onnx_path`` to ``model.ort`` beside it, with the reduced build's operator config; record the checker."""
    import tempfile

    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    out_dir = onnx_path.parent
    with tempfile.TemporaryDirectory() as tmp:
        # the converter converts every .onnx under its input: give it a folder holding only this model
        src = Path(tmp) / "in" / "model.onnx"
        src.parent.mkdir()
        os.symlink(onnx_path.resolve(), src)
        if Path(str(onnx_path) + ".data").exists():
            os.symlink(Path(str(onnx_path) + ".data").resolve(), Path(str(src) + ".data"))
        dest = Path(tmp) / "out"
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # it prints progress
                convert_onnx_models_to_ort(src.parent, output_dir=dest, optimization_styles=[OptimizationStyle[opts.optimization_style]],
                                           target_platform=opts.target_platform)
        except Exception as e:  # onnxruntime's converter raises its own failure types
            raise VitexportError(f"onnxruntime cannot convert {onnx_path.name} to the .ort format: {str(e).splitlines()[0][:200]}") from None
        ort_files = sorted(dest.rglob("*.ort"))
        configs = sorted(dest.rglob("*.config"))
        if len(ort_files) != 1 or len(configs) != 1:
            raise VitexportError(f"onnxruntime's .ort converter wrote {len(ort_files)} models and {len(configs)} configs, expected one each")
        shutil.copyfile(ort_files[0], out_dir / MOBILE_MODEL)
        # the generated header names the temporary path: name the artifact's own file instead
        ops = [l for l in configs[0].read_text().splitlines() if l and not l.startswith("#")]
        (out_dir / MOBILE_OPS_CONFIG).write_text(f"# Generated by onnxruntime.tools.convert_onnx_models_to_ort from {MOBILE_MODEL}\n" + "\n".join(ops) + "\n")
    summary: dict[str, Any] = {
        "model": MOBILE_MODEL,
        "source": onnx_path.name,
        "optimization_style": opts.optimization_style,
        "target_platform": opts.target_platform,
        "operators_config": MOBILE_OPS_CONFIG,
        "operators": ops,
        "reduced_build": f"build.py --minimal_build --include_ops_by_config {MOBILE_OPS_CONFIG} (add extended for NNAPI/CoreML)",
        "runtime": "onnxruntime-android (Maven com.microsoft.onnxruntime:onnxruntime-android) or onnxruntime-c/objc (CocoaPods), or a reduced build",
        # measured: bit-identical to the .onnx run with the same options; an x86 host also applies NchwcTransformer
        "numerics": ("the graph ONNX Runtime optimizes for arm: the .onnx's outputs on an ARM CPU (its int8 QDQ fusions allowed, no NCHWc); "
                     "on x86 the .onnx's patch convolution runs in the NCHWc blocked layout instead, so its logits differ by rounding there")
                    if opts.target_platform == "arm" else "the graph ONNX Runtime optimizes for amd64: the .onnx's outputs on this kind of host",
    }
    if opts.check_usability:
        summary["usability"] = check_mobile_usability(onnx_path, out_dir / MOBILE_USABILITY)
    return summary


def check_mobile_usability(onnx_path: Path, report: Path) -> dict[str, Any]:
    """Run ``python -m onnxruntime.tools.check_onnx_model_mobile_usability`` and keep what it says.

    It is a command-line tool that logs its findings; its verdict lines are parsed, its full text kept in ``report``.
    It checks NNAPI and CoreML partitioning; it does not check XNNPACK (which takes MatMul/Conv/Gemm and leaves the rest
    to the CPU EP).
    """
    try:
        proc = subprocess.run([sys.executable, "-m", "onnxruntime.tools.check_onnx_model_mobile_usability", str(onnx_path)],
                              capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        return {"error": "check_onnx_model_mobile_usability did not finish in 15 minutes"}
    text = (proc.stdout + proc.stderr).replace(str(onnx_path), onnx_path.name)
    report.write_text(text)
    lines = [l.removeprefix("INFO:").strip() for l in text.splitlines()]
    verdicts: dict[str, Any] = {"tool": "python -m onnxruntime.tools.check_onnx_model_mobile_usability", "exit_code": proc.returncode, "full_text": report.name}
    keys = ("partitions with a total of", "Unsupported ops:", "Model should perform well", "not recommended", "will probably not work", "fixed")
    ep = None
    for l in lines:
        if l.startswith("Checking ") and "for usability" not in l and not l.startswith("Checking if"):
            ep = l.removeprefix("Checking ").strip()
            verdicts[ep] = []
        elif l.startswith("For optimal performance") or l.startswith("As NNAPI or CoreML may provide"):
            verdicts["recommendation"] = l
        elif ep and any(k in l for k in keys):
            verdicts[ep].append(l)  # in order: as is, then with the dynamic shapes fixed
    return verdicts
