"""CoreML target: packages, their specs, compressed weights, and an emulation that runs what the package holds.

Tiny random ViTs for the mechanics (CoreML cannot predict on Linux: accuracy here is emulated from the package).
"""

from __future__ import annotations

import contextlib
import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import CALIB, EVAL, REPO, TINY_LABELS

pytest.importorskip("coremltools")

from vitexport.api import BuildOptions, build  # noqa: E402
from vitexport.artifacts import Artifact  # noqa: E402
from vitexport.backends import coreml as cm  # noqa: E402
from vitexport.errors import VitexportError  # noqa: E402

PRECISIONS = ("fp32", "fp16", "int8", "int4", "palette4")
# tiny weights are below coremltools' default 2048-element threshold: lower it so every linear is compressed
TINY_OPTIONS = {"coreml": {"weight_threshold": 256, "palette_group_size": 8}}


@pytest.fixture(scope="module")
def tiny_build(tiny_vit, tmp_path_factory):
    out = tmp_path_factory.mktemp("coreml") / "dist"
    report = build(
        BuildOptions(model=str(tiny_vit), backend="coreml", precisions=PRECISIONS, calib=str(CALIB), eval=str(EVAL),
                     num_calib=8, num_eval=16, out=str(out), latency=False, options=TINY_OPTIONS)
    )
    return out, report


def _pkg(out: Path, precision: str) -> Artifact:
    return Artifact.load(out / f"coreml-{precision}")


def _ct():
    import coremltools as ct

    return ct


def test_rows_are_emulated_with_real_sizes(tiny_build):
    out, report = tiny_build
    rows = {r.name: r for r in report.rows}
    for p in PRECISIONS:
        r = rows[f"coreml-{p}"]
        assert r.accuracy["emulated"] is True and r.latency is None
        assert r.size_bytes == sum(f.stat().st_size for f in (out / f"coreml-{p}" / cm.PACKAGE).rglob("*") if f.is_file())
    assert rows["coreml-fp32"].accuracy["cosine"] > 0.99999  # the fp32 package is the reference graph, weights and all
    assert rows["coreml-fp16"].accuracy["agreement"] == 1.0
    md = (out / "report.md").read_text()
    assert "coreml-int4" in md


@pytest.mark.parametrize("precision", PRECISIONS)
def test_package_loads_and_has_image_input_classifier_outputs_labels(tiny_build, precision):
    out, _ = tiny_build
    ct = _ct()
    art = _pkg(out, precision)
    model = ct.models.MLModel(str(art.path), skip_model_load=True)
    spec = model.get_spec()
    (inp,) = spec.description.input
    assert inp.name == "image" and inp.type.WhichOneof("Type") == "imageType"
    assert (inp.type.imageType.width, inp.type.imageType.height) == (32, 32)
    assert inp.type.imageType.colorSpace == ct.proto.FeatureTypes_pb2.ImageFeatureType.RGB
    assert spec.description.predictedFeatureName == "classLabel"
    assert spec.description.predictedProbabilitiesName == "classLabel_probs"
    outs = {o.name: o.type.WhichOneof("Type") for o in spec.description.output}
    assert outs == {"classLabel": "stringType", "classLabel_probs": "dictionaryType"}
    reader = cm.PackageReader(art.path)
    classify = next(op for op in reader.block.operations if op.type == "classify")
    labels = reader._input(classify, "classes")
    assert list(labels) == list(TINY_LABELS.values())
    meta = dict(spec.description.metadata.userDefined)
    target = cm.deployment_target(precision, cm.CoreMLOptions())
    assert meta["vitexport.minimum_deployment_target"] == target == art.manifest["recipe"]["minimum_deployment_target"]
    assert spec.specificationVersion == {"iOS15": 6, "iOS16": 7, "iOS17": 8, "iOS18": 9}[target]
    assert "already resized" in spec.description.input[0].shortDescription
    assert json.loads(meta["vitexport.preprocessing"])["mean"] == [0.5, 0.5, 0.5]
    # std folded: image bias is -mean, scale 1/255 (the conv weight carries 1/std)
    scale, bias = reader.image_preprocessing()
    assert scale == pytest.approx(1 / 255) and np.allclose(bias, -0.5)


