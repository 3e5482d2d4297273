"""Shared fixtures: tiny random ViT checkpoints (fast mechanics), image folders with awkward files, the real DeiT-tiny."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network

REPO = Path(__file__).resolve().parent.parent
DEIT = REPO / "models" / "deit-tiny-patch16-224"
CALIB = REPO / "calibration" / "calib"
EVAL = REPO / "calibration" / "eval"
SHARED_SAMPLES = REPO.parent / "shared" / "imagenet-samples"
TINY_LABELS = {0: "cat", 1: "dog, doggy", 2: "bird", 3: "fish"}


def _processor_config(size: int) -> dict:
    return {
        "image_processor_type": "ViTImageProcessor",
        "do_resize": True,
        "size": {"height": size, "width": size},
        "resample": 2,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }


def tiny_config(**kw):
    from transformers import ViTConfig

    args = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8)
    args.update(kw)
    return ViTConfig(**args)


def save_checkpoint(model, directory: Path, image_size: int) -> Path:
    model.save_pretrained(directory, safe_serialization=True)
    (directory / "preprocessor_config.json").write_text(json.dumps(_processor_config(image_size)))
    return directory


@pytest.fixture(scope="session")
def tiny_vit(tmp_path_factory) -> Path:
    """A random-weight ViTForImageClassification, 32x32 input, 4 named labels."""
    import torch
    from transformers import ViTForImageClassification

    torch.manual_seed(0)
    model = ViTForImageClassification(tiny_config(num_labels=4, id2label=TINY_LABELS, label2id={v: k for k, v in TINY_LABELS.items()})).eval()
    return save_checkpoint(model, tmp_path_factory.mktemp("tiny_vit"), 32)


@pytest.fixture(scope="module")
def reference(tiny_vit, tmp_path_factory):
    """The tiny ViT's verified reference ONNX, as backends receive it."""
    from vitexport.export import export_reference
    from vitexport.model import ModelSpec

    spec = ModelSpec.load(str(tiny_vit))
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    return export_reference(spec, tmp_path_factory.mktemp("ref"), x)


@pytest.fixture(scope="module")
def calibration():
    """32 random calibration inputs for the tiny ViT, in batches of 16."""
    from vitexport import backends

    x = np.random.default_rng(1).standard_normal((32, 3, 32, 32)).astype(np.float32)
    return backends.Calibration(batches=lambda: (x[i : i + 16] for i in range(0, len(x), 16)), count=len(x), source="random")


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory) -> Path:
    """A random-weight ViTModel (no head, with pooler), like the in21k backbones."""
    import torch
    from transformers import ViTModel

    torch.manual_seed(1)
    model = ViTModel(tiny_config()).eval()
    return save_checkpoint(model, tmp_path_factory.mktemp("tiny_backbone"), 32)


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory) -> Path:
    from transformers import BertConfig, BertModel

    d = tmp_path_factory.mktemp("bert")
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=100)).save_pretrained(d)
    return d


def write_image(path: Path, mode: str, size=(48, 40), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    im = rgb if mode == "RGB" else rgb.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {".jpg": "JPEG", ".png": "PNG", ".gif": "GIF"}[path.suffix]
    im.save(path, fmt)
    return path


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """ImageFolder layout with the tiny model's labels; every odd mode PIL reads is in it."""
    root = tmp_path_factory.mktemp("images")
    kinds = [("RGB", ".jpg"), ("L", ".png"), ("RGBA", ".png"), ("CMYK", ".jpg"), ("P", ".gif"), ("RGB", ".png")]
    for c, name in enumerate(["cat", "doggy", "bird", "fish"]):
        for i, (mode, ext) in enumerate(kinds):
            write_image(root / name / f"{mode.lower()}_{i}{ext}", mode, seed=10 * c + i)
    return root


@pytest.fixture(scope="session")
def calib_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("calib")
    for i in range(12):
        write_image(root / f"img_{i}.jpg", "RGB", seed=100 + i)
    return root


def validate_report(data: dict) -> None:
    """report.json against the schema shipped in the package (vitexport/harness/report.schema.json)."""
    import jsonschema

    from vitexport.harness.report import SCHEMA_PATH

    jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text())).validate(data)


@pytest.fixture(autouse=True)
def _every_written_report_matches_the_schema(monkeypatch):
    """Every report a test writes (build, eval/bench --out) is validated against the schema as it is written."""
    from vitexport.harness.report import Report

    write = Report.write

    def checked(self, out_dir):
        write(self, out_dir)
        validate_report(json.loads((Path(out_dir) / "report.json").read_text()))

    monkeypatch.setattr(Report, "write", checked)
