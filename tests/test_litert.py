"""Android targets: LiteRT .tflite (built with litert-torch, run on ai-edge-litert's XNNPACK interpreter) and ONNX
Runtime Mobile .ort artifacts.

litert-torch cannot go into the project's shared test environment (it pins typing-extensions < 4.13 through xdsl,
which would downgrade typing-extensions and pydantic there). Where it is not importable, the LiteRT runtime tests
below skip, and ``test_litert_runtime_in_private_venv`` runs them in a private venv (system site packages plus
``vitexport[litert]``'s packages, installed from PyPI on first use and kept under the system temp folder).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from conftest import CALIB, EVAL, REPO

from vitexport.api import BuildOptions, build, load_target
from vitexport.artifacts import Artifact
from vitexport.errors import VitexportError

HAVE_LITERT = all(importlib.util.find_spec(m) is not None for m in ("litert_torch", "ai_edge_litert", "ai_edge_quantizer"))
needs_litert = pytest.mark.skipif(
    not HAVE_LITERT,
    reason="litert-torch is not in this environment (it would downgrade typing-extensions/pydantic here): "
    "test_litert_runtime_in_private_venv runs these tests in a private venv",
)
LITERT_SPEC = "litert-torch==0.10.*"  # keep in step with pyproject's [litert] extra
# what test_litert_runtime_in_private_venv runs there (pytest -k matches the module name too: name the tests)
LITERT_RUNTIME_TESTS = "rows_are_measured or fp32_matches or metadata_labels or gptq_codes or stock_int8 or static_int8 or litert_options or xnnpack_dynamic"


# ---------------------------------------------------------------------------------------- ONNX Runtime Mobile (.ort)


@pytest.fixture(scope="module")
def ort_mobile(tiny_vit, tmp_path_factory):
    out = tmp_path_factory.mktemp("ort-mobile") / "dist"
    report = build(BuildOptions(model=str(tiny_vit), backend="onnxruntime", precisions=("fp32", "int8"), calib=str(CALIB), eval=str(EVAL),
                                num_calib=8, num_eval=16, out=str(out), latency=False, options={"onnxruntime": {"mobile": True}}))
    return out, report


def test_ort_artifact_scores_the_same_as_its_onnx_source(ort_mobile):
    import onnxruntime as ort

    out, report = ort_mobile
    rows = {r.name: r for r in report.rows}
    x = np.random.default_rng(3).standard_normal((4, 3, 32, 32)).astype(np.float32)
    for p in ("fp32", "int8"):
        art = Artifact.load(out / f"onnxruntime-{p}")
        assert art.main == "model.ort" and art.path.suffix == ".ort"
        assert rows[f"onnxruntime-{p}"].path.endswith("model.ort")  # the report's row measured the .ort file
        a = ort.InferenceSession(str(art.directory / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"pixel_values": x})[0]
        b = ort.InferenceSession(str(art.path), providers=["CPUExecutionProvider"]).run(None, {"pixel_values": x})[0]
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)
        assert (a.argmax(1) == b.argmax(1)).all()
        # bit for bit the .onnx as ONNX Runtime runs it on ARM: the .ort is converted for target_platform arm, which
        # leaves out x86's NchwcTransformer (a blocked layout for the patch convolution) and allows int8 QDQ fusions
        so = ort.SessionOptions()
        so.add_session_config_entry("session.qdqisint8allowed", "1")
        arm = ort.InferenceSession(str(art.directory / "model.onnx"), so, providers=["CPUExecutionProvider"], disabled_optimizers=["NchwcTransformer"])
        np.testing.assert_array_equal(b, arm.run(None, {"pixel_values": x})[0])
    assert rows["onnxruntime-int8"].accuracy["agreement"] >= 0.9


def test_ort_artifact_has_reduced_build_config_and_usability_verdicts(ort_mobile):
    out, _ = ort_mobile
    art = Artifact.load(out / "onnxruntime-int8")
    mobile = art.manifest["recipe"]["mobile"]
    config = (art.directory / mobile["operators_config"]).read_text()
    assert "ai.onnx;" in config and "/tmp" not in config and str(out) not in config
    assert {"model.ort", "model.onnx", "required_operators.config", "mobile_usability.txt"} <= {f["path"] for f in art.manifest["files"]}
    use = mobile["usability"]
    assert use["exit_code"] == 0 and use["NNAPI"] and use["CoreML MLProgram"] and use["recommendation"]
    assert any("partitions" in line for line in use["NNAPI"])


def test_ort_mobile_bad_option_is_one_clear_error(tiny_vit, tmp_path):
    from vitexport.backends import recipe_from
    from vitexport.backends.onnxruntime import MobileOptions

    _mobile_options = lambda raw: recipe_from(MobileOptions, raw, "onnxruntime")  # noqa: E731

    with pytest.raises(VitexportError, match="unknown onnxruntime option"):
        _mobile_options({"mobil": True})
    with pytest.raises(VitexportError, match="optimization_style"):
        _mobile_options({"mobile": True, "optimization_style": "fast"})


def test_android_profiles():
    android = load_target("android")
    assert android["backend"] == "litert" and set(android["precisions"]) <= {"fp32", "fp16", "int8"}
    ort_mobile = load_target("android-ort")
    assert ort_mobile["backend"] == "onnxruntime" and ort_mobile["options"]["onnxruntime"]["mobile"] is True


# ---------------------------------------------------------------------------------------------- LiteRT, no runtime


def test_app_input_inverts_the_checkpoints_normalisation():
    from vitexport.backends.litert import app_input

    pre = {"rescale": 1 / 255, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    raw = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3)).astype(np.float32)  # NHWC RGB 0..255
    normalised = ((raw.transpose(0, 3, 1, 2) / 255 - np.reshape(pre["mean"], (1, 3, 1, 1))) / np.reshape(pre["std"], (1, 3, 1, 1))).astype(np.float32)
    np.testing.assert_allclose(app_input(normalised, pre), raw, atol=1e-3)


def test_litert_options_are_checked():
    from vitexport.backends import recipe_from
    from vitexport.backends.litert import LiteRTOptions

    _options = lambda raw: recipe_from(LiteRTOptions, raw, "litert")  # noqa: E731

    with pytest.raises(VitexportError, match="unknown litert option"):
        _options({"int8_mode": "stock"})
    with pytest.raises(VitexportError, match="int8_method"):
        _options({"int8_method": "fast"})
    with pytest.raises(VitexportError, match="int8_activations must be one of dynamic, static"):
        _options({"int8_activations": "int16"})
    assert _options({}).int8_activations == "dynamic"


def test_dynamic_row_quantizer_is_per_row_asymmetric_int8():
    """The emulation of XNNPACK's dynamically quantized FC input (test_xnnpack_dynamic_fc_is_the_emulation checks it
    against the kernel): each row on its own 255-step grid that holds 0 exactly."""
    from vitexport.quantization.int8 import dynamic_row_qdq

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((6, 50)) * np.array([0.01, 1, 30, 1, 1, 1])[:, None]).astype(np.float32)
    x[3] = np.abs(x[3]) + 2.0  # all positive: the grid still starts at 0
    x[4] = 0.0
    x[5, :10] = 0.0
    y = dynamic_row_qdq(x)
    step = (np.maximum(x.max(1), 0) - np.minimum(x.min(1), 0)) / 255
    assert (np.abs(y - x).max(1) <= step * 0.5 * (1 + 1e-3) + 1e-7).all()
    assert (np.abs(y - x).max(1)[[0, 1, 2]] > 0).all()  # really quantized, each row with its own step
    assert (y[4] == 0).all() and (y[5, :10] == 0).all()
    assert len(np.unique(np.round(y[2] / step[2]))) <= 256 and np.unique(y[3]).size <= 256


def test_gram_observer_compensates_for_the_dynamic_quantizer():
    """activation_quantizer = "dynamic_row": GPTQ's Hessian and compensation target use each row's own grid."""
    from vitexport.quantization.int8 import Int8Recipe, _QuantizedGramObserver, dynamic_row_qdq

    x = np.random.default_rng(1).standard_normal((2, 7, 16)).astype(np.float32)
    obs = _QuantizedGramObserver({}, dynamic=True)
    obs("a", x)
    xr = x.reshape(-1, 16)
    q = dynamic_row_qdq(xr)
    np.testing.assert_allclose(obs.qq["a"], q.T @ q, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(obs.qx["a"], q.T @ xr, rtol=1e-5, atol=1e-5)
    plain = _QuantizedGramObserver({})
    plain("a", x)
    assert "a" not in plain.qx and not np.allclose(plain.qq["a"], obs.qq["a"])
    with pytest.raises(ValueError, match="activation_quantizer"):
        Int8Recipe(activation_quantizer="dynamic")


def test_dynamic_row_recipe_has_its_own_gram_and_codes(reference):
    """The dynamic recipe's GPTQ codes differ from the static recipe's and are never taken from its memo entries
    (the build shares one memo between recipes): the same codes with and without the static recipe run first."""
    import onnx

    from vitexport.quantization.int8 import Int8Recipe, quantize_int8

    x = np.random.default_rng(2).standard_normal((8, 3, 32, 32)).astype(np.float32)
    static, dynamic = Int8Recipe(reduce_range=False, fallback_budget=0.0), Int8Recipe(reduce_range=False, fallback_budget=0.0, activation_quantizer="dynamic_row")
    store: dict = {}
    memo = lambda k, f: store[k] if k in store else store.setdefault(k, f())  # noqa: E731
    w = lambda m: {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer if t.name.endswith("_weight_quantized")}  # noqa: E731
    a = w(quantize_int8(reference.load(), lambda: iter([x]), static, memo=memo)[0])
    b, summary = quantize_int8(reference.load(), lambda: iter([x]), dynamic, memo=memo)
    c = w(quantize_int8(reference.load(), lambda: iter([x]), dynamic)[0])
    b = w(b)
    assert summary["recipe"]["activation_quantizer"] == "dynamic_row" and a.keys() == b.keys() == c.keys()
    assert all(np.array_equal(b[k], c[k]) for k in b)
    assert any(not np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.skipif(HAVE_LITERT, reason="litert-torch is installed here")
def test_missing_litert_is_one_clear_line(tiny_vit, tmp_path):
    p = subprocess.run([sys.executable, "-m", "vitexport.cli", "build", "--model", str(tiny_vit), "--backend", "litert", "--precision", "fp32",
                        "--calib", str(CALIB), "--eval", str(EVAL), "--out", str(tmp_path / "o")], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().count("\n") == 0 and "vitexport[litert]" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------- LiteRT, measured


@pytest.fixture(scope="module")
def litert_build(tiny_vit, tmp_path_factory):
    out = tmp_path_factory.mktemp("litert") / "dist"
    report = build(BuildOptions(model=str(tiny_vit), backend="litert", precisions=("fp32", "fp16", "int8"), calib=str(CALIB), eval=str(EVAL),
                                num_calib=16, num_eval=16, out=str(out), latency=False))
    return out, report


@needs_litert
def test_litert_rows_are_measured_on_the_interpreter(litert_build):
    out, report = litert_build
    rows = {r.name: r for r in report.rows}
    for p in ("fp32", "fp16", "int8"):
        r = rows[f"litert-{p}"]
        assert r.accuracy is not None and r.accuracy["emulated"] is False, r.notes
        assert (out / f"litert-{p}" / "model.tflite").stat().st_size == r.size_bytes
    assert rows["litert-fp32"].accuracy["agreement"] == 1.0 and rows["litert-fp32"].accuracy["cosine"] > 0.99999
    assert rows["litert-fp16"].accuracy["cosine"] > 0.999
    assert rows["litert-int8"].accuracy["cosine"] > 0.95
    # fp16: every FULLY_CONNECTED weight stored as float16 behind a DEQUANTIZE (the file's overhead dominates a tiny ViT)
    ops = Artifact.load(out / "litert-fp16").manifest["recipe"]["ops"]
    assert ops.get("DEQUANTIZE", 0) >= ops["FULLY_CONNECTED"]
    assert rows["litert-fp16"].size_bytes < rows["litert-fp32"].size_bytes


@needs_litert
def test_litert_fp32_matches_the_reference_onnx(litert_build, reference):
    import onnxruntime as ort

    from vitexport.backends import get

    out, _ = litert_build
    art = Artifact.load(out / "litert-fp32")
    x = np.random.default_rng(5).standard_normal((3, 3, 32, 32)).astype(np.float32)
    y = get("litert").runner(art, 1).run(x)
    r = ort.InferenceSession(str(reference.path), providers=["CPUExecutionProvider"]).run(None, {"pixel_values": x})[0]
    np.testing.assert_allclose(y, r, atol=1e-4, rtol=1e-4)


@needs_litert
def test_litert_metadata_labels_and_input(litert_build):
    from ai_edge_litert.interpreter import Interpreter

    from vitexport.backends.litert import read_metadata

    out, _ = litert_build
    art = Artifact.load(out / "litert-int8")
    meta = read_metadata(art.path)
    assert meta["labels"] == art.manifest["labels"] == (art.directory / "labels.txt").read_text().splitlines()
    assert meta["preprocessing"] == art.manifest["preprocessing"] and meta["input"]["layout"] == "NHWC"
    it = Interpreter(model_path=str(art.path))
    inp = it.get_input_details()[0]
    assert list(inp["shape"]) == [1, 32, 32, 3] and inp["dtype"] == np.float32
    assert art.manifest["io"]["input"] == "image"


@needs_litert
def test_litert_int8_carries_the_recipes_gptq_codes(litert_build, reference, tiny_vit):
    """The int8 .tflite holds exactly the core recipe's GPTQ codes and scales, on exactly the linears it quantized:
    rerun the recipe here on the same 16 calibration images and compare with the file's int8 FULLY_CONNECTED weights."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils as fbu
    from onnx import numpy_helper

    from vitexport.data import ImageSet
    from vitexport.model import ModelSpec
    from vitexport.quantization.int8 import Int8Recipe, quantize_int8

    out, _ = litert_build
    art = Artifact.load(out / "litert-int8")
    i8 = art.manifest["recipe"]["int8"]
    assert i8["recipe"]["weight_rounding"] == "gptq" and i8["recipe"]["reduce_range"] is False
    spec = ModelSpec.load(str(tiny_vit))
    imgs = ImageSet.from_folder(str(CALIB), spec.preprocessing, spec.id2label, None, limit=16)
    x = np.stack([imgs.load(i) for i in range(len(imgs))])
    from vitexport.backends.litert import DYNAMIC_RECIPE

    # the recipe dynamic activations carry (the default): GPTQ compensating XNNPACK's per-row quantization
    assert all(i8["recipe"][k] == v for k, v in DYNAMIC_RECIPE.items())
    q, summary = quantize_int8(reference.load(), lambda: iter([x]), Int8Recipe(reduce_range=False, **DYNAMIC_RECIPE))
    inits = {t.name: t for t in q.graph.initializer}
    producer = {o: n for n in q.graph.node for o in n.output}
    nodes = {n.name: n for n in q.graph.node}
    expected = []
    for rec in summary["quantized"]:
        dq = producer[nodes[rec["node"]].input[1]]
        codes = numpy_helper.to_array(inits[dq.input[0]])
        axis = next(a.i for a in dq.attribute if a.name == "axis")
        expected.append((codes.T if axis == 1 else codes, numpy_helper.to_array(inits[dq.input[1]])))  # [N, K], [N]

    model = fbu.read_model(str(art.path))
    g = model.subgraphs[0]
    found = []
    for op in g.operators:
        oc = model.operatorCodes[op.opcodeIndex]
        if max(oc.builtinCode, oc.deprecatedBuiltinCode) != schema.BuiltinOperator.FULLY_CONNECTED:
            continue
        w = g.tensors[op.inputs[1]]
        if w.type == schema.TensorType.INT8:
            found.append((np.frombuffer(bytes(model.buffers[w.buffer].data), np.int8).reshape(w.shape), np.asarray(w.quantization.scale, np.float32)))
    assert len(found) == len(expected) == i8["quantized"] > 0
    for codes, scale in expected:  # match by per-channel scale (the converter renames and reorders tensors)
        hit = [c for c, s in found if s.shape == scale.shape and np.allclose(s, scale, rtol=1e-6)]
        assert len(hit) == 1 and np.array_equal(hit[0], codes)
    # dynamic int8 activations (the default): every int8 FULLY_CONNECTED reads and writes float, no QUANTIZE op
    assert art.manifest["recipe"]["int8_activations"] == "dynamic" and "QUANTIZE" not in art.manifest["recipe"]["ops"]
    assert "clip nothing" in i8["clamps"]  # the kernel takes each row's own range: the static ranges would only clip
    assert _int8_fc_io_types(art.path) == {(schema.TensorType.FLOAT32, schema.TensorType.FLOAT32)}


@needs_litert
def test_xnnpack_dynamic_fc_is_the_emulation(tmp_path):
    """What the dynamic recipe compensates for is what the kernel does: a FULLY_CONNECTED with int8 weights and
    dynamic int8 activations, run by ai-edge-litert's XNNPACK, gives dynamic_row_qdq(X) W^T + b to float rounding,
    and neither a per-row symmetric nor a per-tensor grid."""
    import litert_torch
    import torch
    from ai_edge_litert.interpreter import Interpreter

    from vitexport.backends import litert as L
    from vitexport.quantization.int8 import dynamic_row_qdq

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48).eval()
    fp = tmp_path / "fc.tflite"
    litert_torch.convert(lin, (torch.randn(1, 10, 64),)).export(str(fp))
    q = tmp_path / "fc-int8.tflite"
    q.write_bytes(L._quantize(fp, [{"regex": ".*", "operation": "FULLY_CONNECTED", "algorithm_key": "min_max_uniform_quantize",
                                    "op_config": L._DYNAMIC_INT8_OP_CONFIG}], None))
    x = (np.random.default_rng(1).standard_normal((1, 10, 64)) * np.linspace(0.1, 5, 10)[None, :, None] + 0.7).astype(np.float32)
    it = Interpreter(model_path=str(q))
    it.allocate_tensors()
    it.set_tensor(it.get_input_details()[0]["index"], x)
    it.invoke()
    y = np.array(it.get_tensor(it.get_output_details()[0]["index"])).reshape(10, 48)
    (codes, scale), = [(c, s) for c, s in _int8_fc_weights(q)]
    w, b, xr = codes.astype(np.float32) * scale[:, None], lin.bias.detach().numpy(), x.reshape(10, 64)
    err = lambda xq: float(np.abs(xq @ w.T + b - y).max())  # noqa: E731
    sym = np.round(xr / (np.abs(xr).max(1, keepdims=True) / 127)) * (np.abs(xr).max(1, keepdims=True) / 127)
    assert err(dynamic_row_qdq(xr)) < 1e-5 * np.abs(y).max()
    assert min(err(xr), err(sym), err(dynamic_row_qdq(xr.reshape(1, -1)).reshape(xr.shape))) > 1e-3 * np.abs(y).max()


def _int8_fc_weights(path) -> list:
    """(int8 codes [N, K], scales [N]) of every FULLY_CONNECTED with int8 weights."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils as fbu

    model = fbu.read_model(str(path))
    g = model.subgraphs[0]
    out = []
    for op in g.operators:
        w = g.tensors[op.inputs[1]]
        if max(model.operatorCodes[op.opcodeIndex].builtinCode, model.operatorCodes[op.opcodeIndex].deprecatedBuiltinCode) == schema.BuiltinOperator.FULLY_CONNECTED \
                and w.type == schema.TensorType.INT8:
            out.append((np.frombuffer(bytes(model.buffers[w.buffer].data), np.int8).reshape(w.shape), np.asarray(w.quantization.scale, np.float32)))
    return out


def _int8_fc_io_types(path) -> set:
    """(input type, output type) of every FULLY_CONNECTED with int8 weights."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils as fbu

    model = fbu.read_model(str(path))
    g = model.subgraphs[0]
    return {(g.tensors[op.inputs[0]].type, g.tensors[op.outputs[0]].type) for op in g.operators
            if max(model.operatorCodes[op.opcodeIndex].builtinCode, model.operatorCodes[op.opcodeIndex].deprecatedBuiltinCode) == schema.BuiltinOperator.FULLY_CONNECTED
            and g.tensors[op.inputs[1]].type == schema.TensorType.INT8}


