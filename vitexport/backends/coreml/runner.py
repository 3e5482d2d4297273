"""Running a package: MLModel.predict on a Mac, and off macOS an emulation of what the package holds."""

from __future__ import annotations

import json
import platform
from typing import Any, Mapping

import numpy as np

from ...artifacts import Artifact
from ...errors import VitexportError
from .package import PackageReader
from .settings import COMPUTE_UNITS, EMBEDDING_OUTPUT, EMULATION_DIR, INPUT_NAME, SKELETON, WEIGHT_MAP, _coremltools


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

        from ...harness.emulation import round_to_float16

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
        self.pre = artifact.manifest.get("preprocessing", {})
        from ...ort_session import ort_session

        self.session = ort_session(model, threads, optimization="basic", what=str(artifact.path))  # basic: keeps the float16 rounding casts
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self.threads = threads
        self.runtime = f"CoreML package emulated on onnxruntime {ort.__version__}"
        self.device = f"emulation on {platform.machine()} CPU ({'float16' if self.fp16 else 'float32'} activations)"

    def pixels(self, batch: np.ndarray) -> np.ndarray:
        """Back from the harness's normalised batch to the 8-bit RGB pixels an app would hand CoreML."""
        return app_pixels(batch, self.pre)

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


def app_pixels(batch: np.ndarray, pre: Mapping[str, Any] | None) -> np.ndarray:
    """Normalised NCHW float batch -> the 8-bit RGB pixel values (as float NCHW) an app would hand CoreML."""
    pre = pre or {}
    mean = np.asarray(pre.get("mean") or (0.0, 0.0, 0.0), np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(pre.get("std") or (1.0, 1.0, 1.0), np.float32).reshape(1, -1, 1, 1)
    rescale = float(pre.get("rescale") or 1.0)
    return np.clip(np.rint((np.asarray(batch, np.float32) * std + mean) / rescale), 0, 255)


def _to_pil(batch: np.ndarray, pre: Mapping[str, Any] | None):
    """Normalised NCHW float batch -> the RGB PIL images the app would feed."""
    from PIL import Image

    for px in app_pixels(batch, pre).astype(np.uint8):
        yield Image.fromarray(np.transpose(px, (1, 2, 0)), "RGB")