def test_weights_really_are_compressed(tiny_build):
    out, _ = tiny_build
    ops = {p: _pkg(out, p).manifest["recipe"]["weights"]["constexpr_ops"] for p in PRECISIONS}
    assert ops["fp32"] == {} and ops["fp16"] == {}
    assert ops["int8"].get("constexpr_affine_dequantize", 0) >= 13  # 12 block linears + head + conv
    assert ops["int4"].get("constexpr_blockwise_shift_scale", 0) == 12  # GPTQ: block linears, head stays fp16
    assert ops["palette4"].get("constexpr_lut_to_dense", 0) >= 12
    reader = cm.PackageReader(_pkg(out, "int4").path)
    q = next(op for op in reader.block.operations if op.type == "constexpr_blockwise_shift_scale")
    arg = q.inputs["data"].arguments[0]
    data_type = reader.ops[arg.name].outputs[0].type if arg.name else arg.value.type
    assert data_type.tensorType.dataType == 35  # UINT4
    reader8 = cm.PackageReader(_pkg(out, "int8").path)
    assert reader8.storage_by_dtype().get("INT8", 0) > 0
    assert _pkg(out, "int8").manifest["recipe"]["int8"]["linears"] == 12  # the encoder's linears carry GPTQ codes
    sizes = {p: _pkg(out, p).size_bytes for p in PRECISIONS}
    assert sizes["int4"] < sizes["int8"] < sizes["fp16"] < sizes["fp32"]


@pytest.mark.parametrize("precision", ["int8", "int4", "palette4"])
def test_reader_dequantizes_like_coremltools(tiny_build, precision):
    """Every constexpr op, dequantized by our reader (used by the emulation) == coremltools' own decompression."""
    from coremltools.converters.mil.frontend.milproto import load as milproto

    ct = _ct()
    art = _pkg(out := tiny_build[0], precision)
    del out
    model = ct.models.MLModel(str(art.path), skip_model_load=True)
    prog = milproto.load(model_spec=model.get_spec(), specification_version=model.get_spec().specificationVersion, file_weights_dir=model.weights_dir)
    reader = cm.PackageReader(art.path)
    n = 0
    for op in prog.functions["main"].operations:
        if op.op_type.startswith("constexpr_"):
            ours = reader.value(op.outputs[0].name)
            theirs = np.asarray(op.materialized_val_inference(), np.float32)
            np.testing.assert_allclose(ours.astype(np.float32), theirs, rtol=0, atol=1e-6)
            n += 1
    assert n >= 12


def test_palette4_package_holds_the_gptq_palettes(tiny_build):
    """Every linear of the palette4 package is a constexpr_lut_to_dense whose groups of output channels use at most
    16 values: the palettes vitexport computed, stored as is (not re-clustered by coremltools)."""
    art = _pkg(tiny_build[0], "palette4")
    recipe = art.manifest["recipe"]
    assert recipe["palette"]["method"].startswith("k-means palettes per group + GPTQ") and recipe["palette"]["linears"] == 12
    reader = cm.PackageReader(art.path)
    luts = [op for op in reader.block.operations if op.type == "constexpr_lut_to_dense"]
    assert len(luts) == 12
    group = TINY_OPTIONS["coreml"]["palette_group_size"]
    for op in luts:
        w = reader.value(op.outputs[0].name).astype(np.float32)
        rows = w.reshape(w.shape[0], -1)
        for g in range(0, rows.shape[0], group):
            assert len(np.unique(rows[g : g + group])) <= 16


