"""ViT-aware static int8 (QDQ) for onnxruntime and QDQ-consuming targets.

What it does, on a copy of the float model:

1. finds the linear layers structurally (``graph.find_linears``) and quantizes only the activation inputs of the
   ones whose role is in ``recipe.roles`` (by default the q/k/v, attention-output, fc1 and fc2 projections).
   Attention matmuls, Softmax, LayerNorm, GELU and the residual adds stay float: quantizing them costs accuracy
   and, on CPU, time (element-wise Q/DQ that no integer kernel absorbs);
2. SmoothQuant: for each LayerNorm feeding only linears being quantized, a per-channel factor
   ``s = max|x|^alpha / max|w_row|^(1-alpha)`` is folded into the LayerNorm (gamma/s, beta/s) and into the rows of
   the consuming weights (w*s). Exact in float; it moves the post-LayerNorm channel outliers into the weights,
   which are quantized per channel. Optionally the same is done for the attention output projection through the
   value projection (columns of W_v and b_v divided by s, rows of W_o multiplied): exact because attention is
   linear in V;
3. streaming calibration (``calibration.stream_activations``): the build's one float pass
   (``calibration.FloatStats``, shared by every recipe) keeps per-channel min/max and each channel's most extreme
   values, from which the percentile range of the smoothed activation comes out exactly (the histogram pass's own
   bin), so only "mse" still streams a histogram pass; the GPTQ statistics Q(X)^T Q(X), Q(X)^T X are one more pass,
   shared by recipes with the same ranges (``memo``). Memory does not depend on the number of images;
4. activation ranges per tensor: "minmax", "percentile" or "mse" (range minimising the expected squared
   quantization error over the histogram); uint8 asymmetric by default, int8 with zero point 0 when
   ``symmetric_activations``;
5. weights: per-output-channel symmetric int8 (``reduce_range``: 7-bit, [-63, 63]), stored as int8 initializers
   behind DequantizeLinear;
6. QuantizeLinear -> DequantizeLinear in front of each quantized linear's activation input (one Q per tensor,
   one DQ per consumer) so onnxruntime fuses DQ+MatMul into MatMulIntegerToFloat (its bias Add stays outside: the
   ONNX Runtime backend folds it in, ``backends.onnxruntime.fold_bias_into_integer_matmuls``).
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Callable, Hashable, Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..ort_session import ort_session
from .calibration import GramSums, HistogramObserver, stream_activations
from .divergence import kl_divergence as _kl
from .gptq import array_digest, damped_inverse_factor, gptq_round, map_layers
from .graph import GraphIndex, Linear, Namer, drop_unused_constants, find_linears, kept_float, unscaled_inputs

if TYPE_CHECKING:
    from ..progress import Stages
    from .calibration import FloatStats

CALIBRATION_METHODS = ("minmax", "percentile", "mse")


@dataclass(frozen=True)
class Int8Recipe:
    """The int8 recipe. Defaults are the measured ViT-aware recipe (see the module docstring)."""

    roles: tuple[str, ...] = ("qkv", "attn_out", "fc1", "fc2")  # linear roles whose inputs are quantized
    smoothquant_alpha: float | None = 0.5  # None or 0 disables SmoothQuant
    # smooth only inputs whose largest channel range is >= this x the median one. 1.0 = every LayerNorm-fed input:
    # DeiT-tiny has no channel outliers (<= 3.3x), yet smoothing all of them measured better (cosine 0.9973 -> 0.9976,
    # top-1 -1.1 -> -0.3 points on 375 images); it folds into LayerNorm and the weights, so it costs nothing at run time
    smooth_outlier_ratio: float = 1.0
    smooth_attn_out: bool = False  # also smooth the attention output projection through the value projection
    calibration: str = "percentile"  # "minmax" | "percentile" | "mse"
    percentile: float = 99.999  # for calibration="percentile"
    histogram_bins: int = 2048
    symmetric_activations: bool = False  # int8 activations with zero point 0 (e.g. for TensorRT)
    # symmetric only: subtract the range's midpoint c before Q and add W.c back through the bias, so a one-sided
    # input (post-GELU: >= -0.17) uses all 256 codes instead of half; TensorRT fuses the Sub into the producer
    center_activations: bool = False
    reduce_range: bool = True  # 7-bit weights ([-63, 63]): avoids int16 saturation of u8*s8 pairs on AVX2 without VNNI
    per_channel: bool = True  # per-output-channel weight scales
    weight_rounding: str = "gptq"  # "gptq": error-compensating rounding from calibration X^T X; "rtn": round to nearest
    gptq_damp: float = 0.01  # GPTQ: fraction of mean(diag(X^T X)) added to the diagonal
    fallback_budget: float = 0.1  # at most this fraction of quantizable linear MACs may stay float, most sensitive first
    # and only inputs that alone cost at least this KL (nats, mean per search image): where quantizing an input barely
    # moves the logits, keeping it float buys nothing and costs a float kernel
    fallback_min_kl: float = 0.0
    fallback_images: int = 16  # calibration images used to measure each input's sensitivity
    compensate_activations: bool = True  # GPTQ target is the float output X W from quantized inputs Q(X), not Q(X) W
    # the Q of that compensation (and of GPTQ's Hessian Q^T Q): "static", this recipe's ranges (the QDQ model's own);
    # "dynamic_row", each row's own min/max int8 as XNNPACK's dynamically quantized fully-connected does it (LiteRT)
    activation_quantizer: str = "static"
    keep_float: tuple[str, ...] = ()  # linears left float: node names, or "role" / "block:role" / "block" selectors
    calibration_threads: int = 0  # onnxruntime intra-op threads during calibration (0 = default)

    def __post_init__(self):
        if self.weight_rounding not in ("gptq", "rtn"):
            raise ValueError(f"weight_rounding must be 'gptq' or 'rtn', not {self.weight_rounding!r}")
        if self.activation_quantizer not in ("static", "dynamic_row"):
            raise ValueError(f"activation_quantizer must be 'static' or 'dynamic_row', not {self.activation_quantizer!r}")
        if self.calibration not in CALIBRATION_METHODS:
            raise ValueError(f"calibration must be one of {CALIBRATION_METHODS}, not {self.calibration!r}")
        bad = set(self.roles) - {"qkv", "attn_out", "fc1", "fc2", "head", "patch_embed", "other"}
        if bad:
            raise ValueError(f"unknown linear roles {sorted(bad)}")
        if self.smoothquant_alpha is not None and not 0.0 <= self.smoothquant_alpha <= 1.0:
            raise ValueError("smoothquant_alpha must be in [0, 1] or None")


# ----------------------------------------------------------------------------------------------------------------
# selection


def select_linears(linears: list[Linear], recipe: Int8Recipe) -> tuple[list[Linear], list[dict]]:
    """(to quantize, skipped with reasons)."""
    chosen, skipped = [], []
    for l in linears:
        if l.role not in recipe.roles:
            skipped.append({"node": l.node.name, "role": l.role, "block": l.block, "reason": f"role {l.role} not in recipe.roles"})
            continue
        k = kept_float(l, recipe.keep_float)
        if k is not None:
            skipped.append({"node": l.node.name, "role": l.role, "block": l.block, "reason": f"kept float by recipe.keep_float ({k})"})
            continue
        chosen.append(l)
    return chosen, skipped


# ----------------------------------------------------------------------------------------------------------------
# SmoothQuant


@dataclass
class SmoothGroup:
    """A tensor whose channels are divided by ``s`` upstream (``kind``) and whose consumers' weight rows are multiplied by ``s``."""

    kind: str  # "layernorm" | "value"
    activation: str
    consumers: list[Linear]
    upstream: onnx.NodeProto  # the LayerNormalization, or the value-projection MatMul
    upstream_bias: str | None = None  # value projection bias
    scales: np.ndarray | None = None


