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
    external data lives."""
    import onnx
    from onnx import numpy_helper

    by_bytes: dict[tuple, tuple[str, bool]] = {}
    for name, t in state_dict.items():
        a = t.detach().cpu().numpy().astype(np.float32)
        by_bytes.setdefault((a.shape, a.tobytes()), (name, False))
        if a.ndim == 2:
            by_bytes.setdefault((a.T.shape, np.ascontiguousarray(a.T).tobytes()), (name, True))
    out: dict[str, tuple[str, bool]] = {}
    for init in onnx_model.graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT:
            continue
        a = numpy_helper.to_array(init, str(base_dir)).astype(np.float32)
        if a.size < 2:
            continue
        hit = by_bytes.get((a.shape, a.tobytes()))
        if hit is not None:
            out[init.name] = hit
    return out
