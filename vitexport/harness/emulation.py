"""Reproducing a target's float16 arithmetic on the CPU, for targets that cannot run here (CoreML off macOS, TensorRT
without a GPU).

A float16 engine or ML program stores every tensor between kernels in float16 and accumulates inside a kernel in
float32. ``round_to_float16`` gives an ONNX graph that storage: a Cast to float16 and back after every float tensor a
node produces (and, optionally, float16 weights). It keeps the failure that matters on these targets: a tensor over
65504 becomes inf, which is why a decomposed LayerNorm (x - mean)^2 collapses in float16 and the one-op
LayerNormalization does not. Run the result with onnxruntime's basic optimisations only: its extended fusions would
remove the casts.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper

_NOT_ROUNDED = {"Shape", "Constant"}
_FP16_MAX = float(np.finfo(np.float16).max)


def round_to_float16(model: onnx.ModelProto, exact_ops: Iterable[str] = (), weights: bool = False) -> onnx.ModelProto:
    """Round ``model`` (in place) to float16 storage.

    ``exact_ops``: op types whose outputs stay float32 (TensorRT fuses DequantizeLinear into its int8 GEMM, whose
    int32 accumulation is scaled in float32: the dequantized tensor never exists in float16).
    ``weights``: round float initializers to float16 too (clamped to +-65504, as TensorRT does), except the scales of
    Quantize/DequantizeLinear (TensorRT keeps those in float32).
    """
    g = model.graph
    keep = _NOT_ROUNDED | set(exact_ops)
    if weights:
        scales = {n.input[1] for n in g.node if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 1}
        for k, t in enumerate(g.initializer):
            if t.data_type == onnx.TensorProto.FLOAT and t.name not in scales:
                a = np.clip(numpy_helper.to_array(t), -_FP16_MAX, _FP16_MAX)  # as TensorRT clamps out-of-range weights
                g.initializer[k].CopyFrom(numpy_helper.from_array(a.astype(np.float16).astype(np.float32), t.name))
    from ..quantization.graph import inferred_value_info

    types_ = {v.name: v.type.tensor_type.elem_type for v in inferred_value_info(model)}
    nodes = []
    for n in g.node:
        extra = []
        if n.op_type not in keep:
            for k, o in enumerate(n.output):
                if o and types_.get(o) == onnx.TensorProto.FLOAT:
                    raw = o + "__fp32"
                    n.output[k] = raw
                    extra.append(helper.make_node("Cast", [raw], [o + "__fp16"], to=onnx.TensorProto.FLOAT16))
                    extra.append(helper.make_node("Cast", [o + "__fp16"], [o], to=onnx.TensorProto.FLOAT))
        nodes.append(n)
        nodes.extend(extra)
    del g.node[:]
    g.node.extend(nodes)
    return model
