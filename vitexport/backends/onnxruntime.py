"""ONNX Runtime target (x86/ARM CPU hosts, Raspberry Pi): fp32, static int8 (QDQ), int4 weight-only (MatMulNBits).

The whole story of this target is here: what each precision is, how it is built from the reference
ONNX, and how it runs. The quantization recipes themselves live in `vitexport.quantization`,
shared with other backends that consume QDQ ONNX.
"""

from __future__ import annotations

import logging
import platform
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..artifacts import Artifact, save_onnx, write_manifest
from ..errors import VitexportError
from ..harness.report import cpu_name
from . import Calibration, Capability, copy_reference, recipe_from, recipe_overrides, require_calibration, shared_int4

log = logging.getLogger(__name__)


class OnnxRuntimeBackend:
    name = "onnxruntime"
    capabilities = {
        "fp32": Capability(calibration=False, runs_here="measured"),
        "int8": Capability(calibration=True, runs_here="measured", recipe="vitexport.quantization.int8:Int8Recipe"),
        "int4": Capability(calibration=True, runs_here="measured", recipe="vitexport.quantization.int4:Int4Recipe"),
    }
    precisions = tuple(capabilities)
    settings: dict[str, Any] = {}  # threads come from the profile's top level
    summary = {"devices": "x86/ARM CPUs, Raspberry Pi", "artifact": "`model.onnx` (QDQ int8, `MatMulNBits` int4)", "measured": "the real runtime"}

    def available(self) -> tuple[bool, str]:
        try:
            import onnxruntime
        except ImportError:
            return False, "onnxruntime is not installed: pip install onnxruntime"
        return True, f"onnxruntime {onnxruntime.__version__}"

    def build(self, reference, calibration: Calibration | None, precision: str, options: Mapping[str, Any], out_dir: Path) -> Artifact:
        out_dir.mkdir(parents=True, exist_ok=True)
        target = out_dir / "model.onnx"
        if precision == "fp32":
            copy_reference(reference, target)
            recipe: dict[str, Any] = {"kind": "float32 reference", "opset": reference.opset, "verification": dict(reference.verification)}
        elif precision == "int8":
            from ..quantization.int8 import Int8Recipe, quantize_int8

            recipe_obj = recipe_from(Int8Recipe, recipe_overrides(options, self.name, "int8"))
            model, recipe = quantize_int8(reference.load(), require_calibration(calibration, precision).batches, recipe_obj, progress=options.get("progress"))
            save_onnx(model, target, reference.metadata())
        elif precision == "int4":
            from ..quantization.int4 import Int4Recipe

            recipe_obj = recipe_from(Int4Recipe, recipe_overrides(options, self.name, "int4"))
            model, recipe = shared_int4(reference, require_calibration(calibration, precision), recipe_obj, progress=options.get("progress"))
            save_onnx(model, target, reference.metadata())
        else:
            raise VitexportError(f"onnxruntime has no precision {precision}: choose from {', '.join(self.precisions)}")
        if calibration is not None and precision != "fp32":
            recipe = {**recipe, "calibration_images": calibration.count, "calibration_source": calibration.source}
        recipe["summary"] = describe(precision, recipe)
        return write_manifest(out_dir, backend=self.name, precision=precision, main=target.name, recipe=recipe, **reference.manifest_fields())

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

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: batch})[0]


def describe(precision: str, recipe: Mapping[str, Any]) -> str:
    """One line for the report; the whole recipe stays in the manifest."""
    if precision == "int8":
        fb = recipe.get("sensitivity_fallback", {}).get("kept_float", [])
        c = recipe.get("counts", {})
        return (
            f"static int8 QDQ: {recipe.get('activations')} activations ({recipe.get('calibration', {}).get('method')} ranges), "
            f"{recipe.get('weights')} weights with GPTQ rounding; {c.get('quantized')} linears int8, "
            f"{len(fb)} inputs left float by measured sensitivity ({100 * sum(k['mac_fraction'] for k in fb):.1f}% of linear MACs)"
        )
    if precision == "int4":
        return f"int4 weight-only MatMulNBits: {recipe.get('method')}, block sizes {recipe.get('block_sizes')}, {recipe.get('quantized')} linears int4, head float"
    return "float32 reference ONNX"
