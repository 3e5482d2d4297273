"""One conformance suite for every registered backend: the same checks, parametrised over the registry, so a new
backend (one module, one registry line, one profile) passes or fails exactly what the others do.

Per backend, every precision this host can build is built from a tiny random ViT through `api.build` (one build per
backend): manifest complete and its sha256s right, runner consistent with the declared capability (measured /
emulated / a one-line "not run here"), report row complete, output staged (an error mid-build leaves nothing),
a bad option one clear line. Precisions that need another host (CoreML w8a8: a Mac) must refuse in one line.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import platform
from pathlib import Path

import pytest

from vitexport import api, backends
from vitexport.artifacts import MANIFEST, Artifact, sha256
from vitexport.cli import main
from vitexport.errors import VitexportError

NAMES = backends.names()
# what a backend needs installed to build here; CI installs all but TensorRT, which builds its kit without it
_NEEDS = {"openvino": "openvino", "coreml": "coremltools", "litert": "litert_torch"}  # litert: see tests/test_litert.py
# tiny weights are below coremltools' default 2048-element threshold: lower it so every linear is compressed
_OPTIONS = {"coreml": {"coreml": {"weight_threshold": 256, "palette_group_size": 8}}}


def _skip_unavailable(name: str) -> None:
    mod = _NEEDS.get(name)
    if mod and importlib.util.find_spec(mod) is None:
        pytest.skip(f"{mod} is not installed")


def _buildable(name: str) -> list[str]:
    caps = backends.get(name).capabilities
    return [p for p, c in caps.items() if c.builds_on in (None, platform.system())]


@pytest.fixture(scope="module", params=NAMES)
def built(request, tiny_vit, image_folder, calib_folder, tmp_path_factory):
    """(backend name, Report, output folder): every precision this host can build, one build."""
    name = request.param
    _skip_unavailable(name)
    out = tmp_path_factory.mktemp(f"conf-{name}") / "dist"
    opts = api.BuildOptions(model=str(tiny_vit), backend=name, precisions=tuple(_buildable(name)), calib=str(calib_folder), eval=str(image_folder),
                            num_eval=8, out=str(out), latency=False, options=_OPTIONS.get(name, {}))
    return name, api.build(opts), out


# ---------------------------------------------------------------- declarations


@pytest.mark.parametrize("name", NAMES)
def test_capabilities_are_declared_for_every_precision(name):
    b = backends.get(name)
    assert b.name == name and b.precisions == tuple(b.capabilities) and b.precisions[0] == "fp32"
    for p, cap in b.capabilities.items():
        assert cap.runs_here in ("measured", "emulated", "not run"), (p, cap)
        if cap.recipe:
            assert dataclasses.is_dataclass(backends.load_class(cap.recipe))
        assert backends.needs_calibration(p, b) == cap.calibration
    assert dataclasses.is_dataclass(b.settings) or isinstance(b.settings, dict)
    assert {"devices", "artifact", "measured"} <= set(b.summary)


def test_readme_target_table_is_derived_from_the_declarations():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    start = readme.index("<!-- targets:start")
    block = readme[readme.index("\n", start) + 1 : readme.index("<!-- targets:end -->")].strip()
    assert block == backends.target_table(), "README target table is stale; paste backends.target_table():\n" + backends.target_table()


def test_precision_parsing_comes_from_the_declarations():
    for name in NAMES:
        b = backends.get(name)
        assert backends.parse_precisions(",".join(reversed(b.precisions)), b) == list(b.precisions)
        with pytest.raises(VitexportError, match=f"backend {name} has no precision int3"):
            backends.parse_precisions("fp32,int3", b)


# ---------------------------------------------------------------- the built artifacts


def _own_rows(report, name):
    """The backend's own rows: a build without ONNX Runtime fp32 adds the reference ONNX as its reference row."""
    return [r for r in report.rows if r.backend == name or r.role != "reference"]


def test_every_buildable_precision_is_built_with_a_complete_manifest(built):
    name, report, out = built
    assert [r.precision for r in _own_rows(report, name)] == _buildable(name)
    for p in _buildable(name):
        d = out / f"{name}-{p}"
        m = json.loads((d / MANIFEST).read_text())
        for key in ("schema", "backend", "precision", "main", "size_bytes", "files", "model", "preprocessing", "labels", "io", "recipe", "tools", "created"):
            assert key in m, (p, key)
        assert m["backend"] == name and m["precision"] == p and (d / m["main"]).exists()
        assert m["size_bytes"] > 0 and m["labels"] == ["cat", "dog, doggy", "bird", "fish"] and m["recipe"]["summary"]
        on_disk = sorted(str(f.relative_to(d)) for f in d.rglob("*") if f.is_file() and f.name != MANIFEST)
        assert sorted(f["path"] for f in m["files"]) == on_disk  # every file hashed, nothing unlisted
        for f in m["files"]:
            assert sha256(d / f["path"]) == f["sha256"] and (d / f["path"]).stat().st_size == f["size_bytes"]
        if backends.get(name).capabilities[p].calibration:
            assert m["recipe"].get("calibration_images") or any(isinstance(v, dict) and v.get("calibration_images") for v in m["recipe"].values()), p
    assert not list(out.parent.glob(f".{out.name}.partial-*"))


def test_runner_matches_the_declared_capability(built):
    name, _, out = built
    b = backends.get(name)
    for p in _buildable(name):
        art = Artifact.load(out / f"{name}-{p}")
        runs = b.capabilities[p].runs_here
        if runs == "not run":
            with pytest.raises(VitexportError) as e:
                b.runner(art)
            assert "\n" not in str(e.value) and str(e.value)
            continue
        r = b.runner(art)
        assert r.emulated == (runs == "emulated"), p
        assert r.runtime and r.device


