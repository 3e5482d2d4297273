"""The rows of the last block that the logits never read, cut out of an ONNX graph.

A ViT classifier reads the final LayerNorm's output at the class token only (DeiT's distilled head at tokens 0 and
1), and everything between the last attention's context and that read works row by row: the output projection,
the residual adds, LayerNorm, the MLP. The exported graph runs them on all 197 rows, though the logits depend on the
read rows alone: about 3/4 of the last block's arithmetic (ViT-Base: 6 % of a forward) for rows nobody reads.
``drop_unread_rows`` slices the read rows out where that row-wise part begins, so it runs on them only.

The logits are the same in exact arithmetic; only where an op reduces over rows do the numbers change, and the one
such op allowed in the row-wise part is ``DynamicQuantizeLinear`` (ONNX Runtime's run-time int8 ranges): its range
then spans the rows that reach the logits instead of every row, a range as tight or tighter for exactly those values.
Everything is found from the graph's shapes; a graph that does not have this shape is returned unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .graph import GraphIndex, Namer, inferred_value_info

_ELEMENTWISE = {
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Where", "Clip", "Erf", "Tanh", "Sigmoid", "Relu", "Gelu", "FastGelu",
    "QuickGelu", "Sqrt", "Reciprocal", "Neg", "Abs", "Exp", "Log", "Cast", "Identity", "Softplus",
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear",
}
# input 0 is the rows, the others (weights, scales, zero points, bias) are per output channel at most
_ROW_BY_ROW = {"MatMul", "MatMulInteger", "MatMulIntegerToFloat", "MatMulNBits", "LayerNormalization"}
# row-wise when they reduce over the channels only: a LayerNorm decomposed (opsets before 17), a softmax over channels
_LAST_AXIS = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL2", "ReduceSumSquare", "Softmax", "LogSoftmax"}


@dataclass(frozen=True)
class Dropped:
    """What ``drop_unread_rows`` did: ``read`` of ``rows`` rows kept from ``sliced`` tensors on, for ``nodes`` nodes
    (``matmuls`` of them matrix products)."""

    read: int
    rows: int
    sliced: tuple[str, ...]
    nodes: int
    matmuls: int

    def summary(self) -> dict:
        return {"rows_read": self.read, "rows": self.rows, "sliced": list(self.sliced), "nodes_on_read_rows": self.nodes, "matmuls_on_read_rows": self.matmuls}


def summary(done: Dropped | None) -> dict:
    """What a recipe records about the pass: ``done.summary()``, or why nothing was dropped."""
    return done.summary() if done is not None else {"rows_read": None, "why": "no row-wise part before a read of leading rows"}


def drop_unread_rows(model: onnx.ModelProto) -> Dropped | None:
    """Rewrite ``model`` in place so the row-wise ops before its token read run on the read rows only; None (and
    ``model`` untouched) when the graph has no such read or nothing to gain."""
    shapes = _shapes(model)
    idx = GraphIndex(model)
    found = _token_read(idx, shapes)
    if found is None:
        return None
    read_tensor, rows, read = found
    region = _row_wise_region(model, idx, shapes, read_tensor, rows)
    matmuls = sum(n.op_type.startswith("MatMul") for n in region)
    if not matmuls:
        return None
    sliced = _slice_entries(model, shapes, region, rows, read)
    changed = {o for n in region for o in n.output}
    keep = [v for v in model.graph.value_info if v.name not in changed]
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep)
    return Dropped(read, rows, tuple(sliced), len(region), matmuls)


def _shapes(model: onnx.ModelProto) -> dict[str, tuple]:
    out: dict[str, tuple] = {}
    for v in inferred_value_info(model):
        t = v.type.tensor_type
        if t.HasField("shape"):
            out[v.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
    for t in model.graph.initializer:
        out[t.name] = tuple(t.dims)
    _fill_row_shapes(model, out)
    return out


def _fill_row_shapes(model: onnx.ModelProto, shapes: dict[str, tuple]) -> None:
    """Row counts onnx's inference leaves unknown: it knows no com.microsoft op (MatMulNBits, MatMulIntegerToFloat),
    and everything after one of them stays unshaped. Only axis 1 matters here, and these ops keep it."""
    for node in model.graph.node:
        if node.op_type not in _ROW_BY_ROW | _ELEMENTWISE | _LAST_AXIS or not node.output or node.output[0] in shapes:
            continue
        rows = [shapes[i] for i in node.input if i and len(shapes.get(i, ())) == 3]
        if rows:
            shapes[node.output[0]] = (rows[0][0], rows[0][1], None)
            if node.op_type == "DynamicQuantizeLinear":
                shapes.update({o: () for o in node.output[1:] if o})


def _read_rows(idx: GraphIndex, node: onnx.NodeProto) -> int | None:
    """How many leading rows (axis 1) ``node`` reads, when it is a Gather or Slice of constant leading indices."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Gather" and attrs.get("axis", 0) == 1 and idx.is_const(node.input[1]):
        i = idx.const_array(node.input[1])
        return int(i.max()) + 1 if i.size and int(i.min()) >= 0 else None
    if node.op_type == "Slice" and len(node.input) >= 4 and all(idx.is_const(n) for n in node.input[1:4]):
        starts, ends, axes = (idx.const_array(n).ravel() for n in node.input[1:4])
        steps = idx.const_array(node.input[4]).ravel() if len(node.input) > 4 and node.input[4] else np.ones(1)
        if list(axes) == [1] and int(starts[0]) >= 0 and int(ends[0]) > 0 and int(steps[0]) == 1:
            return int(ends[0])
    return None