@needs_litert
def test_litert_static_int8_requantizes_fc_outputs(litert_build, tiny_vit, tmp_path):
    """int8_activations = "static": the recipe's ranges quantize each int8 FC's input, and TFLite's int8 kernel writes an
    int8 output (the default, dynamic, has float FC inputs and outputs)."""
    from ai_edge_litert import schema_py_generated as schema

    out = tmp_path / "dist"
    report = build(BuildOptions(model=str(tiny_vit), backend="litert", precisions=("int8",), calib=str(CALIB), eval=str(EVAL),
                                num_calib=16, num_eval=16, out=str(out), latency=False, options={"litert": {"int8_activations": "static"}}))
    art = Artifact.load(out / "litert-int8")
    assert art.manifest["recipe"]["int8_activations"] == "static" and art.manifest["recipe"]["ops"].get("QUANTIZE", 0) >= 1
    assert art.manifest["recipe"]["int8"]["clamps"] == "the recipe's activation ranges"
    assert art.manifest["recipe"]["int8"]["recipe"]["activation_quantizer"] == "static"
    assert _int8_fc_io_types(art.path) == {(schema.TensorType.INT8, schema.TensorType.INT8)}
    assert art.manifest["recipe"]["int8"]["placed"]["int8_fully_connected"] == Artifact.load(litert_build[0] / "litert-int8").manifest["recipe"]["int8"]["placed"]["int8_fully_connected"]
    static = next(r for r in report.rows if r.name == "litert-int8").accuracy
    assert static["emulated"] is False and static["cosine"] > 0.9


