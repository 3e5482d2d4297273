"""Device profiles: one layout for every backend, checked on load (a typo is one line naming the file and key),
inheritance with `base`, and every shipped profile loading under the checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from vitexport import profiles
from vitexport.cli import main
from vitexport.errors import VitexportError


@pytest.mark.parametrize("name", profiles.shipped())
def test_every_shipped_profile_loads_under_the_checks(name):
    p = profiles.load(name)
    assert p["name"] == name and p["backend"] and p["precisions"] and p["description"]


def test_the_shipped_profiles_are_all_there():
    assert {"x86-cpu", "x86-cpu-vnni", "raspberry-pi-4", "raspberry-pi-5", "intel-cpu", "intel-igpu", "iphone", "mac", "jetson-orin", "nvidia-gpu"} <= set(profiles.shipped())


def test_vnni_profile_is_x86_cpu_with_one_difference():
    base, vnni = profiles.load("x86-cpu"), profiles.load("x86-cpu-vnni")
    text = (Path(profiles.__file__).parent / "targets" / "x86-cpu-vnni.toml").read_text()
    assert 'base = "x86-cpu"' in text and "backend" not in text and "precisions" not in text
    assert base["options"]["onnxruntime"]["int8"]["recipe"] == {"reduce_range": True}
    assert vnni["options"]["onnxruntime"]["int8"]["recipe"] == {"reduce_range": False}
    assert {k: v for k, v in vnni.items() if k not in ("name", "description", "options")} == {k: v for k, v in base.items() if k not in ("name", "description", "options")}


def test_latency_profile_is_intel_cpu_with_latency_first():
    """The shipped way to OpenVINO int8 as fast as NNCF's: exactly the options int8_latency.py measured."""
    from vitexport.backends.openvino import LATENCY_FIRST

    base, fast = profiles.load("intel-cpu"), profiles.load("intel-cpu-latency")
    int8 = fast["options"]["openvino"]["int8"]
    assert int8 == {"method": base["options"]["openvino"]["int8"]["method"], **LATENCY_FIRST}
    assert {k: v for k, v in fast.items() if k not in ("name", "description", "options")} == {k: v for k, v in base.items() if k not in ("name", "description", "options")}


# (profile text, words the one-line error must contain)
BAD = [
    ('backend = "onnxruntime"\nprecision = ["fp32"]\n', ["'precision'", "did you mean 'precisions'"]),
    ('backend = "openvino"\n[options.int8]\nreduce_range = false\n', ["[options.int8]", "[options.<backend>.int8]"]),
    ('backend = "openvino"\n[options.openvno]\ndevice = "GPU"\n', ["[options.openvno]", "did you mean 'openvino'"]),
    ('backend = "openvino"\n[options.openvino]\ndevise = "GPU"\n', ["options.openvino.devise", "did you mean 'device'"]),
    ('backend = "openvino"\n[options.openvino.int8]\nmethd = "qdq"\n', ["options.openvino.int8.methd", "did you mean 'method'"]),
    ('backend = "onnxruntime"\n[options.onnxruntime.int8]\nrecipe = { reduce_rang = true }\n', ["options.onnxruntime.int8.recipe.reduce_rang", "did you mean 'reduce_range'"]),
    ('backend = "onnxruntime"\n[options.onnxruntime.int8]\nrecipe = { reduce_range = "no" }\n', ["options.onnxruntime.int8.recipe.reduce_range", "boolean"]),
    ('backend = "onnxruntime"\n[options.onnxruntime.int8]\nrecipe = { calibration = "kl" }\n', ["options.onnxruntime.int8.recipe", "calibration must be one of"]),
    ('backend = "onnxruntime"\n[options.onnxruntime.fp32]\nx = 1\n', ["[options.onnxruntime.fp32]", "no settings"]),
    ('backend = "onnxruntime"\nthreads = "4"\n', ["threads", "integer"]),
    ('backend = "onnxruntime"\nprecisions = ["fp32", "int9"]\n', ["precisions", "'int9'", "did you mean 'int8'"]),
    ('backend = "onnxrt"\n', ["backend", "onnxruntime"]),
    ('backend = "tensorrt"\n[options.tensorrt]\nmin_batch = 4\nmax_batch = 2\n', ["[options.tensorrt]", "min_batch"]),
    ('backend = "tensorrt"\n[options.tensorrt]\nworkspace_mb = 1.5\n', ["options.tensorrt.workspace_mb", "integer"]),
    ('backend = "coreml"\n[options.coreml]\nplatform = "iPhone"\n', ["[options.coreml]", "platform"]),
    ('backend = "coreml"\n[options.coreml.int4]\nrecipe = { block_sizes = [24] }\n', ["options.coreml.int4.recipe", "powers of two"]),
    ('base = "x86-cpu"\nprecisions = "fp32"\n', ["precisions", "array of str"]),
    ('base = "no-such-profile"\n', ["unknown target 'no-such-profile'"]),
    ("backend = \n", ["not valid TOML"]),
]


