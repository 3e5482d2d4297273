"""Checkpoints in, verified reference ONNX out; anything that is not a ViT ends in one clear error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from conftest import DEIT
from vitexport.errors import VitexportError
from vitexport.export import export_reference
from vitexport.model import ModelSpec


def test_deit_spec_reads_its_own_preprocessing():
    spec = ModelSpec.load(DEIT)
    assert spec.task == "classification" and spec.architecture == "ViTForImageClassification"
    assert spec.preprocessing.resize == (256, 256) and spec.preprocessing.crop == (224, 224)
    assert len(spec.id2label) == 1000 and spec.id2label[0].startswith("tench")
    assert spec.input_shape == (3, 224, 224)


def test_backbone_is_an_embedding_model(tiny_backbone):
    spec = ModelSpec.load(tiny_backbone)
    assert spec.task == "embedding" and spec.output_name == "embedding" and spec.id2label == {}


@pytest.mark.parametrize(
    "case,match",
    [
        ("bert", "'bert' checkpoint"),
        ("missing", "not found"),
        ("no_config", "no config.json"),
        ("pickle_only", "--trust-pickle"),
        ("file", "not a file"),
    ],
)
def test_unsupported_checkpoints(tmp_path, bert_dir, tiny_vit, case, match):
    if case == "bert":
        src = bert_dir
    elif case == "missing":
        src = tmp_path / "nope"
    elif case == "no_config":
        src = tmp_path
    elif case == "file":
        src = tmp_path / "model.safetensors"
        src.write_bytes(b"x")
    else:
        src = tmp_path / "pickled"
        src.mkdir()
        (src / "config.json").write_text((tiny_vit / "config.json").read_text())
        (src / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(VitexportError, match=match):
        ModelSpec.load(src)


def test_unreachable_hub_id_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(VitexportError, match="Hugging Face Hub"):
        ModelSpec.load("google/vit-base-patch16-224-does-not-exist")


def _export(src: Path, out: Path):
    spec = ModelSpec.load(src)
    x = np.random.default_rng(0).standard_normal((4, *spec.input_shape)).astype(np.float32)
    return spec, export_reference(spec, out, x)


def test_classifier_export_is_verified_and_self_describing(tiny_vit, tmp_path):
    spec, ref = _export(tiny_vit, tmp_path)
    assert ref.verification["max_abs_diff"] < 1e-4 and ref.verification["top1_agreement"] == 1.0
    model = onnx.load(ref.path)
    ops = {n.op_type for n in model.graph.node}
    assert "LayerNormalization" in ops and "ReduceMean" not in ops  # LayerNorm kept whole
    # scores go straight from their scaling into Softmax: no all-visible additive mask in between
    producer = {o: n for n in model.graph.node for o in n.output}
    softmax_inputs = [producer[n.input[0]].op_type for n in model.graph.node if n.op_type == "Softmax"]
    assert softmax_inputs and "Add" not in softmax_inputs and "Where" not in ops
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    meta = {p.key: p.value for p in model.metadata_props}
    assert '"cat"' in meta["vitexport.labels"] and "mean" in meta["vitexport.preprocessing"]
    sess = ort.InferenceSession(str(ref.path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):  # dynamic batch axis
        out = sess.run(None, {"pixel_values": np.zeros((batch, 3, 32, 32), np.float32)})[0]
        assert out.shape == (batch, 4)


def test_backbone_export_outputs_the_pooled_embedding(tiny_backbone, tmp_path):
    spec, ref = _export(tiny_backbone, tmp_path)
    assert ref.verification["embedding"] == "pooler_output"
    sess = ort.InferenceSession(str(ref.path), providers=["CPUExecutionProvider"])
    assert sess.get_outputs()[0].name == "embedding"
    assert sess.run(None, {"pixel_values": np.zeros((2, 3, 32, 32), np.float32)})[0].shape == (2, 32)


def test_old_opsets_are_refused(tiny_vit, tmp_path):
    spec = ModelSpec.load(tiny_vit)
    with pytest.raises(VitexportError, match="opset 17"):
        export_reference(spec, tmp_path, np.zeros((2, 3, 32, 32), np.float32), opset=16)


def test_distilled_deit_exports(tmp_path):
    """facebook/deit-*-distilled: model_type deit, two tokens (CLS + distillation), logits = mean of both heads."""
    import torch
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher

    from conftest import save_checkpoint

    torch.manual_seed(2)
    cfg = DeiTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8, num_labels=3)
    ckpt = save_checkpoint(DeiTForImageClassificationWithTeacher(cfg).eval(), tmp_path / "deit", 32)
    spec, ref = _export(ckpt, tmp_path / "out")
    assert spec.model_type == "deit" and spec.task == "classification"
    assert ref.verification["max_abs_diff"] < 1e-4


def test_cached_reference_is_the_traced_one_and_is_checked_before_use(tiny_vit, tmp_path, monkeypatch):
    """--cache-dir keeps the verified reference ONNX under the digest of the weights, code and toolchain: the same
    model is copied, not traced, and still checked against PyTorch; an entry that no longer computes the model is
    traced afresh; other weights are another key."""
    import torch

    from vitexport import export

    spec = ModelSpec.load(tiny_vit)
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    cache = tmp_path / "cache"
    a = export_reference(spec, tmp_path / "a", x, cache_dir=str(cache))
    (entry,) = cache.glob("reference-*")
    assert (entry / "model.onnx").read_bytes() == a.path.read_bytes()
    real_trace = export._trace
    monkeypatch.setattr(export, "_trace", lambda *a, **k: pytest.fail("traced although the cache holds this model"))
    b = export_reference(spec, tmp_path / "b", x, cache_dir=str(cache))
    assert b.path.read_bytes() == a.path.read_bytes() and b.verification["max_abs_diff"] == a.verification["max_abs_diff"]

    tampered = onnx.load(str(entry / "model.onnx"))
    w = max(tampered.graph.initializer, key=lambda t: len(t.raw_data))
    arr = onnx.numpy_helper.to_array(w) + np.random.default_rng(1).standard_normal(tuple(w.dims)).astype(np.float32)
    w.CopyFrom(onnx.numpy_helper.from_array(arr, w.name))
    onnx.save(tampered, str(entry / "model.onnx"))
    monkeypatch.setattr(export, "_trace", real_trace)
    warned: list[str] = []
    monkeypatch.setattr(export.log, "warning", lambda msg, *args: warned.append(msg % args))
    c = export_reference(spec, tmp_path / "c", x, cache_dir=str(cache))
    assert c.path.read_bytes() == a.path.read_bytes() and any("failed its check against PyTorch" in w for w in warned)
    assert (entry / "model.onnx").read_bytes() == a.path.read_bytes()  # the entry was replaced by the traced one

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export.shutil, "copyfile", full_disk)
    export._store_reference(cache, "f" * 64, c.path.parent)  # a cache that cannot be written costs time, not the build
    monkeypatch.undo()
    assert sorted(p.name for p in cache.iterdir()) == [entry.name]  # no half-written or temporary folder left

    module = spec.load_torch()
    key = export.export_key(a, module)
    with torch.no_grad():
        next(module.parameters()).view(-1)[0] += 0.1
    assert export.export_key(a, module) != key