def test_emulation_runs_what_the_package_holds(tiny_build, tmp_path):
    """Perturb one weight inside a copy of the package: the emulated outputs change accordingly."""
    out, _ = tiny_build
    src = out / "coreml-fp16"
    dst = tmp_path / "coreml-fp16"
    shutil.copytree(src, dst)
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32).clip(-1, 1)
    before = cm.EmulatedRunner(Artifact.load(dst)).run(x)
    reader = cm.PackageReader(dst / cm.PACKAGE)
    mapping = json.loads((dst / cm.EMULATION_DIR / cm.WEIGHT_MAP).read_text())["initializers"]
    head = next(m["const"] for m in mapping.values() if m["torch"].endswith("classifier.weight"))
    val = reader.ops[head].attributes["val"]
    blob = dst / cm.PACKAGE / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    buf = bytearray(blob.read_bytes())
    data_off = int(np.frombuffer(bytes(buf), np.uint64, 1, int(val.blobFileValue.offset) + 16)[0])
    w = np.frombuffer(bytes(buf[data_off : data_off + 4 * 32 * 2]), np.float16).copy()
    w[:32] = 0  # row 0 of the classifier = label 0's weights
    buf[data_off : data_off + w.nbytes] = w.tobytes()
    blob.write_bytes(bytes(buf))
    after = cm.EmulatedRunner(Artifact.load(dst, verify=False)).run(x)  # edited on purpose: skip the sha256 check
    np.testing.assert_allclose(after[:, 1:], before[:, 1:], atol=1e-6)
    assert np.abs(after[:, 0] - before[:, 0]).max() > 1e-3


