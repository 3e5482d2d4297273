"""The build step's contract under hostile input and faults (issue #10).

0 done, 1 a quality gate failed, 2 a user error (one line on stderr saying what to do), 130/143 interrupted
(SIGINT/SIGTERM); never a traceback, never a half-written or stale output, never a change to an input.
Each class of failure is parametrised over several cases; most of them fail before any slow work.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

from conftest import CALIB, DEIT, EVAL, REPO, write_image
from vitexport.cli import main


# ---------------------------------------------------------------- helpers


def _build(model, images, calib, out, *extra) -> list[str]:
    return ["build", "--model", str(model), "--eval", str(images), "--calib", str(calib), "--out", str(out), "--no-latency", "--quiet", *extra]


def _fails(capsys, argv, match: str, code: int = 2) -> str:
    """main(argv) exits `code` with exactly one 'vitexport: error:' line on stderr containing `match`, no traceback."""
    rc = main(argv)
    cap = capsys.readouterr()
    assert rc == code, cap.err
    errors = [line for line in cap.err.strip().splitlines() if line.startswith("vitexport: error:")]
    assert len(errors) == 1, cap.err
    assert match.lower() in errors[0].lower(), cap.err
    assert "Traceback" not in cap.err and "internal error" not in cap.err, cap.err
    assert "\x1b[" not in errors[0]  # no terminal colour codes from a library's message
    return errors[0]


def _digest(root: Path) -> dict[str, str]:
    """Every file (and its content) under root: to prove an input was not touched."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def _copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_json(path: Path, **changes) -> None:
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))


def _no_leftovers(parent: Path) -> None:
    left = [p.name for p in parent.iterdir() if p.name.startswith(".")]
    assert left == [], left


# ---------------------------------------------------------------- 1. --out must never be (in) an input


@pytest.mark.parametrize("where", ["model", "inside-model", "contains-model", "eval", "inside-eval", "calib", "contains-calib"])
def test_out_overlapping_an_input_is_refused_before_any_work(where, tiny_vit, image_folder, calib_folder, tmp_path, capsys, monkeypatch):
    model = _copy_checkpoint(tiny_vit, tmp_path / "work" / "m")
    images = shutil.copytree(image_folder, tmp_path / "work" / "imgs")
    calib = shutil.copytree(calib_folder, tmp_path / "work" / "cal")
    out = {
        "model": model,
        "inside-model": model / "sub",
        "contains-model": model.parent,
        "eval": images,
        "inside-eval": images / "cat",
        "calib": calib,
        "contains-calib": tmp_path / "work",
    }[where]
    before = _digest(tmp_path / "work")
    from vitexport import model as model_module

    def no_work(*a, **k):  # refused up front: the checkpoint is never even loaded
        raise AssertionError("the build started")

    monkeypatch.setattr(model_module.ModelSpec, "load", no_work)
    _fails(capsys, _build(model, images, calib, out, "--precision", "fp32", "--force"), "--out")
    assert _digest(tmp_path / "work") == before


def test_out_that_is_the_current_folder_is_refused(tiny_vit, image_folder, calib_folder, tmp_path, capsys, monkeypatch):
    here = tmp_path / "here"
    here.mkdir()
    (here / "keep.txt").write_text("mine")
    monkeypatch.chdir(here)
    _fails(capsys, _build(tiny_vit, image_folder, calib_folder, ".", "--precision", "fp32", "--force"), "current folder")
    assert (here / "keep.txt").read_text() == "mine" and [p.name for p in tmp_path.iterdir()] == ["here"]


# ---------------------------------------------------------------- 2. one build per --out at a time


def test_a_locked_out_is_refused(tiny_vit, image_folder, calib_folder, tmp_path, capsys):
    from vitexport.artifacts import output_lock

    out = tmp_path / "dist"
    with output_lock(out):
        _fails(capsys, _build(tiny_vit, image_folder, calib_folder, out, "--precision", "fp32"), "another vitexport build")
    assert not out.exists()
    assert main(_build(tiny_vit, image_folder, calib_folder, out, "--precision", "fp32")) == 0  # released: builds
    _no_leftovers(tmp_path)


