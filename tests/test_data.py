"""Preprocessing must equal the checkpoint's own image processor; bad images must end in one clear error."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import CALIB, DEIT, TINY_LABELS, write_image
from vitexport.data import ImageSet, Preprocessing, folder_label_map, load_rgb, overlap
from vitexport.errors import VitexportError


def _processors():
    from transformers import AutoImageProcessor
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    return [
        AutoImageProcessor.from_pretrained(DEIT),  # bicubic 256 -> crop 224, ImageNet mean/std
        ViTImageProcessorPil(size={"height": 224, "width": 224}, resample=2, image_mean=[0.5] * 3, image_std=[0.5] * 3),  # google/vit-base-patch16-224
        ViTImageProcessorPil(size={"shortest_edge": 232}, do_center_crop=True, crop_size={"height": 224, "width": 224}),
    ]


@pytest.mark.parametrize("index", [0, 1, 2])
def test_preprocessing_matches_transformers(index):
    proc = _processors()[index]
    pre = Preprocessing.from_processor_config(proc.to_dict())
    for path in sorted(CALIB.glob("*.JPEG"))[:6]:
        image = load_rgb(path)
        want = proc(images=image, return_tensors="np")["pixel_values"][0]
        got = pre(image)
        assert got.shape == want.shape == (3, 224, 224)
        assert np.abs(got - want).max() < 1e-5


def test_deit_and_vit_recipes_differ_as_their_configs_say():
    deit = Preprocessing.from_processor_config(_processors()[0].to_dict())
    assert deit.resize == (256, 256) and deit.crop == (224, 224) and deit.resample == 3
    assert deit.mean == pytest.approx((0.485, 0.456, 0.406)) and deit.std == pytest.approx((0.229, 0.224, 0.225))
    vit = Preprocessing.from_processor_config(_processors()[1].to_dict())
    assert vit.resize == (224, 224) and vit.crop is None and vit.mean == (0.5, 0.5, 0.5)
    assert Preprocessing.from_dict(deit.to_dict()) == deit


@pytest.mark.parametrize("mode,ext", [("L", ".png"), ("CMYK", ".jpg"), ("P", ".gif"), ("I;16", ".png"), ("LA", ".png")])
def test_odd_modes_become_rgb(tmp_path, mode, ext):
    if mode == "I;16":
        path = tmp_path / "deep.png"
        Image.fromarray((np.arange(40 * 48).reshape(40, 48) * 20).astype(np.uint16)).save(path)
    else:
        path = write_image(tmp_path / f"x{ext}", mode)
    im = load_rgb(path)
    assert im.mode == "RGB" and im.size == (48, 40)


def test_transparent_pixels_composite_on_white(tmp_path):
    path = tmp_path / "clear.png"
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(path)
    assert np.asarray(load_rgb(path)).min() == 255


@pytest.mark.parametrize("content", [b"", b"not an image at all", "truncated"])
def test_broken_files_raise_one_clear_error(tmp_path, content):
    path = tmp_path / "bad.jpg"
    if content == "truncated":
        good = write_image(tmp_path / "good.jpg", "RGB", size=(256, 256))
        path.write_bytes(good.read_bytes()[:600])
    else:
        path.write_bytes(content)
    with pytest.raises(VitexportError, match="bad.jpg"):
        load_rgb(path)


def test_folder_errors(tmp_path):
    pre = Preprocessing(resize=(32, 32))
    with pytest.raises(VitexportError, match="not found"):
        ImageSet.from_folder(tmp_path / "missing", pre)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(VitexportError, match="no images"):
        ImageSet.from_folder(tmp_path / "empty", pre)


def test_wnid_labels_from_classes_file():
    pre = Preprocessing(resize=(32, 32))
    s = ImageSet.from_folder(CALIB, pre, limit=5)
    assert s.label_source == "wnid"
    assert s.labels[0] == 0  # n01440764 tench is class 0
    assert all(isinstance(x, int) for x in s.labels)


def test_imagefolder_labels_match_synonyms(image_folder):
    assert folder_label_map(["doggy", "Cat", "7", "zebra"], TINY_LABELS) == {"doggy": 1, "Cat": 0, "7": 7}
    s = ImageSet.from_folder(image_folder, Preprocessing(resize=(32, 32)), TINY_LABELS)
    assert s.label_source == "folder" and set(s.labels) == {0, 1, 2, 3}
    x, y = next(s.batches(5))
    assert x.shape == (5, 3, 32, 32) and x.dtype == np.float32


def test_overlap_is_by_content(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_image(a / "one.jpg", "RGB", seed=1)
    write_image(a / "two.jpg", "RGB", seed=2)
    b.mkdir()
    (b / "renamed.jpg").write_bytes((a / "two.jpg").read_bytes())
    pre = Preprocessing(resize=(32, 32))
    assert overlap(ImageSet.from_folder(a, pre), ImageSet.from_folder(b, pre)) == 1
