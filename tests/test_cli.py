"""The command as a build step: exit codes, one-line errors, no half-written output, clean --json, no torch in eval/bench."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_image
from vitexport.artifacts import sha256
from vitexport.cli import main


def _build(tiny_vit, images, calib, out, *extra) -> list[str]:
    return ["build", "--model", str(tiny_vit), "--eval", str(images), "--calib", str(calib), "--out", str(out), "--no-latency", *extra]


@pytest.fixture(scope="module")
def built(tiny_vit, image_folder, calib_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("built") / "dist"
    assert main(_build(tiny_vit, image_folder, calib_folder, out, "--precision", "fp32", "--quiet")) == 0
    return out


def test_build_writes_artifacts_and_report(built):
    report = json.loads((built / "report.json").read_text())
    assert report["schema_version"] == 2
    assert report["model"]["architecture"] == "ViTForImageClassification" and report["model"]["parameters"] > 0
    row = report["rows"][0]
    for key in ("backend", "precision", "path", "size_bytes", "accuracy", "latency", "memory"):
        assert key in row
    for key in ("top1", "top5", "agreement", "cosine", "n", "emulated"):
        assert key in row["accuracy"]
    assert row["accuracy"]["n"] == 24 and row["accuracy"]["agreement"] == 1.0
    assert report["reference"]["verification"]["max_abs_diff"] < 1e-4
    manifest = json.loads((built / "onnxruntime-fp32" / "manifest.json").read_text())
    for f in manifest["files"]:
        assert sha256(built / "onnxruntime-fp32" / f["path"]) == f["sha256"]
    assert manifest["preprocessing"]["resize"] == [32, 32] and manifest["labels"][1] == "dog, doggy"
    assert "| onnxruntime-fp32 |" in (built / "report.md").read_text()
    assert not list(built.parent.glob(".dist.partial-*"))


def test_existing_output_needs_force(built, tiny_vit, image_folder, calib_folder, capsys):
    before = (built / "report.json").read_text()
    assert main(_build(tiny_vit, image_folder, calib_folder, built, "--precision", "fp32")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--force" in err[0]
    assert (built / "report.json").read_text() == before


def test_force_replaces_output(tiny_vit, image_folder, calib_folder, tmp_path):
    out = tmp_path / "dist"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    assert main(_build(tiny_vit, image_folder, calib_folder, out, "--precision", "fp32", "--quiet", "--force")) == 0
    assert not (out / "stale.txt").exists() and (out / "report.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["dist"]


def test_json_mode_prints_only_the_report(tiny_vit, image_folder, calib_folder, tmp_path, capsys):
    assert main(_build(tiny_vit, image_folder, calib_folder, tmp_path / "d", "--precision", "fp32", "--json")) == 0
    out = capsys.readouterr().out
    assert json.loads(out)["rows"][0]["precision"] == "fp32"


def _one_line_failure(capsys, argv, match: str, leftovers: Path | None = None) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.strip().splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("vitexport: error:") and match in errors[0], captured.err
    assert captured.err.strip().splitlines()[-1] == errors[0]
    assert "Traceback" not in captured.err
    if leftovers is not None:
        assert list(leftovers.iterdir()) == []


def test_corrupt_eval_image_fails_cleanly(tiny_vit, image_folder, calib_folder, tmp_path, capsys):
    images = tmp_path / "imgs"
    write_image(images / "ok.jpg", "RGB")
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    outdir = tmp_path / "outs"
    outdir.mkdir()
    _one_line_failure(capsys, _build(tiny_vit, images, calib_folder, outdir / "dist", "--precision", "fp32"), "broken.jpg", leftovers=outdir)


def test_empty_folder_and_non_vit_and_bad_target(tiny_vit, bert_dir, image_folder, calib_folder, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    _one_line_failure(capsys, _build(tiny_vit, tmp_path / "empty", calib_folder, tmp_path / "o1"), "no images")
    _one_line_failure(capsys, _build(bert_dir, image_folder, calib_folder, tmp_path / "o2"), "'bert' checkpoint")
    _one_line_failure(capsys, _build(tiny_vit, image_folder, calib_folder, tmp_path / "o3", "--target", "toaster"), "unknown target")
    _one_line_failure(capsys, _build(tiny_vit, image_folder, calib_folder, tmp_path / "o4", "--precision", "int3"), "no precision int3")
    assert not any(p.name.startswith("o") for p in tmp_path.iterdir())


def test_unwritable_output_fails_cleanly(tiny_vit, image_folder, calib_folder, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    _one_line_failure(capsys, _build(tiny_vit, image_folder, calib_folder, blocker / "dist", "--precision", "fp32"), "cannot write")


def test_eval_and_bench_need_no_torch(built, image_folder):
    code = f"""
