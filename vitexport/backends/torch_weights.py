"""torch <-> ONNX weight matching for backends that convert the torch model (CoreML today, any later torch-based one).

The ONNX exporter renames (and may transpose) parameters, so the reference ONNX's initializers are matched to the
torch state dict by value: same shape and bytes, or the transpose of a 2-D weight.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np


def match_initializers(state_dict: Mapping[str, Any], onnx_model, base_dir: str | Path) -> dict[str, tuple[str, bool]]:
    """ONNX float initializer (>= 2 elements) -> (torch parameter name, stored transposed?), for those that match.

    The first torch name with a given value wins (tied weights map to one name); ``base_dir`` is where the model's
    external data lives. Values are looked up by their shape and a strided sample of 4096 of them, and every hit is
    compared in full: keyed by the bytes themselves, every weight and its transpose were held at once (0.7 GB on
    ViT-Base), and a digest of all bytes and of a transposed copy cost 3.9 s per ViT-Base CoreML package (0.9 s now)."""
    import onnx
    from onnx import numpy_helper

    arrays = {name: np.ascontiguousarray(t.detach().cpu().numpy(), dtype=np.float32) for name, t in state_dict.items()}
    by_key: dict[tuple, list[tuple[str, bool]]] = {}
    for name, a in arrays.items():
        by_key.setdefault(_sample_key(a, False), []).append((name, False))
        if a.ndim == 2:
            by_key.setdefault(_sample_key(a, True), []).append((name, True))
    out: dict[str, tuple[str, bool]] = {}
    for init in onnx_model.graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT:
            continue
        a = np.ascontiguousarray(numpy_helper.to_array(init, str(base_dir)), dtype=np.float32)
        if a.size < 2:
            continue
        for name, transposed in by_key.get(_sample_key(a, False), ()):
            t = arrays[name]
            if np.array_equal(t.T if transposed else t, a):
                out[init.name] = (name, transposed)
                break
    return out


SAMPLE = 4096


def _sample_key(a: np.ndarray, transposed: bool) -> tuple:
    """(shape, bytes of up to SAMPLE evenly strided values) of ``a`` (C-ordered), or of ``a.T`` without forming it."""
    shape = a.shape[::-1] if transposed else a.shape
    idx = np.arange(0, a.size, max(1, a.size // SAMPLE))[:SAMPLE]
    if transposed:  # element (r, c) of a.T is a[c, r]
        r, c = np.divmod(idx, shape[1])
        idx = c * a.shape[1] + r
    return shape, a.reshape(-1)[idx].tobytes()
