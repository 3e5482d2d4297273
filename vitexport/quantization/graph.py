"""Structural view of a ViT ONNX graph: which nodes are the linear layers and what role each plays.

Initializer and node names of exported graphs are not reliable (the dynamo exporter emits names like
``val_31``), so everything here is found from the graph structure only:

- a *linear* is a ``MatMul`` whose second input is a constant 2-D tensor (``[K, N]``), optionally followed by an
  ``Add`` with a constant 1-D bias, or a ``Gemm`` with a constant ``B`` (``transB`` respected, see ``Linear.trans_b``);
- its *role* comes from the producer of its activation input (looking through shape-only ops such as
  Reshape/Transpose/Gather/Slice/Squeeze/Flatten) and from what consumes its output:

  ===============  ========================================================================================
  ``qkv``          activation from a LayerNormalization, output flows (via Reshape/Transpose) into a MatMul of
                   two activations (the attention scores / context): the q, k, v projections
  ``fc1``          activation from a LayerNormalization, output flows into a GELU (Erf / Tanh / Gelu op)
  ``head``         activation from the LayerNormalization that starts no block (the final one), e.g. the
                   classifier or the pooler dense
  ``attn_out``     activation is the attention context (MatMul(Softmax, V) reshaped back)
  ``fc2``          activation is a GELU output
  ``patch_embed``  a linear before the first LayerNormalization (patch embedding written as a MatMul)
  ``other``        anything else
  ===============  ========================================================================================

- its *block* is the index of the transformer block it belongs to: blocks are counted in topological order of
  the LayerNormalizations that feed q/k/v projections; ``None`` for the head, patch embedding and anything outside
  a block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

ROLES = ("qkv", "attn_out", "fc1", "fc2", "head", "patch_embed", "other")

# ops that only move data around: look through them when finding "who really produced this tensor"
_SHAPE_OPS = {"Reshape", "Transpose", "Gather", "Slice", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Cast", "Split", "Concat"}
_GELU_OPS = {"Gelu", "FastGelu", "BiasGelu", "QuickGelu"}


@dataclass(frozen=True)
class Linear:
    """One linear layer of the graph.

    node:       the MatMul or Gemm NodeProto (a reference into the model it was found in)
    op_type:    "MatMul" or "Gemm"
    role:       one of ROLES
    block:      transformer block index (0-based) or None
    activation: name of the activation input tensor (input 0)
    weight:     name of the constant weight tensor (input 1; an initializer or a Constant node output).
                For MatMul the layout is [K, N]; for Gemm it is [N, K] when ``trans_b`` else [K, N].
    bias:       name of the constant bias tensor (the following Add's constant input, or Gemm's C), or None
    """

    node: onnx.NodeProto
    op_type: str
    role: str
    block: int | None
    activation: str
    weight: str
    bias: str | None

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def trans_b(self) -> bool:
        """True when the stored weight is [N, K] (Gemm with transB=1)."""
        if self.op_type != "Gemm":
            return False
        return any(a.name == "transB" and a.i == 1 for a in self.node.attribute)

    def __hash__(self) -> int:  # NodeProto is unhashable; the node's identity is enough
        return hash((self.op_type, self.activation, self.weight, self.bias, tuple(self.node.output)))


class GraphIndex:
    """Producer/consumer maps and constant lookup for one graph (no copies of the weights)."""

    def __init__(self, model: onnx.ModelProto):
        g = model.graph
        self.graph = g
        self.initializers = {t.name: t for t in g.initializer}
        self.constants: dict[str, onnx.TensorProto] = {}
        for n in g.node:
            if n.op_type == "Constant" and len(n.output) == 1:
                for a in n.attribute:
                    if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                        self.constants[n.output[0]] = a.t
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in g.node:
            for o in n.output:
                if o:
                    self.producer[o] = n
            for i in n.input:
                if i:
                    self.consumers.setdefault(i, []).append(n)
        self.graph_inputs = {i.name for i in g.input} - set(self.initializers)
        self.graph_outputs = {o.name for o in g.output}

    def is_const(self, name: str) -> bool:
        return name in self.initializers or name in self.constants

    def const_tensor(self, name: str) -> onnx.TensorProto | None:
        return self.initializers.get(name) or self.constants.get(name)

    def const_shape(self, name: str) -> tuple[int, ...] | None:
        t = self.const_tensor(name)
        return None if t is None else tuple(t.dims)

    def const_array(self, name: str, base_dir: str | None = None) -> np.ndarray:
        t = self.const_tensor(name)
        if t is None:
            raise KeyError(f"{name} is not a constant")
        return numpy_helper.to_array(t, base_dir or "")

    def source(self, name: str, max_hops: int = 8) -> onnx.NodeProto | None:
        """The first producer of ``name`` that is not a shape-only op (following input 0)."""
        for _ in range(max_hops):
            n = self.producer.get(name)
            if n is None or n.op_type not in _SHAPE_OPS:
                return n
            name = n.input[0]
        return None

    def reaches(self, name: str, pred, max_depth: int = 6, through=None) -> bool:
        """True when some consumer path from ``name`` (at most ``max_depth`` nodes) hits a node with pred(node)."""
        frontier = [(name, 0)]
        seen = set()
        while frontier:
            t, d = frontier.pop()
            for c in self.consumers.get(t, []):
                if pred(c, t):
                    return True
                if d + 1 < max_depth and id(c) not in seen and (through is None or c.op_type in through):
                    seen.add(id(c))
                    frontier.extend((o, d + 1) for o in c.output)
        return False


def is_gelu_output(idx: GraphIndex, node: onnx.NodeProto | None) -> bool:
    """Whether ``node`` is the last node of a GELU: a Gelu-family op, or a Mul/Add whose inputs trace back to Erf/Tanh within a few hops."""
    if node is None:
        return False
    if node.op_type in _GELU_OPS or (node.domain == "com.microsoft" and "Gelu" in node.op_type):
        return True
    if node.op_type not in {"Mul", "Add"}:
        return False
    frontier, depth = [node], 0
    while frontier and depth < 4:
        nxt = []
        for n in frontier:
            for i in n.input:
                p = idx.producer.get(i)
                if p is None:
                    continue
                if p.op_type in {"Erf", "Tanh"}:
                    return True
                if p.op_type in {"Mul", "Add", "Div", "Pow", "Sigmoid"}:
                    nxt.append(p)
        frontier, depth = nxt, depth + 1
    return False


def _is_attention_matmul(idx: GraphIndex, node: onnx.NodeProto) -> bool:
    return node.op_type == "MatMul" and not idx.is_const(node.input[1]) and not idx.is_const(node.input[0])


def _weight_and_bias(idx: GraphIndex, node: onnx.NodeProto) -> tuple[str, str | None] | None:
    if node.op_type == "MatMul":
        if len(node.input) < 2 or not idx.is_const(node.input[1]) or idx.is_const(node.input[0]):
            return None
        shape = idx.const_shape(node.input[1])
        if shape is None or len(shape) != 2:
            return None
        bias = None
        cons = idx.consumers.get(node.output[0], [])
        if len(cons) == 1 and cons[0].op_type == "Add":
            add = cons[0]
            other = add.input[1] if add.input[0] == node.output[0] else add.input[0]
            bshape = idx.const_shape(other)
            if bshape is not None and len(bshape) == 1 and bshape[0] == shape[1]:
                bias = other
        return node.input[1], bias
    if node.op_type == "Gemm":
        attrs = {a.name: a for a in node.attribute}
        if "transA" in attrs and attrs["transA"].i:
            return None
        if idx.is_const(node.input[0]) or not idx.is_const(node.input[1]):
            return None
        shape = idx.const_shape(node.input[1])
        if shape is None or len(shape) != 2:
            return None
        bias = node.input[2] if len(node.input) > 2 and node.input[2] and idx.is_const(node.input[2]) else None
        return node.input[1], bias
    return None


def _output_after_bias(idx: GraphIndex, node: onnx.NodeProto, bias: str | None) -> str:
    out = node.output[0]
    if bias is not None and node.op_type == "MatMul":
        out = idx.consumers[out][0].output[0]
    return out


def find_linears(model: onnx.ModelProto) -> list[Linear]:
    """All linear layers (MatMul / Gemm with a constant 2-D weight) in graph order, with roles and block indices.

    Works on the model in memory; the returned ``Linear.node`` objects are references into ``model.graph``.
    """
    idx = GraphIndex(model)
    order = {id(n): k for k, n in enumerate(model.graph.node)}
    prelim = _provisional_roles(model, idx, order)
    # blocks: LayerNorms feeding q/k/v projections, in graph order
    block_lns = sorted({id(ln): ln for *_, role, ln in prelim if role == "qkv" and ln is not None}.values(), key=lambda x: order[id(x)])
    starts = [order[id(ln)] for ln in block_lns]

    def block_of(n: onnx.NodeProto) -> int | None:
        pos = order[id(n)]
        k = sum(1 for s in starts if s < pos) - 1
        return k if k >= 0 else None

    result = []
    for n, w, b, role, ln in prelim:
        block = block_of(n)
        if role == "head":
            # a LayerNorm-fed linear that is neither attention nor MLP: head if after the last block, else "other"
            if ln is not None and starts and order[id(ln)] > starts[-1] and not _ln_feeds_block(idx, ln, prelim):
                block = None
            else:
                role = "other"
        elif role == "patch_embed":
            block = None
        result.append(Linear(node=n, op_type=n.op_type, role=role, block=block, activation=n.input[0], weight=w, bias=b))
    return result


_Provisional = tuple[onnx.NodeProto, str, "str | None", str, "onnx.NodeProto | None"]  # node, weight, bias, role, its LayerNorm


def _provisional_roles(model: onnx.ModelProto, idx: GraphIndex, order: dict[int, int]) -> list[_Provisional]:
    """Every linear with its role read from its neighbours ("head" still to be told from "other" by its block)."""
    raw: list[tuple[onnx.NodeProto, str, str | None]] = []
    for n in model.graph.node:
        wb = _weight_and_bias(idx, n)
        if wb is not None:
            raw.append((n, wb[0], wb[1]))

    def feeds_gelu(out: str) -> bool:
        return idx.reaches(out, lambda c, t: c.op_type in {"Erf", "Tanh"} or c.op_type in _GELU_OPS or "Gelu" in c.op_type, max_depth=3)

    def feeds_attention(out: str) -> bool:
        return idx.reaches(out, lambda c, t: _is_attention_matmul(idx, c), max_depth=6, through=_SHAPE_OPS | {"Mul", "Div"})

    lns = [n for n in model.graph.node if n.op_type == "LayerNormalization"]
    first_ln = order[id(lns[0])] if lns else None

    prelim: list[_Provisional] = []
    for n, w, b in raw:
        src = idx.source(n.input[0])
        out = _output_after_bias(idx, n, b)
        if first_ln is not None and order[id(n)] < first_ln:
            role = "patch_embed"
        elif src is not None and src.op_type == "LayerNormalization":
            if feeds_attention(out):
                role = "qkv"
            elif feeds_gelu(out):
                role = "fc1"
            else:
                role = "head"  # find_linears decides: only if its LayerNorm starts no block
        elif is_gelu_output(idx, src):
            role = "fc2"
        elif src is not None and _is_attention_matmul(idx, src):
            role = "attn_out"
        else:
            role = "other"
        prelim.append((n, w, b, role, src if src is not None and src.op_type == "LayerNormalization" else None))
    return prelim


def kept_float(l: Linear, keep: Iterable[str]) -> str | None:
    """The ``keep_float`` selector that keeps ``l`` float (its node name, role, "block" or "block:role"), or None."""
    for k in keep:
        if k == l.node.name or k == l.role or (l.block is not None and k in (str(l.block), f"{l.block}:{l.role}")):
            return k
    return None


def _ln_feeds_block(idx: GraphIndex, ln: onnx.NodeProto, prelim) -> bool:
    return any(l is ln and role in ("qkv", "fc1") for *_, role, l in prelim)


MS_DOMAIN = "com.microsoft"  # onnxruntime's contrib operators (MatMulNBits, MatMulIntegerToFloat)


class Namer:
    """namer(base) -> a tensor or node name not yet used in ``model`` (and reserved): ``base``, else base_1, base_2..."""

    def __init__(self, model: onnx.ModelProto):
        self.used = {t.name for t in model.graph.initializer} | {o for n in model.graph.node for o in n.output} | {n.name for n in model.graph.node}
        self.used |= {i.name for i in model.graph.input} | {o.name for o in model.graph.output}

    def __call__(self, base: str) -> str:
        name, k = base, 0
        while name in self.used:
            k += 1
            name = f"{base}_{k}"
        self.used.add(name)
        return name


def ensure_ms_opset(model: onnx.ModelProto) -> None:
    """Import the com.microsoft opset, which nodes of that domain need."""
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))


def drop_unused_constants(model: onnx.ModelProto) -> None:
    """Remove initializers, Constant nodes and value_info nothing uses any more (rewrites leave the originals behind)."""
    g = model.graph
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    keep = [t for t in g.initializer if t.name in used]
    if len(keep) != len(g.initializer):
        del g.initializer[:]
        g.initializer.extend(keep)
    dead = [n for n in g.node if n.op_type == "Constant" and n.output[0] not in used]
    for n in dead:
        g.node.remove(n)
    produced = {o for n in g.node for o in n.output} | {i.name for i in g.input} | {t.name for t in g.initializer}
    vis = [v for v in g.value_info if v.name in produced]
    if len(vis) != len(g.value_info):
        del g.value_info[:]
        g.value_info.extend(vis)


def const_array(model: onnx.ModelProto, name: str) -> np.ndarray:
    """An initializer or Constant node's value, by tensor name."""
    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output and n.output[0] == name:
            for a in n.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
    raise KeyError(f"{name} is not a constant of the model")


