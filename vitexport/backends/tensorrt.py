"""TensorRT target (NVIDIA Jetson Orin, desktop and data-centre NVIDIA GPUs): fp16, int8 (explicit QDQ), fp32.

The whole story of this target is here:

- **What an artifact is.** A TensorRT engine only runs on the GPU model and TensorRT version that built it, so the
  portable part of the artifact is an ONNX file TensorRT builds from, plus everything needed to build the engine on
  the device: ``build_engine.py`` (TensorRT's Python API; needs nothing but TensorRT), ``tensorrt.json`` (the build
  plan that script reads), ``trtexec.sh`` (the same build as one trtexec command line), and the manifest.
  When ``import tensorrt`` works and a GPU is present where ``vitexport build`` runs, the engine is built there too
  (``model.engine`` + ``engine.json``) with the same code.
- **Precisions.** ``fp16``: the fp32 reference ONNX (LayerNormalization kept as one op, so TensorRT's fp16
  normalization does not overflow the way a decomposed LayerNorm does) built with the FP16 flag. ``int8``: an
  explicitly quantized (QDQ) ONNX from the core ViT recipe (``vitexport.quantization.int8``) with TensorRT's
  settings: symmetric signed int8 activations and weights (zero point 0), per-output-channel weight scales (axis 1 of a
  MatMul's [K, N] weight, axis 0 of a transB Gemm's [N, K]), full 8-bit weights (TensorRT accumulates in int32, so the
  7-bit AVX2 workaround is off), Q/DQ only on the inputs of the linear layers' MatMul/Gemm; residual Adds,
  LayerNorm, Softmax, GELU and the attention matmuls stay float (fp16 in the engine, which keeps TensorRT's fused
  attention). No calibrator: the scales are in the graph. ``fp32``: the reference ONNX with TF32 turned off.
- **Engine build settings.** One optimisation profile for the batch axis of ``pixel_values`` (min/opt/max batch), a
  workspace memory-pool limit, a timing cache file reused between builds (by default ``tensorrt-timing.cache`` inside
  the artifact folder, which stays self-contained; ``build_engine.py --timing-cache`` shares one between folders), weakly typed networks with ``--fp16`` / ``--int8 --fp16`` by default
  (the non-quantized layers then run in fp16; works on TensorRT 8.6 and 10.x), or ``strongly_typed = true`` for
  ``--stronglyTyped`` (TensorRT >= 9; the float layers then keep the ONNX's fp32).
- **Measuring.** With an engine and TensorRT here, the runner runs the engine (device memory through cuda-python,
  or torch's CUDA allocator if that is what is installed). Without them, ``EmulationRunner`` runs the artifact's ONNX
  in ONNX Runtime on the CPU with the arithmetic of the plan: an int8 QDQ graph as float fake-quantization
  (QuantizeLinear -> DequantizeLinear -> float MatMul; ORT's QDQ fusion into integer kernels is switched off, because
  its AVX2 u8s8/s8s8 kernels saturate int16 pair sums where TensorRT's int32 accumulation does not), and, when the
  plan has the FP16 flag (fp16, and weakly typed int8), every tensor between kernels and every float weight rounded to
  float16 (``harness/emulation.py``). Rows say ``emulated: true`` and have no latency. fp32 would only repeat the
  reference and says "not run here".
- **Jetson.** JetPack 6.1/6.2 ship TensorRT 10.3 (JetPack 6.0: 8.6) and its Python bindings for the system
  Python; Orin has no FP8. Calibrate on the host (the QDQ ONNX carries the scales), copy the artifact folder, build
  the engine on the Jetson (an 8 GB Orin Nano has no memory to spare for calibration).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import platform
import shlex
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..artifacts import Artifact, save_onnx, write_manifest
from ..errors import VitexportError
from . import Calibration, Capability, backend_options, quantize_int8_shared, read_rows_only, recipe_from, recipe_overrides, reference_on_read_rows, require_calibration

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "TensorRT comes with JetPack on a Jetson (sudo apt install python3-libnvinfer); on a desktop GPU: "
    "pip install tensorrt cuda-python"
)
ONNX = "model.onnx"
ENGINE = "model.engine"
ENGINE_INFO = "engine.json"
PLAN = "tensorrt.json"
SCRIPT = "build_engine.py"
TRTEXEC = "trtexec.sh"
README = "README.md"
SCRIPT_TEMPLATE = Path(__file__).with_name("tensorrt_build_engine.py")

# The core int8 recipe with what TensorRT wants (see the module docstring). Target profiles may override any
# Int8Recipe field under [options.tensorrt.int8] recipe = {...}.
INT8_RECIPE: dict[str, Any] = {
    "symmetric_activations": True,  # TensorRT's int8 is symmetric: signed int8, zero point 0
    "reduce_range": False,  # TensorRT accumulates int8 products in int32: full 8-bit weights cannot saturate
    "per_channel": True,  # per-output-channel weight scales
    "roles": ("qkv", "attn_out", "fc1", "fc2"),  # Q/DQ on the linear layers' inputs only
    # symmetric int8 spends half its codes on the negative side that post-GELU inputs (>= -0.17) hardly use, so more
    # of the most sensitive inputs stay float; in the engine those run in fp16 on the tensor cores, not in fp32
    "fallback_budget": 0.2,
    # ... and each one-sided input is centred before its Q (Sub fused by TensorRT, W.c folded into the bias): measured
    # on DeiT-tiny (emulated): cosine to fp32 0.9978 -> 0.9987, agreement 98.4% -> 98.9%
    "center_activations": True,
    # SmoothQuant moves more of each LayerNorm output's range into the weights than the core's 0.5: one symmetric
    # per-tensor activation scale is the weak side here, full 8-bit per-channel weights the strong one. Chosen on
    # held-out calibration images only (benchmarks/tensorrt_recipe_cv.py, float16 emulation): KL to fp32 0.00157 at
    # 0.5, 0.00136 / 0.00141 / 0.00122 / 0.00125 / 0.00128 at 0.6 / 0.7 / 0.8 / 0.9 / 1.0
    "smoothquant_alpha": 0.8,
    # GPTQ rounds against the float inputs' X^T X from the build's float statistics, not against quantized inputs with
    # their compensation target: no quantized-input pass (ViT-Base at 256 images: 98 s less), and no worse on held-out
    # calibration images (benchmarks/tensorrt_recipe_cv.py, two folds, 1250 held-out views, float16 emulation):
    # KL 0.00122 -> 0.00119, 9 -> 7 views differing from fp32 (results/tensorrt-recipe-cv-build-time.json)
    "compensate_activations": False,
}


@dataclasses.dataclass(frozen=True)
class EngineSettings:
    """How the engine is built (``[options.tensorrt]`` in a device profile)."""

    min_batch: int = 1
    opt_batch: int = 1  # the batch TensorRT tunes its kernels for (1: latency on a device)
    max_batch: int = 32
    workspace_mb: int = 1024  # workspace memory-pool limit
    strongly_typed: bool = False  # int8 only: --stronglyTyped (TensorRT >= 9); float layers then keep the ONNX's fp32
    builder_optimization_level: int | None = None  # None: TensorRT's default (3)
    timing_cache: str = "tensorrt-timing.cache"  # inside the artifact folder, which must stay self-contained (pass --timing-cache to share one)
    build_here: bool = True  # build the engine during `vitexport build` when TensorRT and a GPU are here
    tensorrt: str | None = None  # the device's TensorRT (e.g. "8.6" on JetPack 6.0): decides the ONNX opset it can parse

    def __post_init__(self):
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise VitexportError(f"tensorrt batches must satisfy 1 <= min_batch <= opt_batch <= max_batch, not {self.min_batch}, {self.opt_batch}, {self.max_batch}")
        if self.workspace_mb < 16:
            raise VitexportError(f"tensorrt workspace_mb must be at least 16, not {self.workspace_mb}")


def max_onnx_opset(tensorrt_version: str | None) -> int | None:
    """The newest ONNX opset a TensorRT release's parser reads, where it is older than what vitexport exports.
    TensorRT 8.6 (JetPack 6.0) documents opsets up to 17; 10.x reads the default opset 18."""
    if not tensorrt_version:
        return None
    try:
        major, minor = (int(v) for v in (str(tensorrt_version).split(".") + ["0"])[:2])
    except ValueError:
        raise VitexportError(f"tensorrt version {tensorrt_version!r} in the profile is not like 8.6 or 10.3") from None
    return 17 if (major, minor) < (9, 0) else None


def settings_from(options: Mapping[str, Any]) -> EngineSettings:
    """EngineSettings from ``options["tensorrt"]`` (precision sub-tables such as ``int8`` are not engine settings)."""
    mine = backend_options(options, "tensorrt")
    fields = {f.name for f in dataclasses.fields(EngineSettings)}
    unknown = set(mine) - fields
    if unknown:
        raise VitexportError(f"unknown tensorrt option(s) {', '.join(sorted(unknown))}: known are {', '.join(sorted(fields))}, and the int8 table")
    return EngineSettings(**mine)


def engine_plan(precision: str, settings: EngineSettings, input_name: str, input_shape: list[int] | tuple[int, ...]) -> dict[str, Any]:
    """Every decision of the engine build, as the JSON that build_engine.py reads (and trtexec.sh mirrors)."""
    if precision not in TensorRTBackend.precisions:
        raise VitexportError(f"tensorrt has no precision {precision}: choose from {', '.join(TensorRTBackend.precisions)}")
    chw = [int(d) for d in input_shape]
    strongly_typed = settings.strongly_typed and precision == "int8"  # an fp32 ONNX strongly typed is an fp32 engine
    if strongly_typed:
        flags: list[str] = []  # types come from the ONNX: Q/DQ give int8, everything else stays as typed (fp32)
        cleared: list[str] = []
    else:
        flags = {"fp32": [], "fp16": ["FP16"], "int8": ["INT8", "FP16"]}[precision]  # int8: float layers in fp16
        cleared = ["TF32"] if precision == "fp32" else []  # fp32 means fp32, not TF32 matmuls on Ampere+ (Orin)
    return {
        "precision": precision,
        "onnx": ONNX,
        "engine": ENGINE,
        "input": input_name,
        "shapes": {
            "min": [settings.min_batch, *chw],
            "opt": [settings.opt_batch, *chw],
            "max": [settings.max_batch, *chw],
        },
        "builder_flags": flags,
        "cleared_flags": cleared,
        "strongly_typed": strongly_typed,
        "workspace_mb": settings.workspace_mb,
        "builder_optimization_level": settings.builder_optimization_level,
        "timing_cache": settings.timing_cache,
        "explicit_quantization": precision == "int8",  # scales are in the graph: no calibrator, no calibration cache
    }


_TRTEXEC_FLAGS = {"FP16": "--fp16", "INT8": "--int8"}


def trtexec_command(plan: Mapping[str, Any]) -> list[str]:
    """The trtexec (TensorRT 10.x; 8.6 too unless strongly typed) command that builds the same engine as the plan."""
    shape = lambda s: f"{plan['input']}:{'x'.join(str(d) for d in s)}"  # noqa: E731
    cmd = [
        "trtexec",
        f"--onnx={plan['onnx']}",
        f"--saveEngine={plan['engine']}",
        f"--minShapes={shape(plan['shapes']['min'])}",
        f"--optShapes={shape(plan['shapes']['opt'])}",
        f"--maxShapes={shape(plan['shapes']['max'])}",
    ]
    if plan["strongly_typed"]:
        cmd.append("--stronglyTyped")
    cmd += [_TRTEXEC_FLAGS[f] for f in plan["builder_flags"]]
    if "TF32" in plan["cleared_flags"]:
        cmd.append("--noTF32")
    cmd += [f"--memPoolSize=workspace:{plan['workspace_mb']}", f"--timingCacheFile={plan['timing_cache']}"]
    if plan.get("builder_optimization_level") is not None:
        cmd.append(f"--builderOptimizationLevel={plan['builder_optimization_level']}")
    cmd.append("--skipInference")
    return cmd


def trtexec_bench_command(plan: Mapping[str, Any], batch: int = 1) -> list[str]:
    """Time the built engine on the device (trtexec's own latency/throughput report)."""
    chw = plan["shapes"]["opt"][1:]
    return ["trtexec", f"--loadEngine={plan['engine']}", f"--shapes={plan['input']}:{'x'.join(str(d) for d in [batch, *chw])}", "--useCudaGraph", "--noDataTransfers"]


def tensorrt_status() -> tuple[bool, str]:
    """(can build and run engines here, why / which version). Never raises."""
    try:
        import tensorrt as trt
    except Exception:  # ImportError, or a broken install that fails loading its libraries
        return False, f"TensorRT is not installed here ({INSTALL_HINT})"
    try:
        if not trt.Builder(trt.Logger(trt.Logger.ERROR)):
            return False, f"TensorRT {trt.__version__} is installed but found no usable GPU"
    except Exception as e:
        return False, f"TensorRT {trt.__version__} is installed but cannot start a builder here: {str(e).splitlines()[0][:160]}"
    return True, f"TensorRT {trt.__version__}"


class TensorRTBackend:
    name = "tensorrt"
    # where TensorRT and a GPU are, the runner runs the engine instead (measured)
    capabilities = {
        "fp32": Capability(calibration=False, runs_here="not run"),  # emulating it would only repeat the reference
        "fp16": Capability(calibration=False, runs_here="emulated"),
        "int8": Capability(calibration=True, runs_here="emulated", recipe="vitexport.quantization.int8:Int8Recipe"),
    }
    precisions = tuple(capabilities)
    settings = EngineSettings
    summary = {
        "devices": "Jetson, NVIDIA GPUs",
        "artifact": "`model.onnx` (TensorRT-ready QDQ) + engine kit; `model.engine` where TensorRT is",
        "measured": "QDQ arithmetic and fp16 storage in ONNX Runtime; the engine itself where TensorRT and a GPU are",
    }

    def available(self) -> tuple[bool, str]:
        """Buildable everywhere onnxruntime is (the QDQ ONNX and the engine scripts); engines need TensorRT."""
        try:
            import onnxruntime
        except ImportError:
            return False, "onnxruntime is not installed (the int8 recipe and its emulation need it): pip install onnxruntime"
        ok, why = tensorrt_status()
        return True, why if ok else f"onnxruntime {onnxruntime.__version__}; engines not built here: {why}"

    def build(self, reference, calibration: Calibration | None, precision: str, options: Mapping[str, Any], out_dir: Path, stages=None) -> Artifact:
        if precision not in self.precisions:
            raise VitexportError(f"tensorrt has no precision {precision}: choose from {', '.join(self.precisions)}")
        settings = settings_from(options)
        out_dir.mkdir(parents=True, exist_ok=True)
        target = out_dir / ONNX
        if precision in ("fp32", "fp16"):
            rows = reference_on_read_rows(reference, target)
            recipe: dict[str, Any] = {"kind": f"fp32 reference ONNX for a TensorRT {precision} engine", "opset": reference.opset, "layernorm": "one LayerNormalization op", "read_rows": rows}
        else:
            from ..quantization.int8 import Int8Recipe

            require_calibration(calibration, "tensorrt int8")
            recipe_obj = int8_recipe(options, Int8Recipe)
            model, recipe = quantize_int8_shared(reference, calibration, recipe_obj, stages)
            recipe = {**recipe, "kind": "TensorRT-ready int8 QDQ ONNX (explicit quantization, ViT-aware)", "read_rows": read_rows_only(model)}
            recipe["qdq_check"] = check_tensorrt_qdq(model)
            save_onnx(model, target, reference.metadata())
            recipe = {**recipe, "calibration_images": calibration.count, "calibration_source": calibration.source}

        fields = reference.manifest_fields()
        cap = max_onnx_opset(settings.tensorrt)
        if cap is not None and reference.opset > cap:
            raise VitexportError(f"TensorRT {settings.tensorrt} parses ONNX opset {cap} at most, the reference is opset {reference.opset}: build with --opset {cap}")
        if settings.tensorrt and settings.strongly_typed and cap is not None:
            raise VitexportError(f"strongly_typed needs TensorRT 9 or newer, the profile's is {settings.tensorrt}")
        plan = engine_plan(precision, settings, fields["io"]["input"], fields["io"]["input_shape"][1:])
        plan = {**plan, "onnx_opset": reference.opset, "tensorrt": settings.tensorrt}  # for whoever builds it on the device
        write_engine_kit(out_dir, plan)
        engine = _maybe_build_engine(out_dir, plan, settings)
        recipe["tensorrt"] = {"plan": plan, "trtexec": shlex.join(trtexec_command(plan)), "engine": engine}
        recipe["summary"] = describe(precision, recipe)
        main = ENGINE if engine.get("built") else ONNX
        return write_manifest(out_dir, backend=self.name, precision=precision, main=main, recipe=recipe, extra_tools=("tensorrt",), **fields)

    def runner(self, artifact: Artifact, threads: int | None = None):
        engine = artifact.directory / ENGINE
        ok, why = tensorrt_status() if engine.is_file() else (False, "")
        if ok:
            return TensorRTRunner(artifact.directory)
        plan_file = artifact.directory / PLAN
        try:
            plan = json.loads(plan_file.read_text()) if plan_file.is_file() else {}
        except (OSError, ValueError) as e:
            raise VitexportError(f"cannot read {plan_file} ({e.__class__.__name__}): rebuild the artifact") from None
        fp16 = "FP16" in plan.get("builder_flags", ())
        # fp16 and int8 (and the int8 baselines of benchmarks/tensorrt_baselines.py); fp32 would only repeat the reference
        if fp16 or artifact.precision.startswith("int8"):
            return EmulationRunner(artifact.directory / ONNX, threads, float16=fp16)
        reason = (why or f"TensorRT is not installed here ({INSTALL_HINT})") if engine.is_file() else "no TensorRT engine in the artifact"
        raise VitexportError(f"{reason}; build it on the device with `python3 build_engine.py` (or trtexec.sh) in {artifact.directory}, then run vitexport eval/bench there")


def int8_recipe(options: Mapping[str, Any], cls=None):
    """The core Int8Recipe with TensorRT's settings, then the profile's overrides."""
    if cls is None:
        from ..quantization.int8 import Int8Recipe as cls
    overrides = recipe_overrides(options, "tensorrt", "int8")
    recipe_from(cls, overrides)  # unknown keys: one clear error before TensorRT's defaults are merged in
    return recipe_from(cls, {**INT8_RECIPE, **overrides})


def write_engine_kit(out_dir: Path, plan: Mapping[str, Any]) -> None:
    """build_engine.py, tensorrt.json, trtexec.sh and a README: what the device needs besides the ONNX."""
    (out_dir / PLAN).write_text(json.dumps(plan, indent=2) + "\n")
    shutil.copyfile(SCRIPT_TEMPLATE, out_dir / SCRIPT)
    (out_dir / SCRIPT).chmod(0o755)
    cmd = " \\\n  ".join(shlex.quote(a) for a in trtexec_command(plan))
    (out_dir / TRTEXEC).write_text(f'#!/bin/sh\n# Build the engine with trtexec, in this folder (same settings as build_engine.py).\nset -e\ncd "$(dirname "$0")"\n{cmd}\n')
    (out_dir / TRTEXEC).chmod(0o755)
    bench = shlex.join(trtexec_bench_command(plan))
    (out_dir / README).write_text(
        f"# TensorRT {plan['precision']} artifact\n\n"
        "Build the engine on the device that will run it (an engine is tied to its GPU and TensorRT version):\n\n"
        f"    python3 build_engine.py        # TensorRT Python API -> {plan['engine']} + {ENGINE_INFO}\n"
        f"    sh trtexec.sh                  # or the same with trtexec\n\n"
        f"Then measure it: `vitexport eval . --images DIR` / `vitexport bench .` (needs tensorrt, numpy, pillow and\n"
        f"cuda-python; no torch), or `{bench}`.\n\n"
        f"Settings: {plan['builder_flags'] or 'no precision flags'}{' (strongly typed)' if plan['strongly_typed'] else ''}, "
        f"batch {plan['shapes']['min'][0]}..{plan['shapes']['max'][0]} (optimised for {plan['shapes']['opt'][0]}), "
        f"workspace {plan['workspace_mb']} MiB, timing cache {plan['timing_cache']}. "
        "Override the batch range with build_engine.py --min-batch/--opt-batch/--max-batch.\n"
    )


def _maybe_build_engine(out_dir: Path, plan: Mapping[str, Any], settings: EngineSettings) -> dict[str, Any]:
    if not settings.build_here:
        return {"built": False, "reason": "build_here = false: build it on the device"}
    ok, why = tensorrt_status()
    if not ok:
        return {"built": False, "reason": f"{why}: build it on the device with build_engine.py or trtexec.sh"}
    from . import tensorrt_build_engine

    try:
        info = tensorrt_build_engine.build_engine(dict(plan), out_dir, log=log.info)
    except RuntimeError as e:
        raise VitexportError(f"TensorRT engine build failed: {e}") from None
    return {"built": True, **info}


def check_tensorrt_qdq(model) -> dict[str, Any]:
    """Check an explicitly quantized ONNX is what TensorRT wants; raise VitexportError if not. Returns counts.

    Every QuantizeLinear/DequantizeLinear: int8 zero point(s) equal to 0. Activation Q/DQ: per tensor. Weight DQ
    (constant int8 input): per channel on the output-channel axis of the MatMul/Gemm it feeds. Every DequantizeLinear
    feeds only MatMul/Gemm (no Q/DQ on residual Adds, LayerNorm, Softmax).
    """
    from onnx import TensorProto, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    problems: list[str] = []
    counts = {"quantize": 0, "dequantize_activation": 0, "dequantize_weight": 0}
    for n in model.graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        zp = inits.get(n.input[2]) if len(n.input) > 2 and n.input[2] else None
        if zp is None or zp.data_type != TensorProto.INT8:
            problems.append(f"{n.name}: zero point must be an int8 initializer")
        elif np.any(numpy_helper.to_array(zp) != 0):
            problems.append(f"{n.name}: zero point is not 0")
        scale = numpy_helper.to_array(inits[n.input[1]]) if n.input[1] in inits else None
        if n.op_type == "QuantizeLinear":
            counts["quantize"] += 1
            if scale is None or scale.size != 1:
                problems.append(f"{n.name}: activation scale must be one constant (per tensor)")
            continue
        users = consumers.get(n.output[0], [])
        if not users or any(u.op_type not in ("MatMul", "Gemm") for u in users):
            problems.append(f"{n.name}: feeds {sorted({u.op_type for u in users}) or 'nothing'}, not only MatMul/Gemm")
            continue
        if n.input[0] in inits:  # weight
            counts["dequantize_weight"] += 1
            w = inits[n.input[0]]
            if w.data_type != TensorProto.INT8:
                problems.append(f"{n.name}: weights must be int8")
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
            for u in users:
                if list(u.input).index(n.output[0]) != 1:
                    problems.append(f"{n.name}: weight DQ is not the second input of {u.name}")
                    continue
                trans_b = u.op_type == "Gemm" and any(a.name == "transB" and a.i for a in u.attribute)
                want = 0 if trans_b else 1
                if scale is None or scale.size != w.dims[want] or (scale.size > 1 and axis != want):
                    problems.append(f"{n.name}: weight scales must be per output channel (axis {want}, {w.dims[want]} scales)")
        else:
            counts["dequantize_activation"] += 1
            if scale is None or scale.size != 1:
                problems.append(f"{n.name}: activation scale must be one constant (per tensor)")
    if problems:
        raise VitexportError("the int8 QDQ graph is not what TensorRT wants: " + "; ".join(problems[:5]) + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))
    return counts