def _weight_rows(idx: GraphIndex, l: Linear) -> np.ndarray:
    """|W| max per input channel (row of the [K, N] layout)."""
    w = idx.const_array(l.weight)
    if l.trans_b:
        w = w.T
    return np.abs(w).max(axis=1)


def find_smooth_groups(model: onnx.ModelProto, chosen: list[Linear], recipe: Int8Recipe) -> list[SmoothGroup]:
    idx = GraphIndex(model)
    by_act: dict[str, list[Linear]] = {}
    for l in chosen:
        by_act.setdefault(l.activation, []).append(l)
    groups = []
    chosen_ids = {id(l.node) for l in chosen}
    for act, cons in by_act.items():
        prod = idx.producer.get(act)
        if prod is None:
            continue
        all_cons = idx.consumers.get(act, [])
        if act in idx.graph_outputs or any(id(c) not in chosen_ids for c in all_cons):
            continue  # something else reads this tensor: scaling it would change that reader
        if prod.op_type == "LayerNormalization" and len(prod.input) >= 2 and idx.is_const(prod.input[1]):
            if len(prod.output) > 1 and any(o for o in prod.output[1:]):
                continue
            groups.append(SmoothGroup("layernorm", act, cons, prod))
        elif recipe.smooth_attn_out and all(l.role == "attn_out" for l in cons) and len(cons) == 1:
            v = _value_projection(idx, model, act)
            if v is not None:
                groups.append(SmoothGroup("value", act, cons, v[0], v[1]))
    return groups


def _value_projection(idx: GraphIndex, model: onnx.ModelProto, act: str):
    """For an attention-output activation: the value-projection MatMul (and bias) whose channels map 1:1 to it."""
    src = idx.source(act)
    if src is None or src.op_type != "MatMul":
        return None
    vt = src.input[1]
    for _ in range(8):
        p = idx.producer.get(vt)
        if p is None:
            return None
        if p.op_type in {"Reshape", "Transpose"}:
            vt = p.input[0]
            continue
        break
    p = idx.producer.get(vt)
    bias = None
    if p is not None and p.op_type == "Add":
        mm_in = [i for i in p.input if not idx.is_const(i)]
        c_in = [i for i in p.input if idx.is_const(i)]
        if len(mm_in) != 1 or len(c_in) != 1:
            return None
        bias = c_in[0]
        p = idx.producer.get(mm_in[0])
    if p is None or p.op_type != "MatMul" or not idx.is_const(p.input[1]):
        return None
    # the value projection output must feed only this attention path
    out = p.output[0]
    if len(idx.consumers.get(out, [])) != 1:
        return None
    return p, bias


def compute_smooth_scales(model: onnx.ModelProto, groups: list[SmoothGroup], absmax: dict[str, np.ndarray], alpha: float) -> None:
    idx = GraphIndex(model)
    for g in groups:
        a = np.maximum(absmax[g.activation], 1e-5)
        w = np.maximum(np.max(np.stack([_weight_rows(idx, l) for l in g.consumers]), axis=0), 1e-5)
        s = a**alpha / w ** (1.0 - alpha)
        s = np.clip(s, 1e-2, 1e2)
        g.scales = s.astype(np.float32)


def _replace_initializer(model: onnx.ModelProto, idx: GraphIndex, node: onnx.NodeProto, input_pos: int, array: np.ndarray, suffix: str) -> None:
    """Give ``node`` a fresh initializer at ``input_pos`` (never edits a possibly shared original)."""
    old = node.input[input_pos]
    name = _unique(model, f"{old}_{suffix}")
    model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array.astype(numpy_helper.to_array(idx.const_tensor(old)).dtype)), name))
    node.input[input_pos] = name


def apply_smoothing(model: onnx.ModelProto, groups: list[SmoothGroup]) -> None:
    """Fold the scales into the model in place (exact in float)."""
    idx = GraphIndex(model)
    for g in groups:
        s = g.scales
        if g.kind == "layernorm":
            ln = g.upstream
            _replace_initializer(model, idx, ln, 1, idx.const_array(ln.input[1]) / s, "sq")
            if len(ln.input) > 2 and ln.input[2]:
                _replace_initializer(model, idx, ln, 2, idx.const_array(ln.input[2]) / s, "sq")
        else:
            mm = g.upstream
            _replace_initializer(model, idx, mm, 1, idx.const_array(mm.input[1]) / s[None, :], "sq")
            if g.upstream_bias is not None:
                add = idx.consumers[mm.output[0]][0]
                pos = list(add.input).index(g.upstream_bias)
                _replace_initializer(model, idx, add, pos, idx.const_array(g.upstream_bias) / s, "sq")
        for l in g.consumers:
            w = idx.const_array(l.weight)
            w = w * (s[None, :] if l.trans_b else s[:, None])
            _replace_initializer(model, idx, l.node, 1, w, "sq")
        idx = GraphIndex(model)


# ----------------------------------------------------------------------------------------------------------------
# quantization parameters


def activation_shift(lo: float, hi: float, recipe: "Int8Recipe") -> float:
    """The midpoint subtracted before a symmetric Q (0 unless centering makes the step at least 10% finer)."""
    if not (recipe.symmetric_activations and recipe.center_activations):
        return 0.0
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    c = (lo + hi) / 2
    return float(np.float32(c)) if (hi - lo) / 2 < 0.9 * max(abs(lo), abs(hi)) else 0.0


