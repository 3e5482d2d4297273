"""The int8 recipe's sensitivity search, scored in one session per transformer block instead of one per input.

Each quantized input is scored by the KL divergence of the model's outputs from float when that input alone (with
the weights of the linears that read it, rounded to nearest) is quantized. Instead of one rewritten model, one
serialisation and one session per input (the old loop: dozens of ViT-Base-sized copies), a *gated* model holds
a block's candidates at once: each input becomes ``Where(gate, fake_quant(x), x)`` and each of its weights
``Where(gate, W_q, W)``, with the gates as boolean graph inputs, so one session scores several candidates by flipping
a gate. And since a candidate in block b changes nothing before block b, it runs from block b's input (captured
once from the float model) through the rest of the network: on average half a forward pass per candidate. Each
block's session holds that block's candidates only (the later blocks run plain float there), so no model ever
carries two copies of every weight (on ViT-Base that copy was 0.7 GB of the build's peak).

The fake quantization is the one ``insert_qdq`` builds for onnxruntime (QuantizeLinear -> DequantizeLinear of the
same scale and zero point, the centring shift added back, per-channel weight codes), computed in float: onnxruntime
runs the rewritten model's MatMuls as integer kernels, which give the same products up to float32 summation order.

With a cache folder (``--cache-dir``) the scores are stored under ``candidates_digest``, the sha256 of everything
they are computed from, and a later build that would compute the same ones reads them instead (quantization/cache.py).
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..ort_session import ort_session, release_freed_memory
from .divergence import kl_divergence as _kl
from .graph import GraphIndex, Linear, Namer, copy_without_initializers, light_model
from .unread_rows import drop_unread_rows

log = logging.getLogger(__name__)


def _session(model: onnx.ModelProto | bytes, threads: int, initializers: dict[str, np.ndarray] | None = None):
    # no busy-waiting (calibration._session); no prepacked copy of the weights: the first block's session holds the
    # whole network, and that copy sat on the build's memory peak (ViT-Base: ~0.2 GB less; no slower at batch 8,
    # whose GEMMs pack as they go). The summation order differs from a prepacked session's, so scores move in their
    # last digits: the kept sets of DeiT-tiny's OpenVINO and TensorRT recipes are the same
    return ort_session(model, threads, spinning=False, user_model=False, initializers=initializers, prepack=False)


def _gated_activation(g: onnx.ModelProto, act: str, gate: str, qdq: tuple[np.ndarray, np.ndarray, float], fresh: Callable[[str], str]) -> tuple[list[onnx.NodeProto], str]:
    """Nodes computing ``Where(gate, fake_quant(act), act)`` as insert_qdq quantizes it (centring shift, Q, DQ,
    shift added back), their constants added to ``g``; returns (nodes, gated tensor name)."""
    scale, zp, shift = qdq
    s, z = fresh(f"{act}_fb_scale"), fresh(f"{act}_fb_zp")
    g.graph.initializer.extend([numpy_helper.from_array(np.asarray(scale, np.float32), s), numpy_helper.from_array(zp, z)])
    nodes, src = [], act
    if shift:
        c = fresh(f"{act}_fb_center")
        g.graph.initializer.append(numpy_helper.from_array(np.array(shift, np.float32), c))
        src = fresh(f"{act}_fb_centered")
        nodes.append(helper.make_node("Sub", [act, c], [src]))
    q, dq, out = fresh(f"{act}_fb_q"), fresh(f"{act}_fb_dq"), fresh(f"{act}_fb_gated")
    nodes += [helper.make_node("QuantizeLinear", [src, s, z], [q]), helper.make_node("DequantizeLinear", [q, s, z], [dq])]
    if shift:
        back = fresh(f"{act}_fb_uncentered")
        nodes.append(helper.make_node("Add", [dq, c], [back]))
        dq = back
    nodes.append(helper.make_node("Where", [gate, dq, act], [out]))
    return nodes, out


def gated_model(
    model: onnx.ModelProto,
    groups: dict[str, list[Linear]],
    act_qdq: Callable[[str], tuple[np.ndarray, np.ndarray, float]],
    weight_codes: Callable[[Linear, np.ndarray], np.ndarray],
    arrays: dict[str, np.ndarray] | None = None,
) -> tuple[onnx.ModelProto, dict[str, str]]:
    """A copy of ``model`` where every activation of ``groups`` (and its consumers' weights) is fake-quantized when
    its gate input is true. ``act_qdq(act) -> (scale, zero point, shift)``; ``weight_codes(l, w) -> dequantized w``;
    ``arrays``: the weights of ``model``'s in-memory references (light_model). Returns (model, activation -> gate
    input name)."""
    g = onnx.ModelProto()
    g.CopyFrom(model)
    idx = GraphIndex(g)
    fresh = Namer(g)
    before: dict[int, list[onnx.NodeProto]] = {}
    gates: dict[str, str] = {}
    order = {id(n): i for i, n in enumerate(g.graph.node)}
    nodes_by_output = {n.output[0]: n for n in g.graph.node if n.output}
    for act, ls in groups.items():
        gate = fresh(f"fallback_gate_{len(gates)}")
        gates[act] = gate
        g.graph.input.append(helper.make_tensor_value_info(gate, TensorProto.BOOL, []))
        nodes, out = _gated_activation(g, act, gate, act_qdq(act), fresh)
        consumers = [nodes_by_output[l.node.output[0]] for l in ls]
        before.setdefault(id(min(consumers, key=lambda n: order[id(n)])), []).extend(nodes)
        for l, node in zip(ls, consumers):
            w = arrays[node.input[1]] if arrays and node.input[1] in arrays else idx.const_array(node.input[1])
            wq, wg = fresh(f"{node.input[1]}_fb_q"), fresh(f"{node.input[1]}_fb_gated")
            g.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight_codes(l, w).astype(w.dtype)), wq))
            before.setdefault(id(node), []).append(helper.make_node("Where", [gate, wq, node.input[1]], [wg]))
            node.input[0], node.input[1] = out, wg
    nodes = list(g.graph.node)
    del g.graph.node[:]
    for n in nodes:
        g.graph.node.extend(before.get(id(n), []))
        g.graph.node.append(n)
    return g, gates


def tail_model(model: onnx.ModelProto, start: str) -> onnx.ModelProto | None:
    """The part of ``model`` that computes its outputs from tensor ``start`` (a new graph input) and the graph
    inputs it still needs. None when a graph output does not depend on ``start``."""
    g = model.graph
    needed = {o.name for o in g.output}
    keep: list[onnx.NodeProto] = []
    for n in reversed(g.node):
        if any(o in needed for o in n.output):
            keep.append(n)
            needed.discard(start)
            needed.update(i for i in n.input if i and i != start)
    keep.reverse()
    produced = {o for n in keep for o in n.output}
    inits = [t for t in g.initializer if t.name in needed]
    init_names = {t.name for t in inits}
    graph_inputs = [i for i in g.input if i.name in needed and i.name not in init_names]
    missing = needed - produced - init_names - {i.name for i in graph_inputs}
    if missing or not any(start in n.input for n in keep):
        return None
    t = onnx.ModelProto()
    t.ir_version, t.producer_name = model.ir_version, model.producer_name
    t.opset_import.extend(model.opset_import)
    t.graph.name = g.name + "_tail"
    t.graph.node.extend(keep)
    t.graph.initializer.extend(inits)
    known = {v.name: v for v in g.value_info}
    t.graph.input.append(known[start] if start in known else helper.make_tensor_value_info(start, TensorProto.FLOAT, None))
    t.graph.input.extend(graph_inputs)
    t.graph.output.extend(g.output)
    t.graph.value_info.extend(v for v in g.value_info if v.name in produced)  # the shapes drop_unread_rows reads
    return t


def block_inputs(model: onnx.ModelProto, groups: dict[str, list[Linear]]) -> dict[str, str | None]:
    """activation -> the tensor its block starts from (the input of the LayerNorm before the block's q/k/v), or None."""
    idx = GraphIndex(model)
    starts: dict[int, str] = {}
    for act, ls in groups.items():
        for l in ls:
            if l.role == "qkv" and l.block is not None:
                p = idx.producer.get(l.activation)
                if p is not None and p.op_type == "LayerNormalization":
                    starts.setdefault(l.block, p.input[0])
    return {act: starts.get(ls[0].block) if ls[0].block is not None else None for act, ls in groups.items()}


def _tail_session(model: onnx.ModelProto, arrays: dict[str, np.ndarray], start: str | None, groups: dict[str, list[Linear]], act_qdq, weight_codes, threads: int):
    """(session, gate of each candidate) for the part of ``model`` (a light_model, weights in ``arrays``) from
    ``start`` (the whole model when None) with only ``groups`` gated: later blocks' candidates stay plain float
    there, so the model carries one block's quantized weights, not every block's, and runs no Where on them. None
    when the part does not hold every candidate."""
    sub = tail_model(model, start) if start else model
    if sub is None:
        return None
    outputs = {o for n in sub.graph.node for o in n.output}
    if any(l.node.output[0] not in outputs for ls in groups.values() for l in ls):
        return None
    # gate the part's own linears (the Linear records point into the full model, gated_model matches them by output)
    gsub, gates = gated_model(sub, groups, act_qdq, weight_codes, arrays)
    # the logits read the class token's row only: the last block's row-wise part runs on it alone, as in every
    # artifact (backends.read_rows_only), the same scores in exact arithmetic for less of it
    drop_unread_rows(gsub)
    gsub, own = light_model(gsub)  # the block's quantized weights go the same way
    refs = {t.name for t in gsub.graph.initializer if t.data_location == TensorProto.EXTERNAL}
    sess = _session(gsub.SerializeToString(), threads, {n: own[n] if n in own else arrays[n] for n in refs})
    return sess, gates


def candidates_digest(model: onnx.ModelProto, x: np.ndarray, groups: dict[str, list[Linear]], act_qdq, weight_codes, batch: int) -> str:
    """sha256 of everything ``score_candidates`` computes from: the graph and every weight of ``model``, the images,
    each candidate's activation quantizer (scale, zero point, shift) and its linears' rounded weights, the batch,
    the scores' format and onnxruntime's version. Hashing ViT-Base's weights and rounding them once more costs a
    few seconds; the search it can skip, about two minutes on 2 cores."""
    import onnxruntime

    from .cache import SCORES_FORMAT

    h = hashlib.sha256()

    def put(part) -> None:
        if isinstance(part, np.ndarray):
            part = str((part.dtype.str, part.shape)).encode() + np.ascontiguousarray(part).tobytes()
        elif not isinstance(part, bytes):
            part = repr(part).encode()
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)

    put(("vitexport sensitivity scores", SCORES_FORMAT, onnxruntime.__version__, batch))
    put(copy_without_initializers(model, onnx.ModelProto()).SerializeToString())
    for t in model.graph.initializer:
        put(t.SerializeToString())
    put(np.asarray(x, np.float32))
    idx = GraphIndex(model)
    for act in sorted(groups):
        scale, zp, shift = act_qdq(act)
        put((act, float(shift)))
        put(np.asarray(scale))
        put(np.asarray(zp))
        for l in groups[act]:
            put((l.node.name, l.node.input[1]))
            put(np.asarray(weight_codes(l, idx.const_array(l.node.input[1]))))
    return h.hexdigest()