class EmulationRunner:
    """Runs a TensorRT artifact's ONNX in ONNX Runtime on the CPU with the arithmetic its engine plan asks for.

    int8: each Q/DQ pair stays as separate ops (ORT's QDQ fusion into integer kernels is off, because its AVX2 kernels
    saturate int16 pair sums where TensorRT accumulates in int32), so each quantized MatMul is DQ(Q(x)) @ DQ(w_int8)
    in float32, which is what TensorRT's int8 GEMM computes. ``float16``: the plan has the FP16 flag (fp16, and
    weakly typed int8, whose float layers run in fp16), so every tensor between kernels is rounded to float16 and the
    float weights too; dequantized tensors and Q/DQ scales stay float32, since TensorRT fuses them into its int8 GEMM.
    Imports onnx, onnxruntime and numpy only."""

    emulated = True

    def __init__(self, path: Path, threads: int | None = None, float16: bool = False):
        import onnx
        import onnxruntime as ort

        from ..harness.emulation import round_to_float16
        from ..ort_session import ort_session

        # no QDQ -> integer-kernel fusion; float fusions are fine in float32, in float16 they would remove the rounding casts
        model = round_to_float16(onnx.load(str(path)), exact_ops=("DequantizeLinear",), weights=True) if float16 else path
        self.session = ort_session(model, threads, optimization="basic" if float16 else "all", qdq_fusion=False, what=str(path))
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self.threads = threads
        self.float16 = float16
        storage = "float16 storage" if float16 else "float32"
        self.runtime = f"onnxruntime {ort.__version__} (emulating the TensorRT engine: QDQ as float fake-quant, {storage})"
        self.device = f"{platform.machine()} CPU, emulation (the TensorRT engine was not run)"

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})[0]