@pytest.mark.parametrize("text,words", BAD, ids=[str(i) for i in range(len(BAD))])
def test_a_typo_or_wrong_type_is_one_line_naming_file_and_key(tmp_path, capsys, text, words):
    path = tmp_path / "mine.toml"
    path.write_text(text)
    with pytest.raises(VitexportError) as e:
        profiles.load(str(path))
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg, msg
    for w in words:
        assert w in msg, (w, msg)
    # and through the command: exit 2, one line on stderr, before any work (no model is even looked at)
    out = tmp_path / "dist"
    assert main(["build", "--target", str(path), "--model", str(tmp_path / "absent"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vitexport: error: ") and str(path) in err[0]
    assert not out.exists()


def test_base_chain_and_cycles(tmp_path):
    (tmp_path / "a.toml").write_text('base = "x86-cpu"\nthreads = 2\n')
    (tmp_path / "b.toml").write_text('base = "a.toml"\n[options.onnxruntime.int8]\nrecipe = { fallback_budget = 0.2 }\n')
    b = profiles.load(str(tmp_path / "b.toml"))
    assert b["threads"] == 2 and b["backend"] == "onnxruntime"
    assert b["options"]["onnxruntime"]["int8"]["recipe"] == {"reduce_range": True, "fallback_budget": 0.2}  # tables merge
    (tmp_path / "c.toml").write_text('base = "d.toml"\n')
    (tmp_path / "d.toml").write_text('base = "c.toml"\n')
    with pytest.raises(VitexportError, match="cycle"):
        profiles.load(str(tmp_path / "c.toml"))


def test_an_error_in_a_base_names_the_base_file(tmp_path):
    (tmp_path / "parent.toml").write_text('backend = "onnxruntime"\n[options.onnxruntime.int8]\nrecipe = { percentil = 99.9 }\n')
    (tmp_path / "child.toml").write_text('base = "parent.toml"\n')
    with pytest.raises(VitexportError, match="parent.toml: unknown key 'options.onnxruntime.int8.recipe.percentil'"):
        profiles.load(str(tmp_path / "child.toml"))


def test_unknown_target_name_suggests_the_close_one():
    with pytest.raises(VitexportError, match="did you mean 'x86-cpu'"):
        profiles.load("x86-cpuu")


def test_api_options_get_the_same_checks(tmp_path):
    from vitexport import api

    opts = api.BuildOptions(model=str(tmp_path / "absent"), out=str(tmp_path / "dist"), precisions=("fp32",), options={"onnxruntime": {"int8": {"recipe": {"bogus": 1}}}})
    with pytest.raises(VitexportError, match="build options: unknown key 'options.onnxruntime.int8.recipe.bogus'"):
        api.build(opts)


def test_a_bad_recipe_value_is_a_vitexport_error():
    from vitexport.backends import recipe_from
    from vitexport.quantization.int8 import Int8Recipe

    with pytest.raises(VitexportError, match="smoothquant_alpha"):
        recipe_from(Int8Recipe, {"smoothquant_alpha": 3.0})


def test_the_readme_example_profile_loads(tmp_path):
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    start = readme.index("```toml\n", readme.index("**Device profiles**")) + len("```toml\n")
    (tmp_path / "example.toml").write_text(readme[start : readme.index("```", start)])
    p = profiles.load(str(tmp_path / "example.toml"))
    assert p["options"]["onnxruntime"]["int8"]["recipe"] == {"reduce_range": False} and p["threads"] == 4


def test_coreml_numbers_are_checked_on_load(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('backend = "coreml"\n[options.coreml]\npalette_group_size = 0\n')
    with pytest.raises(VitexportError, match="palette_group_size must be >= 1"):
        profiles.load(str(path))