def activation_qparams(lo: float, hi: float, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """(scale float32 scalar, zero point uint8/int8 scalar) for the range [lo, hi]."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if symmetric:
        t = max(abs(lo), abs(hi), 1e-8)
        return np.array(t / 127.0, dtype=np.float32), np.array(0, dtype=np.int8)
    scale = max((hi - lo) / 255.0, 1e-8)
    zp = int(np.clip(np.round(-lo / scale), 0, 255))
    return np.array(scale, dtype=np.float32), np.array(zp, dtype=np.uint8)


def quantize_weight(w: np.ndarray, axis: int, reduce_range: bool, per_channel: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 weight quantization along ``axis`` (output channels). Returns (int8 weights, float32 scales)."""
    qmax = 63.0 if reduce_range else 127.0
    if per_channel:
        red = tuple(i for i in range(w.ndim) if i != axis)
        amax = np.abs(w).max(axis=red)
    else:
        amax = np.array(np.abs(w).max())
    scale = np.maximum(amax, 1e-12) / qmax
    shape = [1] * w.ndim
    if per_channel:
        shape[axis] = -1
    q = np.clip(np.round(w / scale.reshape(shape)), -qmax, qmax).astype(np.int8)
    return q, scale.astype(np.float32)


def static_qdq(x: np.ndarray, scale: np.ndarray, zp: np.ndarray, shift: float = 0.0) -> np.ndarray:
    """``x`` through insert_qdq's activation quantizer, in float32: the centring ``shift`` subtracted, QuantizeLinear
    (round half to even, as ONNX), DequantizeLinear, the shift added back."""
    lo, hi = (-128, 127) if zp.dtype == np.int8 else (0, 255)
    z, c = float(zp), np.float32(shift)
    return ((np.clip(np.round((x - c) / scale) + z, lo, hi) - z) * scale + c).astype(np.float32)


def dynamic_row_qdq(x: np.ndarray) -> np.ndarray:
    """Quantize-dequantize each row of ``x`` [M, K] as XNNPACK's dynamically quantized fully-connected does (qd8):
    asymmetric int8 over the row's own range widened to include 0, zero point nudged to an integer
    (xnn_f32_qd8_asymmetric_quantization_params, f32-qs8-vcvt), all in float32."""
    x = np.asarray(x, np.float32)
    lo, hi = np.minimum(x.min(axis=1), 0).astype(np.float32), np.maximum(x.max(axis=1), 0).astype(np.float32)
    mult = np.where(hi == lo, np.float32(1), np.float32(255) / np.where(hi == lo, 1, hi - lo)).astype(np.float32)
    dmin, dmax = lo * mult, hi * mult
    zp = np.rint(np.clip(np.where((-128 + dmin) + (127 + dmax) > 0, -128 - dmin, 127 - dmax), -128, 127)).astype(np.float32)
    q = np.clip(np.rint(x * mult[:, None]) + zp[:, None], -128, 127)
    return ((q - zp[:, None]) * (np.float32(1) / mult)[:, None]).astype(np.float32)


class _QuantizedGramObserver:
    """Streaming Q(X)^T Q(X) and the compensation target per tensor; Q is the activation's own QuantizeLinear.

    The target is Q(X)^T X ([K, K]), or, for a tensor in ``right`` (its consumers' float weights side by side,
    [K, N] with N < K: fc2's 3072 -> 768), Q(X)^T (X - Q(X)) W directly ([K, N]): what ``compensate`` needs from
    it, in a quarter of the memory and half the multiply-adds, and without cancelling Q^T X - Q^T Q in float32.
    With no qparams for a tensor it keeps plain X^T X (then Q(X) = X); with ``dynamic``, Q is ``dynamic_row_qdq``
    for every tensor.
    """

    def __init__(self, qparams: dict[str, tuple[np.ndarray, np.ndarray]], shifts: dict[str, float] | None = None, right: dict[str, np.ndarray] | None = None,
                 dynamic: bool = False):
        self.qparams = qparams
        self.shifts = shifts or {}
        self.right = right or {}
        self.dynamic = dynamic
        self.qq = GramSums(np.float32)
        self.qx = GramSums(np.float32)

    def __call__(self, name: str, a: np.ndarray) -> None:
        x = np.asarray(a, np.float32).reshape(-1, a.shape[-1])
        xq = x
        if self.dynamic:
            xq = dynamic_row_qdq(x)
        elif name in self.qparams:
            xq = static_qdq(x, *self.qparams[name], self.shifts.get(name, 0.0))
        if xq is not x:
            right = self.right.get(name)
            self.qx.add(name, xq, x if right is None else (x - xq) @ right)
        self.qq.add(name, xq)


def compensate(w_nk: np.ndarray, qq: np.ndarray, qx: np.ndarray | None, damp: float, rhs: np.ndarray | None = None) -> np.ndarray:
    """The float weight that best maps quantized inputs to the float outputs: argmin_W' ||X W - Q(X) W'||.

    W' = W + (Q^T Q)^-1 Q^T (X - Q) W: damping applies to the correction only (damping the whole solve would be a
    ridge regression that shrinks W itself). Activation quantization error that is a function of the activation
    (the few levels left for GELU's negative lobe, rounding bias) is absorbed by the weights. ``rhs``: Q^T (X - Q) W
    when the calibration pass kept it instead of ``qx`` = Q^T X.
    """
    import torch  # a Cholesky solve on torch's threads: H is SPD, no general LU needed

    k = qq.shape[0]
    qq = np.asarray(qq, np.float64)
    w_kn = np.asarray(w_nk, np.float64).T
    h = qq + damp * float(np.mean(np.diag(qq))) * np.eye(k)
    rhs = (np.asarray(qx, np.float64) - qq) @ w_kn if rhs is None else np.asarray(rhs, np.float64)
    l, info = torch.linalg.cholesky_ex(torch.from_numpy(h))
    if int(info) != 0:
        return (w_kn + np.linalg.solve(h, rhs)).T
    return (w_kn + torch.cholesky_solve(torch.from_numpy(rhs), l).numpy()).T


def gptq_weight(w_nk: np.ndarray, hessian: np.ndarray, reduce_range: bool, damp: float = 0.01, lazy: int = 128,
                factor: Callable[[], tuple[np.ndarray, np.ndarray]] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ (Frantar et al. 2022) with fixed symmetric per-output-channel scales. ``w_nk`` is [N, K] (rows = output
    channels), ``hessian`` is X^T X [K, K] of this layer's calibration inputs. Returns (int8 codes [N, K], scales [N]).

    Each column's rounding error is spread over the columns not yet rounded, through the Cholesky factor of the
    damped inverse Hessian, so the layer's *output* error on real inputs is what gets minimised, not the weights'.
    That is what lets 7-bit weights (needed against int16 saturation on AVX2) keep 8-bit accuracy.
    ``factor()``: that factorisation of ``hessian`` from elsewhere (FloatStats.inverse_factor, computed once).
    """
    qmax = 63.0 if reduce_range else 127.0
    w = np.array(w_nk, dtype=np.float64, order="C")
    scale = np.maximum(np.abs(w).max(axis=1), 1e-12) / qmax
    scale = scale.astype(np.float32).astype(np.float64)  # round against the scale that is stored
    try:
        u, dead = factor() if factor is not None else damped_inverse_factor(hessian, damp)
    except np.linalg.LinAlgError:
        q, sc = quantize_weight(np.asarray(w_nk).T, 1, reduce_range)
        return q.T, sc
    w[:, dead] = 0.0
    q, _ = gptq_round(w, u, lambda x, _col: np.clip(np.round(x / scale), -qmax, qmax) * scale, lazy)
    return np.round(q / scale[:, None]).astype(np.int8), scale.astype(np.float32)


def float_gram_codes_key(node: str, act: str, w_nk: np.ndarray, scales: np.ndarray | None, reduce_range: bool, damp: float) -> tuple:
    """The memo key of per-channel GPTQ codes rounded against the float inputs' X^T X: what they depend on, by content
    (the weight as rounded, the input's SmoothQuant scales or None). So recipes whose smoothing, ranges or centring
    differ but leave a layer alone share its codes: TensorRT's and CoreML's full 8-bit fc2 and attention output
    projections, which no recipe smooths."""
    return ("float-gram-gptq", node, act, array_digest(w_nk), array_digest(scales), reduce_range, float(damp))


# ----------------------------------------------------------------------------------------------------------------
# graph rewriting


def _unique(model: onnx.ModelProto, base: str) -> str:
    names = {t.name for t in model.graph.initializer} | {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}
    name, k = base, 0
    while name in names:
        k += 1
        name = f"{base}_{k}"
    return name


def _bias_user(model: onnx.ModelProto, node: onnx.NodeProto, bias: str) -> onnx.NodeProto | None:
    """The Add that adds ``bias`` to ``node``'s output (the second half of an exported Linear)."""
    for n in model.graph.node:
        if n.op_type == "Add" and node.output[0] in n.input and bias in n.input:
            return n
    return None


@dataclass(frozen=True)
class _QdqRewrite:
    """What the steps of ``insert_qdq`` share while they rewrite one model (the mappings fill up as they go)."""

    model: onnx.ModelProto
    idx: GraphIndex
    namer: Namer
    first_consumer: dict[str, onnx.NodeProto]  # activation -> the first chosen linear reading it (where its Q goes)
    weight_users: dict[str, int]  # tensor -> how many node inputs read it (a weight is dropped when none is left)
    new_nodes_before: dict[int, list[onnx.NodeProto]] = dataclasses.field(default_factory=dict)  # id(node) -> nodes to insert before it
    q_out: dict[str, tuple[str, str, str]] = dataclasses.field(default_factory=dict)  # activation -> (quantized tensor, scale, zp)
    act_scale: dict[str, float] = dataclasses.field(default_factory=dict)
    shift: dict[str, float] = dataclasses.field(default_factory=dict)  # activation -> midpoint subtracted before Q (centred symmetric)
    drop_inits: set[str] = dataclasses.field(default_factory=set)

    @classmethod
    def of(cls, model: onnx.ModelProto, chosen: list[Linear]) -> "_QdqRewrite":
        weight_users: dict[str, int] = {}
        for n in model.graph.node:
            for i in n.input:
                weight_users[i] = weight_users.get(i, 0) + 1
        order = {id(n): k for k, n in enumerate(model.graph.node)}
        first_consumer: dict[str, onnx.NodeProto] = {}
        for l in sorted(chosen, key=lambda l: order[id(l.node)]):
            first_consumer.setdefault(l.activation, l.node)
        return cls(model, GraphIndex(model), Namer(model), first_consumer, weight_users)

    def before(self, node: onnx.NodeProto) -> list[onnx.NodeProto]:
        return self.new_nodes_before.setdefault(id(node), [])


def _quantize_activation(rw: _QdqRewrite, act: str, centre: bool, lo: float, hi: float, recipe: Int8Recipe) -> None:
    """One QuantizeLinear per activation (after a Sub of its midpoint when centred), in front of its first consumer."""
    namer, model = rw.namer, rw.model
    c = activation_shift(lo, hi, recipe) if centre else 0.0
    rw.shift[act] = c
    scale, zp = activation_qparams(lo - c, hi - c, recipe.symmetric_activations)
    s_name, z_name, qx = namer(f"{act}_scale"), namer(f"{act}_zero_point"), namer(f"{act}_quantized")
    model.graph.initializer.extend([numpy_helper.from_array(scale, s_name), numpy_helper.from_array(zp, z_name)])
    q_in = act
    if c:
        c_name, q_in = namer(f"{act}_center"), namer(f"{act}_centered")
        model.graph.initializer.append(numpy_helper.from_array(np.array(c, np.float32), c_name))
        rw.before(rw.first_consumer[act]).append(helper.make_node("Sub", [act, c_name], [q_in], name=namer(f"{act}_Sub")))
    rw.before(rw.first_consumer[act]).append(helper.make_node("QuantizeLinear", [q_in, s_name, z_name], [qx], name=namer(f"{act}_QuantizeLinear")))
    rw.q_out[act] = (qx, s_name, z_name)
    rw.act_scale[act] = float(scale)


def _all_weight_codes(
    rw: "_QdqRewrite", chosen: list[Linear], ranges: dict[str, tuple[float, float]], recipe: Int8Recipe,
    hessians: dict[str, np.ndarray] | None, targets: dict[str, np.ndarray] | None, memo: "Memo | None", progress: Callable[[int], None] | None,
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """_weight_codes of every chosen linear, by id of its node: the linears of one input on one thread, one after the
    other (q, k and v read the same smoothed X^T X and factor, _SmoothedGrams keeps them per thread), the inputs on
    threads (gptq.map_layers)."""
    by_act: dict[str, list[Linear]] = {}
    for l in chosen:
        by_act.setdefault(l.activation, []).append(l)

    def of_input(ls: list[Linear]) -> list[tuple[np.ndarray, np.ndarray]]:  # each weight read where it is rounded
        return [_weight_codes(rw.idx.const_array(l.node.input[1]), l, ranges, recipe, hessians, targets, memo) for l in ls]

    out = {}
    groups = list(by_act.values())
    rounded = map_layers(of_input, groups) if hessians else ((ls, of_input(ls)) for ls in groups)  # nearest: no threads
    for ls, got in rounded:
        out.update({id(l.node): c for l, c in zip(ls, got)})
        if progress is not None:
            progress(len(ls))
    return out


def _weight_codes(
    w: np.ndarray, l: Linear, ranges: dict[str, tuple[float, float]], recipe: Int8Recipe,
    hessians: dict[str, np.ndarray] | None, targets: dict[str, np.ndarray] | None, memo: "Memo | None",
) -> tuple[np.ndarray, np.ndarray]:
    """(int8 codes in the weight's own layout, scales): GPTQ-rounded when the input's Hessian is known, else nearest."""
    act = l.activation
    if not (hessians and act in hessians and recipe.per_channel):
        return quantize_weight(w, 0 if l.trans_b else 1, recipe.reduce_range, recipe.per_channel)
    w_nk = w if l.trans_b else w.T

    def rounded(w_nk=w_nk, act=act):
        if targets and act in targets:
            t = targets[act]  # Q^T X, or {linear: Q^T (X - Q) W} (_QuantizedGramObserver's ``right``)
            w_nk = compensate(w_nk, hessians[act], None, recipe.gptq_damp, t[l.node.name]) if isinstance(t, dict) else compensate(w_nk, hessians[act], t, recipe.gptq_damp)
        if isinstance(hessians, _SmoothedGrams):  # its factors are shared or kept for q, k and v
            return gptq_weight(w_nk, None, recipe.reduce_range, recipe.gptq_damp, factor=hessians.factor(act, recipe.gptq_damp))
        return gptq_weight(w_nk, hessians[act], recipe.reduce_range, recipe.gptq_damp)

    # the codes depend on the layer, its weight and its input statistics only: same key, same codes
    compute = rounded
    if isinstance(hessians, _SmoothedGrams):  # float X^T X: the ranges do not enter, the smoothing does
        key = float_gram_codes_key(l.node.name, act, w_nk, hessians.scales(act), recipe.reduce_range, recipe.gptq_damp)
        compute = lambda: hessians.stats.derived(key, rounded)  # noqa: E731 (and between builds, with --cache-dir)
    else:
        key = (l.node.name, act, float(np.float32(ranges[act][0])), float(np.float32(ranges[act][1])))
    codes, ws = memo(key, compute) if memo else compute()
    return (codes if l.trans_b else np.ascontiguousarray(codes.T)), ws


def _weight_dequantize(rw: _QdqRewrite, l: Linear, base: str, qw: np.ndarray, ws: np.ndarray, recipe: Int8Recipe) -> onnx.NodeProto:
    """The int8 weight, its scales and zero points as initializers, and the DequantizeLinear that reads them."""
    namer = rw.namer
    qw_name, ws_name, wz_name, dqw = namer(f"{base}_weight_quantized"), namer(f"{base}_weight_scale"), namer(f"{base}_weight_zero_point"), namer(f"{base}_weight_dequantized")
    rw.model.graph.initializer.extend(
        [numpy_helper.from_array(qw, qw_name), numpy_helper.from_array(ws, ws_name), numpy_helper.from_array(np.zeros(ws.shape, np.int8), wz_name)]
    )
    axis = {"axis": 0 if l.trans_b else 1} if recipe.per_channel else {}
    return helper.make_node("DequantizeLinear", [qw_name, ws_name, wz_name], [dqw], name=namer(f"{base}_weight_DequantizeLinear"), **axis)


def _recentre_bias(rw: _QdqRewrite, l: Linear, base: str, qw: np.ndarray, ws: np.ndarray, recipe: Int8Recipe) -> None:
    """The MatMul sees x - c: put W_q^T c back through the bias (exactly what GPTQ assumed)."""
    model, node, old_b = rw.model, l.node, l.bias
    w_deq = (qw.astype(np.float32) * (ws[:, None] if l.trans_b else ws[None, :])) if recipe.per_channel else qw.astype(np.float32) * ws
    colsum = w_deq.sum(axis=1 if l.trans_b else 0)
    new_b = rw.namer(f"{base}_bias_centered")
    model.graph.initializer.append(numpy_helper.from_array((rw.idx.const_array(old_b).astype(np.float32) + rw.shift[l.activation] * colsum).astype(np.float32), new_b))
    for user in model.graph.node:
        if user is not node and old_b in user.input and (user is _bias_user(model, node, old_b)):
            user.input[list(user.input).index(old_b)] = new_b
    if l.op_type == "Gemm" and len(node.input) > 2 and node.input[2] == old_b:
        node.input[2] = new_b


def _rewire(rw: _QdqRewrite, node: onnx.NodeProto, dqx: str, dqw: str) -> None:
    """Point the linear at its dequantized input and weight; the float weight goes when nothing else reads it."""
    old_w = node.input[1]
    rw.weight_users[old_w] -= 1
    if rw.weight_users[old_w] == 0:
        rw.drop_inits.add(old_w)
    node.input[0] = dqx
    node.input[1] = dqw


def _splice(rw: _QdqRewrite) -> None:
    """Insert the new nodes in front of the ones they feed and drop the float weights nothing reads any more."""
    model = rw.model
    nodes = list(model.graph.node)
    del model.graph.node[:]
    for n in nodes:
        model.graph.node.extend(rw.new_nodes_before.get(id(n), []))
        model.graph.node.append(n)
    if rw.drop_inits:
        keep = [t for t in model.graph.initializer if t.name not in rw.drop_inits]
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)


def insert_qdq(
    model: onnx.ModelProto,
    chosen: list[Linear],
    ranges: dict[str, tuple[float, float]],
    recipe: Int8Recipe,
    hessians: dict[str, np.ndarray] | None = None,
    targets: dict[str, np.ndarray] | None = None,
    memo: "Memo | None" = None,
    progress: Callable[[int], None] | None = None,
) -> list[dict]:
    """Rewrite ``model`` in place: int8 per-channel weights behind DQ, Q->DQ on the activation inputs. Returns per-layer records."""
    rw = _QdqRewrite.of(model, chosen)
    codes = _all_weight_codes(rw, chosen, ranges, recipe, hessians, targets, memo, progress)
    records = []
    for l in chosen:
        node, act = l.node, l.activation
        base = node.name or node.output[0]
        if act not in rw.q_out:
            _quantize_activation(rw, act, all(x.bias for x in chosen if x.activation == act), *ranges[act], recipe)
        qx, s_name, z_name = rw.q_out[act]
        dqx = rw.namer(f"{act}_dequantized_{base}")
        dq_a = helper.make_node("DequantizeLinear", [qx, s_name, z_name], [dqx], name=rw.namer(f"{base}_act_DequantizeLinear"))
        qw, ws = codes[id(node)]  # in the weight's own layout
        dq_w = _weight_dequantize(rw, l, base, qw, ws, recipe)
        rw.before(node).extend([dq_a, dq_w])
        if rw.shift.get(act):
            _recentre_bias(rw, l, base, qw, ws, recipe)
        _rewire(rw, node, dqx, dq_w.output[0])
        lo, hi = ranges[act]
        records.append(
            {
                "node": node.name,
                "role": l.role,
                "block": l.block,
                "activation": act,
                "activation_range": [round(float(lo), 6), round(float(hi), 6)],
                "activation_scale": rw.act_scale[act],
                "activation_shift": rw.shift.get(act, 0.0),
                "weight_shape": list(qw.shape),
            }
        )
    _splice(rw)
    return records


# ----------------------------------------------------------------------------------------------------------------
# calibration


class _ChannelStats:
    """Per-channel (last axis) min, max of every observed tensor: pass 1."""

    def __init__(self):
        self.min: dict[str, np.ndarray] = {}
        self.max: dict[str, np.ndarray] = {}

    def __call__(self, name: str, a: np.ndarray) -> None:
        a2 = a.reshape(-1, a.shape[-1])
        lo, hi = a2.min(axis=0).astype(np.float64), a2.max(axis=0).astype(np.float64)
        if name in self.min:
            np.minimum(self.min[name], lo, out=self.min[name])
            np.maximum(self.max[name], hi, out=self.max[name])
        else:
            self.min[name], self.max[name] = lo, hi

    def absmax(self) -> dict[str, np.ndarray]:
        return {n: np.maximum(np.abs(self.min[n]), np.abs(self.max[n])) for n in self.min}


def calibrate_ranges(
    model: onnx.ModelProto,
    acts: list[str],
    batches: Callable[[], Iterable[np.ndarray]],
    recipe: Int8Recipe,
    channel_stats: "_ChannelStats",
    scales: dict[str, np.ndarray],
    progress: Callable[[int], None] | None = None,
) -> dict[str, tuple[float, float]]:
    """Per-tensor ranges on the (already smoothed) ``model``. Pass-1 ``channel_stats`` came from the unsmoothed model;
    ``scales`` holds the smoothing factor of each smoothed tensor."""
    mm: dict[str, tuple[float, float]] = {}
    for a in acts:
        s = scales.get(a)
        lo, hi = channel_stats.min[a], channel_stats.max[a]
        if s is not None:
            lo, hi = lo / s, hi / s
        mm[a] = (float(lo.min()), float(hi.max()))
    if recipe.calibration == "minmax":
        return mm
    hist = HistogramObserver(mm, bins=recipe.histogram_bins)
    stream_activations(model, acts, batches, hist, threads=recipe.calibration_threads, progress=progress)
    out = {}
    for a in acts:
        if recipe.calibration == "percentile":
            out[a] = hist.percentile_range(a, recipe.percentile)
        else:
            out[a] = hist.mse_range(a, symmetric=recipe.symmetric_activations, levels=255 if recipe.symmetric_activations else 256)
    return out


def _run(model: onnx.ModelProto, x: np.ndarray, threads: int, qdq_fusion: bool = True) -> np.ndarray:
    sess = ort_session(model, threads, spinning=False, user_model=False, qdq_fusion=qdq_fusion)
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i : i + 8]})[0] for i in range(0, len(x), 8)])