class TensorRTRunner:
    """Runs the artifact's engine with TensorRT on this machine's GPU: the real runtime, nothing emulated.
    Imports tensorrt, numpy and one small CUDA binding (cuda-python, or torch if that is what is installed)."""

    emulated = False

    def __init__(self, directory: Path):
        import tensorrt as trt

        self.trt = trt
        info = json.loads((directory / ENGINE_INFO).read_text()) if (directory / ENGINE_INFO).is_file() else {}
        if info.get("tensorrt") and info["tensorrt"] != trt.__version__:
            raise VitexportError(f"the engine in {directory} was built with TensorRT {info['tensorrt']}, this is {trt.__version__}: rebuild it here with build_engine.py")
        self.cuda = _cuda()
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine((directory / ENGINE).read_bytes())
        if self.engine is None:
            raise VitexportError(f"TensorRT cannot load {directory / ENGINE} (built for another GPU or TensorRT version?): rebuild it here with build_engine.py")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        self.max_batch = int(self.engine.get_tensor_profile_shape(self.input_name, 0)[2][0])
        self.out_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.output_name)))
        self.stream = self.cuda.stream()
        self.buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)
        self.threads = None
        self.runtime = f"TensorRT {trt.__version__}"
        self.device = info.get("device") or "NVIDIA GPU"

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self.buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                self.cuda.free(ptr)
            ptr, size = self.cuda.malloc(nbytes), nbytes
            self.buffers[name] = (ptr, size)
        return ptr

    def run(self, batch: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(batch, dtype=np.float32)
        if len(x) > self.max_batch:
            return np.concatenate([self.run(x[i : i + self.max_batch]) for i in range(0, len(x), self.max_batch)])
        self.context.set_input_shape(self.input_name, tuple(x.shape))
        out = np.empty(tuple(self.context.get_tensor_shape(self.output_name)), self.out_dtype)
        d_in, d_out = self._buffer(self.input_name, x.nbytes), self._buffer(self.output_name, out.nbytes)
        self.context.set_tensor_address(self.input_name, d_in)
        self.context.set_tensor_address(self.output_name, d_out)
        self.cuda.h2d(d_in, x, self.stream)
        if not self.context.execute_async_v3(self.cuda.handle(self.stream)):
            raise VitexportError("TensorRT failed to run the engine")
        self.cuda.d2h(out, d_out, self.stream)
        self.cuda.sync(self.stream)
        return out.astype(np.float32, copy=False)

    def __del__(self):
        for ptr, _ in getattr(self, "buffers", {}).values():
            try:
                self.cuda.free(ptr)
            except Exception:
                pass


def _cuda():
    """Device memory and a stream through cuda-python (preferred: small) or torch's CUDA allocator."""
    try:
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            from cuda import cudart
        return _CudaPython(cudart)
    except ImportError:
        pass
    try:
        import torch

        if torch.cuda.is_available():
            return _CudaTorch(torch)
    except ImportError:
        pass
    raise VitexportError("running a TensorRT engine needs a CUDA binding: pip install cuda-python")


class _CudaPython:
    def __init__(self, cudart):
        self.rt = cudart

    def _ok(self, result):
        err, *rest = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            raise VitexportError(f"CUDA error {err}")
        return rest[0] if rest else None

    def malloc(self, nbytes: int) -> int:
        return int(self._ok(self.rt.cudaMalloc(nbytes)))

    def free(self, ptr: int) -> None:
        self._ok(self.rt.cudaFree(ptr))

    def stream(self):
        return self._ok(self.rt.cudaStreamCreate())

    def handle(self, stream) -> int:
        return int(stream)

    def h2d(self, dst: int, src: np.ndarray, stream) -> None:
        self._ok(self.rt.cudaMemcpyAsync(dst, src.ctypes.data, src.nbytes, self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream))

    def d2h(self, dst: np.ndarray, src: int, stream) -> None:
        self._ok(self.rt.cudaMemcpyAsync(dst.ctypes.data, src, dst.nbytes, self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream))

    def sync(self, stream) -> None:
        self._ok(self.rt.cudaStreamSynchronize(stream))


class _CudaTorch:
    def __init__(self, torch):
        self.torch = torch
        self.keep: dict[int, Any] = {}

    def malloc(self, nbytes: int) -> int:
        t = self.torch.empty(nbytes, dtype=self.torch.uint8, device="cuda")
        self.keep[t.data_ptr()] = t
        return t.data_ptr()

    def free(self, ptr: int) -> None:
        self.keep.pop(ptr, None)

    def stream(self):
        return self.torch.cuda.current_stream()

    def handle(self, stream) -> int:
        return int(stream.cuda_stream)

    def h2d(self, dst: int, src: np.ndarray, stream) -> None:
        self.keep[dst][: src.nbytes].copy_(self.torch.from_numpy(src.reshape(-1).view(np.uint8)))

    def d2h(self, dst: np.ndarray, src: int, stream) -> None:
        stream.synchronize()
        dst.reshape(-1).view(np.uint8)[:] = self.keep[src][: dst.nbytes].cpu().numpy()

    def sync(self, stream) -> None:
        stream.synchronize()


def describe(precision: str, recipe: Mapping[str, Any]) -> str:
    """One line for the report; the whole recipe stays in the manifest."""
    engine = recipe.get("tensorrt", {}).get("engine", {})
    where = f"engine built here (TensorRT {engine.get('tensorrt')})" if engine.get("built") else "engine not built here: build_engine.py / trtexec.sh on the device"
    if precision == "int8":
        fb = recipe.get("sensitivity_fallback", {}).get("kept_float", [])
        c = recipe.get("counts", {})
        return (
            f"TensorRT int8 QDQ ONNX: symmetric int8 activations ({recipe.get('calibration', {}).get('method')} ranges), "
            f"{recipe.get('weights')} weights with GPTQ rounding; {c.get('quantized')} linears int8, "
            f"{len(fb)} inputs float ({100 * sum(k['mac_fraction'] for k in fb):.1f}% of linear MACs); {where}"
        )
    flags = {"fp16": "--fp16", "fp32": "fp32, TF32 off"}[precision]
    return f"fp32 reference ONNX (LayerNormalization whole) for a TensorRT {precision} engine ({flags}); {where}"
