"""Images in, preprocessed float32 NCHW batches out.

Preprocessing is re-implemented here with PIL and numpy (following transformers' PIL image processor
step by step, and tested against it) so that evaluating an artifact never needs torch or transformers.
Odd image modes and broken files are handled here, once.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import VitexportError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"})

# PIL's resampling codes, as preprocessor_config.json stores them.
_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


@dataclass(frozen=True)
class Preprocessing:
    """What the checkpoint's image processor does, as data. Recorded in every artifact."""

    resize: tuple[int, int] | None = None  # exact (height, width)
    shortest_edge: int | None = None  # or: scale so the short side has this length
    resample: int = 2  # PIL code: 2 bilinear, 3 bicubic
    crop: tuple[int, int] | None = None  # centre crop (height, width)
    rescale: float | None = 1 / 255
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    source: str = ""  # the image processor class it came from

    @classmethod
    def from_processor_config(cls, cfg: Mapping, source: str = "") -> "Preprocessing":
        size = cfg.get("size") if cfg.get("do_resize", True) else None
        resize = shortest = None
        if isinstance(size, int):
            resize = (size, size)
        elif isinstance(size, Mapping):
            if "height" in size and "width" in size:
                resize = (int(size["height"]), int(size["width"]))
            elif "shortest_edge" in size:
                shortest = int(size["shortest_edge"])
            else:
                raise VitexportError(f"unsupported image processor size {dict(size)} in {source or 'preprocessor_config.json'}: expected height/width or shortest_edge")
        crop = None
        if cfg.get("do_center_crop") and cfg.get("crop_size"):
            c = cfg["crop_size"]
            crop = (int(c), int(c)) if isinstance(c, int) else (int(c["height"]), int(c["width"]))
        mean = std = None
        if cfg.get("do_normalize", True):
            mean = _triple(cfg.get("image_mean", 0.5))
            std = _triple(cfg.get("image_std", 0.5))
        rescale = float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else None
        return cls(
            resize=resize,
            shortest_edge=shortest,
            resample=int(cfg.get("resample", 2)),
            crop=crop,
            rescale=rescale,
            mean=mean,
            std=std,
            source=source or str(cfg.get("image_processor_type", "")),
        )

    @property
    def output_size(self) -> tuple[int, int]:
        if self.crop:
            return self.crop
        if self.resize:
            return self.resize
        raise VitexportError("preprocessing has no fixed output size (shortest_edge resize without crop): ViT needs a fixed input size")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["resample_name"] = _RESAMPLE_NAMES.get(self.resample, str(self.resample))
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "Preprocessing":
        def tup(v):
            return tuple(v) if v is not None else None

        return cls(
            resize=tup(d.get("resize")),
            shortest_edge=d.get("shortest_edge"),
            resample=int(d.get("resample", 2)),
            crop=tup(d.get("crop")),
            rescale=d.get("rescale"),
            mean=tup(d.get("mean")),
            std=tup(d.get("std")),
            source=d.get("source", ""),
        )

    def __call__(self, image: Image.Image) -> np.ndarray:
        """An RGB PIL image -> float32 CHW array."""
        if self.resize:
            h, w = self.resize
            image = image.resize((w, h), resample=self.resample)
        elif self.shortest_edge:
            image = image.resize(_shortest_edge_size(image.size, self.shortest_edge), resample=self.resample)
        x = np.asarray(image)
        if self.crop:
            x = _center_crop(x, self.crop)
        x = x.astype(np.float32)
        if self.rescale is not None:
            x = x * np.float32(self.rescale)
        if self.mean is not None and self.std is not None:
            x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)


def _triple(v) -> tuple[float, float, float]:
    if isinstance(v, (int, float)):
        return (float(v),) * 3
    return tuple(float(x) for x in v)  # type: ignore[return-value]


def _shortest_edge_size(wh: tuple[int, int], short: int) -> tuple[int, int]:
    # Same truncation as transformers' get_resize_output_image_size(default_to_square=False).
    w, h = wh
    if w <= h:
        return short, int(short * h / w)
    return int(short * w / h), short


def _center_crop(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    ch, cw = size
    h, w = x.shape[:2]
    if h < ch or w < cw:  # transformers pads with zeros around, then crops
        padded = np.zeros((max(h, ch), max(w, cw), x.shape[2]), x.dtype)
        top, left = (padded.shape[0] - h) // 2, (padded.shape[1] - w) // 2
        padded[top : top + h, left : left + w] = x
        x, h, w = padded, padded.shape[0], padded.shape[1]
    top, left = (h - ch) // 2, (w - cw) // 2
    return x[top : top + ch, left : left + cw]


def load_rgb(path: Path) -> Image.Image:
    """Open any image PIL reads as RGB: greyscale, CMYK, palette and alpha images included.

    Transparent pixels are composited on white (what a viewer shows), not left as whatever RGB hides under alpha 0.
    """
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
                return Image.alpha_composite(bg, im).convert("RGB")
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float64)
                im = Image.fromarray((arr / max(arr.max(), 1.0) * 255).astype(np.uint8))
            return im.convert("RGB")
    except FileNotFoundError:
        raise VitexportError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise VitexportError(f"cannot read image {path}: {e.__class__.__name__}: {e} (remove or replace the file)") from None


# ---------------------------------------------------------------- labels


