"""quantization/unread_rows.py: the last block's rows no output reads are dropped, and nothing else changes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from vitexport.quantization.unread_rows import drop_unread_rows


def _run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def _rows_graph(reads, extra: str | None = None) -> onnx.ModelProto:
    """x [B, 5, 4] -> LayerNorm -> MatMul -> Add x (residual) [-> ``extra``] -> one Gather per index in ``reads``."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "gamma"),
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "beta"),
        numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal((1, 5, 4)).astype(np.float32), "per_row"),
    ]
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["ln"], axis=-1)]
    if extra == "decomposed_ln":  # LayerNorm as opsets before 17 write it: reductions over the channels only
        inits += [numpy_helper.from_array(np.array([-1], np.int64), "last"), numpy_helper.from_array(np.array(1e-5, np.float32), "eps")]
        nodes = [
            helper.make_node("ReduceMean", ["x", "last"], ["mu"]), helper.make_node("Sub", ["x", "mu"], ["xc"]),
            helper.make_node("Mul", ["xc", "xc"], ["sq"]), helper.make_node("ReduceMean", ["sq", "last"], ["var"]),
            helper.make_node("Add", ["var", "eps"], ["ve"]), helper.make_node("Sqrt", ["ve"], ["sd"]),
            helper.make_node("Div", ["xc", "sd"], ["xn"]), helper.make_node("Mul", ["xn", "gamma"], ["xg"]),
            helper.make_node("Add", ["xg", "beta"], ["ln"]),
        ]
    nodes += [
        helper.make_node("MatMul", ["ln", "w"], ["mm"]),
        helper.make_node("Add", ["mm", "x"], ["res"]),
    ]
    last = "res"
    if extra == "per_row_add":  # a constant that differs by row (a position embedding): row i still reads row i
        nodes.append(helper.make_node("Add", ["res", "per_row"], ["pr"]))
        last = "pr"
    if extra == "mix_rows":  # every row reads the mean of all rows: the MatMul before it must see them all
        inits.append(numpy_helper.from_array(np.array([1], np.int64), "axis1"))
        nodes += [helper.make_node("ReduceMean", ["res", "axis1"], ["mean"], keepdims=1), helper.make_node("Add", ["res", "mean"], ["mixed"])]
        last = "mixed"
    outputs = []
    for k, i in enumerate(reads):
        inits.append(numpy_helper.from_array(np.array(i, np.int64), f"i{k}"))
        nodes.append(helper.make_node("Gather", [last, f"i{k}"], [f"y{k}"], axis=1))
        outputs.append(helper.make_tensor_value_info(f"y{k}", TensorProto.FLOAT, ["batch", 4]))
    graph = helper.make_graph(nodes, "rows", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 5, 4])], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("reads, kept, extra", [((0,), 1, None), ((0, 1), 2, None), ((2,), 3, None), ((0,), 1, "per_row_add"), ((0,), 1, "decomposed_ln")])
def test_keeps_the_leading_rows_read_and_the_outputs(reads, kept, extra):
    m = _rows_graph(reads, extra)
    x = np.random.default_rng(1).standard_normal((3, 5, 4)).astype(np.float32)
    before = _run(m, {"x": x})
    done = drop_unread_rows(m)
    assert done is not None and done.read == kept and done.rows == 5 and done.matmuls == 1 and done.nodes >= (11 if extra == "decomposed_ln" else 3)
    assert set(done.sliced) == ({"x", "per_row"} if extra == "per_row_add" else {"x"})
    onnx.checker.check_model(m, full_check=True)
    assert "x" not in {i for n in m.graph.node if n.op_type != "Slice" for i in n.input}  # all of it reads the slice
    for a, b in zip(before, _run(m, {"x": x})):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("reads, extra", [((-1,), None), ((0,), "mix_rows")])
def test_leaves_graphs_it_cannot_prove_alone(reads, extra):
    """A read from the end, or an op mixing rows between the MatMul and the read: the graph is left as it is."""
    m = _rows_graph(reads, extra)
    before = m.SerializeToString()
    assert drop_unread_rows(m) is None
    assert m.SerializeToString() == before


def test_reference_of_a_tiny_vit_same_logits_bit_for_bit(reference):
    m = onnx.load(str(reference.path))
    x = np.random.default_rng(2).standard_normal((4, 3, 32, 32)).astype(np.float32)
    before = _run(m, {"pixel_values": x})[0]
    done = drop_unread_rows(m)
    # 32x32 at patch 8: 16 patches and the class token; the classifier reads the class token only
    assert done is not None and (done.read, done.rows, done.matmuls) == (1, 17, 3) and len(done.sliced) == 2
    np.testing.assert_array_equal(before, _run(m, {"pixel_values": x})[0])