def test_out_created_during_the_build_is_not_replaced(tiny_vit, image_folder, calib_folder, tmp_path, capsys, monkeypatch):
    """Re-checked at the final rename: without --force a folder that appeared meanwhile is kept."""
    from vitexport import api

    out = tmp_path / "dist"
    real = api.measure_artifacts

    def meanwhile(*a, **k):
        out.mkdir()
        (out / "theirs.txt").write_text("someone else's")
        return real(*a, **k)

    monkeypatch.setattr(api, "measure_artifacts", meanwhile)
    _fails(capsys, _build(tiny_vit, image_folder, calib_folder, out, "--precision", "fp32"), "--force")
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]
    _no_leftovers(tmp_path)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "vitexport.cli", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), "HF_HUB_OFFLINE": "1"}


def test_two_builds_into_one_out_at_once(tiny_vit, image_folder, calib_folder, tmp_path):
    out = tmp_path / "dist"
    procs = [subprocess.Popen(_cli(*_build(tiny_vit, image_folder, calib_folder, out, "--precision", "fp32")), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env()) for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    loser = next(err for rc, err in results if rc == 2)
    assert "another vitexport build" in loser or "already exists" in loser, loser
    assert "Traceback" not in loser
    report = json.loads((out / "report.json").read_text())
    assert report["rows"][0]["precision"] == "fp32" and (out / "onnxruntime-fp32" / "manifest.json").is_file()
    _no_leftovers(tmp_path)


# ---------------------------------------------------------------- 3. silently wrong artifacts


def _checkpoint_variant(tiny_vit: Path, dst: Path, kind: str) -> Path:
    from safetensors.torch import load_file, save_file

    d = _copy_checkpoint(tiny_vit, dst)
    weights = d / "model.safetensors"
    if kind == "missing-head":
        sd = {k: v for k, v in load_file(weights).items() if not k.startswith("classifier")}
        save_file(sd, weights, metadata={"format": "pt"})
    elif kind == "classifier-as-backbone":
        _edit_json(d / "config.json", architectures=["ViTModel"])
    elif kind == "nan-weight":
        sd = load_file(weights)
        sd["classifier.bias"][0] = float("nan")
        save_file(sd, weights, metadata={"format": "pt"})
    return d


@pytest.mark.parametrize(
    "kind,match",
    [("missing-head", "random"), ("classifier-as-backbone", "random"), ("nan-weight", "non-finite")],
)
def test_random_or_non_finite_weights_never_become_an_artifact(kind, match, tiny_vit, image_folder, calib_folder, tmp_path, capsys):
    model = _checkpoint_variant(tiny_vit, tmp_path / "m", kind)
    _fails(capsys, _build(model, image_folder, calib_folder, tmp_path / "out", "--precision", "fp32"), match)
    assert not (tmp_path / "out").exists()
    _no_leftovers(tmp_path)


@pytest.mark.parametrize(
    "change,match",
    [
        ({"image_std": [0.0, 0.0, 0.0]}, "image_std"),
        ({"image_std": [0.5, float("nan"), 0.5]}, "image_std"),
        ({"size": "224"}, "size"),
        ({"size": 0}, "size"),
        ({"size": {"height": 0, "width": 32}}, "size"),
        ({"resample": 99}, "resample"),
        ({"image_mean": [0.5, 0.5]}, "image_mean"),
        ({"crop_size": "big", "do_center_crop": True}, "crop_size"),
        ({"rescale_factor": -1}, "rescale_factor"),
    ],
    ids=["std-zero", "std-nan", "size-string", "size-zero", "height-zero", "resample-99", "mean-2-values", "crop-string", "rescale-negative"],
)
def test_bad_preprocessor_config_is_one_line(change, match, tiny_vit, image_folder, calib_folder, tmp_path, capsys):
    model = _copy_checkpoint(tiny_vit, tmp_path / "m")
    _edit_json(model / "preprocessor_config.json", **change)
    before = _digest(model)
    _fails(capsys, _build(model, image_folder, calib_folder, tmp_path / "out", "--precision", "fp32"), match)
    assert _digest(model) == before and not (tmp_path / "out").exists()


def test_a_named_classes_file_beyond_the_models_labels_is_refused(tiny_vit, calib_folder, tmp_path, capsys):
    """The shipped ImageNet classes.tsv with a 4-label model would score 0% top-1 without a word."""
    _fails(capsys, _build(tiny_vit, EVAL, calib_folder, tmp_path / "out", "--precision", "fp32", "--classes", str(EVAL / "classes.tsv")), "4 labels")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("layout", ["found-classes-tsv", "numeric-folders"])
def test_labels_found_beyond_the_models_labels_are_not_scored(layout, tiny_vit, calib_folder, tmp_path, capsys):
    """Labels vitexport discovered by itself that do not fit the model: said loudly, and no top-1 is reported."""
    if layout == "found-classes-tsv":
        images = EVAL
    else:
        images = tmp_path / "imgs"
        write_image(images / "1" / "a.jpg", "RGB")
        write_image(images / "7" / "b.jpg", "RGB", seed=1)
    out = tmp_path / "out"
    argv = [a for a in _build(tiny_vit, images, calib_folder, out, "--precision", "fp32", "--num-eval", "8") if a != "--quiet"]
    assert main(argv) == 0
    assert "4 labels: they are not used" in capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["evaluation"]["labelled"] == 0 and report["rows"][0]["accuracy"]["top1"] is None


def test_export_check_fails_on_non_finite_outputs():
    from vitexport.export import verification_problem

    assert verification_problem({"max_abs_diff": float("nan"), "top1_agreement": 1.0, "n": 4, "finite": False}) is not None
    assert verification_problem({"max_abs_diff": float("inf"), "top1_agreement": 1.0, "n": 4, "finite": True}) is not None
    assert verification_problem({"max_abs_diff": 1e-6, "top1_agreement": 1.0, "n": 4, "finite": True}) is None


# ---------------------------------------------------------------- 4. eval/bench verify the artifact before running it


@pytest.fixture(scope="module")
def fp32_artifact(tiny_vit, image_folder, calib_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rel") / "dist"
    assert main(_build(tiny_vit, image_folder, calib_folder, out, "--precision", "fp32")) == 0
    return out / "onnxruntime-fp32"


def _flip_weight_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    at = len(data) - 200  # inside the classifier's weights, not the protobuf framing
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def _break(art: Path, kind: str) -> None:
    onnx_file = art / "model.onnx"
    manifest = art / "manifest.json"
    if kind == "missing":
        onnx_file.unlink()
    elif kind == "truncated":
        onnx_file.write_bytes(onnx_file.read_bytes()[: onnx_file.stat().st_size // 2])
    elif kind == "empty":
        onnx_file.write_bytes(b"")
    elif kind == "bit-flip":
        _flip_weight_byte(onnx_file)
    elif kind == "manifest-empty":
        manifest.write_text("{}")
    elif kind == "main-outside":
        _edit_json(manifest, main="../../../../etc/hostname")
    elif kind == "unknown-backend":
        _edit_json(manifest, backend="tflite")
    elif kind == "bad-preprocessing":
        _edit_json(manifest, preprocessing={"resize": "big"})
    elif kind == "no-input-shape":
        _edit_json(manifest, io={"input": "pixel_values"})


BREAKS = [("missing", "missing"), ("truncated", "sha256"), ("empty", "sha256"), ("bit-flip", "sha256"), ("manifest-empty", "manifest"), ("main-outside", "outside"), ("unknown-backend", "backend"), ("bad-preprocessing", "preprocessing"), ("no-input-shape", "input_shape")]


@pytest.mark.parametrize("command", ["eval", "bench"])
@pytest.mark.parametrize("kind,match", BREAKS, ids=[k for k, _ in BREAKS])
def test_a_broken_artifact_is_refused(command, kind, match, fp32_artifact, image_folder, tmp_path, capsys):
    art = shutil.copytree(fp32_artifact, tmp_path / "art")
    _break(art, kind)
    argv = ["eval", str(art), "--images", str(image_folder)] if command == "eval" else ["bench", str(art), "--batch", "2"]
    _fails(capsys, argv, match)


def test_eval_out_that_is_the_artifact_is_refused(fp32_artifact, image_folder, tmp_path, capsys):
    art = shutil.copytree(fp32_artifact, tmp_path / "art")
    before = _digest(art)
    _fails(capsys, ["eval", str(art), "--images", str(image_folder), "--out", str(art), "--force"], "--out")
    assert _digest(art) == before


def test_an_edited_artifact_runs_with_the_override(fp32_artifact, image_folder, tmp_path, capsys):
    art = shutil.copytree(fp32_artifact, tmp_path / "art")
    _flip_weight_byte(art / "model.onnx")
    assert main(["eval", str(art), "--images", str(image_folder), "--ignore-sha256", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rows"][0]["accuracy"]["n"] == 24


def test_reference_with_another_output_is_refused(fp32_artifact, tiny_backbone, image_folder, calib_folder, tmp_path, capsys):
    out = tmp_path / "bb"
    assert main(_build(tiny_backbone, image_folder, calib_folder, out, "--precision", "fp32")) == 0
    _fails(capsys, ["eval", str(fp32_artifact), "--images", str(image_folder), "--reference", str(out / "onnxruntime-fp32")], "reference")


# ---------------------------------------------------------------- 5. no tracebacks: bad checkpoints, images, files, options


def _bad_weights(dst: Path, tiny_vit: Path, kind: str) -> Path:
    d = _copy_checkpoint(tiny_vit, dst)
    w = d / "model.safetensors"
    if kind == "truncated":
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    elif kind == "empty":
        w.write_bytes(b"")
    elif kind == "bad-header":
        w.write_bytes(struct.pack("<Q", 40) + b"{not json at all, really not json!!!!!!" + b"\0" * 64)
    elif kind == "shape-mismatch":
        _edit_json(d / "config.json", intermediate_size=128)
    elif kind == "one-channel":
        _edit_json(d / "config.json", num_channels=1)
    elif kind == "unknown-architecture":
        _edit_json(d / "config.json", architectures=["ViTForSomethingNew"])
    return d


@pytest.mark.parametrize(
    "kind,match",
    [("truncated", "model.safetensors"), ("empty", "model.safetensors"), ("bad-header", "model.safetensors"), ("shape-mismatch", "shape"), ("one-channel", "channel"), ("unknown-architecture", "ViTForSomethingNew")],
)
def test_bad_checkpoint_is_one_line(kind, match, tiny_vit, image_folder, calib_folder, tmp_path, capsys):
    model = _bad_weights(tmp_path / "m", tiny_vit, kind)
    line = _fails(capsys, _build(model, image_folder, calib_folder, tmp_path / "out", "--precision", "fp32"), match)
    assert "upgrade transformers" not in line
    assert not (tmp_path / "out").exists()
    _no_leftovers(tmp_path)


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_even_when_trusted(tiny_vit, image_folder, calib_folder, tmp_path, capsys):
    model = _copy_checkpoint(tiny_vit, tmp_path / "m")
    (model / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    evil = _Evil()
    evil.marker = marker
    (model / "pytorch_model.bin").write_bytes(pickle.dumps({"x": evil}))
    _fails(capsys, _build(model, image_folder, calib_folder, tmp_path / "out", "--precision", "fp32", "--trust-pickle"), "weights")
    assert not marker.exists()


def _png_header_only(path: Path, w: int, h: int) -> Path:
    """A PNG that claims w x h pixels (PIL refuses it as a decompression bomb before decoding anything)."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("kind", ["bomb", "dangling-symlink", "binary-classes"])
def test_bad_image_folder_is_one_line_naming_the_file(kind, tiny_vit, calib_folder, tmp_path, capsys):
    images = tmp_path / "imgs"
    write_image(images / "cat" / "ok.jpg", "RGB")
    if kind == "bomb":
        bad = _png_header_only(images / "cat" / "huge.png", 30000, 30000)
    elif kind == "dangling-symlink":
        bad = images / "cat" / "gone.jpg"
        bad.symlink_to(tmp_path / "nowhere.jpg")
    else:
        bad = images / "classes.tsv"
        bad.write_bytes(bytes(range(256)) * 4)
    _fails(capsys, _build(tiny_vit, images, calib_folder, tmp_path / "out", "--precision", "fp32"), bad.name)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("opset", ["99", "16", "0"])
def test_opset_out_of_range_is_refused_up_front(opset, tiny_vit, image_folder, calib_folder, tmp_path, capsys):
    _fails(capsys, _build(tiny_vit, image_folder, calib_folder, tmp_path / "out", "--precision", "fp32", "--opset", opset), "--opset")


def test_non_utf8_folder_name_builds(tiny_vit, calib_folder, tmp_path, capsys):
    root = os.fsencode(tmp_path) + b"/imgs-\xff\xfe"
    os.makedirs(root + b"/cat")
    write_image(Path(os.fsdecode(root + b"/cat/a.jpg")), "RGB")
    out = tmp_path / "out"
    assert main(_build(tiny_vit, os.fsdecode(root), calib_folder, out, "--precision", "fp32")) == 0
    assert (out / "report.md").read_text(encoding="utf-8")
    json.loads((out / "report.json").read_text(encoding="utf-8"))


# ---------------------------------------------------------------- 6. leftovers: signals, stale partials, full disks


def _wait_for(proc: subprocess.Popen, needle: str, log: list[str], timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            raise AssertionError("build ended before: " + needle + "\n" + "".join(log))
        log.append(line)
        if needle in line:
            return
    raise AssertionError("timed out waiting for " + needle)


@pytest.mark.skipif(not (DEIT / "model.safetensors").is_file(), reason="the shipped DeiT-tiny is needed for a build long enough to interrupt")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_signal_mid_calibration_and_a_clean_rerun(sig, tiny_vit, image_folder, calib_folder, tmp_path):
    out = tmp_path / "dist"
    argv = ["build", "--model", str(DEIT), "--calib", str(CALIB), "--eval", str(EVAL), "--num-eval", "16", "--num-calib", "48", "--precision", "fp32,int8", "--no-latency", "--out", str(out)]
    proc = subprocess.Popen(_cli(*argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    log: list[str] = []
    _wait_for(proc, "building onnxruntime int8", log)
    time.sleep(3)  # into the calibration passes
    proc.send_signal(sig)
    rest = proc.stderr.read()
    rc = proc.wait(timeout=120)
    assert not out.exists()
    partials = [p for p in tmp_path.iterdir() if p.name.startswith(".dist.partial-")]
    if sig == signal.SIGTERM:
        assert rc == 143, (rc, rest)
        assert "Traceback" not in rest and "vitexport: terminated" in rest, rest
        _no_leftovers(tmp_path)
    else:
        assert rc == -signal.SIGKILL
        assert len(partials) == 1  # what a killed build leaves: its pid file says whose it was
        assert json.loads((partials[0] / ".vitexport-build.json").read_text())["pid"] == proc.pid
    # the rerun into the same --out cleans (and names) what a dead build left, and succeeds
    rerun = [a for a in _build(tiny_vit, image_folder, calib_folder, out, "--precision", "fp32") if a != "--quiet"]  # warnings shown
    res = subprocess.run(_cli(*rerun), capture_output=True, text=True, env=_env(), timeout=600)
    assert res.returncode == 0, res.stderr
    if partials:
        assert partials[0].name in res.stderr and "removed" in res.stderr
    assert (out / "report.json").is_file() and not (out / ".vitexport-build.json").exists()
    _no_leftovers(tmp_path)


def test_a_foreign_partial_folder_is_named_not_removed(tiny_vit, image_folder, calib_folder, tmp_path, capsys):
    """A partial folder without vitexport's pid file is not ours to delete: it is named, not removed."""
    foreign = tmp_path / ".dist.partial-foreign"
    foreign.mkdir()
    (foreign / "x").write_text("?")
    out = tmp_path / "dist"
    assert main(["build", "--model", str(tiny_vit), "--eval", str(image_folder), "--out", str(out), "--no-latency", "--precision", "fp32"]) == 0
    assert foreign.is_dir() and foreign.name in capsys.readouterr().err


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True).returncode == 0


def test_full_disk_is_refused_up_front(tiny_vit, image_folder, calib_folder, tmp_path, capsys):
    small = tmp_path / "small"
    if not _mount_tmpfs(small, "64k"):
        pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN); test_enospc_at_the_write_boundary covers the write path")
    try:
        _fails(capsys, _build(tiny_vit, image_folder, calib_folder, small / "out", "--precision", "fp32"), "space")
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], check=False)


@pytest.mark.skipif(not (DEIT / "model.safetensors").is_file(), reason="needs the shipped DeiT-tiny (23 MB of weights) to outgrow the free-space estimate")
def test_full_disk_mid_build_is_one_line_and_leaves_nothing(tmp_path, capsys):
    """A real ENOSPC: the up-front estimate (image caches + weights) fits in 40 MB, the reference plus an artifact do not."""
    small = tmp_path / "small"
    if not _mount_tmpfs(small, "40m"):
        pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN); test_enospc_at_the_write_boundary covers the write path")
    try:
        argv = ["build", "--model", str(DEIT), "--eval", str(EVAL), "--num-eval", "16", "--precision", "fp32", "--no-latency", "--quiet", "--out", str(small / "out")]
        _fails(capsys, argv, "no space left")
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], check=False)