@dataclass(frozen=True)
class LabelMap:
    """How file paths map to class indices of the model."""

    kind: str  # "wnid" | "folder" | "none"
    index_of: Mapping[str, int] = field(default_factory=dict)

    def label(self, path: Path, root: Path) -> int | None:
        if self.kind == "wnid":
            return self.index_of.get(path.name.split("_", 1)[0])
        if self.kind == "folder":
            rel = path.relative_to(root)
            return self.index_of.get(rel.parts[0]) if len(rel.parts) > 1 else None
        return None


def read_classes_file(path: Path) -> dict[str, int]:
    """`index<TAB>wnid<TAB>label` lines (header optional) -> {wnid: index}."""
    out: dict[str, int] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise VitexportError(f"cannot read classes file {path}: {e.strerror}") from None
    for line in lines:
        parts = line.split("\t")
        if len(parts) >= 2 and parts[0].strip().isdigit():
            out[parts[1].strip()] = int(parts[0])
    if not out:
        raise VitexportError(f"classes file {path} has no 'index<TAB>wnid<TAB>label' lines")
    return out


def _norm(name: str) -> str:
    return name.strip().lower().replace("_", " ")


def folder_label_map(class_dirs: Sequence[str], id2label: Mapping[int, str] | None) -> dict[str, int]:
    """Map ImageFolder class directories to model label indices.

    A folder matches a label by its full name or any comma-separated synonym ("tench, Tinca tinca"),
    case and underscores ignored; purely numeric folder names are indices.
    """
    lookup: dict[str, int] = {}
    for idx, name in (id2label or {}).items():
        lookup.setdefault(_norm(name), int(idx))
        for syn in name.split(","):
            lookup.setdefault(_norm(syn), int(idx))
    out = {}
    for d in class_dirs:
        if _norm(d) in lookup:
            out[d] = lookup[_norm(d)]
        elif d.isdigit():
            out[d] = int(d)
    return out


# ---------------------------------------------------------------- image sets


def list_images(root: Path) -> list[Path]:
    if not root.exists():
        raise VitexportError(f"image folder not found: {root}")
    if not root.is_dir():
        raise VitexportError(f"not a folder of images: {root} (pass a directory)")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not files:
        raise VitexportError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {root}")
    return files


@dataclass(frozen=True)
class ImageSet:
    """A list of image files, their labels when known, and the preprocessing that turns them into model inputs."""

    root: Path
    paths: tuple[Path, ...]
    labels: tuple[int | None, ...]
    preprocessing: Preprocessing
    label_source: str = "none"

    @classmethod
    def from_folder(
        cls,
        root: str | Path,
        preprocessing: Preprocessing,
        id2label: Mapping[int, str] | None = None,
        classes_file: str | Path | None = None,
        limit: int | None = None,
        skip: int = 0,
    ) -> "ImageSet":
        """Images under `root`, labelled from `WNID_*` names plus a classes file, or from an ImageFolder layout.

        A `classes.tsv` in the folder itself is used when no classes file is given.
        """
        root = Path(root)
        paths = list_images(root)
        labels_map = _discover_labels(root, paths, id2label, Path(classes_file) if classes_file else None)
        paths = paths[skip:]
        if limit is not None:
            paths = paths[:limit]
        if not paths:
            raise VitexportError(f"no images left in {root} after skipping {skip}")
        labels = tuple(labels_map.label(p, root) for p in paths)
        return cls(root, tuple(paths), labels, preprocessing, labels_map.kind)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def labelled(self) -> bool:
        return any(lab is not None for lab in self.labels)

    def load(self, i: int) -> np.ndarray:
        return self.preprocessing(load_rgb(self.paths[i]))

    def batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, list[int | None]]]:
        for start in range(0, len(self.paths), batch_size):
            idx = range(start, min(start + batch_size, len(self.paths)))
            yield np.stack([self.load(i) for i in idx]), [self.labels[i] for i in idx]

    def arrays(self, batch_size: int = 16):
        """A fresh iterator of input arrays only, as calibration wants it."""
        return (x for x, _ in self.batches(batch_size))

    def content_hashes(self) -> dict[str, Path]:
        out = {}
        for p in self.paths:
            out[hashlib.sha1(p.read_bytes()).hexdigest()] = p
        return out


def _discover_labels(root: Path, paths: Sequence[Path], id2label, classes_file: Path | None) -> LabelMap:
    if classes_file is None and (root / "classes.tsv").is_file():
        classes_file = root / "classes.tsv"
    if classes_file is not None:
        wnids = read_classes_file(classes_file)
        lm = LabelMap("wnid", wnids)
        hits = sum(lm.label(p, root) is not None for p in paths)
        if hits:
            if hits < len(paths):
                log.warning("%d of %d images in %s have no WNID_ prefix found in %s: they count for agreement only", len(paths) - hits, len(paths), root, classes_file)
            return lm
        log.warning("no image name in %s starts with a WNID from %s", root, classes_file)
    dirs = sorted({p.relative_to(root).parts[0] for p in paths if len(p.relative_to(root).parts) > 1})
    if dirs:
        mapping = folder_label_map(dirs, id2label)
        if mapping:
            missing = [d for d in dirs if d not in mapping]
            if missing:
                log.warning("class folders not among the model's labels (agreement only): %s", ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
            return LabelMap("folder", mapping)
        log.warning("class folders in %s match none of the model's labels: accuracy against labels is skipped", root)
    return LabelMap("none")


def overlap(a: ImageSet, b: ImageSet) -> int:
    """How many images two sets share, by content (the same file under another name counts)."""
    return len(a.content_hashes().keys() & b.content_hashes().keys())