def _both(tick: Callable[[int], None], progress: Callable[[int], None] | None) -> Callable[[int], None]:
    def both(n: int) -> None:
        tick(n)
        if progress is not None:
            progress(n)

    return both


def _channel_stats(stats: "FloatStats", acts: list[str]) -> "_ChannelStats":
    cs = _ChannelStats()
    for a in acts:
        cs.min[a], cs.max[a] = stats.min[a], stats.max[a]
    return cs


def _outlier_ratio(channel_absmax: np.ndarray) -> float:
    """Largest channel range over the median one: how much one per-tensor scale wastes on a few channels."""
    return float(channel_absmax.max() / max(float(np.median(channel_absmax)), 1e-12))


def _fallback_groups(chosen: list[Linear]) -> dict[str, list[Linear]]:
    groups: dict[str, list[Linear]] = {}
    for l in chosen:
        groups.setdefault(l.activation, []).append(l)
    return groups


def _fallback_images(batches: Callable[[], Iterable[np.ndarray]], n: int) -> np.ndarray:
    xs, got = [], 0
    for x in batches():
        xs.append(np.asarray(x))
        got += len(x)
        if got >= n:
            break
    return np.concatenate(xs)[:n]


def sensitivity_scores_one_model_each(
    model: onnx.ModelProto, chosen: list[Linear], ranges: dict[str, tuple[float, float]], recipe: Int8Recipe, batches: Callable[[], Iterable[np.ndarray]],
    qdq_fusion: bool = True,
) -> dict[str, float]:
    """The search as first written: one rewritten model, serialisation and session per input, each run in full.
    Kept as the reference that ``sensitivity_scores`` is checked against (tests/test_calibration_shared.py).
    ``qdq_fusion=False`` runs each Q/DQ pair as float fake-quantization instead of onnxruntime's integer kernels,
    which on x86 without VNNI sum u8*s8 pairs in int16 and saturate on full 8-bit weights (TensorRT's recipe)."""
    x = _fallback_images(batches, recipe.fallback_images)
    ref = _run(model, x, recipe.calibration_threads)
    rtn = dataclasses.replace(recipe, weight_rounding="rtn")
    scores = {}
    for act, ls in _fallback_groups(chosen).items():
        trial = onnx.ModelProto()
        trial.CopyFrom(model)
        names = {l.node.name for l in ls}
        insert_qdq(trial, [l for l in find_linears(trial) if l.node.name in names], ranges, rtn)
        scores[act] = _kl(ref, _run(trial, x, recipe.calibration_threads, qdq_fusion))
    return scores


