"""TensorRT backend: the QDQ graph TensorRT wants (structure and numbers, on a tiny ViT), the engine-build decisions
(plan, trtexec line, files, the Python API calls against a recording stand-in for tensorrt), the emulated runner
without torch, and what happens where TensorRT is missing."""

from __future__ import annotations

import importlib.util
import json
import shutil
import shlex
import subprocess
import sys
import textwrap
import types

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from vitexport import backends
from vitexport.artifacts import Artifact, sha256
from vitexport.backends import tensorrt as trt_backend
from vitexport.backends.tensorrt import (
    EngineSettings,
    EmulationRunner,
    TensorRTBackend,
    check_tensorrt_qdq,
    engine_plan,
    int8_recipe,
    settings_from,
    trtexec_command,
)
from vitexport.errors import VitexportError
from vitexport.quantization.graph import find_linears

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None
# the tiny ViT has too few linears for a MAC-budget fallback to mean anything: keep every linear int8 there
NO_FALLBACK = {"tensorrt": {"int8": {"recipe": {"fallback_budget": 0.0}}}}


@pytest.fixture(scope="module")
def inputs():
    return np.random.default_rng(2).standard_normal((8, 3, 32, 32)).astype(np.float32)


@pytest.fixture(scope="module")
def built(reference, calibration, tmp_path_factory):
    be = TensorRTBackend()
    out = tmp_path_factory.mktemp("trt")
    return {p: be.build(reference, calibration if p == "int8" else None, p, NO_FALLBACK, out / f"tensorrt-{p}") for p in be.precisions}


@pytest.fixture(scope="module")
def qdq(built):
    return onnx.load(str(built["int8"].directory / "model.onnx"))


def _consumers(model):
    out: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


# ---------------------------------------------------------------- registry, availability


def test_registered_and_buildable_without_tensorrt():
    assert "tensorrt" in backends.names()
    ok, why = backends.get("tensorrt").available()
    assert ok  # the QDQ ONNX and the engine kit need only onnx/onnxruntime
    if not HAVE_TRT:
        assert "not installed" in why and "JetPack" in why


# ---------------------------------------------------------------- the QDQ graph


