"""On-disk cache of what a build computes from the calibration images (``vitexport build --cache-dir DIR``).

Three kinds of entry, so rebuilding one target after changing another, or rerunning a build in CI, skips the
costliest steps of the recipes (ViT-Base on 2 cores: 220 s and 2 x 120 s of a 750 s build, then about 190 s of GPTQ):

- the float statistics (calibration.FloatStats): one ``.npz`` named by the sha256 of (format version, the reference
  ONNX's sha256, the images' sha256, the observed tensors);
- each recipe's sensitivity scores (quantization/fallback.py): one ``.json`` named by the sha256 of everything the
  scores are computed from (fallback.candidates_digest: the model the recipe searches, weights included, the
  search images, each candidate's activation quantizer and rounded weights, onnxruntime's version).

- the weight codes rounded against the float statistics (GPTQ int8 of every int8 recipe and of CoreML, int4, the
  4-bit palettes): one ``.npz`` per layer and recipe named by the sha256 of (the float statistics' entry key, the
  layer, its weight's digest, the recipe's settings, the source of the modules that round); CodesCache.

(Two more kinds belong to their own steps: the verified reference ONNX, export.py's ``reference-<export_key>/``,
checked against PyTorch again on every use; and each CoreML package's converted program, ``coreml-<key>/``, keyed
by the traced module's every weight and setting and checked against its files' sha256: backends/coreml/convert.py.) A different model, image set, preprocessing, recipe setting or vitexport format is a different
file, never a stale hit. Entries are written to a temporary name and renamed, so a crash never leaves a half-written one; an unreadable
or inconsistent entry is ignored (and recomputed). Keys are contents, not the CPU: an entry written on another CPU
holds that CPU's float rounding, the same values to within it.

Every hit sets the entry's modification time (``touch``; access times are not kept on most CI file systems), and
after each build ``prune`` removes the least recently used entries until the folder fits ``--cache-max-size``:
every commit that changes a model, an image or the rounding code adds entries, and a CI cache kept between jobs
would otherwise only grow. Nothing the build itself used or wrote is removed, and nothing in the folder that is not
an entry (by its name) is ever touched.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

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
    touch(path)
    log.info("calibration cache: float statistics from %s", path)
    return stats


SCORES_FORMAT = 2  # bump when the sensitivity scores change (what fallback.score_candidates measures, or how: 2, no prepacking)


def scores_path(cache_dir: str | os.PathLike, digest: str) -> Path:
    return Path(cache_dir) / f"fallback-scores-{digest[:32]}.json"


def save_scores(cache_dir, digest: str, scores: dict[str, float]) -> Path | None:
    path = scores_path(cache_dir, digest)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".fallback-scores-", suffix=".json", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump({"format": SCORES_FORMAT, "digest": digest, "scores": scores}, f, sort_keys=True)  # floats round-trip exactly
        os.replace(tmp, path)
    except OSError as e:
        log.warning("calibration cache: cannot write %s (%s)", path, e)
        return None
    log.info("calibration cache: wrote %s", path)
    return path


def load_scores(cache_dir, digest: str, names) -> dict[str, float] | None:
    """The scores stored under ``digest``, or None (no entry, or one that is unreadable, of another format or key,
    or does not score exactly ``names`` with finite values)."""
    path = scores_path(cache_dir, digest)
    if not path.is_file():
        return None
    try:
        entry = json.loads(path.read_text())
        scores = {str(k): float(v) for k, v in entry["scores"].items()}
        ok = entry.get("format") == SCORES_FORMAT and entry.get("digest") == digest and set(scores) == set(names) and all(math.isfinite(v) for v in scores.values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        log.warning("calibration cache: ignoring unreadable %s (%s)", path, e)
        return None
    if not ok:
        log.warning("calibration cache: ignoring %s (another format, key or set of inputs)", path)
        return None
    touch(path)
    log.info("calibration cache: sensitivity scores from %s", path)
    return scores


CODES_FORMAT = 1  # bump when what CodesCache stores changes meaning
# the modules whose code decides the codes (GPTQ, its inverse factors, the int8, int4 and palette rounding): an edit
# to any of them is a miss, never a stale hit
CODE_SOURCES = ("gptq.py", "int8.py", "int4.py", "palette.py", "calibration.py")


@functools.lru_cache(maxsize=1)
def _code_sources() -> str:
    from importlib.metadata import version

    h = hashlib.sha256(repr((np.__version__, version("torch"))).encode())  # torch: the inverse factors' Cholesky
    for name in CODE_SOURCES:
        h.update((Path(__file__).parent / name).read_bytes())
    return h.hexdigest()


@dataclass(frozen=True)
class CodesCache:
    """Weight codes rounded against one build's float statistics (FloatStats.derived), kept in ``folder`` between
    builds. ``stats_key`` names what the statistics are computed from (entry_path's key: their format, the
    reference's sha256, the images' sha256, the observed tensors); each entry's own key names the rest (the layer,
    its weight's digest, the recipe's settings)."""

    folder: Path
    stats_key: str

    def path(self, key: tuple) -> tuple[Path, str]:
        digest = hashlib.sha256(repr((CODES_FORMAT, _code_sources(), self.stats_key, key)).encode()).hexdigest()
        return self.folder / f"codes-{digest[:32]}.npz", digest

    def get(self, key: tuple, compute: Callable[[], tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
        path, digest = self.path(key)
        arrays = self._load(path, digest)
        if arrays is None:
            arrays = tuple(compute())
            self._save(path, digest, arrays)
        return arrays

    @staticmethod
    def _load(path: Path, digest: str) -> tuple[np.ndarray, ...] | None:
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z["digest"]) != digest:
                    raise ValueError("another key")
                arrays = tuple(z[f"a{i}"] for i in range(int(z["count"])))
        except (OSError, ValueError, KeyError) as e:
            log.warning("calibration cache: ignoring unreadable %s (%s)", path, e)
            return None
        if not all(np.isfinite(a).all() for a in arrays if a.dtype.kind == "f"):
            log.warning("calibration cache: ignoring %s (non-finite values)", path)
            return None
        touch(path)
        return arrays

    @staticmethod
    def _save(path: Path, digest: str, arrays: tuple[np.ndarray, ...]) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".codes-", suffix=".npz", dir=path.parent)
            try:
                with os.fdopen(fd, "wb") as f:
                    np.savez(f, digest=np.array(digest), count=np.array(len(arrays)), **{f"a{i}": np.asarray(a) for i, a in enumerate(arrays)})
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as e:  # a cache that cannot be written costs time, not the build
            log.warning("calibration cache: cannot write %s (%s)", path, e)


def with_codes_cache(stats: FloatStats, cache_dir, reference_path, fingerprint: str | None, acts: list[str]) -> FloatStats:
    """``stats`` whose derived results (FloatStats.derived) are kept under ``cache_dir``; unchanged without one."""
    if not cache_dir or fingerprint is None:
        return stats
    import dataclasses

    return dataclasses.replace(stats, codes_cache=CodesCache(Path(cache_dir), entry_path(cache_dir, reference_path, fingerprint, acts).stem))


# ----------------------------------------------------------------------------------------------------------------
# size bound (--cache-max-size)

ENTRY_PREFIXES = ("float-stats-", "fallback-scores-", "codes-", "reference-", "coreml-")
STALE_TEMPORARY_SECONDS = 3600  # a temporary entry this old was left by a killed build (writing one takes seconds)


def touch(path: str | os.PathLike) -> None:
    """Mark an entry as used now (its modification time: what ``prune`` orders by); a read-only cache stays as it is."""
    try:
        os.utime(path)
    except OSError:
        pass


@dataclass(frozen=True)
class Pruned:
    removed: int  # entries removed, least recently used first
    removed_bytes: int
    stale_temporaries: int  # half-written entries of killed builds removed
    kept_bytes: int  # what the folder's entries take now
    over: bool  # the entries this build used alone take more than the bound (none of them was removed)


def _entry_size(path: Path) -> int:
    # artifacts.size_on_disk, which this layer may not import (tests/test_layering.py)
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def _remove(path: Path) -> None:
    import shutil

    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


def prune(cache_dir: str | os.PathLike, max_bytes: int, used_since: float, now: float | None = None) -> Pruned:
    """Remove the least recently used entries of ``cache_dir`` until they take at most ``max_bytes``, keeping every
    entry used or written at or after ``used_since`` (a timestamp: this build's start), and the temporary entries of
    builds killed more than STALE_TEMPORARY_SECONDS ago. Files whose names are not entries' are never touched; an
    entry another build removes or replaces meanwhile is skipped."""
    import time

    now = time.time() if now is None else now
    folder, entries, stale = Path(cache_dir), [], 0
    if not folder.is_dir():
        return Pruned(0, 0, 0, 0, False)
    for p in folder.iterdir():
        try:
            if p.name.startswith(tuple("." + e for e in ENTRY_PREFIXES)):
                if now - p.stat().st_mtime > STALE_TEMPORARY_SECONDS:
                    _remove(p)
                    stale += 1
            elif p.name.startswith(ENTRY_PREFIXES):
                entries.append((p.stat().st_mtime, _entry_size(p), p))
        except OSError:  # gone meanwhile (another build's prune or rename)
            continue
    total = sum(size for _, size, _ in entries)
    removed = removed_bytes = 0
    for mtime, size, p in sorted(entries, key=lambda e: e[0]):
        if total <= max_bytes or mtime >= used_since:
            break
        try:
            _remove(p)
        except OSError as e:
            log.warning("calibration cache: cannot remove %s (%s)", p, e)
            continue
        total -= size
        removed, removed_bytes = removed + 1, removed_bytes + size
    return Pruned(removed, removed_bytes, stale, total, total > max_bytes)