import sys, json
from vitexport.cli import main
assert main(["eval", {str(built / 'onnxruntime-fp32')!r}, "--images", {str(image_folder)!r}, "--json"]) == 0
assert main(["bench", {str(built / 'onnxruntime-fp32')!r}, "--batch", "2", "--json"]) == 0
heavy = [m for m in ("torch", "transformers") if m in sys.modules]
assert not heavy, heavy
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    first = json.loads(res.stdout[: res.stdout.index("\n}\n") + 2])
    assert first["rows"][0]["accuracy"]["n"] == 24 and first["rows"][0]["accuracy"]["top1"] is not None


def test_eval_of_something_that_is_not_an_artifact(tmp_path, image_folder, capsys):
    _one_line_failure(capsys, ["eval", str(tmp_path), "--images", str(image_folder)], "not a vitexport artifact")


def test_python_dash_m_is_the_same_command(tmp_path):
    # a CI step that calls a virtual environment's interpreter directly has no ``vitexport`` script on PATH
    res = subprocess.run([sys.executable, "-m", "vitexport", "build", "--quiet", "--model", str(tmp_path / "missing")], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vitexport: error: model directory not found"), res.stderr
    res = subprocess.run([sys.executable, "-m", "vitexport", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.startswith("usage: vitexport ")


def test_help_is_complete(capsys):
    for cmd in ("build", "eval", "bench"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--model", "--backend", "--precision", "--calib", "--eval", "--num-calib", "--out", "--force", "--json", "--quiet", "--images", "--target"):
        assert flag in text


def test_cache_max_size_takes_sizes_and_refuses_anything_else(capsys):
    from vitexport.cli import _size

    assert (_size("10G"), _size("500m"), _size("1.5GiB"), _size("4096"), _size("none")) == (10 << 30, 500 << 20, 3 << 29, 4096, None)
    with pytest.raises(SystemExit) as e:
        main(["build", "--cache-max-size", "ten gigs"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--cache-max-size" in err[0] and "10G" in err[0]


@pytest.fixture(scope="module")
def built_all(tiny_vit, image_folder, calib_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("built_all") / "dist"
    assert main(_build(tiny_vit, image_folder, calib_folder, out, "--precision", "int4,fp32,int8", "--quiet")) == 0
    return out


def test_every_onnxruntime_precision_is_a_measured_row(built_all):
    report = json.loads((built_all / "report.json").read_text())
    rows = {r["precision"]: r for r in report["rows"]}
    assert [r["precision"] for r in report["rows"]] == ["fp32", "int8", "int4"]  # the reference row first
    assert rows["int8"]["size_bytes"] < rows["fp32"]["size_bytes"]
    for p in ("int8", "int4"):
        a = rows[p]["accuracy"]
        assert a["emulated"] is False and 0.0 <= a["agreement"] <= 1.0 and a["cosine"] > 0.9
        assert rows[p]["build"]["seconds"] >= 0 and rows[p]["recipe"]
        manifest = json.loads((built_all / f"onnxruntime-{p}" / "manifest.json").read_text())
        assert manifest["recipe"]["calibration_images"] == 12
    assert report["evaluation"]["calibration_images"] == 12


def test_quality_gate_fails_the_build_step(tiny_vit, image_folder, calib_folder, tmp_path, capsys):
    argv = _build(tiny_vit, image_folder, calib_folder, tmp_path / "d", "--precision", "fp32,int8", "--quiet", "--min-agreement", "100.1")
    assert main(argv) == 1
    assert "quality gate failed" in capsys.readouterr().err
    assert (tmp_path / "d" / "report.json").exists()  # the report is still there to read