def test_qdq_is_symmetric_int8_with_zero_points_zero(qdq):
    inits = {t.name: t for t in qdq.graph.initializer}
    qdq_nodes = [n for n in qdq.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq_nodes
    for n in qdq_nodes:
        zp = inits[n.input[2]]
        assert zp.data_type == onnx.TensorProto.INT8, n.name
        assert not numpy_helper.to_array(zp).any(), n.name


def test_qdq_only_on_linear_inputs(qdq, reference):
    """Q/DQ sit on the activation and weight inputs of the q/k/v, attention-output, fc1 and fc2 MatMuls, nowhere else:
    not on residual Adds, LayerNorm, Softmax, GELU, the attention matmuls or the head."""
    cons = _consumers(qdq)
    producer = {o: n for n in qdq.graph.node for o in n.output}
    for n in qdq.graph.node:
        if n.op_type == "DequantizeLinear":
            assert {c.op_type for c in cons[n.output[0]]} == {"MatMul"}, n.name
        if n.op_type in ("Add", "LayerNormalization", "Softmax", "Erf", "Gelu", "Mul", "Div"):
            assert all(producer.get(i) is None or producer[i].op_type != "DequantizeLinear" for i in n.input), n.name
    for n in qdq.graph.node:  # nothing reads a Softmax output through Q/DQ, and no Q reads an Add (residual) output
        if n.op_type == "QuantizeLinear":
            assert producer[n.input[0]].op_type not in ("Softmax", "Add"), n.name
    role = {l.node.name: l.role for l in find_linears(reference.load())}  # roles from the float graph; names are kept
    nodes = {n.name: n for n in qdq.graph.node}
    fed = lambda name: all(producer.get(i) is not None and producer[i].op_type == "DequantizeLinear" for i in nodes[name].input[:2])  # noqa: E731
    assert {r for name, r in role.items() if fed(name)} == {"qkv", "attn_out", "fc1", "fc2"}
    assert sum(fed(name) for name in role) == 12 and not any(fed(name) for name, r in role.items() if r == "head")
    attention = [n for n in qdq.graph.node if n.op_type == "MatMul" and not any(i in {t.name for t in qdq.graph.initializer} for i in n.input)]
    attention = [n for n in attention if not any(producer.get(i) is not None and producer[i].op_type == "DequantizeLinear" for i in n.input)]
    assert len(attention) >= 4  # QK^T and PV of each of the 2 blocks stay float


def test_weights_full_8bit_per_output_channel(qdq):
    inits = {t.name: t for t in qdq.graph.initializer}
    cons = _consumers(qdq)
    seen = 0
    for n in qdq.graph.node:
        if n.op_type != "DequantizeLinear" or n.input[0] not in inits:
            continue
        w = numpy_helper.to_array(inits[n.input[0]])
        scale = numpy_helper.to_array(inits[n.input[1]])
        axis = next(a.i for a in n.attribute if a.name == "axis")
        (mm,) = cons[n.output[0]]
        assert mm.op_type == "MatMul" and list(mm.input).index(n.output[0]) == 1
        assert w.dtype == np.int8 and axis == 1 and scale.shape == (w.shape[1],)  # [K, N]: one scale per output column
        assert np.abs(w).max() == 127  # reduce_range off: TensorRT accumulates in int32
        assert w.min() >= -127  # symmetric weights never use -128
        seen += 1
    assert seen == 12  # 2 blocks x (q, k, v, out, fc1, fc2)


def test_activation_scales_per_tensor_and_recorded(built, qdq):
    recipe = built["int8"].manifest["recipe"]
    assert recipe["recipe"]["symmetric_activations"] is True and recipe["recipe"]["reduce_range"] is False
    assert recipe["activations"].startswith("int8 symmetric")
    assert recipe["qdq_check"] == {"quantize": 8, "dequantize_activation": 12, "dequantize_weight": 12}
    assert check_tensorrt_qdq(qdq) == recipe["qdq_check"]


def test_check_rejects_what_tensorrt_does_not_want(reference, calibration, qdq):
    from vitexport.quantization.int8 import Int8Recipe, quantize_int8

    stock, _ = quantize_int8(reference.load(), calibration.batches, Int8Recipe(fallback_budget=0.0, weight_rounding="rtn"))  # uint8 asymmetric
    with pytest.raises(VitexportError, match="zero point must be an int8"):
        check_tensorrt_qdq(stock)
    bad = onnx.ModelProto()
    bad.CopyFrom(qdq)
    dq = next(n for n in bad.graph.node if n.op_type == "DequantizeLinear" and any(a.name == "axis" for a in n.attribute))
    next(a for a in dq.attribute if a.name == "axis").i = 0
    with pytest.raises(VitexportError, match="per output channel"):
        check_tensorrt_qdq(bad)
    bad.CopyFrom(qdq)
    ln = next(n for n in bad.graph.node if n.op_type == "LayerNormalization")
    dq = next(n for n in bad.graph.node if n.op_type == "DequantizeLinear" and n.input[0] not in {t.name for t in bad.graph.initializer})
    ln.input[0] = dq.output[0]  # a DQ feeding a LayerNorm
    with pytest.raises(VitexportError, match="not only MatMul/Gemm"):
        check_tensorrt_qdq(bad)


def test_emulation_is_float_fake_quant_and_close_to_fp32(built, reference, inputs):
    """The emulated runner computes exactly the ONNX op-by-op semantics (no integer kernels), and int8 stays close."""
    import onnxruntime as ort

    path = built["int8"].directory / "model.onnx"
    got = EmulationRunner(path).run(inputs)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # Q, DQ, float MatMul: one op at a time
    plain = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, {"pixel_values": inputs})[0]
    np.testing.assert_allclose(got, plain, atol=1e-4, rtol=1e-4)
    ref = ort.InferenceSession(str(reference.path), providers=["CPUExecutionProvider"]).run(None, {"pixel_values": inputs})[0]
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.98
    assert not np.allclose(got, ref, atol=1e-6)  # it is quantized


# ---------------------------------------------------------------- engine-build decisions


