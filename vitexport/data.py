"""Images in, preprocessed float32 NCHW batches out.

Preprocessing is re-implemented here with PIL and numpy (following transformers' PIL image processor
step by step, and tested against it) so that evaluating an artifact never needs torch or transformers.
Odd image modes and broken files are handled here, once.
"""

from __future__ import annotations

import hashlib
import logging
import os
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
        """Every value is checked: a size of 0 or "224" must not silently skip the resize, a zero std must not divide."""
        where = source or str(cfg.get("image_processor_type", "")) or "preprocessor_config.json"
        size = cfg.get("size") if cfg.get("do_resize", True) else None
        resize = shortest = None
        if size is not None:
            if isinstance(size, Mapping) and "shortest_edge" in size and not ("height" in size and "width" in size):
                shortest = _positive_int(size["shortest_edge"], "size.shortest_edge", where)
            else:
                resize = _hw(size, "size", where)
        crop = None
        if cfg.get("do_center_crop") and cfg.get("crop_size") is not None:
            crop = _hw(cfg["crop_size"], "crop_size", where)
        mean = std = None
        if cfg.get("do_normalize", True):
            mean = _triple(cfg.get("image_mean", 0.5), "image_mean", where)
            std = _triple(cfg.get("image_std", 0.5), "image_std", where)
            if min(std) <= 0:
                raise VitexportError(f"image_std {list(std)} in {where} has a value <= 0 (inputs would be inf/NaN): fix preprocessor_config.json")
        rescale = None
        if cfg.get("do_rescale", True):
            rescale = _finite(cfg.get("rescale_factor", 1 / 255), "rescale_factor", where)
            if rescale <= 0:
                raise VitexportError(f"rescale_factor {rescale} in {where} must be positive (usually 1/255): fix preprocessor_config.json")
        resample = cfg.get("resample", 2)
        if isinstance(resample, bool) or not isinstance(resample, int) or resample not in _RESAMPLE_NAMES:
            raise VitexportError(f"resample {resample!r} in {where} is not a PIL filter ({', '.join(f'{k} {v}' for k, v in _RESAMPLE_NAMES.items())}): fix preprocessor_config.json")
        return cls(
            resize=resize,
            shortest_edge=shortest,
            resample=resample,
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
        # in words too, for whoever feeds the artifact without vitexport (from_dict reads only the fields above)
        d["color"] = "RGB"
        d["layout"] = "NCHW float32"
        d["steps"] = self.describe()
        return d

    def describe(self) -> str:
        name = _RESAMPLE_NAMES.get(self.resample, str(self.resample))
        steps = ["convert to RGB (transparent pixels on white)"]
        if self.resize:
            steps.append(f"resize to {self.resize[0]}x{self.resize[1]} (height x width, aspect ratio not kept) with {name} filter")
        elif self.shortest_edge:
            steps.append(f"resize so the shorter side is {self.shortest_edge} (aspect ratio kept) with {name} filter")
        if self.crop:
            steps.append(f"centre crop {self.crop[0]}x{self.crop[1]}")
        if self.rescale is not None:
            steps.append(f"multiply by {self.rescale:.6g}")
        if self.mean is not None and self.std is not None:
            steps.append(f"subtract mean {list(self.mean)} and divide by std {list(self.std)} per channel (R, G, B)")
        steps.append("channels first (NCHW), float32")
        return "; ".join(steps)

    @classmethod
    def from_dict(cls, d: Mapping) -> "Preprocessing":
        def tup(v):
            return tuple(v) if v is not None else None

        pre = cls(
            resize=tup(d.get("resize")),
            shortest_edge=d.get("shortest_edge"),
            resample=int(d.get("resample", 2)),
            crop=tup(d.get("crop")),
            rescale=d.get("rescale"),
            mean=tup(d.get("mean")),
            std=tup(d.get("std")),
            source=d.get("source", ""),
        )
        pre._check("the manifest's preprocessing")
        return pre

    def _check(self, where: str) -> None:
        """The same rules as from_processor_config, for preprocessing read back from a manifest."""
        for key, size in (("resize", self.resize), ("crop", self.crop)):
            if size is not None:
                if len(size) != 2:
                    raise VitexportError(f"{key} {list(size)} in {where} must be [height, width]")
                _hw({"height": size[0], "width": size[1]}, key, where)
        if self.shortest_edge is not None:
            _positive_int(self.shortest_edge, "shortest_edge", where)
        for key, v in (("mean", self.mean), ("std", self.std)):
            if v is not None:
                _triple(list(v), key, where)
        if self.std is not None and min(self.std) <= 0:
            raise VitexportError(f"std {list(self.std)} in {where} has a value <= 0")
        if self.rescale is not None:
            _finite(self.rescale, "rescale", where)
        if self.resample not in _RESAMPLE_NAMES:
            raise VitexportError(f"resample {self.resample} in {where} is not a PIL filter")

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


def _finite(v, key: str, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
        raise VitexportError(f"{key} {v!r} in {where} is not a finite number: fix preprocessor_config.json")
    return float(v)


def _triple(v, key: str = "value", where: str = "preprocessor_config.json") -> tuple[float, float, float]:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return (_finite(v, key, where),) * 3
    if not isinstance(v, (list, tuple)) or len(v) != 3:
        raise VitexportError(f"{key} {v!r} in {where} must be one number or three (R, G, B): fix preprocessor_config.json")
    return tuple(_finite(x, key, where) for x in v)  # type: ignore[return-value]


def _positive_int(v, key: str, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise VitexportError(f"{key} {v!r} in {where} must be a positive whole number of pixels: fix preprocessor_config.json")
    return v


def _hw(v, key: str, where: str) -> tuple[int, int]:
    """A size as preprocessor configs write it: an int, or {"height", "width"}."""
    if isinstance(v, Mapping) and "height" in v and "width" in v:
        return _positive_int(v["height"], f"{key}.height", where), _positive_int(v["width"], f"{key}.width", where)
    if isinstance(v, Mapping):
        raise VitexportError(f"unsupported {key} {dict(v)} in {where}: expected height/width or shortest_edge")
    n = _positive_int(v, key, where)
    return n, n


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
    except Image.DecompressionBombError as e:  # not an OSError: PIL refuses images past twice MAX_IMAGE_PIXELS
        raise VitexportError(f"image {path} is too large to decode safely ({e}): shrink it or remove it") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise VitexportError(f"cannot read image {path}: {e.__class__.__name__}: {e} (remove or replace the file)") from None
    except Exception as e:  # damaged files make PIL's decoders raise many other types (struct.error, IndexError, ...)
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
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise VitexportError(f"cannot read classes file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise VitexportError(f"classes file {path} is not UTF-8 text: it should hold 'index<TAB>wnid<TAB>label' lines") from None
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
    candidates = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    dangling = [p for p in candidates if p.is_symlink() and not p.exists()]
    if dangling:  # a broken file stops the build (README): a link to nothing is one, not something to skip quietly
        raise VitexportError(f"image {dangling[0]} is a symbolic link to a file that does not exist ({os.readlink(dangling[0])}): fix or remove it")
    files = [p for p in candidates if p.is_file()]
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
        if skip < 0 or (limit is not None and limit < 1):
            raise VitexportError(f"image counts must be positive (limit {limit}, skip {skip})")
        paths = paths[skip:]
        if limit is not None:
            paths = paths[:limit]
        if not paths:
            raise VitexportError(f"no images left in {root} after skipping {skip}")
        labels = tuple(labels_map.label(p, root) for p in paths)
        kind = labels_map.kind
        if id2label and any(lab is not None and not 0 <= lab < len(id2label) for lab in labels):
            # indices past the model's labels (ImageNet's classes.tsv with a fine-tune's 4 labels) would score as
            # misses: a classes file the user named is refused; labels vitexport found by itself are not used
            top = max(lab for lab in labels if lab is not None)
            what = f"{classes_file}" if classes_file else f"the labels found in {root}"
            if classes_file:
                raise VitexportError(
                    f"{what} has class indices up to {top} but the model has {len(id2label)} labels: pass a classes file with the model's own indices, or none"
                )
            log.warning("%s (%s) go up to class index %d but the model has %d labels: they are not used; top-1 against labels is skipped (agreement and cosine only)", what, kind, top, len(id2label))
            labels, kind = (None,) * len(labels), "none"
        return cls(root, tuple(paths), labels, preprocessing, kind)

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
