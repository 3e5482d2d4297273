"""CoreML target (iPhone, iPad, Mac): one ML Program `.mlpackage` per precision that an app bundles as is.

The whole story of this target is here:

- **Conversion.** CoreML's converter takes PyTorch, not ONNX (onnx-coreml is dead), so this is the one backend that
  reloads the checkpoint (from the source recorded in the reference's ModelSpec) instead of building from the
  reference ONNX. It goes through ``torch.jit.trace`` (coremltools 9's ``torch.export`` path fails on ViT with a
  non-contiguous dim-order error), eager attention, one output.
- **Input** is an RGB ``ImageType`` of the checkpoint's own size with the preprocessing inside the model: CoreML's
  image input does ``scale * pixel + bias[c]``; the per-channel 1/std it cannot express is folded into the patch
  embedding convolution's weights (exact: the patch convolution has no padding). CoreML's image input does **not**
  resize or centre-crop: the app frames the image exactly as the checkpoint's preprocessing did (every figure was
  measured that way); ``vitexport.app_framing`` in the metadata gives the Vision settings that reproduce it
  (a ``regionOfInterest`` plus ``.scaleFill`` or ``.centerCrop``: plain ``.centerCrop`` is another framing).
- **Outputs**: a classifier gets CoreML's classifier outputs (``classLabel`` + ``classLabel_probs``, softmax
  probabilities over the checkpoint's own labels); a backbone outputs its embedding as an MLMultiArray.
- **Precisions** (the minimum deployment target each needs is chosen and recorded):
  ``fp32`` / ``fp16`` (iOS 15 / macOS 12), ``int8`` linear symmetric per-channel weights (iOS 16 / macOS 13) whose
  codes on the encoder's linears are GPTQ-rounded by the core int8 recipe's ``gptq_weight`` (coremltools' own
  round-to-nearest with ``int8_method = "rtn"``),
  ``int4`` block-wise weights (iOS 18 / macOS 15) whose codes are the core's GPTQ int4 weights
  (vitexport.quantization.int4) written into the package through coremltools' torch compression metadata,
  ``palette4`` 4-bit palettization, one 16-entry palette per 16 output channels (iOS 18 / macOS 15), whose palettes
  and rounding come from vitexport.quantization.palette (k-means + GPTQ on calibration images; coremltools' own
  k-means with ``palette_method = "kmeans"``), and ``w8a8`` (int8 activations,
  iOS 17 / macOS 14), which calibrates by running CoreML predictions and can therefore only be built on macOS.
- **Measuring.** On macOS a runner calls ``MLModel.predict`` on the real package (compute units: cpu_only,
  cpu_and_gpu, all). Elsewhere CoreML cannot predict, so the runner *emulates* the package: it reads the weights back
  out of the saved ``.mlpackage`` (the MIL program and weight.bin, parsed here without coremltools' converter or
  torch), dequantizes them exactly as the constexpr ops define, puts them into the reference graph (a weight-free
  copy of the fp32 reference ONNX is stored beside the package, in ``emulation/``) and runs it with ONNX Runtime,
  rounding every op's output to float16 when the package computes in float16. Rows say ``emulated: true``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import io
import json
import logging
import os
import platform
import sys
import time
import types
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..artifacts import Artifact, write_manifest
from ..errors import VitexportError
from . import Calibration, recipe_from, shared_int4

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install vitexport[coreml] (or: pip install coremltools)"
PACKAGE = "model.mlpackage"
EMULATION_DIR = "emulation"
SKELETON = "graph.onnx"  # the fp32 reference ONNX without its weights
WEIGHT_MAP = "weights.json"  # ONNX initializer -> the package's weight that fills it
INPUT_NAME = "image"
EMBEDDING_OUTPUT = "embedding"
COMPUTE_UNITS = ("cpu_only", "cpu_and_gpu", "cpu_and_ne", "all")

# precision -> (iOS, macOS) minimum deployment target; palette4 per tensor would be iOS16, grouped channels need iOS18
_TARGETS = {
    "fp32": ("iOS15", "macOS12"),
    "fp16": ("iOS15", "macOS12"),
    "int8": ("iOS16", "macOS13"),
    "int4": ("iOS18", "macOS15"),
    "palette4": ("iOS18", "macOS15"),
    "w8a8": ("iOS17", "macOS14"),
}


@dataclasses.dataclass(frozen=True)
class CoreMLOptions:
    """Per-target settings (``[options.coreml]`` in a targets/*.toml profile)."""

    platform: str = "iOS"  # "iOS" | "macOS": which deployment target family is recorded and required
    compute_units: str = "all"  # macOS runner: cpu_only | cpu_and_gpu | cpu_and_ne | all
    int8_method: str = "gptq"  # "gptq": core GPTQ-rounded per-channel codes (needs calibration) | "rtn": coremltools'
    int4_method: str = "gptq"  # "gptq": the core's GPTQ codes (needs calibration) | "rtn": coremltools round-to-nearest
    int4_block_size: int = 32
    palette_method: str = "gptq"  # "gptq": vitexport.quantization.palette (needs calibration) | "kmeans": coremltools'
    palette_granularity: str = "per_grouped_channel"  # or "per_tensor" (iOS16; kmeans only)
    palette_group_size: int = 16  # output channels sharing one 16-entry palette
    palette_kmeans_workers: int = 1
    palette_per_channel_scale: bool = False  # iOS18: scale each output channel before sharing a palette
    keep_float: tuple[str, ...] = ("position_embeddings", "cls_token", "classifier")  # int4/palette4: weights left fp16 (name parts)
    weight_threshold: int = 2048  # weights with fewer elements stay float (LayerNorm, biases, cls token)

    def __post_init__(self):
        if self.platform not in ("iOS", "macOS"):
            raise VitexportError(f"coreml platform must be iOS or macOS, not {self.platform!r}")
        if self.compute_units not in COMPUTE_UNITS:
            raise VitexportError(f"coreml compute_units must be one of {', '.join(COMPUTE_UNITS)}, not {self.compute_units!r}")
        if self.int8_method not in ("gptq", "rtn"):
            raise VitexportError(f"coreml int8_method must be gptq or rtn, not {self.int8_method!r}")
        if self.int4_method not in ("gptq", "rtn"):
            raise VitexportError(f"coreml int4_method must be gptq or rtn, not {self.int4_method!r}")
        if self.palette_method not in ("gptq", "kmeans"):
            raise VitexportError(f"coreml palette_method must be gptq or kmeans, not {self.palette_method!r}")
        if self.palette_granularity not in ("per_tensor", "per_grouped_channel"):
            raise VitexportError(f"coreml palette_granularity must be per_tensor or per_grouped_channel, not {self.palette_granularity!r}")
        if self.palette_method == "gptq" and self.palette_granularity != "per_grouped_channel":
            raise VitexportError("coreml palette_method gptq is per grouped channel: set palette_method = \"kmeans\" for per_tensor")


def deployment_target(precision: str, opts: CoreMLOptions, ) -> str:
    ios, mac = _TARGETS[precision]
    if precision == "palette4" and opts.palette_granularity == "per_tensor":
        ios, mac = "iOS16", "macOS13"
    return ios if opts.platform == "iOS" else mac


class CoreMLBackend:
    name = "coreml"
    precisions = ("fp32", "fp16", "int8", "int4", "palette4", "w8a8")

    def available(self) -> tuple[bool, str]:
        if importlib.util.find_spec("coremltools") is None:
            return False, f"coremltools is not installed: {INSTALL_HINT}"
        from importlib.metadata import version

        return True, f"coremltools {version('coremltools')}"

    # ------------------------------------------------------------------ build

    def build(self, reference, calibration: Calibration | None, precision: str, options: Mapping[str, Any], out_dir: Path) -> Artifact:
        if precision not in self.precisions:
            raise VitexportError(f"coreml has no precision {precision}: choose from {', '.join(self.precisions)}")
        ok, why = self.available()
        if not ok:
            raise VitexportError(why)
        opts = _options(options.get("coreml", {}))
        if precision == "w8a8" and platform.system() != "Darwin":
            raise VitexportError(
                "coreml w8a8 (int8 activations) calibrates by running CoreML predictions, which only run on macOS: "
                "build it on a Mac, or use int8 (weights) here"
            )
        if precision == "int4" and opts.int4_method == "gptq" and (calibration is None or calibration.count == 0):
            raise VitexportError("coreml int4 uses GPTQ rounding, which needs calibration images: pass --calib DIR")
        if precision == "int8" and opts.int8_method == "gptq" and (calibration is None or calibration.count == 0):
            raise VitexportError("coreml int8 uses GPTQ rounding, which needs calibration images: pass --calib DIR")
        if precision == "palette4" and opts.palette_method == "gptq" and (calibration is None or calibration.count == 0):
            raise VitexportError("coreml palette4 uses GPTQ rounding, which needs calibration images: pass --calib DIR")
        out_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        spec = reference.spec
        target = deployment_target(precision, opts)
        recipe: dict[str, Any] = {"minimum_deployment_target": target, "platform": opts.platform, "compute_units": opts.compute_units}

        with _quiet():
            ct = _coremltools()
            import torch

            # The one backend that reloads the checkpoint: coremltools converts PyTorch (TorchScript), not ONNX.
            head = spec.load_torch()
            original = {k: v.detach().clone() for k, v in head.state_dict().items()}
            module, folded = _CoreMLModule.wrap(head, spec)
            recipe["input"] = {
                "type": "image RGB",
                "size": list(spec.input_shape[1:]),
                "scale": folded["scale"],
                "bias": folded["bias"],
                "std_folded_into": folded["conv"],
                "not_inside": "resize / centre crop: the app frames the image as app_framing says",
                "app_framing": app_framing(spec.preprocessing),
            }
            if precision == "int4" and opts.int4_method == "gptq":
                recipe["int4"] = _attach_gptq_int4(module, head, reference, calibration, options, opts)
            if precision == "int8" and opts.int8_method == "gptq":
                recipe["int8"] = _attach_gptq_int8(head, reference, calibration, options)
            if precision == "palette4" and opts.palette_method == "gptq":
                recipe["palette"] = _attach_gptq_palette(head, reference, calibration, options, opts)

            c, h, w = spec.input_shape
            example = torch.rand(1, c, h, w)
            tc = time.perf_counter()
            with torch.no_grad():
                traced = torch.jit.trace(module.eval(), example, check_trace=False)
            classifier = spec.task == "classification"
            kwargs: dict[str, Any] = {}
            if classifier:
                kwargs["classifier_config"] = ct.ClassifierConfig(spec.labels_list())
            else:
                kwargs["outputs"] = [ct.TensorType(name=EMBEDDING_OUTPUT)]
            mlmodel = ct.convert(
                traced,
                inputs=[ct.ImageType(name=INPUT_NAME, shape=(1, c, h, w), scale=folded["scale"], bias=folded["bias"], color_layout=ct.colorlayout.RGB)],
                convert_to="mlprogram",
                minimum_deployment_target=getattr(ct.target, target),
                compute_precision=ct.precision.FLOAT32 if precision == "fp32" else ct.precision.FLOAT16,
                **kwargs,
            )
            recipe["convert_s"] = round(time.perf_counter() - tc, 2)
            recipe["compute_precision"] = "float32" if precision == "fp32" else "float16"

            tq = time.perf_counter()
            mlmodel, compression = _compress(ct, mlmodel, precision, opts, calibration, spec.preprocessing.to_dict())
            recipe.update(compression)
            recipe["compress_s"] = round(time.perf_counter() - tq, 2)
            _describe_model(mlmodel, reference, precision, target, recipe)
            mlmodel.save(str(out_dir / PACKAGE))
            del mlmodel, traced, module, head

        _write_emulation(out_dir, reference, original)
        recipe["weights"] = _weight_summary(out_dir / PACKAGE)
        recipe["emulation"] = "weights read back from the package, dequantized, run in the reference graph with ONNX Runtime" + (
            "; every op output rounded to float16" if precision != "fp32" else ""
        )
        recipe["build_s"] = round(time.perf_counter() - t0, 2)
        recipe["summary"] = describe(precision, recipe)
        fields = reference.manifest_fields()
        io = {**fields["io"], "input": INPUT_NAME, "input_kind": f"RGB image {h}x{w} (resized/cropped by the app)",
              "outputs": ["classLabel", "classLabel_probs"] if classifier else [EMBEDDING_OUTPUT]}
        fields["io"] = io
        return write_manifest(out_dir, backend=self.name, precision=precision, main=PACKAGE, recipe=recipe, **fields)

    # ------------------------------------------------------------------ run

    def runner(self, artifact: Artifact, threads: int | None = None):
        if platform.system() == "Darwin" and not os.environ.get("VITEXPORT_COREML_EMULATE"):
            units = os.environ.get("VITEXPORT_COREML_COMPUTE_UNITS") or artifact.manifest.get("recipe", {}).get("compute_units", "all")
            return CoreMLRunner(artifact, units)
        return EmulatedRunner(artifact, threads)


def describe(precision: str, recipe: Mapping[str, Any]) -> str:
    t = recipe.get("minimum_deployment_target")
    if precision == "int8":
        how = "GPTQ rounding on the encoder linears" if "int8" in recipe else "round to nearest"
        return f"CoreML ML Program, int8 linear symmetric per-channel weights ({how}), fp16 compute, {t}+"
    if precision == "int4":
        m = recipe.get("int4", {}).get("method", "rtn")
        return f"CoreML ML Program, int4 block-{recipe.get('block_size')} weights ({m} rounding) on linears, fp16 compute, {t}+"
    if precision == "palette4":
        how = "k-means + GPTQ rounding" if "palette" in recipe else "k-means"
        return f"CoreML ML Program, 4-bit palettized linears ({how}, {recipe.get('granularity')}), fp16 compute, {t}+"
    if precision == "w8a8":
        return f"CoreML ML Program, int8 weights and activations, {t}+"
    return f"CoreML ML Program, {precision} weights and compute, {t}+"


# ---------------------------------------------------------------------------------------------------------- building


def _options(raw: Mapping[str, Any]) -> CoreMLOptions:
    fields = {f.name for f in dataclasses.fields(CoreMLOptions)}
    unknown = set(raw) - fields
    if unknown:
        raise VitexportError(f"unknown coreml option(s) {', '.join(sorted(unknown))}: known are {', '.join(sorted(fields))}")
    return CoreMLOptions(**raw)


def _coremltools():
    try:
        import coremltools as ct
    except ImportError as e:
        raise VitexportError(f"coremltools cannot be imported ({e}): {INSTALL_HINT}") from None
    return ct


class _quiet:
    """coremltools warns about untested torch versions and prints tqdm bars: keep them out of the build's output."""

    def __enter__(self):
        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore")
        self._levels = {}
        for name in ("coremltools", "torch.jit"):
            lg = logging.getLogger(name)
            self._levels[name] = lg.level
            lg.setLevel(logging.ERROR)
        # coremltools' tqdm bars (one per pass pipeline) have no off switch: they go to a buffer, kept in the debug log
        self._buf = io.StringIO()
        self._err = contextlib.redirect_stderr(self._buf)
        self._err.__enter__()
        return self

    def __exit__(self, *exc):
        for name, level in self._levels.items():
            logging.getLogger(name).setLevel(level)
        self._err.__exit__(*exc)
        log.debug("coremltools: %s", self._buf.getvalue()[-2000:])
        self._w.__exit__(*exc)
        return False


class _CoreMLModule:
    """The traced module: reference head (eager attention) + softmax for classifiers, std folded into the patch conv."""

    @staticmethod
    def wrap(head, spec):
        import torch

        pre = spec.preprocessing
        scale = float(pre.rescale) if pre.rescale else 1.0
        mean = pre.mean or (0.0, 0.0, 0.0)
        std = pre.std or (1.0, 1.0, 1.0)
        conv_name, conv = next(((n, m) for n, m in head.named_modules() if isinstance(m, torch.nn.Conv2d)), (None, None))
        if conv is None:
            raise VitexportError(f"{spec.source}: no patch-embedding convolution found to fold the input std into")
        if any(p != 0 for p in (conv.padding if isinstance(conv.padding, tuple) else (conv.padding,))):
            raise VitexportError(f"{spec.source}: the patch convolution pads its input, so 1/std cannot be folded exactly")
        with torch.no_grad():
            conv.weight.div_(torch.tensor(std, dtype=conv.weight.dtype).view(1, -1, 1, 1))

        class Module(torch.nn.Module):
            def __init__(self, head, classifier: bool):
                super().__init__()
                self.head = head
                self.classifier = classifier

            def forward(self, image):
                out = self.head(image)
                return torch.softmax(out, dim=-1) if self.classifier else out

        # CoreML image input: y = scale * pixel + bias[c]; with bias = -mean the conv sees (x - mean), and W/std does the rest
        folded = {"scale": scale, "bias": [-float(m) for m in mean], "std": [float(s) for s in std], "conv": conv_name}
        return Module(head, spec.task == "classification"), folded


def _torch_weight_names(head, reference) -> dict[str, tuple[str, bool]]:
    """Reference ONNX initializer -> (torch parameter name, transposed?), matched by value (the exporter renames them)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(reference.path))
    by_bytes: dict[tuple, str] = {}
    for name, t in head.state_dict().items():
        a = t.detach().cpu().numpy().astype(np.float32)
        by_bytes.setdefault((a.shape, a.tobytes()), name)
        if a.ndim == 2:
            by_bytes.setdefault((a.T.shape, np.ascontiguousarray(a.T).tobytes()), name + "|T")
    out = {}
    for init in model.graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT:
            continue
        a = numpy_helper.to_array(init, str(reference.path.parent)).astype(np.float32)
        if a.size < 2:
            continue
        hit = by_bytes.get((a.shape, a.tobytes()))
        if hit is None and a.ndim == 1:  # e.g. a bias the exporter stored with a leading 1
            hit = None
        if hit is not None:
            out[init.name] = (hit.removesuffix("|T"), hit.endswith("|T"))
    return out


def _linear_hessians(head, reference, calibration, options) -> tuple[Any, list, dict[str, np.ndarray], dict[str, tuple[str, bool]]]:
    """(reference ONNX, its q/k/v/attn-out/fc1/fc2 linears, X^T X of each linear's input over the calibration
    images (streamed), reference initializer -> torch parameter name)."""
    from ..quantization.calibration import stream_activations
    from ..quantization.graph import find_linears
    from ..quantization.int4 import HessianObserver

    model = reference.load()
    linears = [l for l in find_linears(model) if l.role in ("qkv", "attn_out", "fc1", "fc2")]
    obs = HessianObserver()
    stream_activations(model, sorted({l.activation for l in linears}), calibration.batches, obs, progress=options.get("progress"))
    names = _torch_weight_names(head, reference)
    missing = [l.node.name for l in linears if l.weight not in names]
    if missing:
        raise VitexportError(f"coreml: cannot map {missing[0]} back to a torch weight")
    return model, linears, obs.h, names


def _attach_gptq_int8(head, reference, calibration, options) -> dict[str, Any]:
    """GPTQ-rounded symmetric per-channel int8 codes (the core int8 recipe's gptq_weight, full 8 bits: CoreML
    dequantizes weights, there is no integer accumulation to saturate), handed to coremltools exactly through
    ``_COREML_/weight/*`` buffers (compression_type 3 = quantization, 8 bits, scale [N, 1], no zero point)."""
    import torch

    from ..quantization.graph import weight_nk
    from ..quantization.int8 import gptq_weight

    t0 = time.perf_counter()
    model, linears, hessians, names = _linear_hessians(head, reference, calibration, options)
    params = dict(head.named_parameters())
    for l in linears:
        tname, _ = names[l.weight]
        codes, scale = gptq_weight(weight_nk(model, l), hessians[l.activation], reduce_range=False)
        mod_name, pname = tname.rsplit(".", 1)
        with torch.no_grad():
            params[tname].copy_(torch.from_numpy(codes.astype(np.float32) * scale[:, None]))
        mod = head.get_submodule(mod_name)
        mod.register_buffer(f"_COREML_/{pname}/compression_type", torch.tensor([3]))
        mod.register_buffer(f"_COREML_/{pname}/quantization_n_bits", torch.tensor(8))
        mod.register_buffer(f"_COREML_/{pname}/quantization_scale", torch.from_numpy(scale[:, None].copy()))
    return {"method": "GPTQ (vitexport.quantization.int8.gptq_weight), symmetric per-channel int8", "linears": len(linears),
            "roles": ["qkv", "attn_out", "fc1", "fc2"], "others": "coremltools linear_quantize_weights (round to nearest)",
            "calibration_images": calibration.count, "written_as": "torch compression metadata -> constexpr dequantize", "seconds": round(time.perf_counter() - t0, 2)}


def _attach_gptq_palette(head, reference, calibration, options, opts: CoreMLOptions) -> dict[str, Any]:
    """Palettize the linears with vitexport.quantization.palette and hand coremltools the exact palettes.

    coremltools' torch frontend turns ``_COREML_/weight/*`` buffers (compression_type 2 = palettization, ``lut``
    [N/group, 1, 16, 1]) into constexpr_lut_to_dense ops; the weight's values are already palette entries, so its
    index lookup is exact.
    """
    import torch

    from ..quantization.graph import weight_nk
    from ..quantization.palette import PaletteRecipe, palettize_gptq

    t0 = time.perf_counter()
    recipe = PaletteRecipe(group_size=opts.palette_group_size)
    model, linears, hessians, names = _linear_hessians(head, reference, calibration, options)
    params = dict(head.named_parameters())
    errors = []
    for l in linears:
        tname, _ = names[l.weight]
        w = weight_nk(model, l)  # [N, K]: torch Linear's own layout
        q, lut = palettize_gptq(w, hessians[l.activation], recipe)
        errors.append(float(np.linalg.norm(q - w) / max(np.linalg.norm(w), 1e-30)))
        mod_name, pname = tname.rsplit(".", 1)
        with torch.no_grad():
            params[tname].copy_(torch.from_numpy(q))
        mod = head.get_submodule(mod_name)
        mod.register_buffer(f"_COREML_/{pname}/compression_type", torch.tensor([2]))
        mod.register_buffer(f"_COREML_/{pname}/lut", torch.from_numpy(lut[:, None, :, None].copy()))
    return {"method": "k-means palettes per group + GPTQ rounding", "group_size": recipe.group_size, "refine": recipe.refine, "damp": recipe.damp,
            "linears": len(linears), "roles": ["qkv", "attn_out", "fc1", "fc2"], "rel_weight_error_mean": round(float(np.mean(errors)), 5),
            "calibration_images": calibration.count, "written_as": "torch compression metadata -> constexpr_lut_to_dense", "seconds": round(time.perf_counter() - t0, 2)}


def _attach_gptq_int4(module, head, reference, calibration, options, opts: CoreMLOptions) -> dict[str, Any]:
    """Run the core's GPTQ int4 recipe on the reference ONNX and hand its exact codes to coremltools.

    coremltools' torch frontend turns ``_COREML_/weight/*`` buffers (compression_type 3 = quantization, n_bits,
    scale, zero point) into constexpr_blockwise_shift_scale ops: the package then holds GPTQ's codes, not a re-rounding.
    """
    import torch
    from onnx import numpy_helper

    from ..quantization.graph import find_linears
    from ..quantization.int4 import Int4Recipe, unpack_matmulnbits

    raw = dict(options.get("int4", {}))
    raw.setdefault("block_sizes", (opts.int4_block_size,))
    recipe = recipe_from(Int4Recipe, raw)
    linears = {l.node.name: l for l in find_linears(reference.load())}
    qmodel, summary = shared_int4(reference, calibration, recipe, progress=options.get("progress"))
    names = _torch_weight_names(head, reference)
    inits = {t.name: t for t in qmodel.graph.initializer}
    params = dict(head.named_parameters())
    done = 0
    for node in qmodel.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        src = linears.get(node.name.removesuffix("_Q4"))
        if src is None or src.weight not in names:
            raise VitexportError(f"coreml int4: cannot map {node.name} back to a torch weight")
        tname, _ = names[src.weight]
        at = {a.name: a.i for a in node.attribute}
        k, n, block = at["K"], at["N"], at["block_size"]
        b = numpy_helper.to_array(inits[node.input[1]])
        scales = numpy_helper.to_array(inits[node.input[2]]).astype(np.float32).reshape(n, -1)
        zp_packed = numpy_helper.to_array(inits[node.input[3]]) if len(node.input) > 3 and node.input[3] else None
        if k % block:
            raise VitexportError(f"coreml int4: K={k} is not a multiple of block {block}")
        w_kn = unpack_matmulnbits(b, scales, zp_packed, k, n, block)
        nb = k // block
        if zp_packed is None:
            zp = np.full((n, nb), 8, np.float32)
        else:
            z = np.asarray(zp_packed, np.uint8).reshape(n, -1)
            zp = np.stack([z & 0x0F, z >> 4], axis=-1).reshape(n, -1)[:, :nb].astype(np.float32)
        mod_name, pname = tname.rsplit(".", 1)
        mod = head.get_submodule(mod_name)
        with torch.no_grad():
            params[tname].copy_(torch.from_numpy(np.ascontiguousarray(w_kn.T)))
        mod.register_buffer(f"_COREML_/{pname}/compression_type", torch.tensor([3]))
        mod.register_buffer(f"_COREML_/{pname}/quantization_n_bits", torch.tensor(4))
        mod.register_buffer(f"_COREML_/{pname}/quantization_scale", torch.from_numpy(scales.copy()))
        mod.register_buffer(f"_COREML_/{pname}/zero_point", torch.from_numpy(zp))
        done += 1
    keep = ("method", "bits", "symmetric", "damp", "clip_search", "block_sizes", "quantized", "quantized_roles", "kept_float", "calibration_images", "total_s")
    return {**{k: summary[k] for k in keep if k in summary}, "written_as": "torch compression metadata -> constexpr_blockwise_shift_scale", "linears": done}


def _compress(ct, mlmodel, precision: str, opts: CoreMLOptions, calibration: Calibration | None, pre: Mapping[str, Any]):
    import coremltools.optimize.coreml as cto

    if precision in ("fp32", "fp16"):
        return mlmodel, {"compression": "none"}
    if precision in ("int8", "w8a8"):
        cfg = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel", weight_threshold=opts.weight_threshold)
        keep = ("position_embeddings", "cls_token")
        config = _config(cto, mlmodel, cfg, keep)
        out = {"compression": "linear_quantize_weights", "mode": "linear_symmetric", "weight_type": "int8", "granularity": "per_channel", "kept_float": list(keep)}
        if precision == "w8a8":  # pragma: no cover - macOS only (needs CoreML predictions to calibrate)
            from coremltools.optimize.coreml.experimental import OpActivationLinearQuantizerConfig, linear_quantize_activations

            if calibration is None:
                raise VitexportError("coreml w8a8 needs calibration images: pass --calib DIR")
            samples = [{INPUT_NAME: img} for batch in calibration.batches() for img in _to_pil(batch, pre)]
            act = cto.OptimizationConfig(global_config=OpActivationLinearQuantizerConfig(mode="linear_symmetric"))
            mlmodel = linear_quantize_activations(mlmodel, act, samples)
            out["activation_type"] = "int8"
        return cto.linear_quantize_weights(mlmodel, config), out
    if precision == "int4":
        if opts.int4_method == "gptq":
            return mlmodel, {"compression": "GPTQ int4 codes from vitexport.quantization.int4", "weight_type": "uint4", "granularity": "per_block", "block_size": opts.int4_block_size}
        # coremltools' own round-to-nearest (its default symmetric mode): the stock recipe GPTQ is measured against
        cfg = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int4", granularity="per_block", block_size=opts.int4_block_size, weight_threshold=opts.weight_threshold)
        config = _config(cto, mlmodel, cfg, ("patch_embeddings",) + tuple(opts.keep_float))
        return cto.linear_quantize_weights(mlmodel, config), {"kept_float": ["patch_embeddings", *opts.keep_float],
            "compression": "linear_quantize_weights", "int4": {"method": "rtn"}, "weight_type": "int4", "mode": "linear_symmetric", "granularity": "per_block", "block_size": opts.int4_block_size}
    if precision == "palette4" and opts.palette_method == "gptq":
        return mlmodel, {"compression": "GPTQ palettes from vitexport.quantization.palette", "weight_type": "4-bit palette", "granularity": "per_grouped_channel",
                         "group_size": opts.palette_group_size, "per_channel_scale": False}
    if precision == "palette4":
        kw: dict[str, Any] = {"nbits": 4, "mode": "kmeans", "granularity": opts.palette_granularity, "weight_threshold": opts.weight_threshold,
                              "num_kmeans_workers": opts.palette_kmeans_workers}
        if opts.palette_granularity == "per_grouped_channel":
            kw["group_size"] = opts.palette_group_size
            kw["enable_per_channel_scale"] = opts.palette_per_channel_scale
        config = _config(cto, mlmodel, cto.OpPalettizerConfig(**kw), ("patch_embeddings",) + tuple(opts.keep_float))
        out = {"compression": "palettize_weights", "weight_type": "4-bit palette", "granularity": opts.palette_granularity,
               "group_size": kw.get("group_size"), "per_channel_scale": kw.get("enable_per_channel_scale", False),
               "kept_float": ["patch_embeddings", *opts.keep_float]}
        return cto.palettize_weights(mlmodel, config), out
    raise VitexportError(f"coreml has no precision {precision}")


def _config(cto, mlmodel, cfg, keep: tuple[str, ...]):
    """One config for every weight (per op type configs conflict when consts are shared, e.g. a random model's zero
    biases), except the named weights that stay float."""
    spec = mlmodel.get_spec()
    fn = spec.mlProgram.functions["main"]
    names = [o.name for op in fn.block_specializations[fn.opset].operations if op.type == "const" for o in op.outputs]
    skip = {n: None for n in names if any(k in n for k in keep)}
    return cto.OptimizationConfig(global_config=cfg, op_name_configs=skip)


def _describe_model(mlmodel, reference, precision: str, target: str, recipe: Mapping[str, Any]) -> None:
    from importlib.metadata import version

    spec = reference.spec
    pre = spec.preprocessing.to_dict()
    h, w = spec.input_shape[1:]
    what = "image classifier" if spec.task == "classification" else "image embedding backbone"
    source = _source_name(spec.source)  # never the build machine's path
    mlmodel.short_description = (
        f"{spec.architecture} {what} from {source}, {precision}, built by vitexport. Input: an RGB image of exactly {h}x{w}, "
        f"framed as the checkpoint's preprocessing does ({_resize_text(spec.preprocessing)}; see vitexport.app_framing); scaling and normalisation happen inside the model."
    )
    author, licence = _card_fields(spec.source)
    if author:
        mlmodel.author = author
    mlmodel.license = licence or f"not stated by the checkpoint ({source}): check its model card before shipping"
    mlmodel.version = version("vitexport") if _has_dist("vitexport") else "0"
    mlmodel.input_description[INPUT_NAME] = f"RGB image {h}x{w}, already resized and centre-cropped ({_resize_text(spec.preprocessing)})"
    if spec.task == "classification":
        mlmodel.output_description["classLabel"] = "most likely label"
        mlmodel.output_description["classLabel_probs"] = "probability of every label (softmax)"
    else:
        mlmodel.output_description[EMBEDDING_OUTPUT] = f"embedding ({reference.verification.get('embedding') or 'pooled'})"
    meta = mlmodel.user_defined_metadata
    meta["vitexport.version"] = mlmodel.version
    meta["vitexport.precision"] = precision
    meta["vitexport.minimum_deployment_target"] = target
    meta["vitexport.preprocessing"] = json.dumps(pre)
    meta["vitexport.app_preprocessing"] = f"resize/crop to {h}x{w} in the app: {_resize_text(spec.preprocessing)}"
    meta["vitexport.app_framing"] = app_framing(spec.preprocessing)
    meta["vitexport.model"] = json.dumps({**spec.summary(reference.num_parameters), "source": source})
    meta["vitexport.task"] = spec.task


def _source_name(source: str) -> str:
    """A hub id as is; a local checkpoint by its folder name (the absolute path says nothing to the app)."""
    return Path(source).name if Path(source).exists() else source


def app_framing(pre) -> str:
    """How an app reproduces the evaluated framing with Vision (CoreML's image input neither resizes nor crops).

    resize HxW then crop hxw is the central (h/H, w/W) of the original, stretched to hxw: a centred regionOfInterest
    with .scaleFill. shortest-edge s then crop c is the central square of side c/s of the short side: the same
    region fraction with .centerCrop. Vision's own resampling filter differs from the checkpoint's."""
    h, w = pre.output_size
    if pre.resize:
        fh, fw = (pre.crop[0] / pre.resize[0], pre.crop[1] / pre.resize[1]) if pre.crop else (1.0, 1.0)
        option = ".scaleFill"
    elif pre.shortest_edge and pre.crop:
        fh = fw = pre.crop[0] / pre.shortest_edge
        option = ".centerCrop"
    else:
        return f"feed an RGB image of exactly {h}x{w}"
    roi = f"CGRect(x: {(1 - fw) / 2:.4f}, y: {(1 - fh) / 2:.4f}, width: {fw:.4f}, height: {fh:.4f})"
    return (
        f"{_resize_text(pre)} = the central {fh:.2%} x {fw:.2%} (height x width) of the image scaled to {h}x{w}: "
        f"VNCoreMLRequest regionOfInterest = {roi}, imageCropAndScaleOption = {option}"
    )


def _resize_text(pre) -> str:
    parts = []
    if pre.shortest_edge:
        parts.append(f"resize shortest edge to {pre.shortest_edge}")
    elif pre.resize:
        parts.append(f"resize to {pre.resize[0]}x{pre.resize[1]}")
    if pre.crop:
        parts.append(f"centre crop {pre.crop[0]}x{pre.crop[1]}")
    return ", then ".join(parts) or "none"


def _has_dist(name: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version(name)
        return True
    except PackageNotFoundError:
        return False


def _card_fields(source: str) -> tuple[str | None, str | None]:
    """author / licence from a local checkpoint's model card (README.md front matter) when it has them."""
    card = Path(source) / "README.md"
    author = licence = None
    if card.is_file():
        for line in card.read_text(errors="replace").splitlines()[:40]:
            if line.lower().startswith("license:"):
                licence = line.split(":", 1)[1].strip()
            if line.lower().startswith(("author:", "authors:")):
                author = line.split(":", 1)[1].strip()
    if "/" in source and not Path(source).exists():
        author = author or source.split("/")[0]
    return author, licence


def _write_emulation(out_dir: Path, reference, original: Mapping[str, Any]) -> None:
    """emulation/graph.onnx: the reference graph with its weights removed; weights.json: which package weight fills each."""
    import onnx
    from onnx import numpy_helper

    pkg = PackageReader(out_dir / PACKAGE)
    model = onnx.load(str(reference.path))
    inverse: dict[tuple, tuple[str, bool]] = {}
    for name, t in original.items():
        a = t.numpy().astype(np.float32)
        inverse.setdefault((a.shape, a.tobytes()), (name, False))
        if a.ndim == 2:
            inverse.setdefault((a.T.shape, np.ascontiguousarray(a.T).tobytes()), (name, True))
    consumed = pkg.consumed_weights()
    mapping = {}
    keep = []
    for init in model.graph.initializer:
        a = numpy_helper.to_array(init, str(reference.path.parent)) if init.data_type == onnx.TensorProto.FLOAT else None
        hit = inverse.get((a.shape, a.astype(np.float32).tobytes())) if a is not None and a.size >= 2 else None
        if hit is None:
            keep.append(init)
            continue
        tname, transpose = hit
        stem = tname.replace(".", "_")
        size = int(a.size)
        cands = [n for n, shp in consumed.items() if f"_{stem}_" in f"_{n}_" and int(np.prod(shp)) == size]
        if len(cands) != 1:
            raise VitexportError(f"coreml emulation: cannot find the package weight for {tname} (candidates {cands}); please report this model")
        mapping[init.name] = {"const": cands[0], "torch": tname, "transpose": transpose, "shape": list(a.shape)}
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    d = out_dir / EMULATION_DIR
    d.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(d / SKELETON))
    (d / WEIGHT_MAP).write_text(json.dumps({"input_preprocessing": "package", "initializers": mapping}, indent=1) + "\n")


def _weight_summary(path: Path) -> dict[str, Any]:
    pkg = PackageReader(path)
    kinds: dict[str, int] = {}
    for op in pkg.ops.values():
        if op.type.startswith("constexpr_"):
            kinds[op.type] = kinds.get(op.type, 0) + 1
    return {"constexpr_ops": kinds, "weight_bin_bytes": pkg.weight_bin_bytes(), "storage": pkg.storage_by_dtype()}


# ---------------------------------------------------------------------------------------------------------- reading
#
# A reader for saved .mlpackage files that needs neither coremltools' converter nor torch (importing coremltools
# imports torch and transformers when they are installed; runners must not): the protobuf classes that ship with
# coremltools are loaded under a private package name, weight.bin is read with numpy.

_DTYPES = {10: np.float16, 11: np.float32, 12: np.float64, 21: np.int8, 22: np.int16, 23: np.int32, 24: np.int64, 31: np.uint8, 32: np.uint16,
           33: np.uint32, 34: np.uint64, 1: np.bool_}
_SUBBYTE = {25: (4, True), 35: (4, False), 36: (2, False), 37: (1, False), 38: (6, False), 39: (3, False)}  # dataType -> (bits, signed)


def _proto():
    name = "_vitexport_coreml_proto"
    if name + ".Model_pb2" in sys.modules:
        return sys.modules[name + ".Model_pb2"], sys.modules[name + ".MIL_pb2"]
    spec = importlib.util.find_spec("coremltools")
    if spec is None or not spec.origin:
        raise VitexportError(f"reading a CoreML package needs coremltools' protobuf definitions: {INSTALL_HINT}")
    pkg = types.ModuleType(name)
    pkg.__path__ = [str(Path(spec.origin).parent / "proto")]
    sys.modules[name] = pkg
    return importlib.import_module(name + ".Model_pb2"), importlib.import_module(name + ".MIL_pb2")


def unpack_subbyte(raw: bytes | np.ndarray, bits: int, count: int, signed: bool) -> np.ndarray:
    """n-bit values packed little-endian (first value in the lowest bits), as MIL blob storage writes them."""
    b = np.unpackbits(np.frombuffer(bytes(raw), np.uint8), bitorder="little")[: count * bits].reshape(count, bits).astype(np.int16)
    v = (b << np.arange(bits, dtype=np.int16)).sum(axis=1)
    if signed:
        v = np.where(v >= 1 << (bits - 1), v - (1 << bits), v)
    return v.astype(np.int8 if signed else np.uint8)


class PackageReader:
    """The MIL program of a saved .mlpackage: every constant and constexpr op, dequantized on request."""

    def __init__(self, path: Path):
        self.path = Path(path)
        data = self.path / "Data" / "com.apple.CoreML"
        if not (data / "model.mlmodel").is_file():
            raise VitexportError(f"{self.path} is not an ML Program .mlpackage (no Data/com.apple.CoreML/model.mlmodel)")
        model_pb2, _ = _proto()
        self.spec = model_pb2.Model()
        self.spec.ParseFromString((data / "model.mlmodel").read_bytes())
        if self.spec.WhichOneof("Type") != "mlProgram":
            raise VitexportError(f"{self.path} is not an ML Program")
        self.weights_dir = data / "weights"
        self._blobs: dict[str, bytes] = {}
        fn = self.spec.mlProgram.functions["main"]
        self.block = fn.block_specializations[fn.opset]
        self.ops = {}
        for op in self.block.operations:
            for o in op.outputs:
                self.ops[o.name] = op
        self._cache: dict[str, np.ndarray] = {}

    # -- raw storage

    def _blob(self, file_name: str) -> bytes:
        rel = file_name.replace("@model_path/", "")
        if rel not in self._blobs:
            self._blobs[rel] = (self.weights_dir.parent / rel).read_bytes()
        return self._blobs[rel]

    def weight_bin_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.weights_dir.glob("*") if p.is_file()) if self.weights_dir.is_dir() else 0

    @staticmethod
    def _shape(vtype) -> tuple[int, ...]:
        t = vtype.tensorType
        return tuple(int(d.constant.size) for d in t.dimensions)

    def _value(self, value) -> np.ndarray:
        t = value.type.tensorType
        dt, shape = int(t.dataType), self._shape(value.type)
        count = int(np.prod(shape)) if shape else 1
        kind = value.WhichOneof("value")
        if kind == "blobFileValue":
            buf = self._blob(value.blobFileValue.fileName)
            off = int(value.blobFileValue.offset)
            sentinel, _ = np.frombuffer(buf, np.uint32, 2, off)
            if sentinel != 0xDEADBEEF:
                raise VitexportError(f"{self.path}: corrupt weight.bin (bad blob header at {off})")
            nbytes, data_off = (int(x) for x in np.frombuffer(buf, np.uint64, 2, off + 8))
            raw = buf[data_off : data_off + nbytes]
            if dt in _SUBBYTE:
                bits, signed = _SUBBYTE[dt]
                return unpack_subbyte(raw, bits, count, signed).reshape(shape)
            return np.frombuffer(raw, _DTYPES[dt], count).reshape(shape)
        if value.immediateValue.WhichOneof("value") == "list":  # e.g. the classifier's labels
            return np.array([self._value(v).reshape(-1)[0] for v in value.immediateValue.list.values], dtype=object)
        tv = value.immediateValue.tensor
        which = tv.WhichOneof("value")
        if which == "bytes":
            raw = tv.bytes.values
            if dt in _SUBBYTE:
                bits, signed = _SUBBYTE[dt]
                return unpack_subbyte(raw, bits, count, signed).reshape(shape)
            return np.frombuffer(raw, _DTYPES[dt], count).reshape(shape)
        if which == "strings":
            return np.array(list(tv.strings.values), dtype=object).reshape(shape)
        vals = list(getattr(tv, which).values) if which else []
        return np.asarray(vals, dtype=_DTYPES.get(dt, np.float32)).reshape(shape)

    # -- values

    def _input(self, op, key: str) -> np.ndarray | None:
        if key in op.inputs:
            arg = op.inputs[key].arguments[0]
            return self.value(arg.name) if arg.WhichOneof("binding") == "name" else self._value(arg.value)
        if key in op.attributes:
            return self._value(op.attributes[key])
        return None

    def value(self, name: str) -> np.ndarray:
        """A constant (dequantized when it is a constexpr op's output) as numpy, in its stored dtype family."""
        if name in self._cache:
            return self._cache[name]
        op = self.ops.get(name)
        if op is None:
            raise KeyError(name)
        t = op.type
        if t == "const":
            v = self._value(op.attributes["val"])
        elif t == "constexpr_affine_dequantize":  # iOS16: scale * (q - zp) along `axis`
            q = self._input(op, "quantized_data").astype(np.float32)
            zp = self._input(op, "zero_point").astype(np.float32)
            scale = self._input(op, "scale").astype(np.float32)
            axis = int(self._input(op, "axis"))
            bshape = [1] * q.ndim
            if scale.size > 1:
                bshape[axis] = -1
            v = ((q - zp.reshape(bshape if zp.size > 1 else [1] * q.ndim)) * scale.reshape(bshape)).astype(np.float32)
        elif t == "constexpr_blockwise_shift_scale":  # iOS18: (data - offset) * scale, scale/offset repeated per block
            data = self._input(op, "data").astype(np.float32)
            scale = _repeat_blocks(self._input(op, "scale").astype(np.float32), data.shape)
            off = self._input(op, "offset")
            if off is not None:
                data = data - _repeat_blocks(off.astype(np.float32), data.shape)
            v = data * scale
        elif t == "constexpr_lut_to_dense":
            lut = self._input(op, "lut").astype(np.float32)
            idx = self._input(op, "indices")
            shape = self._input(op, "shape")
            if shape is not None:  # iOS16: flat lut, bit-packed indices
                bits = int(np.log2(lut.size))
                n = int(np.prod(shape))
                codes = unpack_subbyte(idx.tobytes(), bits, n, False) if bits < 8 else idx.reshape(-1)
                v = lut.reshape(-1)[codes.astype(np.int64)].reshape(tuple(int(s) for s in shape))
            else:  # iOS18: indices of the output's shape, lut [*groups, 2^n, vector_size]
                if lut.shape[-1] != 1:
                    raise VitexportError(f"{self.path}: vector palettization is not supported by the reader")
                grid = lut[..., 0]  # [*groups, 2^n]
                gidx = np.ix_(*[np.arange(s) // (s // g) for s, g in zip(idx.shape, grid.shape[:-1])])
                v = grid[gidx + (idx.astype(np.int64),)]
        elif t == "constexpr_cast":
            v = self._input(op, "source_val").astype(np.float32)
        else:
            raise VitexportError(f"{self.path}: the reader does not know the op {t} (producing {name})")
        if t != "const":  # CoreML materialises the weight in the op's output type (float16 in a float16 program)
            v = v.astype(_DTYPES.get(int(op.outputs[0].type.tensorType.dataType), np.float32))
        self._cache[name] = v
        return v

    def consumed_weights(self) -> dict[str, tuple[int, ...]]:
        """Names and shapes of the constant tensors (>= 2 elements) that compute ops read: the model's weights."""
        out = {}
        for op in self.block.operations:
            if op.type == "const" or op.type.startswith("constexpr_"):
                continue
            for arg in op.inputs.values():
                for b in arg.arguments:
                    if b.WhichOneof("binding") != "name":
                        continue
                    src = self.ops.get(b.name)
                    if src is None or not (src.type == "const" or src.type.startswith("constexpr_")):
                        continue
                    shape = self._shape(src.outputs[0].type)
                    if int(np.prod(shape) if shape else 1) >= 2 and int(src.outputs[0].type.tensorType.dataType) in (10, 11):
                        out[b.name] = shape
        return out

    def image_preprocessing(self, input_name: str = INPUT_NAME) -> tuple[float, np.ndarray]:
        """The scale and per-channel bias the package applies to its image input (1 and 0 when it has none)."""
        scale, bias = 1.0, np.zeros(3, np.float32)
        consumers = [op for op in self.block.operations if any(b.name == input_name for a in op.inputs.values() for b in a.arguments)]
        cur = input_name
        for _ in range(2):
            nxt = [op for op in self.block.operations if op.type in ("mul", "add") and any(b.name == cur for a in op.inputs.values() for b in a.arguments)]
            if not nxt:
                break
            op = nxt[0]
            other = next(b.name for k, a in op.inputs.items() for b in a.arguments if b.name != cur)
            val = self.value(other).astype(np.float32)
            if op.type == "mul":
                scale = float(val.reshape(-1)[0])
            else:
                bias = val.reshape(-1)
            cur = op.outputs[0].name
        del consumers
        return scale, bias

    def computes_in_fp16(self) -> bool:
        return any(int(o.type.tensorType.dataType) == 10 for op in self.block.operations if op.type not in ("const",) and not op.type.startswith("constexpr_") for o in op.outputs)

    def storage_by_dtype(self) -> dict[str, int]:
        """Bytes of weight.bin per stored data type (sub-byte types make the compression visible)."""
        _, mil = _proto()
        out: dict[str, int] = {}
        for op in self.block.operations:
            values = list(op.attributes.values()) + [b.value for a in op.inputs.values() for b in a.arguments if b.WhichOneof("binding") == "value"]
            for val in values:
                if val.WhichOneof("value") != "blobFileValue":
                    continue
                buf = self._blob(val.blobFileValue.fileName)
                nbytes = int(np.frombuffer(buf, np.uint64, 1, int(val.blobFileValue.offset) + 8)[0])
                name = mil.DataType.Name(int(val.type.tensorType.dataType))
                out[name] = out.get(name, 0) + nbytes
        return out


def _repeat_blocks(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    for axis, (s, g) in enumerate(zip(shape, a.shape)):
        if g != s and g != 1:
            a = np.repeat(a, s // g, axis=axis)
    return a


# ---------------------------------------------------------------------------------------------------------- running


class EmulatedRunner:
    """Runs what a saved .mlpackage holds, without CoreML: its weights (read back from the package and dequantized as
    its constexpr ops define) in the reference graph on ONNX Runtime; its own image scale/bias on the input; every
    op output rounded to float16 when the package computes in float16. Accumulation stays float32 and the softmax of
    the classifier output is left out (the harness compares logits), so this is an emulation, not CoreML: no latency."""

    emulated = True

    def __init__(self, artifact: Artifact, threads: int | None = None):
        import onnx
        import onnxruntime as ort
        from onnx import numpy_helper

        from ..harness.emulation import round_to_float16

        d = artifact.directory / EMULATION_DIR
        if not (d / SKELETON).is_file() or not (d / WEIGHT_MAP).is_file():
            raise VitexportError(f"{artifact.directory} has no {EMULATION_DIR}/ folder: rebuild the artifact to emulate it off macOS")
        pkg = PackageReader(artifact.path)
        mapping = json.loads((d / WEIGHT_MAP).read_text())["initializers"]
        model = onnx.load(str(d / SKELETON))
        for name, m in mapping.items():
            w = pkg.value(m["const"]).astype(np.float32)
            w = w.T if m["transpose"] else w
            model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w.reshape(m["shape"])), name))
        self.fp16 = pkg.computes_in_fp16()
        if self.fp16:
            round_to_float16(model)
        self.scale, self.bias = pkg.image_preprocessing()
        pre = artifact.manifest.get("preprocessing", {})
        self.rescale = float(pre.get("rescale") or 1.0)
        self.mean = np.asarray(pre.get("mean") or (0.0, 0.0, 0.0), np.float32).reshape(1, -1, 1, 1)
        self.std = np.asarray(pre.get("std") or (1.0, 1.0, 1.0), np.float32).reshape(1, -1, 1, 1)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # keeps the float16 rounding casts
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = threads
        self.session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self.threads = threads
        self.runtime = f"CoreML package emulated on onnxruntime {ort.__version__}"
        self.device = f"emulation on {platform.machine()} CPU ({'float16' if self.fp16 else 'float32'} activations)"

    def pixels(self, batch: np.ndarray) -> np.ndarray:
        """Back from the harness's normalised batch to the 8-bit RGB pixels an app would hand CoreML."""
        return np.clip(np.rint((batch * self.std + self.mean) / self.rescale), 0, 255)

    def run(self, batch: np.ndarray) -> np.ndarray:
        x = self.pixels(np.asarray(batch, np.float32)) * self.scale + self.bias.reshape(1, -1, 1, 1)
        return self.session.run([self.output_name], {self.input_name: x.astype(np.float32)})[0]


class CoreMLRunner:  # pragma: no cover - needs macOS (CoreML predictions); not run on vitexport's Linux CI
    """MLModel.predict on the real package, with selectable compute units (cpu_only / cpu_and_gpu / cpu_and_ne / all).
    Classifiers return log-probabilities (the logits up to a per-image constant: top-1 and agreement are exact)."""

    emulated = False

    def __init__(self, artifact: Artifact, compute_units: str = "all"):
        ct = _coremltools()
        if compute_units not in COMPUTE_UNITS:
            raise VitexportError(f"compute units must be one of {', '.join(COMPUTE_UNITS)}, not {compute_units!r}")
        units = {"cpu_only": ct.ComputeUnit.CPU_ONLY, "cpu_and_gpu": ct.ComputeUnit.CPU_AND_GPU, "cpu_and_ne": ct.ComputeUnit.CPU_AND_NE, "all": ct.ComputeUnit.ALL}
        self.model = ct.models.MLModel(str(artifact.path), compute_units=units[compute_units])
        self.labels = list(artifact.manifest.get("labels", []))
        self.classifier = artifact.manifest.get("io", {}).get("task", "classification") == "classification"
        self.pre = artifact.manifest.get("preprocessing", {})
        self.threads = None
        self.runtime = f"CoreML via coremltools {ct.__version__}"
        self.device = f"{platform.machine()} macOS {platform.mac_ver()[0]}, compute units {compute_units}"

    def run(self, batch: np.ndarray) -> np.ndarray:
        outs = []
        for img in _to_pil(batch, self.pre):
            r = self.model.predict({INPUT_NAME: img})
            if self.classifier:
                probs = r["classLabel_probs"]
                outs.append(np.log(np.maximum([probs[label] for label in self.labels], 1e-30)))
            else:
                outs.append(np.asarray(r[EMBEDDING_OUTPUT]).reshape(-1))
        return np.stack(outs).astype(np.float32)


def _to_pil(batch: np.ndarray, pre: Mapping[str, Any] | None):
    """Normalised NCHW float batch -> the RGB PIL images the app would feed."""
    from PIL import Image

    pre = pre or {}
    mean = np.asarray(pre.get("mean") or (0.0, 0.0, 0.0), np.float32).reshape(-1, 1, 1)
    std = np.asarray(pre.get("std") or (1.0, 1.0, 1.0), np.float32).reshape(-1, 1, 1)
    rescale = float(pre.get("rescale") or 1.0)
    for x in np.asarray(batch, np.float32):
        px = np.clip(np.rint((x * std + mean) / rescale), 0, 255).astype(np.uint8)
        yield Image.fromarray(np.transpose(px, (1, 2, 0)), "RGB")