def sensitivity_scores(
    model: onnx.ModelProto,
    chosen: list[Linear],
    ranges: dict[str, tuple[float, float]],
    recipe: Int8Recipe,
    batches: Callable[[], Iterable[np.ndarray]],
    progress: Callable[[int], None] | None = None,
    cache_dir: str | None = None,
) -> dict[str, float]:
    """KL from float when each quantized input alone is quantized (with its linears' weights rounded to nearest):
    one gated session per transformer block, each candidate run from its block's input (quantization/fallback.py);
    with ``cache_dir``, stored there and reused by a later build that would compute the same scores."""
    from .fallback import score_candidates

    groups = _fallback_groups(chosen)
    x = _fallback_images(batches, recipe.fallback_images)
    centred = {act: activation_shift(*ranges[act], recipe) if all(l.bias for l in ls) else 0.0 for act, ls in groups.items()}

    def act_qdq(act: str):
        lo, hi = ranges[act]
        c = centred[act]
        scale, zp = activation_qparams(lo - c, hi - c, recipe.symmetric_activations)
        return scale, zp, c

    def weight_codes(l: Linear, w: np.ndarray) -> np.ndarray:
        axis = 0 if l.trans_b else 1
        q, sc = quantize_weight(w, axis, recipe.reduce_range, recipe.per_channel)
        return q.astype(np.float32) * ((sc[:, None] if l.trans_b else sc[None, :]) if recipe.per_channel else sc)

    return score_candidates(model, x, groups, act_qdq, weight_codes, threads=recipe.calibration_threads, progress=progress, cache_dir=cache_dir)