def test_emulated_runner_needs_neither_torch_nor_transformers(tiny_build):
    out, _ = tiny_build
    code = (
        "import sys\n"
        "for m in ('torch', 'transformers'): sys.modules[m] = None\n"
        "import numpy as np\n"
        "from vitexport.artifacts import Artifact\n"
        "from vitexport.backends import get\n"
        f"art = Artifact.load({str(out / 'coreml-int4')!r})\n"
        "r = get('coreml').runner(art)\n"
        "print(r.emulated, r.run(np.zeros((2, 3, 32, 32), np.float32)).shape)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "True (2, 4)"


def test_fp16_emulation_rounds_activations(tiny_build):
    out, _ = tiny_build
    assert cm.EmulatedRunner(_pkg(out, "fp16")).fp16 is True
    assert cm.EmulatedRunner(_pkg(out, "fp32")).fp16 is False


def test_backbone_outputs_embedding_multiarray(tiny_backbone, tmp_path):
    ct = _ct()
    out = tmp_path / "bb"
    report = build(BuildOptions(model=str(tiny_backbone), backend="coreml", precisions=("fp16",), calib=None, eval=str(EVAL), num_eval=8, out=str(out), latency=False))
    spec = ct.models.MLModel(str(out / "coreml-fp16" / cm.PACKAGE), skip_model_load=True).get_spec()
    (o,) = spec.description.output
    assert o.name == "embedding" and o.type.WhichOneof("Type") == "multiArrayType"
    ref, row = report.rows  # the reference ONNX is measured as its own row when no fp32 artifact is built
    assert ref.role == "reference" and row.name == "coreml-fp16"
    assert row.accuracy["emulated"] and row.accuracy["cosine"] > 0.999


def test_conversion_validates_each_pipeline_once_and_writes_the_same_package(tiny_vit, tmp_path, monkeypatch):
    """coremltools validates the program after every graph pass; the build validates each pipeline's result once.
    The package is byte for byte the one the per-pass checks give, and coremltools is left as it was."""
    from coremltools.converters.mil.mil import Program
    from coremltools.converters.mil.mil.passes.pass_pipeline import PassPipelineManager

    from vitexport.backends.coreml import convert as cv

    real, apply = Program.validate, PassPipelineManager.__dict__["apply_pipeline"]
    calls = []

    def counting(self, *a, **k):
        calls.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(Program, "validate", counting)
    packages, counts = {}, {}
    for once in (True, False):
        if not once:
            monkeypatch.setattr(cv, "_validate_once", contextlib.nullcontext)
        calls.clear()
        out = tmp_path / str(once)
        build(BuildOptions(model=str(tiny_vit), backend="coreml", precisions=("fp16",), calib=None, eval=str(EVAL), num_eval=4, out=str(out), latency=False))
        counts[once] = len(calls)
        pkg = out / "coreml-fp16" / cm.PACKAGE
        packages[once] = {str(f.relative_to(pkg)): f.read_bytes() for f in sorted(pkg.rglob("*")) if f.is_file() and f.name != "Manifest.json"}
    assert packages[True] == packages[False] and packages[True]
    assert 1 <= counts[True] <= 8 and counts[False] > 10 * counts[True], counts  # one per pipeline against one per pass
    assert Program.validate is counting and PassPipelineManager.__dict__["apply_pipeline"] is apply


def test_quick_fp16_overflow_answers_as_coremltools_does():
    """The overflow check patched in during conversion gives coremltools' own answer for every op: in range, beyond
    float16, infinities (an attention mask's -inf casts fine), NaN, and large values beside infinities."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil.passes.defs.quantization import FP16ComputePrecision

    from vitexport.backends.coreml import convert as cv

    consts = [np.full((2, 3), 1.0), [[1e5, 0, 0]], [[-np.inf, 0, 1]], [[np.nan, 0, 1]], [[np.inf, 7e4, 1]], [[6.5504e4, -6.5504e4, 0]], 2.0]

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 3))])
    def prog(x):
        for c in consts:
            x = mb.add(x=x, y=np.asarray(c, np.float32))
        return x

    ops = [op for op in prog.functions["main"].operations if op.op_type == "add"]
    real = FP16ComputePrecision.__dict__["fp16_overflow"]
    want = [real.__func__(op) for op in ops]
    restore = cv._quick_fp16_overflow()
    try:
        got = [FP16ComputePrecision.fp16_overflow(op) for op in ops]
    finally:
        restore()
    assert got == want == [False, True, False, False, True, False, False]
    assert FP16ComputePrecision.__dict__["fp16_overflow"] is real


def _untimed(recipe):
    """A manifest's recipe without its timings (seconds, *_s), which differ between any two builds."""
    if isinstance(recipe, dict):
        return {k: _untimed(v) for k, v in recipe.items() if k != "seconds" and not k.endswith("_s")}
    return recipe


def test_cache_dir_reuses_conversions_and_refuses_a_damaged_one(tiny_vit, tmp_path, monkeypatch):
    """With --cache-dir a rebuild converts nothing: each package is the earlier build's program (same spec, same
    weights, bit for bit) with its description written again; an entry whose files no longer match their sha256 is
    converted afresh, never shipped."""
    from coremltools.proto import Model_pb2

    from vitexport.backends.coreml import convert as cv

    precisions = ("fp16", "int8", "palette4")
    cache = tmp_path / "cache"

    def run(name: str):
        out = tmp_path / name
        build(BuildOptions(model=str(tiny_vit), backend="coreml", precisions=precisions, calib=str(CALIB), eval=str(EVAL), num_calib=8, num_eval=8,
                           out=str(out), latency=False, options=TINY_OPTIONS, cache_dir=str(cache)))
        return out

    def package(out: Path, p: str):
        pkg = out / f"coreml-{p}" / cm.PACKAGE
        spec = Model_pb2.Model()
        spec.ParseFromString((pkg / "Data" / "com.apple.CoreML" / "model.mlmodel").read_bytes())
        return spec, (pkg / "Data" / "com.apple.CoreML" / "weights" / "weight.bin").read_bytes(), json.loads((out / f"coreml-{p}" / "manifest.json").read_text())["recipe"]

    cold = run("cold")
    assert len(list(cache.glob("coreml-*"))) == len(precisions)
    monkeypatch.setattr(cv, "convert", lambda *a, **k: pytest.fail("converted although --cache-dir holds the conversion"))
    warm = run("warm")
    for p in precisions:
        (s0, w0, r0), (s1, w1, r1) = package(cold, p), package(warm, p)
        assert s0 == s1 and w0 == w1, p
        assert "conversion" not in r0 and r1["conversion"].startswith("reused from --cache-dir")
        assert _untimed(r0) == {k: v for k, v in _untimed(r1).items() if k != "conversion"}
    monkeypatch.undo()
    entry = next(e for e in cache.glob("coreml-*") if json.loads((e / "entry.json").read_text())["recipe"]["compression"] == "none")
    weights = entry / "model.mlpackage" / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    warned: list[str] = []
    monkeypatch.setattr(cv.log, "warning", lambda msg, *a: warned.append(msg % a))  # the CLI's tests may have rerouted logging
    damaged = run("damaged")
    assert any("ignoring cached conversion" in w for w in warned), warned
    (s0, w0, _), (s2, w2, r2) = package(cold, "fp16"), package(damaged, "fp16")
    assert s0 == s2 and w0 == w2 and "conversion" not in r2
    assert cv._files_sha256(entry / "model.mlpackage") == json.loads((entry / "entry.json").read_text())["files"]  # stored again, whole


def test_weights_are_matched_by_value_through_sample_collisions():
    """Torch weights are found in the ONNX by value, stored as is or transposed; the first of tied weights wins, and
    two weights that agree on every sampled value but differ elsewhere are told apart by the full comparison."""
    import onnx
    import torch
    from onnx import numpy_helper

    from vitexport.backends.torch_weights import SAMPLE, match_initializers

    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 4)).astype(np.float32)
    big = rng.standard_normal((SAMPLE * 3,)).astype(np.float32)
    twin = big.copy()
    twin[1] += 1.0  # not on the stride-3 sample
    sd = {"a": torch.from_numpy(a), "tied": torch.from_numpy(a.copy()), "big": torch.from_numpy(big), "twin": torch.from_numpy(twin),
          "scalar": torch.tensor([2.0])}
    inits = {"A": a, "A_T": a.T.copy(), "TWIN": twin, "BIG": big, "OTHER": rng.standard_normal((4, 3)).astype(np.float32), "S": np.array([2.0], np.float32)}
    graph = onnx.helper.make_graph([], "g", [], [], [numpy_helper.from_array(v, k) for k, v in inits.items()])
    got = match_initializers(sd, onnx.helper.make_model(graph), ".")
    assert got == {"A": ("a", False), "A_T": ("a", True), "TWIN": ("twin", False), "BIG": ("big", False)}