@pytest.mark.parametrize("where", ["artifact-write", "image-cache"])
def test_enospc_at_the_write_boundary(where, tiny_vit, image_folder, calib_folder, tmp_path, capsys, monkeypatch):
    """Simulated: the write that hits a full disk raises ENOSPC as the OS would."""
    from vitexport import api
    from vitexport.backends import onnxruntime as ort_backend

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(a[-1]) if a else None)

    if where == "artifact-write":
        monkeypatch.setattr(ort_backend, "reference_on_read_rows", full)  # the fp32 artifact's write of the reference ONNX
    else:
        monkeypatch.setattr(api.os, "posix_fallocate", full)
    _fails(capsys, _build(tiny_vit, image_folder, calib_folder, tmp_path / "out", "--precision", "fp32"), "no space left")
    assert not (tmp_path / "out").exists()
    _no_leftovers(tmp_path)


# ---------------------------------------------------------------- 7. counts


@pytest.mark.parametrize(
    "argv_tail,flag",
    [
        (["--num-calib", "-1", "--precision", "fp32,int8"], "--num-calib"),
        (["--num-calib", "0", "--precision", "fp32,int8"], "--num-calib"),
        (["--num-eval", "-3"], "--num-eval"),
        (["--num-eval", "0"], "--num-eval"),
        (["--threads", "-3"], "--threads"),
        (["--threads", "0"], "--threads"),
        (["--min-agreement", "nan"], "--min-agreement"),
        (["--min-agreement", "-5"], "--min-agreement"),
        (["--max-top1-drop", "-1"], "--max-top1-drop"),
    ],
)
def test_build_counts_must_be_positive(argv_tail, flag, tiny_vit, image_folder, calib_folder, tmp_path, capsys):
    argv = _build(tiny_vit, image_folder, calib_folder, tmp_path / "out", *argv_tail)
    if "--precision" not in argv_tail:
        argv += ["--precision", "fp32"]
    _fails(capsys, argv, flag)