def score_candidates(
    model: onnx.ModelProto,
    x: np.ndarray,
    groups: dict[str, list[Linear]],
    act_qdq: Callable[[str], tuple[np.ndarray, np.ndarray, float]],
    weight_codes: Callable[[Linear, np.ndarray], np.ndarray],
    threads: int = 0,
    progress: Callable[[int], None] | None = None,
    batch: int = 8,
    cache_dir: str | os.PathLike | None = None,
) -> dict[str, float]:
    """KL from float of the outputs on images ``x`` when each activation of ``groups`` alone is quantized; with
    ``cache_dir``, read from (or stored in) that folder under ``candidates_digest``."""
    if not cache_dir:
        return _score(model, x, groups, act_qdq, weight_codes, threads, progress, batch)
    from .cache import load_scores, save_scores

    digest = candidates_digest(model, x, groups, act_qdq, weight_codes, batch)
    scores = load_scores(cache_dir, digest, groups)
    if scores is not None:
        if progress is not None:
            progress(len(groups))
        return scores
    scores = _score(model, x, groups, act_qdq, weight_codes, threads, progress, batch)
    save_scores(cache_dir, digest, scores)
    return scores


def _score(model, x, groups, act_qdq, weight_codes, threads, progress, batch) -> dict[str, float]:
    from .calibration import stream_activations

    input_name = next(i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer})
    output_name = model.graph.output[0].name
    starts = block_inputs(model, groups)
    wanted = sorted({s for s in starts.values() if s})
    captured: dict[str, list[np.ndarray]] = {}
    chunks = [x[i : i + batch] for i in range(0, len(x), batch)]
    stream_activations(model, [output_name, *wanted], lambda: iter(chunks), lambda n, a: captured.setdefault(n, []).append(np.array(a)), threads=threads)
    ref = np.concatenate(captured[output_name])
    by_start: dict[str | None, list[str]] = {}
    for act, s in starts.items():
        by_start.setdefault(s, []).append(act)
    light, arrays = light_model(model)
    scores: dict[str, float] = {}
    # candidates with no block, or that their block's tail does not contain, are scored on the whole model last
    orphans: list[str] = list(by_start.pop(None, []))
    for start, acts in [*by_start.items(), (None, orphans)]:
        made = _tail_session(light, arrays, start, {a: groups[a] for a in acts}, act_qdq, weight_codes, threads) if acts else None
        if made is None:
            orphans.extend(acts if start else [])
            continue
        sess, gates = made
        present = {i.name for i in sess.get_inputs()}
        feeds = [{start: c} for c in captured[start]] if start else [{input_name: c} for c in chunks]
        if start and input_name in present:
            feeds = [{**f, input_name: c} for f, c in zip(feeds, chunks)]
        for act in acts:
            flags = {gname: np.array(a == act) for a, gname in gates.items() if gname in present}
            out = np.concatenate([sess.run([output_name], {**f, **flags})[0] for f in feeds])
            scores[act] = _kl(ref, out)
            if progress is not None:
                progress(1)
        del sess
    del light, arrays
    # once, not after each block: the first block's part is the largest, so the later ones reuse its freed heap, and
    # on a VM that hands trimmed pages back to its host every re-touched GB cost seconds
    release_freed_memory()
    return scores