def sensitivity_fallback(
    model: onnx.ModelProto, chosen: list[Linear], ranges: dict[str, tuple[float, float]], recipe: Int8Recipe, batches: Callable[[], Iterable[np.ndarray]]
) -> tuple[list[dict], float]:
    """Which quantized inputs to leave float: measured, not guessed.

    Each activation (with the linears that read it) is quantized alone and scored by the KL divergence of the
    outputs from float on a few calibration images; errors of separate inputs add up closely, so the inputs with the
    most KL per multiply-accumulate are left float until ``fallback_budget`` of the MACs is used.
    Returns (records of the inputs kept float, the summed KL of all inputs).
    """
    if recipe.fallback_budget <= 0:
        return [], 0.0
    scores = sensitivity_scores(model, chosen, ranges, recipe, batches)
    return select_fallback_model(model, chosen, scores, recipe.fallback_budget, recipe.fallback_min_kl), float(sum(scores.values()))


def select_fallback_model(model: onnx.ModelProto, chosen: list[Linear], scores: dict[str, float], budget: float, min_kl: float = 0.0) -> list[dict]:
    """``select_fallback`` with MACs counted from ``model``'s weights."""
    index = GraphIndex(model)
    groups = _fallback_groups(chosen)
    macs = {act: sum(int(np.prod(index.const_shape(l.node.input[1]) or ())) for l in ls) for act, ls in groups.items()}
    total_macs = sum(macs.values())
    return [{"activation": act, "nodes": sorted(l.node.name for l in groups[act]), "kl_alone": round(scores[act], 6), "mac_fraction": round(macs[act] / total_macs, 4)}
            for act in select_fallback(scores, macs, budget, min_kl)]


def select_fallback(scores: dict[str, float], macs: dict[str, int], budget: float, min_kl: float = 0.0) -> list[str]:
    """The inputs left float, most KL per multiply-accumulate first, while they fit in ``budget`` of all the MACs
    (one that does not fit is skipped, a smaller one after it may still fit); none that alone costs under ``min_kl``."""
    total, used, kept = sum(macs.values()), 0, []
    for act in sorted(macs, key=lambda a: scores[a] / macs[a], reverse=True):
        if used + macs[act] <= budget * total and scores[act] >= min_kl:
            used += macs[act]
            kept.append(act)
    return kept


# ----------------------------------------------------------------------------------------------------------------
# entry point


Memo = Callable[[Hashable, Callable[[], Any]], Any]


def _no_memo(key: Hashable, compute: Callable[[], Any]) -> Any:
    return compute()


def smoothing_key(recipe: Int8Recipe) -> tuple:
    """The recipe fields that decide the smoothed model and its activation ranges (not the weights' rounding)."""
    return ("int8-ranges", recipe.roles, recipe.keep_float, recipe.smoothquant_alpha, recipe.smooth_outlier_ratio, recipe.smooth_attn_out,
            recipe.calibration, recipe.percentile, recipe.histogram_bins, recipe.symmetric_activations, recipe.center_activations)


@dataclass(frozen=True)
class _Selection:
    """The linears of the working model, which of them are quantized, which stay float (and why), and their inputs."""

    linears: list[Linear]
    chosen: list[Linear]
    skipped: list[dict]
    acts: list[str]

    @classmethod
    def of(cls, work: onnx.ModelProto, recipe: Int8Recipe, acts: list[str] | None = None) -> "_Selection":
        linears = find_linears(work)
        chosen, skipped = select_linears(linears, recipe)
        return cls(linears, chosen, skipped, acts if acts is not None else list(dict.fromkeys(l.activation for l in chosen)))

    def without(self, fallback: list[dict]) -> "_Selection":
        """The sensitivity fallback's inputs (and their linears) moved to the float side."""
        dropped = {a["activation"] for a in fallback}
        skipped = self.skipped + [{"node": l.node.name, "role": l.role, "block": l.block, "reason": "sensitivity fallback"} for l in self.chosen if l.activation in dropped]
        return _Selection(self.linears, [l for l in self.chosen if l.activation not in dropped], skipped, [a for a in self.acts if a not in dropped])


def _own_float_stats(work: onnx.ModelProto, acts: list[str], batches, recipe: Int8Recipe, stats: "FloatStats | None", stages: "Stages", progress) -> "FloatStats | None":
    """The build's float statistics when they cover every quantized input, else one float pass of this recipe's own."""
    from .calibration import collect_float_stats

    if not acts or (stats is not None and all(a in stats.min for a in acts)):
        return stats
    images_hint = sum(len(x) for x in batches()) if stats is None else stats.images
    with stages.stage("float statistics", total=images_hint) as tick:
        return collect_float_stats(work, acts, batches, images_hint, gram=False, threads=recipe.calibration_threads, progress=_both(tick, progress),
                                   whole_tensor_tails=unscaled_inputs(find_linears(work)))


def _smooth(work: onnx.ModelProto, sel: _Selection, stats: "FloatStats", recipe: Int8Recipe) -> list[SmoothGroup]:
    """SmoothQuant folded into ``work`` (in place) on the LayerNorm-fed inputs with enough of an outlier ratio."""
    absmax = stats.absmax()
    groups = [g for g in find_smooth_groups(work, sel.chosen, recipe) if _outlier_ratio(absmax[g.activation]) >= recipe.smooth_outlier_ratio]
    compute_smooth_scales(work, groups, absmax, recipe.smoothquant_alpha)
    apply_smoothing(work, groups)
    drop_unused_constants(work)  # the unsmoothed weights: not carried through every later pass and session
    return groups


