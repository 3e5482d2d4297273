"""torch <-> ONNX weight matching for backends that convert the torch model (CoreML today, any later torch-based one).

The ONNX exporter renames (and may transpose) parameters, so the reference ONNX's initializers are matched to the
torch state dict by value: same shape and bytes, or the transpose of a 2-D weight.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Mapping

import numpy as np


def match_initializers(state_dict: Mapping[str, Any], onnx_model, base_dir: str | Path) -> dict[str, tuple[str, bool]]:
    """ONNX float initializer (>= 2 elements) -> (torch parameter name, stored transposed?), for those that match.

    The first torch name with a given value wins (tied weights map to one name); ``base_dir`` is where the model's
    external data lives. Values are looked up by a digest of their bytes and a hit is compared in full: keyed by the
    bytes themselves, every weight and its transpose were held at once (0.7 GB on ViT-Base, under CoreML's peak)."""
    import onnx
    from onnx import numpy_helper

    def digest(a: np.ndarray) -> tuple:
        return a.shape, hashlib.blake2b(np.ascontiguousarray(a).tobytes(), digest_size=16).digest()

    arrays = {name: t.detach().cpu().numpy() for name, t in state_dict.items()}
    by_digest: dict[tuple, tuple[str, bool]] = {}
    for name, a in arrays.items():
        a = a.astype(np.float32, copy=False)
        by_digest.setdefault(digest(a), (name, False))
        if a.ndim == 2:
            by_digest.setdefault(digest(a.T), (name, True))
    out: dict[str, tuple[str, bool]] = {}
    for init in onnx_model.graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT:
            continue
        a = numpy_helper.to_array(init, str(base_dir)).astype(np.float32, copy=False)
        if a.size < 2:
            continue
        hit = by_digest.get(digest(a))
        if hit is not None:
            t = arrays[hit[0]].astype(np.float32, copy=False)
            if np.array_equal(t.T if hit[1] else t, a):
                out[init.name] = hit
    return out