def test_plan_flags_per_precision():
    s = EngineSettings(min_batch=1, opt_batch=4, max_batch=16, workspace_mb=2048)
    p16, p8, p32 = (engine_plan(p, s, "pixel_values", [3, 224, 224]) for p in ("fp16", "int8", "fp32"))
    assert p16["builder_flags"] == ["FP16"] and not p16["strongly_typed"] and p16["cleared_flags"] == []
    assert p8["builder_flags"] == ["INT8", "FP16"] and p8["explicit_quantization"]  # float layers in fp16, no calibrator
    assert p32["builder_flags"] == [] and p32["cleared_flags"] == ["TF32"]
    assert p8["shapes"] == {"min": [1, 3, 224, 224], "opt": [4, 3, 224, 224], "max": [16, 3, 224, 224]}
    typed = EngineSettings(strongly_typed=True)
    assert engine_plan("int8", typed, "x", [3, 8, 8])["builder_flags"] == [] and engine_plan("int8", typed, "x", [3, 8, 8])["strongly_typed"]
    assert engine_plan("fp16", typed, "x", [3, 8, 8])["builder_flags"] == ["FP16"]  # an fp32 ONNX strongly typed would be fp32


def test_trtexec_command_line():
    s = EngineSettings(min_batch=1, opt_batch=4, max_batch=16, workspace_mb=2048)
    cmd = trtexec_command(engine_plan("int8", s, "pixel_values", [3, 224, 224]))
    assert cmd == [
        "trtexec",
        "--onnx=model.onnx",
        "--saveEngine=model.engine",
        "--minShapes=pixel_values:1x3x224x224",
        "--optShapes=pixel_values:4x3x224x224",
        "--maxShapes=pixel_values:16x3x224x224",
        "--int8",
        "--fp16",
        "--memPoolSize=workspace:2048",
        "--timingCacheFile=tensorrt-timing.cache",
        "--skipInference",
    ]
    typed = trtexec_command(engine_plan("int8", EngineSettings(strongly_typed=True, builder_optimization_level=5), "pixel_values", [3, 224, 224]))
    assert "--stronglyTyped" in typed and "--int8" not in typed and "--fp16" not in typed and "--builderOptimizationLevel=5" in typed
    assert "--noTF32" in trtexec_command(engine_plan("fp32", s, "pixel_values", [3, 224, 224]))


def test_settings_validation():
    with pytest.raises(VitexportError, match="min_batch <= opt_batch"):
        EngineSettings(min_batch=4, opt_batch=2)
    with pytest.raises(VitexportError, match="unknown tensorrt option"):
        settings_from({"tensorrt": {"max_batchsize": 8}})
    with pytest.raises(VitexportError, match="unknown Int8Recipe option"):
        int8_recipe({"tensorrt": {"int8": {"recipe": {"symetric": True}}}})
    r = int8_recipe({"tensorrt": {"int8": {"recipe": {"percentile": 99.99, "roles": ["qkv", "fc1"]}}}})
    assert r.symmetric_activations and not r.reduce_range and r.percentile == 99.99 and r.roles == ("qkv", "fc1")


def test_targets_profiles():
    from vitexport.api import target_settings

    for name, max_batch in (("jetson-orin", 8), ("nvidia-gpu", 64)):
        t = target_settings(name, None, None, None)
        assert t["backend"] == "tensorrt" and set(t["precisions"]) == {"fp16", "int8"}
        assert settings_from(t["options"]).max_batch == max_batch
        assert int8_recipe(t["options"]).symmetric_activations


def test_artifact_folder_has_everything_the_device_needs(built):
    for p, art in built.items():
        d = art.directory
        names = {f.name for f in d.iterdir()}
        assert {"model.onnx", "build_engine.py", "tensorrt.json", "trtexec.sh", "README.md", "manifest.json"} <= names
        assert (d / "build_engine.py").read_text() == trt_backend.SCRIPT_TEMPLATE.read_text()
        plan = json.loads((d / "tensorrt.json").read_text())
        recipe = art.manifest["recipe"]
        assert plan == recipe["tensorrt"]["plan"] and plan["precision"] == p and plan["input"] == "pixel_values"
        assert plan["shapes"]["min"] == [1, 3, 32, 32]
        script = (d / "trtexec.sh").read_text()
        assert shlex.split(script.split('cd "$(dirname "$0")"\n', 1)[1].replace("\\\n", " ")) == trtexec_command(plan)
        assert recipe["tensorrt"]["trtexec"] == shlex.join(trtexec_command(plan))
        assert "summary" in recipe and "tensorrt" in recipe["summary"].lower()
        if not HAVE_TRT:
            assert art.main == "model.onnx" and recipe["tensorrt"]["engine"]["built"] is False
            assert "not installed" in recipe["tensorrt"]["engine"]["reason"] and "not built here" in recipe["summary"]
        listed = {f["path"]: f["sha256"] for f in art.manifest["files"]}
        assert listed["build_engine.py"] == sha256(d / "build_engine.py")


