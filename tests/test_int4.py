"""Int4 block-wise weight-only quantization to MatMulNBits: packing checked against onnxruntime itself, the block
size policy, the graph rewrite, GPTQ vs round-to-nearest, and the real DeiT-tiny's agreement with fp32."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from vitexport.quantization.graph import find_linears
from vitexport.quantization.int4 import (
    Int4Recipe,
    choose_block_size,
    pack_matmulnbits,
    quantize_gptq,
    quantize_int4,
    quantize_rtn,
    unpack_matmulnbits,
)

REPO = Path(__file__).resolve().parent.parent
DEIT_DIR = REPO.parent / "shared" / "models" / "deit-tiny-patch16-224"
SAMPLES = REPO.parent / "shared" / "imagenet-samples"


def _session(model: onnx.ModelProto | bytes) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def _export(model, x, path: Path) -> onnx.ModelProto:
    import torch

    torch.onnx.export(
        model, (x,), str(path), dynamo=True, opset_version=18, input_names=["pixel_values"], output_names=["logits"],
        dynamic_shapes={"pixel_values": {0: torch.export.Dim("batch", min=1, max=1024)}}, optimize=True,
    )
    return onnx.load(str(path))


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory) -> onnx.ModelProto:
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
                    patch_size=8, num_labels=10, attn_implementation="eager")
    m = ViTForImageClassification(cfg).eval()
    return _export(m, torch.randn(2, 3, 32, 32), tmp_path_factory.mktemp("tiny_int4") / "tiny.onnx")


def _tiny_batches(n: int = 24, bs: int = 8, seed: int = 0):
    x = np.random.default_rng(seed).standard_normal((n, 3, 32, 32)).astype(np.float32)
    return lambda: (x[i : i + bs] for i in range(0, n, bs))


def _single_matmul(w_kn: np.ndarray) -> onnx.ModelProto:
    k, n = w_kn.shape
    g = helper.make_graph(
        [helper.make_node("MatMul", ["A", "W"], ["Y"])], "mm",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, n])],
        [numpy_helper.from_array(w_kn.astype(np.float32), "W")],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


def _matmulnbits_model(b, scales, zp, k, n, block, bias=None) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(b, "B"), numpy_helper.from_array(scales, "S")]
    inputs = ["A", "B", "S", ""]
    if zp is not None:
        inits.append(numpy_helper.from_array(zp, "Z"))
        inputs[3] = "Z"
    if bias is not None:
        inits.append(numpy_helper.from_array(bias, "bias"))
        inputs += ["", "bias"]
    while inputs[-1] == "":
        inputs.pop()
    node = helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", K=k, N=n, bits=4, block_size=block)
    g = helper.make_graph([node], "q4", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, k])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, n])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])


# ------------------------------------------------------------------------------------------------------------ format


@pytest.mark.parametrize("k,n,block,symmetric", [(96, 40, 32, False), (96, 40, 32, True), (80, 24, 32, False), (192, 16, 64, False), (128, 8, 16, True)])
def test_packing_matches_dequantized_float_matmul_in_onnxruntime(k, n, block, symmetric):
    rng = np.random.default_rng(k + n + block)
    w = rng.standard_normal((k, n)).astype(np.float32)  # MatMul layout [K, N]
    bias = rng.standard_normal(n).astype(np.float32)
    qw = quantize_rtn(w.T, block, Int4Recipe(method="rtn", symmetric=symmetric, clip_search=False))
    b, scales, zp = pack_matmulnbits(qw, symmetric)
    assert b.shape == (n, -(-k // block), block // 2) and b.dtype == np.uint8
    assert scales.shape == (n * -(-k // block),) and (zp is None) == symmetric
    deq = unpack_matmulnbits(b, scales, zp, k, n, block)
    np.testing.assert_array_equal(deq, qw.dequantize().T)
    assert np.abs(deq - w).max() < np.abs(w).max() / 7  # it is the weight, not noise

    a = rng.standard_normal((5, k)).astype(np.float32)
    got = _session(_matmulnbits_model(b, scales, zp, k, n, block, bias)).run(None, {"A": a})[0]
    want = _session(_single_matmul(deq)).run(None, {"A": a})[0] + bias
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_reads_onnxruntime_quantizer_output_and_agrees_with_its_rtn():
    """onnxruntime's own MatMulNBits quantizer (RTN, asymmetric, block 32): our unpacking reproduces its kernel's
    output, and our RTN picks the same codes for (nearly) every weight."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    k, n, block = 128, 48, 32
    rng = np.random.default_rng(7)
    w = rng.standard_normal((k, n)).astype(np.float32)
    q = MatMulNBitsQuantizer(_single_matmul(w), algo_config=DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=False))
    q.process()
    model = q.model.model
    node = next(nd for nd in model.graph.node if nd.op_type == "MatMulNBits")
    attrs = {a.name: a.i for a in node.attribute}
    assert (attrs["K"], attrs["N"], attrs["block_size"], attrs["bits"]) == (k, n, block, 4)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    b, s, z = (inits[node.input[i]] for i in (1, 2, 3))
    deq = unpack_matmulnbits(b, s, z, k, n, block)
    a = rng.standard_normal((4, k)).astype(np.float32)
    np.testing.assert_allclose(_session(model).run(None, {"A": a})[0], a @ deq, rtol=1e-4, atol=1e-4)

    mine = quantize_rtn(w.T, block, Int4Recipe(method="rtn", clip_search=False))
    b2, s2, z2 = pack_matmulnbits(mine, symmetric=False)
    assert b2.shape == b.shape and z2.shape == z.reshape(-1).shape
    np.testing.assert_allclose(s2, s.reshape(-1), rtol=1e-6)  # same scales (to float rounding)
    assert np.mean(b2 == b) > 0.99 and np.mean(z2 == z.reshape(-1)) > 0.99  # same packed codes and zero points