def _smoothed(work: onnx.ModelProto, sel: _Selection, stats: "FloatStats", recipe: Int8Recipe, owned: bool) -> tuple[onnx.ModelProto, _Selection, list[SmoothGroup]]:
    """(working model, selection, smoothing groups) after SmoothQuant. _smooth drops the unsmoothed weights, but
    protobuf frees a message's memory only with the whole message (ViT-Base: 0.2-0.35 GB more under every later
    pass): an ``owned`` model is replaced by a compact copy, with nothing left pointing into the old one."""
    groups = _smooth(work, sel, stats, recipe)
    if owned:
        compact = onnx.ModelProto()
        compact.CopyFrom(work)
        work = compact
    new = _Selection.of(work, recipe, sel.acts)  # nodes unchanged, weights renamed
    if owned:
        by_name = {l.node.name: l for l in new.chosen}
        groups = [dataclasses.replace(g, consumers=[by_name[l.node.name] for l in g.consumers], upstream=None) for g in groups]
    return work, new, groups


def _activation_ranges(
    work: onnx.ModelProto, acts: list[str], batches, recipe: Int8Recipe, stats: "FloatStats", scales: dict[str, np.ndarray], stages: "Stages", progress
) -> tuple[dict[str, tuple[float, float]], int]:
    """(ranges on the smoothed model, calibration passes run): percentiles from the float tails (exactly the
    histogram's answer), else a histogram pass (none for minmax)."""
    from .calibration import percentile_range_from_tails

    ranges: dict[str, tuple[float, float]] = {}
    if recipe.calibration == "percentile":
        for a in acts:
            r = percentile_range_from_tails(stats, a, recipe.percentile, recipe.histogram_bins, scales.get(a))
            if r is None:
                ranges = {}
                break
            ranges[a] = r
    if ranges:
        return ranges, 0
    with stages.stage("activation histograms", total=stats.images) as tick:
        ranges = calibrate_ranges(work, acts, batches, recipe, _channel_stats(stats, acts), scales, progress=_both(tick, progress))
    return ranges, int(recipe.calibration != "minmax")


def _fallback(work: onnx.ModelProto, sel: _Selection, ranges: dict[str, tuple[float, float]], recipe: Int8Recipe, batches, memo: Memo, stages: "Stages",
              cache_dir: str | None = None) -> tuple[list[dict], float]:
    """(inputs left float by the measured search, summed KL of all inputs); the scores are shared through ``memo``
    within a build and through ``cache_dir`` (--cache-dir) between builds."""
    fb_key = (smoothing_key(recipe), "fallback", recipe.fallback_images, recipe.reduce_range, recipe.per_channel)
    with stages.stage("sensitivity search", total=len(sel.acts), unit="input") as tick:
        scores = memo(fb_key, lambda: sensitivity_scores(work, sel.chosen, ranges, recipe, batches, progress=tick, cache_dir=cache_dir))
    return select_fallback_model(work, sel.chosen, scores, recipe.fallback_budget, recipe.fallback_min_kl), float(sum(scores.values()))


@dataclass(frozen=True)
class _GptqInputs:
    """What GPTQ rounds against: per input, Q(X)^T Q(X) (and Q(X)^T X to compensate), and the memo key of its codes."""

    hessians: dict[str, np.ndarray]
    targets: dict[str, np.ndarray] | None
    key: tuple
    passes: int


def _compensation_right(work: onnx.ModelProto, chosen: list[Linear], acts: list[str]) -> dict[str, tuple[np.ndarray, list[tuple[str, int]]]]:
    """act -> (its linears' float weights side by side [K, N], (linear, width) of each), for the inputs with N < K."""
    idx, out = GraphIndex(work), {}
    for a in acts:
        ls = [l for l in chosen if l.activation == a]
        ws = [idx.const_array(l.weight) for l in ls]
        ws = [w.T if l.trans_b else w for l, w in zip(ls, ws)]  # [K, N]
        if ws and sum(w.shape[1] for w in ws) < ws[0].shape[0]:
            out[a] = (np.ascontiguousarray(np.concatenate(ws, axis=1), np.float32), [(l.node.name, w.shape[1]) for l, w in zip(ls, ws)])
    return out


def _split_columns(target: np.ndarray, widths: list[tuple[str, int]]) -> dict[str, np.ndarray]:
    ends = np.cumsum([w for _, w in widths])
    return {name: target[:, e - w : e] for (name, w), e in zip(widths, ends)}


class _SmoothedGrams(Mapping):
    """X^T X of the smoothed inputs, from the float statistics' X^T X of the reference's: SmoothQuant divides channel i
    by s_i, so entry (i, j) divides by s_i s_j. One input at a time, on access (ViT-Base's are 1.1 GB in all)."""

    def __init__(self, stats: "FloatStats", scales: Mapping[str, np.ndarray], acts: list[str]):
        self._grams, self._scales, self._acts, self._stats = stats.gram, scales, acts, stats
        self._kept = threading.local()  # per thread (insert_qdq rounds inputs on threads): the last input's Gram and factor

    def factor(self, act: str, damp: float) -> Callable[[], tuple[np.ndarray, np.ndarray]]:
        """The inverse factor of ``act``'s X^T X: the build's shared one for an unscaled input
        (FloatStats.inverse_factor), else this recipe's own, kept while q, k and v (one after the other) read it."""
        if self._scales.get(act) is None:
            return lambda: self._stats.inverse_factor(act, damp)

        def own() -> tuple[np.ndarray, np.ndarray]:
            kept = getattr(self._kept, "factor", (None, None))
            if kept[0] != (act, damp):
                kept = self._kept.factor = ((act, damp), damped_inverse_factor(self[act], damp))
            return kept[1]

        return own

    def __getitem__(self, act: str) -> np.ndarray:
        if act not in self._acts:
            raise KeyError(act)
        kept = getattr(self._kept, "gram", (None, None))
        if kept[0] != act:  # q, k and v read the same input one after the other
            g = np.array(self._grams[act], np.float64)
            s = self._scales.get(act)
            kept = self._kept.gram = (act, g if s is None else g / np.outer(s, s))
        return kept[1]

    def scales(self, act: str) -> np.ndarray | None:
        return self._scales.get(act)

    @property
    def stats(self) -> "FloatStats":
        return self._stats

    def __iter__(self):
        return iter(self._acts)

    def __len__(self) -> int:
        return len(self._acts)


def _gptq_inputs(work: onnx.ModelProto, chosen: list[Linear], ranges: dict[str, tuple[float, float]], recipe: Int8Recipe, batches, memo: Memo, images: int, stages: "Stages", progress,
                 stats: "FloatStats | None" = None, scales: Mapping[str, np.ndarray] | None = None) -> _GptqInputs:
    """The quantized-input Gram matrices: one pass for the inputs no recipe with the same ranges has streamed yet.
    Without activation compensation GPTQ rounds against the float inputs' X^T X, which the build's float statistics
    already hold: no pass at all."""
    key = smoothing_key(recipe)
    acts = list(dict.fromkeys(l.activation for l in chosen))
    if not recipe.compensate_activations and stats is not None and stats.gram is not None and all(a in stats.gram for a in acts):
        return _GptqInputs(hessians=_SmoothedGrams(stats, scales or {}, acts), targets=None, key="codes", passes=0)  # float_gram_codes_key
    shifts = {a: activation_shift(*ranges[a], recipe) for a in acts}
    qparams = {a: activation_qparams(ranges[a][0] - shifts[a], ranges[a][1] - shifts[a], recipe.symmetric_activations) for a in acts}
    dynamic = recipe.compensate_activations and recipe.activation_quantizer == "dynamic_row"
    grams = memo((key, "quantized-gram", recipe.compensate_activations, dynamic), dict)  # act -> (Q^T Q, target): a recipe with the same ranges reuses what is there
    missing = [a for a in acts if a not in grams]
    if missing:
        right = _compensation_right(work, chosen, missing) if recipe.compensate_activations else {}
        obs = _QuantizedGramObserver({a: qparams[a] for a in missing} if recipe.compensate_activations else {}, shifts, {a: r[0] for a, r in right.items()},
                                     dynamic=dynamic)
        with stages.stage("quantized-input Gram matrices", total=images) as tick:
            stream_activations(work, missing, batches, obs, threads=recipe.calibration_threads, progress=_both(tick, progress))
        for a in missing:
            target = obs.qx.pop(a, None)
            grams[a] = (obs.qq.pop(a), _split_columns(target, right[a][1]) if a in right else target)
        del obs
    return _GptqInputs(
        hessians={a: grams[a][0] for a in acts},
        targets={a: grams[a][1] for a in acts} if recipe.compensate_activations else None,
        key=(key, "gptq", recipe.reduce_range, recipe.per_channel, recipe.gptq_damp, recipe.compensate_activations, dynamic),
        passes=int(bool(missing)),
    )


