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

The package is split along these seams: ``settings`` (options, deployment targets), ``convert`` (torch -> ML
Program, coremltools' compression), ``gptq`` (vitexport's codes written through coremltools' torch compression
metadata), ``package`` (metadata, the emulation graph, a reader of saved packages) and ``runner``.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import time
from pathlib import Path
from typing import Any, Mapping

from ...artifacts import Artifact, write_manifest
from ...errors import VitexportError
from .. import Calibration, Capability, backend_options, recipe_from
from .package import app_framing  # noqa: F401  (also the app's framing, in words, for README and tests)
from .settings import (  # noqa: F401  (re-exported: the names tests and scripts use)
    _TARGETS,
    COMPUTE_UNITS,
    EMBEDDING_OUTPUT,
    EMULATION_DIR,
    INPUT_NAME,
    INSTALL_HINT,
    PACKAGE,
    SKELETON,
    WEIGHT_MAP,
    CoreMLOptions,
    deployment_target,
)

def _capability(precision: str, calibration: bool, **kw: Any) -> Capability:
    return Capability(calibration=calibration, runs_here="emulated", min_target=" / ".join(_TARGETS[precision]), **kw)


class CoreMLBackend:
    name = "coreml"
    # int8/int4/palette4 round with GPTQ on calibration activations; w8a8 calibrates its activation ranges with
    # CoreML predictions, so it builds on a Mac only. On a Mac the runner predicts for real (measured).
    capabilities = {
        "fp32": _capability("fp32", False),
        "fp16": _capability("fp16", False),
        "int8": _capability("int8", True),
        "int4": _capability("int4", True, recipe="vitexport.quantization.int4:Int4Recipe"),
        "palette4": _capability("palette4", True),
        "w8a8": _capability("w8a8", True, builds_on="Darwin"),
    }
    precisions = tuple(capabilities)
    settings = CoreMLOptions
    summary = {"devices": "iPhone, iPad, Mac", "artifact": "`model.mlpackage` (ML Program)", "measured": "weights read back from the package; `MLModel.predict` on a Mac"}

    def available(self) -> tuple[bool, str]:
        if importlib.util.find_spec("coremltools") is None:
            return False, f"coremltools is not installed: {INSTALL_HINT}"
        from importlib.metadata import version

        return True, f"coremltools {version('coremltools')}"

    # ------------------------------------------------------------------ build

    def build(self, reference, calibration: Calibration | None, precision: str, options: Mapping[str, Any], out_dir: Path, stages=None) -> Artifact:
        from .package import _weight_summary, _write_emulation

        opts = self._check(calibration, precision, options)
        out_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        target = deployment_target(precision, opts)
        recipe: dict[str, Any] = {"minimum_deployment_target": target, "platform": opts.platform, "compute_units": opts.compute_units}
        matched = _write_package(reference, calibration, precision, options, opts, target, recipe, out_dir / PACKAGE, stages)
        _write_emulation(out_dir, reference, matched)
        recipe["weights"] = _weight_summary(out_dir / PACKAGE)
        recipe["emulation"] = "weights read back from the package, dequantized, run in the reference graph with ONNX Runtime" + (
            "; every op output rounded to float16" if precision != "fp32" else ""
        )
        recipe["build_s"] = round(time.perf_counter() - t0, 2)
        recipe["summary"] = describe(precision, recipe)
        fields = reference.manifest_fields()
        h, w = reference.spec.input_shape[1:]
        classifier = reference.spec.task == "classification"
        fields["io"] = {**fields["io"], "input": INPUT_NAME, "input_kind": f"RGB image {h}x{w} (resized/cropped by the app)",
                        "outputs": ["classLabel", "classLabel_probs"] if classifier else [EMBEDDING_OUTPUT]}
        return write_manifest(out_dir, backend=self.name, precision=precision, main=PACKAGE, recipe=recipe, **fields)

    def _check(self, calibration: Calibration | None, precision: str, options: Mapping[str, Any]) -> CoreMLOptions:
        """The options, and what this precision needs here (a Mac, calibration images), before any work."""
        if precision not in self.precisions:
            raise VitexportError(f"coreml has no precision {precision}: choose from {', '.join(self.precisions)}")
        ok, why = self.available()
        if not ok:
            raise VitexportError(why)
        opts = recipe_from(CoreMLOptions, backend_options(options, self.name), "coreml")
        needs = self.capabilities[precision].builds_on
        if needs and _host_system() != needs:
            raise VitexportError(
                "coreml w8a8 (int8 activations) calibrates by running CoreML predictions, which only run on macOS: "
                "build it on a Mac, or use int8 (weights) here"
            )
        method = {"int4": opts.int4_method, "int8": opts.int8_method, "palette4": opts.palette_method, "w8a8": "calibrated"}.get(precision)
        if method in ("gptq", "calibrated") and (calibration is None or calibration.count == 0):
            how = "uses GPTQ rounding" if method == "gptq" else "calibrates its activation ranges"
            raise VitexportError(f"coreml {precision} {how}, which needs calibration images: pass --calib DIR")
        return opts

    # ------------------------------------------------------------------ run

    def runner(self, artifact: Artifact, threads: int | None = None):
        from .runner import CoreMLRunner, EmulatedRunner

        if platform.system() == "Darwin" and not os.environ.get("VITEXPORT_COREML_EMULATE"):
            units = os.environ.get("VITEXPORT_COREML_COMPUTE_UNITS") or artifact.manifest.get("recipe", {}).get("compute_units", "all")
            return CoreMLRunner(artifact, units)
        return EmulatedRunner(artifact, threads)