def test_report_row_is_complete(built):
    name, report, out = built
    for row in _own_rows(report, name):
        runs = backends.get(name).capabilities[row.precision].runs_here
        assert row.name == f"{name}-{row.precision}" and row.backend == name and Path(row.path).exists()
        assert row.size_bytes > 0 and row.recipe.get("summary") and row.build and row.build["seconds"] >= 0
        if runs == "not run":
            assert row.accuracy is None and any(n.startswith("not run here: ") for n in row.notes)
            continue
        for key in ("top1", "top5", "agreement", "cosine", "n", "emulated"):
            assert key in row.accuracy, (row.name, key)
        assert row.accuracy["n"] == 8 and row.accuracy["emulated"] == (runs == "emulated") and row.memory["peak_mb"] >= 0
    saved = json.loads((out / "report.json").read_text())
    assert [r["name"] for r in saved["rows"]] == [r.name for r in report.rows]


# ---------------------------------------------------------------- failures


@pytest.mark.parametrize("name", NAMES)
def test_an_error_mid_build_leaves_no_output(name, tiny_vit, image_folder, calib_folder, tmp_path, monkeypatch):
    """The first precision is built, the second fails: nothing at --out, no staging folder left behind."""
    _skip_unavailable(name)
    cls = type(backends.get(name))
    first, second = _buildable(name)[:2]
    real = cls.build

    def build(self, reference, calibration, precision, options, out_dir, stages=None):
        if precision == second:
            raise VitexportError(f"{second} failed on purpose")
        return real(self, reference, calibration, precision, options, out_dir, stages=stages)

    monkeypatch.setattr(cls, "build", build)
    out = tmp_path / "dist"
    opts = api.BuildOptions(model=str(tiny_vit), backend=name, precisions=(first, second), calib=str(calib_folder), eval=str(image_folder),
                            num_eval=4, num_calib=4, out=str(out), latency=False)
    with pytest.raises(VitexportError, match="on purpose"):
        api.build(opts)
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", NAMES)
def test_a_bad_option_is_one_clear_line(name, tmp_path, capsys):
    """A typo in the backend's own table, through a profile and the command: exit 2, one line naming the key."""
    profile = tmp_path / "mine.toml"
    profile.write_text(f'backend = "{name}"\n[options.{name}]\nno_such_setting = 1\n')
    assert main(["build", "--target", str(profile), "--out", str(tmp_path / "dist")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vitexport: error: ") and f"options.{name}.no_such_setting" in err[0]
    assert not (tmp_path / "dist").exists()


@pytest.mark.parametrize("name", NAMES)
def test_a_bad_recipe_option_given_to_the_backend_is_a_vitexport_error(name, reference, calibration, tmp_path):
    _skip_unavailable(name)
    b = backends.get(name)
    precision = next((p for p, c in b.capabilities.items() if c.recipe and c.builds_on is None), None)
    if precision is None:
        pytest.skip(f"{name} has no recipe options")
    with pytest.raises(VitexportError, match="bogus"):
        b.build(reference, calibration, precision, {name: {precision: {"recipe": {"bogus": 1}}}}, tmp_path / "x")


@pytest.mark.parametrize("name", NAMES)
def test_a_precision_for_another_host_refuses_in_one_line(name, reference, calibration, tmp_path):
    _skip_unavailable(name)
    b = backends.get(name)
    others = [p for p, c in b.capabilities.items() if c.builds_on not in (None, platform.system())]
    if not others:
        pytest.skip(f"every {name} precision builds here")
    for p in others:
        with pytest.raises(VitexportError) as e:
            b.build(reference, calibration, p, {}, tmp_path / p)
        assert "\n" not in str(e.value) and not (tmp_path / p).exists()


# ---------------------------------------------------------------- declared needs reach the backend


def test_coreml_w8a8_receives_the_calibration_images(tiny_vit, image_folder, calib_folder, tmp_path, monkeypatch):
    """w8a8 declares calibration, so api.build hands it the images. The Mac-only step is stubbed at the coremltools
    boundary (this is NOT a real w8a8 package): we stand in for macOS and replace
    coremltools.optimize.coreml.experimental.linear_quantize_activations, which needs CoreML predictions, by a
    recorder; conversion, weight quantization, saving and the manifest are real."""
    pytest.importorskip("coremltools")
    import coremltools.optimize.coreml.experimental as experimental

    from vitexport.backends import coreml as cm

    seen = {}

    def fake_linear_quantize_activations(mlmodel, config, sample_data, **kw):
        seen["samples"] = sample_data
        return mlmodel

    monkeypatch.setattr(cm, "_host_system", lambda: "Darwin")
    monkeypatch.setattr(experimental, "linear_quantize_activations", fake_linear_quantize_activations)
    out = tmp_path / "dist"
    report = api.build(api.BuildOptions(model=str(tiny_vit), backend="coreml", precisions=("w8a8",), calib=str(calib_folder), eval=str(image_folder),
                                        num_calib=5, num_eval=4, out=str(out), latency=False))
    assert len(seen["samples"]) == 5 and all(set(s) == {cm.INPUT_NAME} and s[cm.INPUT_NAME].size == (32, 32) for s in seen["samples"])
    recipe = json.loads((out / "coreml-w8a8" / MANIFEST).read_text())["recipe"]
    assert recipe["activation_type"] == "int8" and recipe["activation_calibration"]["images"] == 5 and recipe["minimum_deployment_target"] == "iOS17"
    assert report.evaluation["calibration_images"] == 5