def _flat_grams(grams: dict) -> dict[str, np.ndarray]:
    """Every array of a quantized-gram memo entry (act -> (Q^T Q, target array | {linear: array} | None)), keyed by
    position: "i" for the i-th act's Q^T Q, "i.t" for its target, "i.j" for its j-th linear's target."""
    flat: dict[str, np.ndarray] = {}
    for i, (qq, target) in enumerate(grams.values()):
        flat[f"{i}"] = qq
        if isinstance(target, dict):
            flat.update({f"{i}.{j}": t for j, t in enumerate(target.values())})
        elif target is not None:
            flat[f"{i}.t"] = target
    return flat


class SpilledQuantizedGrams(dict):
    """A quantized-input Gram memo entry (act -> (Q^T Q, target)) whose arrays wait in memory-mapped files
    (calibration.SpilledArrays), removed with the entry. New entries (``_gptq_inputs`` adding acts) stay in memory."""

    def __init__(self, grams: dict):
        super().__init__()
        from .calibration import SpilledArrays

        self.files = SpilledArrays(_flat_grams(grams), prefix="vitexport-qgrams-")
        for i, (act, (_, target)) in enumerate(grams.items()):
            t = {lin: self.files[f"{i}.{j}"] for j, lin in enumerate(target)} if isinstance(target, dict) else None if target is None else self.files[f"{i}.t"]
            self[act] = (self.files[f"{i}"], t)


def spill_quantized_grams(grams: dict, min_bytes: int) -> dict:
    """``grams`` (a quantized-gram memo entry) on disk when its arrays take at least ``min_bytes``; unchanged when
    smaller, already spilled, or the temporary folder cannot take them."""
    if isinstance(grams, SpilledQuantizedGrams) or sum(a.nbytes for a in _flat_grams(grams).values()) < min_bytes:
        return grams
    try:
        return SpilledQuantizedGrams(grams)
    except OSError:  # no room in the temporary folder: keep them in memory
        return grams


def _summary(recipe: Int8Recipe, sel: _Selection, records: list[dict], groups: list[SmoothGroup], calibration: dict[str, Any], fallback: list[dict], kl_total: float) -> dict[str, Any]:
    summary = {
        "kind": "static int8 QDQ (ViT-aware)",
        "format": "QDQ",
        "recipe": dataclasses.asdict(recipe),
        "calibration": calibration,
        "activations": "int8 symmetric (zero point 0)" if recipe.symmetric_activations else "uint8 asymmetric",
        "weights": f"int8 symmetric per-{'channel' if recipe.per_channel else 'tensor'}" + (" (7-bit, reduce_range)" if recipe.reduce_range else ""),
        "smoothquant": {
            "alpha": recipe.smoothquant_alpha if groups else None,
            "tensors": [{"activation": g.activation, "via": g.kind, "consumers": [l.node.name for l in g.consumers]} for g in groups],
        },
        "sensitivity_fallback": {"budget": recipe.fallback_budget, "min_kl": recipe.fallback_min_kl, "images": recipe.fallback_images, "kl_all_inputs": round(kl_total, 6), "kept_float": fallback},
        "quantized": records,
        "float": sel.skipped,
        "counts": {"linears": len(sel.linears), "quantized": len(records), "float": len(sel.skipped)},
        "kept_float_ops": "attention matmuls, Softmax, LayerNormalization, GELU, residual Add, patch-embedding Conv",
    }
    summary["recipe"]["roles"] = list(summary["recipe"]["roles"])
    summary["recipe"]["keep_float"] = list(recipe.keep_float)
    return summary


def quantize_int8(
    model: onnx.ModelProto,
    batches: Callable[[], Iterable[np.ndarray]],
    recipe: Int8Recipe = Int8Recipe(),
    progress: Callable[[int], None] | None = None,
    stats: "FloatStats | None" = None,
    memo: Memo | None = None,
    stages: "Stages | None" = None,
    owned: bool = False, cache_dir: str | None = None,
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Static int8 QDQ model from the float ``model`` (unchanged) and calibration ``batches`` (a callable returning a
    fresh iterable of float32 NCHW arrays each call). Returns (quantized model, JSON-able summary).

    ``stats``: the build's float statistics of ``model`` (calibration.collect_float_stats over the same images), so
    this recipe runs no float pass of its own; ``memo(key, compute)``: a per-build store (Calibration.memo) through
    which recipes that share their smoothing and ranges (ONNX Runtime's and OpenVINO's) share their sensitivity
    scores, quantized-input Gram matrices and GPTQ codes; ``stages`` times each step with its own progress bar.
    ``owned``: the caller hands ``model`` over (a fresh load), so it is rewritten in place instead of copied;
    ``cache_dir``: where the sensitivity scores are kept between builds (quantization/cache.py)."""
    from ..progress import stages_of

    stages = stages_of(stages)
    memo = memo or _no_memo
    work = model if owned else onnx.ModelProto()
    if not owned:
        work.CopyFrom(model)
    sel = _Selection.of(work, recipe)
    acts = sel.acts
    given = stats
    stats = _own_float_stats(work, acts, batches, recipe, stats, stages, progress)
    passes = int(stats is not given)
    images = stats.images if stats is not None else 0
    groups: list[SmoothGroup] = []
    if recipe.smoothquant_alpha and acts:
        del model  # with ``owned`` the caller's model is ``work``; _smoothed may replace it with a compact copy
        work, sel, groups = _smoothed(work, sel, stats, recipe, owned)
    ranges: dict[str, tuple[float, float]] = {}
    if acts:
        ranges, n = _activation_ranges(work, acts, batches, recipe, stats, {g.activation: g.scales for g in groups}, stages, progress)
        passes += n
    fallback, kl_total = _fallback(work, sel, ranges, recipe, batches, memo, stages, cache_dir) if acts and recipe.fallback_budget > 0 else ([], 0.0)
    if fallback:
        sel = sel.without(fallback)
    gptq = _gptq_inputs(work, sel.chosen, ranges, recipe, batches, memo, images, stages, progress, stats, {g.activation: g.scales for g in groups}) if recipe.weight_rounding == "gptq" and sel.acts else None
    passes += gptq.passes if gptq else 0
    with stages.stage("GPTQ and QDQ rewrite" if gptq else "QDQ rewrite", total=len(sel.chosen), unit="linear") as tick:
        code_memo = (lambda k, f, key=gptq.key: memo((key, k), f)) if gptq else None
        records = insert_qdq(work, sel.chosen, ranges, recipe, gptq.hessians if gptq else None, gptq.targets if gptq else None, memo=code_memo, progress=tick)
    del gptq
    # SmoothQuant and the weight rewrite leave the original float weights and LayerNorm parameters unused
    drop_unused_constants(work)
    onnx.checker.check_model(work) if work.ByteSize() < 2**31 - 1 else None
    calibration = {
        "method": recipe.calibration,
        "images": images,
        "passes": passes,  # this recipe's own passes; the build's float statistics and shared passes not counted
        "streaming": True,
        "float_statistics": "the build's shared pass" if given is not None and stats is given else "own pass",
    }
    return work, _summary(recipe, sel, records, groups, calibration, fallback, kl_total)