def test_w8a8_needs_macos_and_bad_options_are_clear(tmp_path):
    backend = cm.CoreMLBackend()
    if platform.system() != "Darwin":
        with pytest.raises(VitexportError, match="only run on macOS"):
            backend.build(None, None, "w8a8", {}, tmp_path / "a")
    with pytest.raises(VitexportError, match="unknown coreml option"):
        backend.build(None, None, "fp16", {"coreml": {"bogus": 1}}, tmp_path / "b")
    with pytest.raises(VitexportError, match="palette_granularity"):
        backend.build(None, None, "palette4", {"coreml": {"palette_granularity": "per_row"}}, tmp_path / "c")
    with pytest.raises(VitexportError, match="palette_method"):
        backend.build(None, None, "palette4", {"coreml": {"palette_method": "magic"}}, tmp_path / "d")
    with pytest.raises(VitexportError, match="needs calibration images"):
        backend.build(None, None, "palette4", {}, tmp_path / "e")
    with pytest.raises(VitexportError, match="needs calibration images"):
        backend.build(None, None, "int8", {}, tmp_path / "f")
    with pytest.raises(VitexportError, match="int8_method"):
        backend.build(None, None, "int8", {"coreml": {"int8_method": "magic"}}, tmp_path / "g")
    assert not any(tmp_path.iterdir())


def test_target_profiles(tmp_path):
    from vitexport.api import load_target
    from vitexport.backends import recipe_from

    for name, plat in (("iphone", "iOS"), ("mac", "macOS")):
        t = load_target(name)
        assert t["backend"] == "coreml" and "fp16" in t["precisions"]
        assert recipe_from(cm.CoreMLOptions, t.get("options", {}).get("coreml", {}), "coreml").platform == plat
