"""A wheel install is a real install: built with `pip wheel --no-deps`, installed into a fresh virtual environment
(system site-packages for torch and the other dependencies, which come from local disk), run from outside the
checkout: every shipped profile is listed, a `--target` build works, and `vitexport build` with no arguments says in
one line that the default model and images come with a clone, not with the wheel."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vitexport import profiles

ROOT = Path(__file__).resolve().parent.parent


def _run(cmd: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=900, **kw)


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # a copy of what the wheel is built from, so the build leaves nothing in the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "vitexport", src / "vitexport", ignore=shutil.ignore_patterns("__pycache__"))
    r = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", tmp / "wheels", src], cwd=tmp)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = (tmp / "wheels").glob("vitexport-*.whl")
    # no pip inside the venv (ensurepip may be absent): this pip installs into it with --python
    r = _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", tmp / "venv"], cwd=tmp)
    assert r.returncode == 0, r.stderr[-2000:]
    r = _run([sys.executable, "-m", "pip", "--python", tmp / "venv" / "bin" / "python", "install", "--no-deps", "--no-index", wheel], cwd=tmp)
    assert r.returncode == 0, r.stderr[-2000:]
    return tmp / "venv"


def test_the_installed_package_is_the_wheel(venv, tmp_path):
    r = _run([venv / "bin" / "python", "-c", "import vitexport; print(vitexport.__file__)"], cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip().startswith(str(venv)), r.stdout + r.stderr


def test_wheel_lists_every_profile(venv, tmp_path):
    r = _run([venv / "bin" / "vitexport", "targets", "--json"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    listed = [p["name"] for p in json.loads(r.stdout)]
    assert listed == profiles.shipped() and len(listed) >= 10


def test_wheel_builds_with_a_target(venv, tmp_path, tiny_vit, image_folder, calib_folder):
    out = tmp_path / "dist"
    r = _run([venv / "bin" / "vitexport", "build", "--target", "x86-cpu-vnni", "--precision", "fp32,int8", "--model", tiny_vit,
              "--calib", calib_folder, "--eval", image_folder, "--out", out, "--no-latency", "--quiet"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert [row["name"] for row in report["rows"]] == ["onnxruntime-fp32", "onnxruntime-int8"]
    assert report["evaluation"]["target"] == "x86-cpu-vnni"
    recipe = json.loads((out / "onnxruntime-int8" / "manifest.json").read_text())["recipe"]
    assert recipe["recipe"]["reduce_range"] is False  # the inherited profile's one difference reached the recipe


def test_wheel_build_without_arguments_is_one_clear_line(venv, tmp_path):
    r = _run([venv / "bin" / "vitexport", "build"], cwd=tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("vitexport: error: the default model") and "not with the wheel" in lines[0] and "--model" in lines[0]
    assert not (tmp_path / "dist").exists()