class _Recorder:
    """A stand-in for the tensorrt module that records what build_engine.py asks of it (it builds nothing)."""

    __version__ = "10.3.0"

    def __init__(self, parse_ok: bool = True):
        self.calls: list[tuple] = []
        rec = self

        class Obj:
            def __init__(self, name):
                self._name = name

            def __getattr__(self, attr):
                if attr == "num_errors":  # a property in TensorRT
                    return 1

                def call(*a, **k):
                    rec.calls.append((f"{self._name}.{attr}", a, k))
                    if attr == "parse_from_file":
                        return parse_ok
                    if attr == "build_serialized_network":
                        return b"ENGINE"
                    if attr == "set_timing_cache":
                        return True
                    if attr == "serialize":
                        return b"CACHE2"
                    if attr in ("get_timing_cache",):
                        return Obj("cache")
                    return Obj(attr)

                return call

        self.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda s, *a: None})
        self.Builder = lambda logger: Obj("builder")
        self.OnnxParser = lambda net, logger: Obj("parser")
        self.NetworkDefinitionCreationFlag = types.SimpleNamespace(EXPLICIT_BATCH=0, STRONGLY_TYPED=5)
        self.BuilderFlag = types.SimpleNamespace(FP16="FP16", INT8="INT8", TF32="TF32")
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")

    def names(self, suffix):
        return [c for c in self.calls if c[0].endswith(suffix)]


def test_build_engine_script_drives_the_tensorrt_api(built, monkeypatch, tmp_path):
    """The Python API calls build_engine.py makes for an int8 plan: flags, workspace, profile, timing cache reuse."""
    from vitexport.backends import tensorrt_build_engine as script

    d = tmp_path / "tensorrt-int8"
    d.mkdir()
    plan = json.loads((built["int8"].directory / "tensorrt.json").read_text())
    (d / "model.onnx").write_bytes(b"onnx")
    (d / "tensorrt-timing.cache").write_bytes(b"CACHE1")
    fake = _Recorder()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    info = script.build_engine(plan, d, log=lambda *_: None)
    assert (d / "model.engine").read_bytes() == b"ENGINE"
    assert (d / "tensorrt-timing.cache").read_bytes() == b"CACHE2"  # written back for the next build, inside the folder
    assert json.loads((d / "engine.json").read_text()) == info and info["timing_cache_reused"] and info["tensorrt"] == "10.3.0"
    assert [c[1] for c in fake.names("create_network")] == [(0,)]  # TensorRT 10: no EXPLICIT_BATCH, weakly typed
    assert [c[1][0] for c in fake.names("set_flag")] == ["INT8", "FP16"]
    assert fake.names("set_memory_pool_limit")[0][1] == ("WORKSPACE", 1024 << 20)
    assert fake.names("set_shape")[0][1] == ("pixel_values", [1, 3, 32, 32], [1, 3, 32, 32], [32, 3, 32, 32])
    assert fake.names("create_timing_cache")[0][1] == (b"CACHE1",)
    assert fake.names("parse_from_file")[0][1] == (str(d / "model.onnx"),)

    fake = _Recorder(parse_ok=False)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    with pytest.raises(RuntimeError, match="ONNX parser rejected"):
        script.build_engine(plan, d, log=lambda *_: None)


# ---------------------------------------------------------------- runners and the missing runtime


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed here")
def test_without_tensorrt_int8_and_fp16_are_emulated_and_fp32_says_why(built, inputs):
    be = TensorRTBackend()
    for p in ("int8", "fp16"):  # the default plans carry the FP16 flag: float16 storage between kernels
        r = be.runner(Artifact.load(built[p].directory))
        assert r.emulated and r.float16 and "emulating the TensorRT engine" in r.runtime and r.run(inputs).shape == (8, 4)
    with pytest.raises(VitexportError, match="build_engine.py"):
        be.runner(Artifact.load(built["fp32"].directory))