def test_every_onnx_artifact_runs_on_the_read_rows(reference, calibration, tmp_path):
    """fp32 is the reference's logits bit for bit; int8's run-time ranges now span the read rows only."""
    from vitexport.backends import get

    x = np.random.default_rng(3).standard_normal((8, 3, 32, 32)).astype(np.float32)
    ref = _run(onnx.load(str(reference.path)), {"pixel_values": x})[0]
    for precision in ("fp32", "int8", "int4"):
        art = get("onnxruntime").build(reference, calibration, precision, {}, tmp_path / precision)
        rows = art.manifest["recipe"]["read_rows"]
        assert (rows["rows_read"], rows["rows"], rows["matmuls_on_read_rows"]) == (1, 17, 3), precision
        out = _run(onnx.load(str(art.path)), {"pixel_values": x})[0]
        if precision == "fp32":
            np.testing.assert_array_equal(out, ref)
        else:
            cos = (out * ref).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(ref, axis=1)
            assert cos.min() > 0.98, (precision, cos)


def test_search_scores_unchanged_by_the_pruned_tails(reference, monkeypatch):
    """The sensitivity search runs each block's tail on the read rows: the same scores in exact arithmetic."""
    from vitexport.quantization import fallback
    from vitexport.quantization.graph import find_linears
    from vitexport.quantization.int8 import activation_qparams, quantize_weight

    model = onnx.load(str(reference.path))
    groups: dict = {}
    for l in find_linears(model):
        if l.role in ("qkv", "attn_out", "fc1", "fc2"):
            groups.setdefault(l.activation, []).append(l)
    x = np.random.default_rng(4).standard_normal((8, 3, 32, 32)).astype(np.float32)

    def act_qdq(act):
        scale, zp = activation_qparams(-3.0, 3.0, False)
        return scale, zp, 0.0

    def codes(l, w):
        q, s = quantize_weight(w, 1, reduce_range=False)
        return q.astype(np.float32) * s

    calls = []
    real = fallback.drop_unread_rows
    monkeypatch.setattr(fallback, "drop_unread_rows", lambda m: calls.append(real(m)))
    pruned = fallback.score_candidates(model, x, groups, act_qdq, codes, batch=4)
    assert calls and all(c is not None for c in calls)
    monkeypatch.setattr(fallback, "drop_unread_rows", lambda m: None)
    full = fallback.score_candidates(model, x, groups, act_qdq, codes, batch=4)
    assert set(pruned) == set(full) == set(groups)
    for act in groups:
        assert pruned[act] == pytest.approx(full[act], rel=1e-3, abs=1e-9), act


def test_stock_dynamic_int8_graph_drops_as_much(reference, tmp_path):
    """onnxruntime's quantize_dynamic multiplies DynamicQuantizeLinear's scale by the weight's beside the rows: that
    scale arithmetic joins the part, so the stock graph loses the same three MatMuls' unread rows as ours
    (benchmarks/unread_rows.py measures both)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(reference.path), str(tmp_path / "stock.onnx"), weight_type=QuantType.QInt8)
    m = onnx.load(str(tmp_path / "stock.onnx"))
    x = np.random.default_rng(5).standard_normal((1, 3, 32, 32)).astype(np.float32)
    before = _run(m, {"pixel_values": x})[0]
    done = drop_unread_rows(m)
    assert done is not None and done.matmuls == 3 and len(done.sliced) == 2
    after = _run(m, {"pixel_values": x})[0]
    assert float((before * after).sum() / np.linalg.norm(before) / np.linalg.norm(after)) > 0.99


def test_reference_writes_its_read_rows_graph_once_and_refuses_a_wrong_one(reference, tmp_path, monkeypatch):
    """export_reference writes the sliced graph beside the reference (every fp32/fp16 artifact copies or converts
    it); a sliced graph whose logits differ from the reference's is not written, and the artifacts keep every row."""
    from vitexport.export import write_read_rows
    from vitexport.quantization import unread_rows

    assert reference.read_rows_path is not None and reference.read_rows_path.is_file()
    assert reference.read_rows["matmuls_on_read_rows"] == 3 and reference.read_rows["relative_diff_to_reference"] <= 1e-5
    x = np.random.default_rng(6).standard_normal((2, 3, 32, 32)).astype(np.float32)

    def wrong(model):  # slices as the pass does, then breaks the head's bias
        done = real(model)
        head = next(t for t in model.graph.initializer if tuple(t.dims) == (4,))  # the 4-label head's bias
        head.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(head) + 1.0).astype(np.float32), head.name))
        return done

    real = unread_rows.drop_unread_rows
    monkeypatch.setattr(unread_rows, "drop_unread_rows", wrong)
    path, why = write_read_rows(reference.path, tmp_path / "rows.onnx", x)
    assert path is None and "differed" in why["why"] and not (tmp_path / "rows.onnx").exists()
