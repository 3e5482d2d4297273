"""On-disk cache of the float calibration statistics (``vitexport build --cache-dir DIR``).

The float statistics (calibration.FloatStats) depend on the reference model and the preprocessed calibration
images only, so rebuilding one target after changing another, or rerunning a build in CI, can skip the pass.
An entry is one ``.npz`` named by the sha256 of (format version, the reference ONNX's sha256, the images'
sha256, the observed tensors): a different model, image set, preprocessing or vitexport statistics format is
a different file, never a stale hit. Entries are written to a temporary name and renamed, so a crash never leaves
a half-written one; an unreadable entry is ignored (and recomputed).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from .calibration import FloatStats

log = logging.getLogger(__name__)

FORMAT = 2  # bump when FloatStats or its collection changes meaning (2: fc2 inputs keep whole-tensor tails)


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    for p in (Path(path), Path(str(path) + ".data")):
        if p.is_file():
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    h.update(chunk)
    return h.hexdigest()


def images_sha256(arrays) -> str:
    """sha256 of the preprocessed calibration images, batch by batch (what the statistics were computed from)."""
    h = hashlib.sha256()
    for x in arrays:
        a = np.ascontiguousarray(x, dtype=np.float32)
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def entry_path(cache_dir: str | os.PathLike, reference_path, fingerprint: str | None, acts: list[str]) -> Path:
    key = json.dumps({"format": FORMAT, "reference": file_sha256(reference_path), "images": fingerprint, "tensors": sorted(acts)}, sort_keys=True)
    return Path(cache_dir) / f"float-stats-{hashlib.sha256(key.encode()).hexdigest()[:32]}.npz"


def save_float_stats(cache_dir, reference_path, fingerprint: str | None, acts: list[str], stats: FloatStats) -> Path | None:
    if fingerprint is None:
        return None
    path = entry_path(cache_dir, reference_path, fingerprint, acts)
    arrays = {"images": np.array(stats.images), "names": np.array(sorted(stats.min))}
    for i, n in enumerate(sorted(stats.min)):
        arrays[f"min{i}"], arrays[f"max{i}"] = stats.min[n], stats.max[n]
        arrays[f"top{i}"], arrays[f"bottom{i}"] = stats.top[n], stats.bottom[n]
        arrays[f"elements{i}"] = np.array(stats.elements[n])
        if n in stats.gram:
            arrays[f"gram{i}"] = stats.gram[n]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".float-stats-", suffix=".npz", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except OSError as e:  # a cache that cannot be written costs time, not the build
        log.warning("calibration cache: cannot write %s (%s)", path, e)
        return None
    log.info("calibration cache: wrote %s", path)
    return path


def load_float_stats(cache_dir, reference_path, fingerprint: str | None, acts: list[str]) -> FloatStats | None:
    if fingerprint is None:
        return None
    path = entry_path(cache_dir, reference_path, fingerprint, acts)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            names = [str(n) for n in z["names"]]
            if sorted(names) != sorted(acts):
                return None
            stats = FloatStats(
                min={n: z[f"min{i}"] for i, n in enumerate(names)},
                max={n: z[f"max{i}"] for i, n in enumerate(names)},
                gram={n: z[f"gram{i}"] for i, n in enumerate(names) if f"gram{i}" in z.files},
                top={n: z[f"top{i}"] for i, n in enumerate(names)},
                bottom={n: z[f"bottom{i}"] for i, n in enumerate(names)},
                elements={n: int(z[f"elements{i}"]) for i, n in enumerate(names)},
                images=int(z["images"]),
            )
    except (OSError, ValueError, KeyError) as e:
        log.warning("calibration cache: ignoring unreadable %s (%s)", path, e)
        return None
    log.info("calibration cache: float statistics from %s", path)
    return stats