def _token_read(idx: GraphIndex, shapes: dict[str, tuple]) -> tuple[str, int, int] | None:
    """(tensor, rows, rows read): the one [batch, rows, channels] tensor that is only ever read at leading rows."""
    found = []
    for name, readers in idx.consumers.items():
        shape = shapes.get(name)
        if not shape or len(shape) != 3 or not shape[1] or name in idx.graph_outputs:
            continue
        reads = [_read_rows(idx, n) for n in readers]
        if reads and all(r is not None for r in reads) and max(reads) < shape[1]:
            found.append((name, shape[1], max(reads)))
    return found[0] if len(found) == 1 else None


def _is_rows(shapes: dict[str, tuple], name: str, rows: int) -> bool:
    s = shapes.get(name)
    return s is not None and len(s) == 3 and s[1] == rows


def _broadcasts_over_rows(shapes: dict[str, tuple], name: str) -> bool:
    s = shapes.get(name)
    return s is not None and (len(s) <= 1 or s[-2] == 1)


def _row_wise(node: onnx.NodeProto, shapes: dict[str, tuple], rows: int, idx: GraphIndex) -> bool:
    """True when every output row of ``node`` depends on the same row of its inputs only."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    ins = [i for i in node.input if i]
    if not ins or not _is_rows(shapes, ins[0], rows) and node.op_type in _ROW_BY_ROW | _LAST_AXIS:
        return False
    if node.op_type == "LayerNormalization":
        return attrs.get("axis", -1) in (-1, 2)
    if node.op_type in _LAST_AXIS:
        return _over_channels_only(node, attrs, idx)
    if node.op_type in _ROW_BY_ROW:
        return all(i in idx.initializers or (not _is_rows(shapes, i, rows) and len(shapes.get(i, (0, 0, 0))) <= 2) for i in ins[1:])
    if node.op_type not in _ELEMENTWISE:
        return False
    if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(shapes.get(ins[1], ())) == 1 and attrs.get("axis", 1) not in (-1, 2):
        return False
    if not any(_is_rows(shapes, i, rows) for i in ins):
        # scale arithmetic beside the rows (stock dynamic int8 multiplies DynamicQuantizeLinear's scale by the
        # weight's): in the part only when everything it feeds is, so the quantizer before it can join too
        return all(_broadcasts_over_rows(shapes, i) for i in [*ins, *node.output])
    return all(_is_rows(shapes, i, rows) or _broadcasts_over_rows(shapes, i) for i in ins)


def _over_channels_only(node: onnx.NodeProto, attrs: dict, idx: GraphIndex) -> bool:
    if node.op_type in ("Softmax", "LogSoftmax"):
        return attrs.get("axis", -1) in (-1, 2)
    if attrs.get("keepdims", 1) != 1:
        return False
    if "axes" in attrs:
        axes = list(attrs["axes"])
    elif len(node.input) > 1 and node.input[1] and idx.is_const(node.input[1]):
        axes = [int(a) for a in idx.const_array(node.input[1]).ravel()]
    else:
        return False  # no axes: a reduction over every axis
    return axes in ([-1], [2])


def _row_wise_region(model: onnx.ModelProto, idx: GraphIndex, shapes: dict[str, tuple], read_tensor: str, rows: int) -> list[onnx.NodeProto]:
    """The nodes, walking back from the read, whose outputs only row-wise nodes of the region (or the read) use."""
    inside: set[int] = set()
    region: list[onnx.NodeProto] = []
    for node in reversed(model.graph.node):
        outs = [o for o in node.output if o]
        if not outs or not _row_wise(node, shapes, rows, idx):
            continue
        used_inside = all(
            o not in idx.graph_outputs and idx.consumers.get(o) and all(id(c) in inside or o == read_tensor for c in idx.consumers[o]) for o in outs
        )
        if used_inside and (read_tensor in outs or any(id(c) in inside for o in outs for c in idx.consumers[o])):
            inside.add(id(node))
            region.append(node)
    return region[::-1]


def _slice_entries(model: onnx.ModelProto, shapes: dict[str, tuple], region: list[onnx.NodeProto], rows: int, read: int) -> list[str]:
    """Slice every row tensor entering ``region`` from outside it to its first ``read`` rows; returns their names."""
    inside = {id(n) for n in region}
    produced = {o for n in region for o in n.output}
    g = model.graph
    fresh = Namer(model)
    consts = [fresh(f"read_rows_{what}") for what in ("starts", "ends", "axes")]
    g.initializer.extend(numpy_helper.from_array(np.array([v], np.int64), n) for n, v in zip(consts, (0, read, 1)))
    sliced: dict[str, str] = {}
    before: dict[int, list[onnx.NodeProto]] = {}
    for node in region:
        for k, name in enumerate(node.input):
            if not name or name in produced or not _is_rows(shapes, name, rows):
                continue
            if name not in sliced:
                sliced[name] = fresh(f"{name}_read_rows")
                before.setdefault(id(node), []).append(helper.make_node("Slice", [name, *consts], [sliced[name]], name=f"{sliced[name]}_slice"))
            node.input[k] = sliced[name]
    nodes = list(g.node)
    del g.node[:]
    for n in nodes:
        g.node.extend(before.get(id(n), []))
        g.node.append(n)
    assert all(id(n) in inside for n in nodes if any(i in sliced.values() for i in n.input))
    return list(sliced)