# ------------------------------------------------------------------------------------------------------------ policy


def test_block_size_policy():
    prefs = (128, 64, 32)
    assert choose_block_size(192, prefs) == 64  # 192 is not a multiple of 128
    assert choose_block_size(768, prefs) == 128 and choose_block_size(3072, prefs) == 128
    assert choose_block_size(96, prefs) == 32 and choose_block_size(100, prefs) == 32  # no divisor: smallest, padded
    assert choose_block_size(192, Int4Recipe().block_sizes) in (16, 32, 64)
    assert all(192 % b == 0 and 768 % b == 0 for b in Int4Recipe().block_sizes)
    with pytest.raises(ValueError):
        Int4Recipe(block_sizes=(48,))
    with pytest.raises(ValueError):
        Int4Recipe(method="awq-ish")


def test_deit_shaped_matrix_never_gets_block_128():
    rng = np.random.default_rng(0)
    qw = quantize_rtn(rng.standard_normal((16, 192)), choose_block_size(192, (128, 64, 32)))
    assert qw.block_size == 64 and qw.scales.shape == (16, 3)


# ------------------------------------------------------------------------------------------------------------ rewrite


def test_every_target_matmul_replaced_and_output_close(tiny_onnx):
    before = tiny_onnx.SerializeToString()
    q, summary = quantize_int4(tiny_onnx, _tiny_batches(), Int4Recipe())
    assert tiny_onnx.SerializeToString() == before  # input untouched

    onnx.checker.check_model(q)
    nodes = [n for n in q.graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == 2 * 6 and all(n.domain == "com.microsoft" for n in nodes)
    left = find_linears(q)
    assert [l.op_type for l in left] == ["Gemm"]  # only the classifier stays float
    assert summary["quantized"] == 12 and summary["calibration_images"] == 24
    assert {d["role"] for d in summary["kept_float"]} == {"head"}
    assert set(summary["block_sizes"]) == {"qkv", "attn_out", "fc1", "fc2"}
    for n in nodes:
        a = {x.name: x.i for x in n.attribute}
        assert a["K"] % a["block_size"] == 0 and a["bits"] == 4
        assert len(n.input) == 6 and n.input[5]  # bias folded in
    json.dumps(summary)
    # no stale float weights left in the file
    assert sum(numpy_helper.to_array(t).size for t in q.graph.initializer if t.data_type == TensorProto.FLOAT) < 0.5 * sum(
        numpy_helper.to_array(t).size for t in tiny_onnx.graph.initializer if t.data_type == TensorProto.FLOAT)

    x = np.random.default_rng(5).standard_normal((6, 3, 32, 32)).astype(np.float32)
    ref = _session(tiny_onnx).run(None, {"pixel_values": x})[0]
    out = _session(q).run(None, {"pixel_values": x})[0]
    assert out.shape == ref.shape
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 0.15


def test_keep_float_and_head_role(tiny_onnx):
    q, summary = quantize_int4(tiny_onnx, None, Int4Recipe(method="rtn", roles=("qkv", "fc1", "fc2", "head"), keep_float=("1:fc2",), fold_bias=False))
    count = lambda m, op: sum(n.op_type == op for n in m.graph.node)  # noqa: E731
    assert count(q, "Add") == count(tiny_onnx, "Add")  # bias Adds kept
    left = find_linears(q)
    assert sorted(l.op_type for l in left) == ["MatMul"] * 3  # head went int4 (no Gemm left)
    assert sum(n.op_type == "Gemm" for n in q.graph.node) == 0
    assert sorted(d["role"] for d in summary["kept_float"]) == ["attn_out", "attn_out", "fc2"]  # block 1's fc2 kept
    assert summary["quantized"] == 2 * 5 - 1 + 1  # q,k,v,fc1,fc2 per block, minus 1:fc2, plus the head
    x = np.random.default_rng(1).standard_normal((3, 3, 32, 32)).astype(np.float32)
    ref = _session(tiny_onnx).run(None, {"pixel_values": x})[0]
    out = _session(q).run(None, {"pixel_values": x})[0]
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 0.2


def test_sequential_gptq_calibrates_block_by_block(tiny_onnx):
    q, summary = quantize_int4(tiny_onnx, _tiny_batches(), Int4Recipe(sequential=True))
    assert summary["calibration_passes"] == 2 and summary["quantized"] == 12 and summary["calibration_images"] == 24
    assert [(d["role"], d["block"]) for d in summary["layers"]][-3:] == [("attn_out", 1), ("fc1", 1), ("fc2", 1)]
    assert sum(n.op_type == "MatMulNBits" for n in q.graph.node) == 12


def test_gptq_beats_rtn_on_a_layer():
    """Correlated inputs (like LayerNorm outputs): GPTQ's output error is well below round-to-nearest's."""
    rng = np.random.default_rng(3)
    k, n = 128, 64
    x = rng.standard_normal((2000, k)) @ (np.eye(k) + 0.3 * rng.standard_normal((k, k))) * rng.uniform(0.2, 3, k)
    w = rng.standard_normal((n, k))
    h = x.T @ x
    for sym in (False, True):
        r = Int4Recipe(symmetric=sym)
        err_rtn = np.linalg.norm(x @ (quantize_rtn(w, 32, r).dequantize() - w).T)
        err_gptq = np.linalg.norm(x @ (quantize_gptq(w, h, 32, r).dequantize() - w).T)
        assert err_gptq < 0.8 * err_rtn


def test_gptq_blocks_are_the_textbook_loop_bit_for_bit():
    """int4 GPTQ through gptq_round's two-level updates gives exactly the codes, scales and zero points of the plain
    column loop (each block's clip search on its columns as updated so far): the published figures' rounding."""
    from vitexport.quantization.gptq import damped_inverse_factor
    from vitexport.quantization.int4 import _fake_quant, _search_params

    rng = np.random.default_rng(5)
    k, n = 256, 48
    x = rng.standard_normal((3000, k)) @ (np.eye(k) + 0.3 * rng.standard_normal((k, k))) * rng.uniform(0.2, 3, k)
    w, h = rng.standard_normal((n, k)) * 0.05, x.T @ x

    def textbook(w, block, recipe):
        u, _ = damped_inverse_factor(h, recipe.damp)
        hd = np.diag(h) + recipe.damp * float(np.mean(np.diag(h)))
        w, codes, scales, zps = w.copy(), np.empty((n, k)), [], []
        for c in range(k):
            if c % block == 0:
                scale, zp = _search_params(w[:, c : c + block], hd[c : c + block], recipe)
                scale = scale.astype(np.float32).astype(np.float64)
                scales.append(scale), zps.append(zp)
            codes[:, c], deq = _fake_quant(w[:, c], scale, zp)
            w[:, c:] -= np.outer((w[:, c] - deq) / u[c, c], u[c, c:])
        return codes, np.stack(scales, 1), np.stack(zps, 1)

    for block, sym, lazy in ((32, False, 32), (64, True, 128), (16, False, 64)):
        recipe = Int4Recipe(symmetric=sym, lazy_columns=lazy)
        got = quantize_gptq(w, h, block, recipe)
        codes, scales, zps = textbook(w, block, recipe)
        assert np.array_equal(got.codes, codes) and np.array_equal(got.scales, scales.astype(np.float32)) and np.array_equal(got.zero_points, zps)


def test_clip_search_is_the_per_candidate_fake_quantization():
    from vitexport.quantization.int4 import _block_params, _fake_quant, _search_params

    rng = np.random.default_rng(6)
    w, hd = rng.standard_normal((40, 32)) * 0.05, rng.uniform(0.1, 3, 32)
    w[0] = 0.0  # a dead row: scale 1
    for sym in (False, True):
        recipe = Int4Recipe(symmetric=sym)
        errs = [(((w - _fake_quant(w, *_block_params(w, sym, r))[1]) ** 2) @ hd, _block_params(w, sym, r)) for r in recipe.clip_grid]
        best = np.argmin(np.stack([e for e, _ in errs]), axis=0)  # the first of equal errors, as the search keeps
        scale, zp = _search_params(w, hd, recipe)
        assert np.array_equal(scale, [errs[b][1][0][i] for i, b in enumerate(best)])
        assert np.array_equal(zp, [errs[b][1][1][i] for i, b in enumerate(best)])


def test_gptq_beats_rtn_on_the_tiny_vit(tiny_onnx):
    x = np.random.default_rng(9).standard_normal((16, 3, 32, 32)).astype(np.float32)
    ref = _session(tiny_onnx).run(None, {"pixel_values": x})[0]
    errs = {}
    for method in ("rtn", "gptq"):
        q, _ = quantize_int4(tiny_onnx, _tiny_batches(48), Int4Recipe(method=method, clip_search=False))
        errs[method] = float(np.mean((_session(q).run(None, {"pixel_values": x})[0] - ref) ** 2))
    assert errs["gptq"] < errs["rtn"]


# ------------------------------------------------------------------------------------------------------------ real model


@pytest.mark.skipif(not (DEIT_DIR / "model.safetensors").exists() or not SAMPLES.is_dir(), reason="shared DeiT-tiny not present")
def test_deit_tiny_int4_agrees_with_fp32(tmp_path):
    """GPTQ int4 on the real DeiT-tiny: >= 92% top-1 agreement with fp32 on held-out ImageNet samples."""
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, ViTForImageClassification

    files = sorted(p for p in SAMPLES.iterdir() if p.suffix == ".JPEG")
    calib_files, eval_files = files[1::8], files[0::4][:100]  # disjoint: odd positions vs multiples of 4
    proc = AutoImageProcessor.from_pretrained(DEIT_DIR)

    def load(paths):
        return proc(images=[Image.open(p).convert("RGB") for p in paths], return_tensors="np")["pixel_values"].astype(np.float32)

    calib, evals = load(calib_files), load(eval_files)
    torch.manual_seed(0)
    m = ViTForImageClassification.from_pretrained(DEIT_DIR, attn_implementation="eager").eval()
    fp32 = _export(m, torch.from_numpy(evals[:2]), tmp_path / "deit.onnx")
    q, summary = quantize_int4(fp32, lambda: (calib[i : i + 16] for i in range(0, len(calib), 16)))
    assert summary["calibration_images"] == len(calib) and summary["quantized"] == 72

    def run(model):
        s = _session(model)
        return np.concatenate([s.run(None, {"pixel_values": evals[i : i + 25]})[0] for i in range(0, len(evals), 25)])

    ref, out = run(fp32), run(q)
    agreement = float(np.mean(ref.argmax(1) == out.argmax(1)))
    assert agreement >= 0.92, f"int4 top-1 agreement {agreement:.3f}"


def test_one_build_runs_gptq_int4_once_for_every_backend(tiny_vit, calib_folder, tmp_path, monkeypatch):
    """ONNX Runtime, OpenVINO and CoreML int4 use the same core recipe: calibrated once, each gets its own copy."""
    pytest.importorskip("openvino")
    from vitexport.api import BuildOptions, build
    from vitexport.quantization import int4

    calls = []
    real = int4.quantize_int4

    def counting(*a, **k):
        calls.append(a[2])
        return real(*a, **k)

    monkeypatch.setattr(int4, "quantize_int4", counting)
    out = tmp_path / "dist"
    build(BuildOptions(model=str(tiny_vit), backend="onnxruntime,openvino", precisions=("int4",), calib=str(calib_folder), out=str(out), latency=False))
    assert len(calls) == 1
    layers = [json.loads((out / d / "manifest.json").read_text())["recipe"]["layers"] for d in ("onnxruntime-int4", "openvino-int4")]
    assert layers[0] == layers[1] and layers[0]


def test_shared_results_are_copies():
    from vitexport.backends import Calibration

    cal = Calibration(batches=lambda: iter(()), count=0, source="none")
    runs = []
    first = cal.shared(("k", 1), lambda: runs.append(1) or {"a": [1]})
    first["a"].append(2)
    assert cal.shared(("k", 1), lambda: runs.append(1) or {"a": []}) == {"a": [1]} and len(runs) == 1
    assert cal.shared(("k", 2), lambda: {"b": 0}) == {"b": 0}  # another key is another computation
