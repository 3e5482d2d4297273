"""Float16 emulation: it must reproduce what float16 storage does to a graph, overflow included."""

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from vitexport.harness.emulation import round_to_float16


def _run(model, x):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _layernorm_graph(decomposed: bool):
    c = 16
    gamma = numpy_helper.from_array(np.ones(c, np.float32), "gamma")
    beta = numpy_helper.from_array(np.zeros(c, np.float32), "beta")
    eps = numpy_helper.from_array(np.array(1e-6, np.float32), "eps")
    if decomposed:  # what opset < 17 exporters emit
        nodes = [
            helper.make_node("ReduceMean", ["x"], ["mu"], axes=[-1], keepdims=1),
            helper.make_node("Sub", ["x", "mu"], ["d"]),
            helper.make_node("Mul", ["d", "d"], ["d2"]),
            helper.make_node("ReduceMean", ["d2"], ["var"], axes=[-1], keepdims=1),
            helper.make_node("Add", ["var", "eps"], ["ve"]),
            helper.make_node("Sqrt", ["ve"], ["sd"]),
            helper.make_node("Div", ["d", "sd"], ["n"]),
            helper.make_node("Mul", ["n", "gamma"], ["g"]),
            helper.make_node("Add", ["g", "beta"], ["y"]),
        ]
        opset = 13
    else:
        nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["y"], axis=-1, epsilon=1e-6)]
        opset = 17
    graph = helper.make_graph(
        nodes, "ln", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, c])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, c])], [gamma, beta, eps]
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_decomposed_layernorm_overflows_in_float16_and_the_one_op_does_not():
    """Residual-stream values of a few hundred square past 65504: the known fp16 collapse of a decomposed LayerNorm."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((2, 16)) * 400).astype(np.float32)
    exact = _run(_layernorm_graph(False), x)
    assert np.allclose(_run(_layernorm_graph(True), x), exact, atol=1e-4)  # same function in float32
    one_op = _run(round_to_float16(_layernorm_graph(False)), x)
    np.testing.assert_allclose(one_op, exact, atol=5e-3)  # float16 output rounding only
    broken = _run(round_to_float16(_layernorm_graph(True)), x)
    assert np.abs(broken - exact).max() > 0.5  # (x - mean)^2 is inf in float16: the normalised output collapses


def test_dequantized_tensors_and_scales_stay_float32():
    """TensorRT fuses DQ into its int8 GEMM: DQ outputs and Q/DQ scales are not rounded; other weights are."""
    w = numpy_helper.from_array(np.array([[1, -2], [3, 4]], np.int8), "w")
    scale = numpy_helper.from_array(np.array([0.1234567, 0.0001234567], np.float32), "s")
    zp = numpy_helper.from_array(np.zeros(2, np.int8), "z")
    bias = numpy_helper.from_array(np.array([0.1234567, 1e-5], np.float32), "b")
    nodes = [
        helper.make_node("DequantizeLinear", ["w", "s", "z"], ["wf"], axis=1),
        helper.make_node("MatMul", ["x", "wf"], ["m"]),
        helper.make_node("Add", ["m", "b"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "dq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], [w, scale, zp, bias])
    model = round_to_float16(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]), exact_ops=("DequantizeLinear",), weights=True)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert inits["s"].dtype == np.float32 and inits["s"][1] == np.float32(0.0001234567)  # not float16-rounded
    assert inits["b"][0] == np.float32(np.float16(0.1234567))  # a float weight is
    cast_inputs = {n.input[0] for n in model.graph.node if n.op_type == "Cast"}
    assert "wf__fp32" not in cast_inputs and "m__fp32" in cast_inputs and "y__fp32" in cast_inputs
    onnx.checker.check_model(model)


def test_shape_inference_without_weight_bytes_infers_the_same(reference, monkeypatch):
    """inferred_value_info (large initializers as typed inputs) gives every tensor the type and shape that
    onnx.shape_inference.infer_shapes gives it on the whole model, the Reshape shapes included."""
    from vitexport.quantization import graph

    model = onnx.load(str(reference.path))
    full = onnx.shape_inference.infer_shapes(model)
    want = {v.name: v.type for v in list(full.graph.value_info) + list(full.graph.output)}
    monkeypatch.setattr(graph, "SHAPE_ONLY_BYTES", 1024)  # the tiny ViT's 32x32 weights are 4 kB: strip them
    assert len(graph._shapes_only(model).graph.input) >= len(model.graph.input) + 12  # each block's six weight matrices
    got = {v.name: v.type for v in graph.inferred_value_info(model)}
    assert want and all(got.get(name) == t for name, t in want.items())