@pytest.mark.parametrize("tail,flag", [(["eval", "--limit", "-2"], "--limit"), (["eval", "--limit", "0"], "--limit"), (["bench", "--batch", "0"], "--batch"), (["bench", "--batch", "-1"], "--batch"), (["bench", "--threads", "-1"], "--threads")])
def test_eval_and_bench_counts_must_be_positive(tail, flag, fp32_artifact, image_folder, capsys):
    command, *rest = tail
    argv = [command, str(fp32_artifact), *rest] + (["--images", str(image_folder)] if command == "eval" else [])
    _fails(capsys, argv, flag)


# ---------------------------------------------------------------- exit codes beyond user errors


def test_a_bug_is_one_line_with_exit_3_and_a_traceback_only_with_verbose(tiny_vit, image_folder, calib_folder, tmp_path, capsys, monkeypatch):
    from vitexport import api

    def bug(*a, **k):
        raise RuntimeError("something vitexport got wrong")

    monkeypatch.setattr(api, "_build_locked", bug)
    assert main(_build(tiny_vit, image_folder, calib_folder, tmp_path / "out", "--precision", "fp32")) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vitexport: error: internal error RuntimeError: something vitexport got wrong") and "Traceback" not in err
    argv = _build(tiny_vit, image_folder, calib_folder, tmp_path / "out", "--precision", "fp32")
    argv.remove("--quiet")
    assert main([*argv, "--verbose"]) == 3
    assert "Traceback" in capsys.readouterr().err
    _no_leftovers(tmp_path)


def test_ctrl_c_mid_build_exits_130_and_leaves_nothing(tiny_vit, image_folder, calib_folder, tmp_path, capsys, monkeypatch):
    from vitexport import api

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "measure_artifacts", interrupted)
    assert main(_build(tiny_vit, image_folder, calib_folder, tmp_path / "out", "--precision", "fp32")) == 130
    assert "interrupted" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_argparse_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["build", "--threads", "many"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vitexport: error: argument --threads")


# ---------------------------------------------------------------- 8. minor: modes


def test_output_folder_follows_the_umask(tiny_vit, image_folder, calib_folder, tmp_path):
    old = os.umask(0o022)
    try:
        assert main(_build(tiny_vit, image_folder, calib_folder, tmp_path / "out", "--precision", "fp32")) == 0
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755


# ---------------------------------------------------------------- 9. artifacts that do not mislead the app


def test_manifest_preprocessing_says_it_in_words():
    from vitexport.data import Preprocessing

    cfg = json.loads((DEIT / "preprocessor_config.json").read_text())
    d = Preprocessing.from_processor_config(cfg).to_dict()
    assert d["color"] == "RGB" and d["resample_name"] == "bicubic" and d["layout"] == "NCHW float32"
    assert "centre crop 224x224" in d["steps"] and "bicubic" in d["steps"] and "RGB" in d["steps"]
    assert Preprocessing.from_dict(d) == Preprocessing.from_processor_config(cfg)


@pytest.fixture(scope="module")
def every_backend(tiny_backbone, image_folder, calib_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("every") / "dist"
    assert main(_build(tiny_backbone, image_folder, calib_folder, out, "--backend", "onnxruntime,openvino,coreml,tensorrt", "--precision", "fp32")) == 0
    return out


def test_onnx_output_is_described_for_a_backbone(every_backend):
    import onnx

    m = onnx.load(str(every_backend / "onnxruntime-fp32" / "model.onnx"))
    assert m.graph.output[0].doc_string and "embedding" in m.graph.output[0].doc_string


def test_tensorrt_kit_is_self_contained(every_backend):
    plan = json.loads((every_backend / "tensorrt-fp32" / "tensorrt.json").read_text())
    assert not plan["timing_cache"].startswith("..") and "/" not in plan["timing_cache"]
    assert plan["timing_cache"] in (every_backend / "tensorrt-fp32" / "trtexec.sh").read_text()


def test_openvino_records_the_precision_its_figures_hold_for(every_backend):
    from vitexport.backends.openvino import read_rt_info

    art = every_backend / "openvino-fp32"
    info = read_rt_info(art / "model.xml")
    assert info["inference_precision_hint"] == "f32"
    assert json.loads((art / "manifest.json").read_text())["recipe"]["inference_precision_hint"] == "f32"


def test_coreml_metadata_has_no_build_path_and_a_licence(every_backend):
    ct = pytest.importorskip("coremltools")
    spec = ct.utils.load_spec(str(every_backend / "coreml-fp32" / "model.mlpackage"))
    text = spec.description.metadata.shortDescription + json.dumps(dict(spec.description.metadata.userDefined))
    assert str(every_backend.parent) not in text and "/tmp" not in text
    assert spec.description.metadata.license
    assert "regionOfInterest" in spec.description.metadata.userDefined["vitexport.app_framing"]


def test_coreml_framing_is_the_evaluated_one():
    """DeiT resizes to 256x256 and crops 224: the centre 87.5% stretched to 224, not Vision's plain .centerCrop."""
    from vitexport.backends.coreml import app_framing
    from vitexport.data import Preprocessing

    deit = Preprocessing.from_processor_config(json.loads((DEIT / "preprocessor_config.json").read_text()))
    text = app_framing(deit)
    assert "87.50% x 87.50%" in text and "x: 0.0625" in text and ".scaleFill" in text
    short = Preprocessing(shortest_edge=256, crop=(224, 224), resample=3)
    assert ".centerCrop" in app_framing(short) and "87.50%" in app_framing(short)
    squash = Preprocessing(resize=(224, 224), resample=2)
    assert "width: 1.0000" in app_framing(squash) and ".scaleFill" in app_framing(squash)


def test_evaluating_a_truncated_openvino_bin_is_refused(every_backend, image_folder, tmp_path, capsys):
    art = shutil.copytree(every_backend / "openvino-fp32", tmp_path / "ov")
    b = art / "model.bin"
    b.write_bytes(b.read_bytes()[: b.stat().st_size // 2])
    _fails(capsys, ["eval", str(art), "--images", str(image_folder)], "sha256")
