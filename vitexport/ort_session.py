"""The one place an ONNX Runtime CPU session is made: the options every caller wants, and one clear error."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .errors import VitexportError


def ort_session(model: str | Path | bytes | Any, threads: int | None = None, *, optimization: str = "all", qdq_fusion: bool = True, what: str | None = None, user_model: bool = True, spinning: bool = True,
                initializers: Mapping[str, Any] | None = None, prepack: bool = True):
    """An ``onnxruntime.InferenceSession`` on the CPU provider for a path, serialized bytes or a ModelProto.

    ``optimization``: "all" (runners: the fusions the runtime really does) or "basic" (emulations, whose float16
    rounding casts a fusion would remove). ``qdq_fusion=False`` keeps each Q/DQ pair as float fake-quantization.
    ``threads``: intra-op threads (None: onnxruntime's choice), one inter-op thread. A model onnxruntime cannot load
    is a VitexportError naming ``what`` (the path by default); ``user_model=False`` for a model vitexport made in
    memory itself (calibration, the fallback search), where a refusal is a bug and its own error propagates.
    ``spinning=False``: idle intra-op threads sleep instead of busy-waiting (long batch loops on a shared host).
    ``initializers``: numpy arrays for the model's in-memory external initializers (``quantization.graph.light_model``), which
    onnxruntime copies in before it optimises the graph. ``prepack=False``: MatMul weights are not copied into
    onnxruntime's packed layout (one more copy of every weight held by the session)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC}[optimization]
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not prepack:
        so.add_session_config_entry("session.disable_prepacking", "1")
    if not qdq_fusion:
        so.add_session_config_entry("session.disable_quant_qdq", "1")
    if initializers:
        names = list(initializers)
        so.add_external_initializers(names, [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(initializers[n])) for n in names])
    source = model if isinstance(model, (bytes, str)) else str(model) if isinstance(model, Path) else model.SerializeToString()
    try:
        return ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
        if not user_model:
            raise
        name = what or (str(model) if isinstance(model, (str, Path)) else "the model")
        raise VitexportError(f"onnxruntime cannot load {name}: {str(e).splitlines()[0][:200]} (rebuild the artifact)") from None


def usable_cores() -> int:
    """The cores this process may run on (its affinity; macOS has none, so all of them)."""
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def release_freed_memory() -> None:
    """Hand the heap pages freed by dropped sessions, model copies and statistics back to the OS.

    glibc keeps freed heap memory for reuse; after a ViT-Base search (a session per block) that was 2.3 GB of RSS
    which the next step's peak stacked on. Elsewhere (macOS, musl) there is nothing to do."""
    import ctypes
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass
