"""GPTQ codes for CoreML: the core recipes' rounding (int8 per channel, int4 block-wise, 4-bit palettes), computed on
the reference ONNX and handed to coremltools exactly through its torch compression metadata (``_COREML_/...``
buffers), so the package holds vitexport's codes rather than a re-rounding."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ...errors import VitexportError
from .. import recipe_from, recipe_overrides, shared_int4
from .settings import CoreMLOptions


def _linear_hessians(reference, calibration, names: dict[str, tuple[str, bool]], stages=None) -> tuple[Any, list, Any]:
    """(reference ONNX, its q/k/v/attn-out/fc1/fc2 linears, the build's shared float statistics: X^T X of each
    linear's input over the calibration images, and its inverse factors). ``names``: reference initializer -> torch
    parameter name (torch_weights.match_initializers, matched once per package)."""
    from ...quantization.graph import find_linears
    from .. import float_stats

    model = reference.load()
    linears = [l for l in find_linears(model) if l.role in ("qkv", "attn_out", "fc1", "fc2")]
    # the build's one float pass already holds X^T X of every linear input (int4 and the int8 recipes use it too)
    stats = float_stats(reference, calibration, stages)
    missing = [l.node.name for l in linears if l.weight not in names]
    if missing:
        raise VitexportError(f"coreml: cannot map {missing[0]} back to a torch weight")
    return model, linears, stats


def _attach_gptq_int8(head, reference, calibration, names: dict[str, tuple[str, bool]], stages=None) -> dict[str, Any]:
    """GPTQ-rounded symmetric per-channel int8 codes (the core int8 recipe's gptq_weight, full 8 bits: CoreML
    dequantizes weights, there is no integer accumulation to saturate), handed to coremltools exactly through
    ``_COREML_/weight/*`` buffers (compression_type 3 = quantization, 8 bits, scale [N, 1], no zero point)."""
    import torch

    from ...quantization.gptq import map_layers
    from ...quantization.graph import weight_nk
    from ...quantization.int8 import Int8Recipe, float_gram_codes_key, gptq_weight
    from .. import recipe_memo

    damp = Int8Recipe.gptq_damp  # the core int8 recipe's: the memo key matches TensorRT's codes
    t0 = time.perf_counter()
    model, linears, stats = _linear_hessians(reference, calibration, names, stages)
    params = dict(head.named_parameters())
    memo = recipe_memo(reference, calibration)  # TensorRT's recipe rounds the same unsmoothed layers the same way

    def rounded(l):
        w = weight_nk(model, l)
        key = ("codes", float_gram_codes_key(l.node.name, l.activation, w, None, False, damp))
        # the same content key as TensorRT's unsmoothed layers (int8._weight_codes), in the build and in --cache-dir
        return memo(key, lambda: stats.derived(key[1], lambda: gptq_weight(w, None, reduce_range=False, damp=damp, factor=lambda: stats.inverse_factor(l.activation, damp))))

    for l, (codes, scale) in map_layers(rounded, linears):  # layers on threads
        tname, _ = names[l.weight]
        mod_name, pname = tname.rsplit(".", 1)
        with torch.no_grad():
            params[tname].copy_(torch.from_numpy(codes.astype(np.float32) * scale[:, None]))
        mod = head.get_submodule(mod_name)
        mod.register_buffer(f"_COREML_/{pname}/compression_type", torch.tensor([3]))
        mod.register_buffer(f"_COREML_/{pname}/quantization_n_bits", torch.tensor(8))
        mod.register_buffer(f"_COREML_/{pname}/quantization_scale", torch.from_numpy(scale[:, None].copy()))
    return {"method": "GPTQ (vitexport.quantization.int8.gptq_weight), symmetric per-channel int8", "linears": len(linears),
            "roles": ["qkv", "attn_out", "fc1", "fc2"], "others": "coremltools linear_quantize_weights (round to nearest)",
            "calibration_images": calibration.count, "written_as": "torch compression metadata -> constexpr dequantize", "seconds": round(time.perf_counter() - t0, 2)}


def _attach_gptq_palette(head, reference, calibration, opts: CoreMLOptions, names: dict[str, tuple[str, bool]], stages=None) -> dict[str, Any]:
    """Palettize the linears with vitexport.quantization.palette and hand coremltools the exact palettes.

    coremltools' torch frontend turns ``_COREML_/weight/*`` buffers (compression_type 2 = palettization, ``lut``
    [N/group, 1, 16, 1]) into constexpr_lut_to_dense ops; the weight's values are already palette entries, so its
    index lookup is exact.
    """
    import torch

    from ...quantization.graph import weight_nk
    from ...quantization.gptq import map_layers
    from ...quantization.palette import PaletteRecipe, palettize_cached

    t0 = time.perf_counter()
    recipe = PaletteRecipe(group_size=opts.palette_group_size)
    model, linears, stats = _linear_hessians(reference, calibration, names, stages)
    params = dict(head.named_parameters())
    errors = []
    def palettized(l):
        w = weight_nk(model, l)  # [N, K]: torch Linear's own layout
        return (w, *palettize_cached(stats, l, w, recipe))

    for l, (w, q, lut) in map_layers(palettized, linears):  # layers on threads
        tname, _ = names[l.weight]
        errors.append(float(np.linalg.norm(q - w) / max(np.linalg.norm(w), 1e-30)))
        mod_name, pname = tname.rsplit(".", 1)
        with torch.no_grad():
            params[tname].copy_(torch.from_numpy(q))
        mod = head.get_submodule(mod_name)
        mod.register_buffer(f"_COREML_/{pname}/compression_type", torch.tensor([2]))
        mod.register_buffer(f"_COREML_/{pname}/lut", torch.from_numpy(lut[:, None, :, None].copy()))
    return {"method": "k-means palettes per group + GPTQ rounding", "group_size": recipe.group_size, "refine": recipe.refine, "damp": recipe.damp,
            "linears": len(linears), "roles": ["qkv", "attn_out", "fc1", "fc2"], "rel_weight_error_mean": round(float(np.mean(errors)), 5),
            "calibration_images": calibration.count, "written_as": "torch compression metadata -> constexpr_lut_to_dense", "seconds": round(time.perf_counter() - t0, 2)}


def _attach_gptq_int4(module, head, reference, calibration, options, opts: CoreMLOptions, names: dict[str, tuple[str, bool]], stages=None) -> dict[str, Any]:
    """Run the core's GPTQ int4 recipe on the reference ONNX and hand its exact codes to coremltools.

    coremltools' torch frontend turns ``_COREML_/weight/*`` buffers (compression_type 3 = quantization, n_bits,
    scale, zero point) into constexpr_blockwise_shift_scale ops: the package then holds GPTQ's codes, not a re-rounding.
    """
    import torch
    from onnx import numpy_helper

    from ...quantization.graph import find_linears
    from ...quantization.int4 import Int4Recipe, unpack_matmulnbits, unpack_zero_points

    raw = recipe_overrides(options, "coreml", "int4")
    raw.setdefault("block_sizes", (opts.int4_block_size,))
    recipe = recipe_from(Int4Recipe, raw)
    linears = {l.node.name: l for l in find_linears(reference.load())}
    qmodel, summary = shared_int4(reference, calibration, recipe, stages=stages)
    inits = {t.name: t for t in qmodel.graph.initializer}
    params = dict(head.named_parameters())
    done = 0
    for node in qmodel.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        src = linears.get(node.name.removesuffix("_Q4"))
        if src is None or src.weight not in names:
            raise VitexportError(f"coreml int4: cannot map {node.name} back to a torch weight")
        tname, _ = names[src.weight]
        at = {a.name: a.i for a in node.attribute}
        k, n, block = at["K"], at["N"], at["block_size"]
        b = numpy_helper.to_array(inits[node.input[1]])
        scales = numpy_helper.to_array(inits[node.input[2]]).astype(np.float32).reshape(n, -1)
        zp_packed = numpy_helper.to_array(inits[node.input[3]]) if len(node.input) > 3 and node.input[3] else None
        if k % block:
            raise VitexportError(f"coreml int4: K={k} is not a multiple of block {block}")
        w_kn = unpack_matmulnbits(b, scales, zp_packed, k, n, block)
        zp = unpack_zero_points(zp_packed, n, k // block)
        mod_name, pname = tname.rsplit(".", 1)
        mod = head.get_submodule(mod_name)
        with torch.no_grad():
            params[tname].copy_(torch.from_numpy(np.ascontiguousarray(w_kn.T)))
        mod.register_buffer(f"_COREML_/{pname}/compression_type", torch.tensor([3]))
        mod.register_buffer(f"_COREML_/{pname}/quantization_n_bits", torch.tensor(4))
        mod.register_buffer(f"_COREML_/{pname}/quantization_scale", torch.from_numpy(scales.copy()))
        mod.register_buffer(f"_COREML_/{pname}/zero_point", torch.from_numpy(zp))
        done += 1
    keep = ("method", "bits", "symmetric", "damp", "clip_search", "block_sizes", "quantized", "quantized_roles", "kept_float", "calibration_images", "total_s")
    return {**{k: summary[k] for k in keep if k in summary}, "written_as": "torch compression metadata -> constexpr_blockwise_shift_scale", "linears": done}