@needs_litert
def test_litert_stock_int8_is_the_quantizers_own_recipe(tiny_vit, tmp_path):
    out = tmp_path / "dist"
    report = build(BuildOptions(model=str(tiny_vit), backend="litert", precisions=("int8",), calib=str(CALIB), eval=str(EVAL),
                                num_calib=8, num_eval=8, out=str(out), latency=False, options={"litert": {"int8_method": "stock"}}))
    art = Artifact.load(out / "litert-int8")
    assert art.manifest["recipe"]["method"] == "stock" and "int8" not in art.manifest["recipe"]
    assert next(r for r in report.rows if r.name == "litert-int8").accuracy["emulated"] is False


# ---------------------------------------------------------------------------------------------- private venv


def _private_venv() -> Path:
    venv = Path(tempfile.gettempdir()) / "vitexport-litert-venv-0.10"
    py = venv / "bin" / "python"
    probe = [str(py), "-c", "import litert_torch, ai_edge_litert, ai_edge_quantizer"]
    if py.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return py
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    # torch on the same line so pip keeps the installed CPU build; only what the system site lacks is downloaded
    import torch

    pin = f"torch=={torch.__version__.split('+')[0]}"
    p = subprocess.run([str(py), "-m", "pip", "install", "-q", pin, LITERT_SPEC], capture_output=True, text=True, timeout=1500)
    if p.returncode != 0:
        pytest.skip(f"could not install {LITERT_SPEC} into a private venv (no registry?): {p.stderr.strip().splitlines()[-1:]}")
    return py


@pytest.mark.skipif(HAVE_LITERT, reason="litert-torch is importable here: the LiteRT tests above ran in this process")
@pytest.mark.skipif(bool(os.environ.get("VITEXPORT_SKIP_LITERT_VENV")), reason="VITEXPORT_SKIP_LITERT_VENV is set: LiteRT runtime tests not run")
def test_litert_runtime_in_private_venv():
    py = _private_venv()
    p = subprocess.run([str(py), "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__)), "-k", LITERT_RUNTIME_TESTS],
                       capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=1800)
    tail = "\n".join(p.stdout.splitlines()[-25:])
    assert p.returncode == 0, tail
    assert " passed" in tail and " skipped" not in tail.splitlines()[-1], tail