def test_strongly_typed_int8_is_emulated_in_float32(built, inputs, tmp_path):
    """--stronglyTyped keeps the ONNX's fp32 for float layers: no float16 rounding in the emulation then."""
    d = tmp_path / "st"
    shutil.copytree(built["int8"].directory, d)
    plan = json.loads((d / "tensorrt.json").read_text())
    (d / "tensorrt.json").write_text(json.dumps({**plan, **engine_plan("int8", EngineSettings(strongly_typed=True), "pixel_values", [3, 32, 32])}))
    r32, r16 = TensorRTBackend().runner(Artifact.load(d, verify=False)), TensorRTBackend().runner(Artifact.load(built["int8"].directory))  # plan edited on purpose
    assert not r32.float16 and r16.float16
    a, b = r32.run(inputs), r16.run(inputs)
    assert not np.array_equal(a, b) and np.allclose(a, b, atol=5e-2)


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed here")
def test_build_engine_script_without_tensorrt_is_one_clear_line(built):
    r = subprocess.run([sys.executable, str(built["fp16"].directory / "build_engine.py")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "TensorRT" in r.stderr and "trtexec.sh" in r.stderr
    assert not (built["fp16"].directory / "model.engine").exists()


def test_emulated_runner_imports_no_torch(built, inputs, tmp_path):
    np.save(tmp_path / "x.npy", inputs)
    code = textwrap.dedent(
        f"""
        import sys
        for m in ("torch", "transformers", "tensorrt"):
            sys.modules[m] = None  # any import of them fails
        import numpy as np
        from vitexport import backends
        from vitexport.artifacts import Artifact
        art = Artifact.load({str(built["int8"].directory)!r})
        r = backends.get("tensorrt").runner(art)
        print(r.emulated, r.run(np.load({str(tmp_path / "x.npy")!r})).shape)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "(8,", "4)"]


def test_report_rows_side_by_side(tiny_vit, image_folder, calib_folder, tmp_path):
    """`--backend onnxruntime,tensorrt`: int8 and fp16 rows emulated without latency, the fp32 row says it was not run here."""
    from vitexport.api import BuildOptions, build

    out = tmp_path / "dist"
    report = build(
        BuildOptions(model=str(tiny_vit), backend="onnxruntime,tensorrt", precisions=("fp32", "fp16", "int8"), calib=str(calib_folder), eval=str(image_folder), out=str(out), latency=False, options=NO_FALLBACK)
    )
    rows = {r.name: r for r in report.rows}
    assert {"onnxruntime-fp32", "tensorrt-fp32", "tensorrt-fp16", "tensorrt-int8"} <= set(rows)
    int8, fp16 = rows["tensorrt-int8"], rows["tensorrt-fp16"]
    if not HAVE_TRT:
        assert int8.accuracy["emulated"] is True and int8.latency is None
        assert fp16.accuracy["emulated"] is True and fp16.latency is None and fp16.accuracy["agreement"] >= 0.95
        assert fp16.accuracy["cosine"] < 1 - 1e-9  # float16 storage, not the fp32 reference again
        assert rows["tensorrt-fp32"].accuracy is None and any("build_engine.py" in n for n in rows["tensorrt-fp32"].notes)
        # the note names the artifact where it ends up, not the staging folder it was measured in
        assert any(str(out / "tensorrt-fp32") in n for n in rows["tensorrt-fp32"].notes)
        assert not any(".partial" in n for r in report.rows for n in r.notes)
    assert int8.accuracy["n"] == 24
    assert (out / "tensorrt-int8" / "trtexec.sh").is_file()


def test_corrupt_plan_is_one_clear_error(built, tmp_path):
    d = tmp_path / "bad"
    shutil.copytree(built["int8"].directory, d)
    (d / "tensorrt.json").write_text("{not json")
    with pytest.raises(VitexportError, match="tensorrt.json.*rebuild the artifact"):
        TensorRTBackend().runner(Artifact.load(d, verify=False))  # past the sha256 check: the runner's own parse