def _host_system() -> str:
    """platform.system(), one seam for tests that stand in for a Mac at the coremltools boundary."""
    return platform.system()


def _write_package(reference, calibration: Calibration | None, precision: str, options: Mapping[str, Any], opts: CoreMLOptions,
                   target: str, recipe: dict[str, Any], path: Path, stages=None) -> dict[str, Any]:
    """Reload the checkpoint (coremltools converts PyTorch, not ONNX), fold the preprocessing in, attach GPTQ codes,
    convert, compress, describe and save the package. Fills ``recipe``; returns which torch weight each reference
    initializer is (torch_weights.match_initializers, matched before GPTQ rewrites any: no clone of the weights
    held through the conversion, 0.35 GB on ViT-Base)."""
    import onnx

    from ..torch_weights import match_initializers
    from .convert import _CoreMLModule, _quiet
    from .gptq import _attach_gptq_int4, _attach_gptq_int8, _attach_gptq_palette
    from .package import _describe_model
    from .settings import _coremltools

    spec = reference.spec
    with _quiet():
        ct = _coremltools()
        head = spec.load_torch()
        matched = match_initializers(head.state_dict(), onnx.load(str(reference.path)), reference.path.parent)
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
            recipe["int4"] = _attach_gptq_int4(module, head, reference, calibration, options, opts, matched, stages)
        if precision == "int8" and opts.int8_method == "gptq":
            recipe["int8"] = _attach_gptq_int8(head, reference, calibration, matched, stages)
        if precision == "palette4" and opts.palette_method == "gptq":
            recipe["palette"] = _attach_gptq_palette(head, reference, calibration, opts, matched, stages)
        mlmodel = _converted(ct, module, spec, folded, precision, target, opts, calibration, recipe, reference.cache_dir)
        _describe_model(mlmodel, reference, precision, target, recipe)
        mlmodel.save(str(path))
    return matched


def _converted(ct, module, spec, folded, precision: str, target: str, opts: CoreMLOptions, calibration: Calibration | None, recipe: dict[str, Any],
               cache_dir: str | None = None):
    """The ML Program of ``module``, compressed as ``precision`` asks: converted here, or an earlier build's identical
    conversion from --cache-dir (convert.conversion_key; w8a8, calibrated by predictions on a Mac, is not cached)."""
    from .convert import _compress, _validate_once, cached_conversion, conversion_key, convert, store_conversion

    cache_dir = cache_dir if precision != "w8a8" else None
    key = conversion_key(module, spec, folded, precision, target, opts) if cache_dir else None
    hit = cached_conversion(ct, cache_dir, key) if key else None
    if hit is not None:
        mlmodel, made = hit
        recipe.update(made)
        recipe["conversion"] = f"reused from --cache-dir ({key[:32]})"
        return mlmodel
    with _validate_once():
        mlmodel, timing = convert(ct, module, spec, folded, precision, target)
        tq = time.perf_counter()
        mlmodel, compression = _compress(ct, mlmodel, precision, opts, calibration, spec.preprocessing.to_dict())
    made = {"compute_precision": timing["compute_precision"], **compression}
    recipe.update({**made, "convert_s": timing["convert_s"], "compress_s": round(time.perf_counter() - tq, 2)})
    if key:
        store_conversion(cache_dir, key, mlmodel, made)
    return mlmodel


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


def __getattr__(name: str):
    """The reader and runners load on first use (they import onnx/onnxruntime, the build does not need them)."""
    if name in ("PackageReader", "unpack_subbyte"):
        from . import package

        return getattr(package, name)
    if name in ("EmulatedRunner", "CoreMLRunner"):
        from . import runner

        return getattr(runner, name)
    raise AttributeError(name)