def unscaled_inputs(linears: list[Linear]) -> set[str]:
    """The linear inputs read by fc2 layers only: GELU outputs, which no SmoothQuant scale can fold into, so their
    percentiles are only ever taken unscaled (calibration.FloatStatsObserver keeps one tail of the whole tensor)."""
    others = {l.activation for l in linears if l.role != "fc2"}
    return {l.activation for l in linears if l.role == "fc2"} - others


def weight_nk(model: onnx.ModelProto, l: Linear) -> np.ndarray:
    """A linear's weight as [N, K] (rows = output channels, torch.nn.Linear's layout), float32."""
    w = const_array(model, l.weight).astype(np.float32)
    return w if l.trans_b else w.T  # MatMul / Gemm(transB=0) store [K, N]


SHAPE_ONLY_BYTES = 1 << 16  # initializers this large enter shape inference as typed inputs, without their bytes


def inferred_value_info(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The value_info, inputs and outputs ``onnx.shape_inference.infer_shapes`` gives ``model``, inferred on a copy
    whose large initializers are graph inputs of the same type and shape: only small ones (the shapes a Reshape
    reads) carry values into inference, and ViT-Base's 346 MB of weights were serialised, parsed and copied back
    for nothing (4.8 s of its export)."""
    inferred = onnx.shape_inference.infer_shapes(_shapes_only(model))
    return list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)


def copy_without_initializers(model: onnx.ModelProto, out: onnx.ModelProto) -> onnx.ModelProto:
    """``out`` given ``model``'s header, nodes, inputs, outputs, value_info and functions, and no initializer."""
    g = model.graph
    out.ir_version, out.producer_name = model.ir_version, model.producer_name
    out.opset_import.extend(model.opset_import)
    out.graph.name = g.name
    out.graph.node.extend(g.node)
    out.graph.input.extend(g.input)
    out.graph.output.extend(g.output)
    out.graph.value_info.extend(g.value_info)
    out.functions.extend(model.functions)
    return out


def _shapes_only(model: onnx.ModelProto) -> onnx.ModelProto:
    light = copy_without_initializers(model, onnx.ModelProto())
    g = model.graph
    inputs = {i.name for i in g.input}
    for t in g.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL and len(t.raw_data) < SHAPE_ONLY_BYTES:
            light.graph.initializer.append(t)
        elif t.name not in inputs:
            light.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return light


EXTERNAL_BYTES = 1 << 16  # weights this large travel as arrays, not in the serialised graph


def light_model(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A copy of ``model`` whose weights (initializers only read as a MatMul's B or by the gates' Where) of
    EXTERNAL_BYTES or more are in-memory external references, and the arrays they refer to.

    The search's block sessions and every calibration pass (calibration.stream_activations) run such a copy: each
    used to serialise the whole network (ViT-Base: 346 MB of weights, 1.2 s per block session, and the copies
    stacked on the build's peak); now the graph is copied and serialised without its weights
    and onnxruntime copies the arrays straight in (``ort_session(initializers=...)``). Only weights go this way:
    onnxruntime skips a fusion whose small constant it cannot read (the position embeddings' SkipLayerNorm), and with
    these references its results are the same bits (tests/test_calibration_shared.py)."""
    arrays: dict[str, np.ndarray] = {}
    light = copy_without_initializers(model, onnx.ModelProto())
    readers: dict[str, set[tuple[str, int]]] = {}
    for n in model.graph.node:
        for i, name in enumerate(n.input):
            readers.setdefault(name, set()).add((n.op_type, i))
    weight_uses = {("MatMul", 1), ("Where", 1), ("Where", 2)}
    outputs = {o.name for o in model.graph.output}
    for t in model.graph.initializer:
        if _is_heavy(t) and readers.get(t.name, set()) <= weight_uses and t.name not in outputs:
            arrays[t.name] = numpy_helper.to_array(t)
            light.graph.initializer.append(_reference(t))
        else:
            light.graph.initializer.append(t)
    return light, arrays


def _is_heavy(t: onnx.TensorProto) -> bool:
    return t.data_location != TensorProto.EXTERNAL and len(t.raw_data) >= EXTERNAL_BYTES


def _reference(t: onnx.TensorProto) -> onnx.TensorProto:
    ref = onnx.TensorProto(name=t.name, data_type=t.data_type, dims=t.dims, data_location=TensorProto.EXTERNAL)
    for key, value in (("location", "in-memory"), ("offset", "0"), ("length", str(len(t.raw_data)))):
        ref.external_data.add(key=key, value=value)
    return ref
