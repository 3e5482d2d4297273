"""The Backend seam: one module per target, each with the same few entry points.

A backend turns the verified fp32 reference ONNX (plus calibration images, where a precision needs them)
into Artifacts, and says whether and how an artifact can run on this host. It never reloads the checkpoint.
Backend modules import their runtime inside functions, so a missing runtime is a clear message.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Iterator, Mapping, Protocol

import numpy as np

from ..errors import VitexportError

# name -> "module:Class"; the module is imported only when the backend is asked for.
REGISTRY: dict[str, str] = {
    "onnxruntime": "vitexport.backends.onnxruntime:OnnxRuntimeBackend",
    "coreml": "vitexport.backends.coreml:CoreMLBackend",
    "openvino": "vitexport.backends.openvino:OpenVinoBackend",
    "tensorrt": "vitexport.backends.tensorrt:TensorRTBackend",
}


@dataclass(frozen=True)
class Calibration:
    """Preprocessed calibration inputs; `batches()` starts a fresh pass each call (recipes may need two)."""

    batches: Callable[[], Iterator[np.ndarray]]
    count: int
    source: str
    _shared: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)
    cache_dir: str | None = None  # on-disk cache of the float statistics (--cache-dir); None: memory only
    fingerprint: str | None = None  # sha256 of the preprocessed images (with cache_dir: part of the cache key)

    def shared(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        """``compute()`` once per key for these images; later callers get a deep copy of the first result.

        Backends that run the same recipe on the same reference (GPTQ int4 for ONNX Runtime, OpenVINO and CoreML)
        then calibrate once per build instead of once per backend. The key must name everything the result depends
        on besides these images: the reference file and the full recipe.
        """
        if key not in self._shared:
            self._shared[key] = compute()
        return copy.deepcopy(self._shared[key])

    def memo(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        """``compute()`` once per key for these images, the same object to every caller: read-only results only.

        Quantized-input Gram matrices (kind "quantized-gram", about 1 GB on ViT-Base) are kept for the latest
        recipe only: the recipes that share them build one after the other.
        """
        store = self._shared.setdefault("__memo__", {})
        if key not in store:
            kind = key[1] if isinstance(key, tuple) and len(key) > 1 and isinstance(key[1], tuple) and len(key[1]) > 1 else None
            if kind is not None and kind[1] == "quantized-gram":
                for k in [k for k in store if isinstance(k, tuple) and len(k) > 1 and isinstance(k[1], tuple) and len(k[1]) > 1 and k[1][1] == "quantized-gram"]:
                    del store[k]
            store[key] = compute()
        return store[key]


class Runner(Protocol):
    emulated: bool  # True when the arithmetic is reproduced by another runtime, not measured on the target's own
    device: str
    runtime: str
    threads: int | None

    def run(self, batch: np.ndarray) -> np.ndarray: ...


class Backend(Protocol):
    name: str
    precisions: tuple[str, ...]

    def available(self) -> tuple[bool, str]: ...

    def build(self, reference, calibration: Calibration | None, precision: str, options: Mapping[str, Any], out_dir: Path): ...

    def runner(self, artifact, threads: int | None = None) -> Runner: ...


def names() -> list[str]:
    return list(REGISTRY)


def get(name: str) -> Backend:
    if name not in REGISTRY:
        raise VitexportError(f"unknown backend '{name}': choose one of {', '.join(REGISTRY)}")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)()


def shared_int4(reference, calibration: "Calibration | None", recipe, progress=None, stages=None):
    """The core int4 recipe on ``reference``: (MatMulNBits model, summary), computed once per build and recipe,
    its Hessians taken from the build's float statistics."""
    from ..quantization.int4 import quantize_int4

    if calibration is None:  # RTN needs no images, and there is nothing to share it through
        return quantize_int4(reference.load(), None, recipe, progress=progress)
    key = ("int4", str(Path(reference.path).resolve()), recipe)

    def compute():
        stats = float_stats(reference, calibration, stages, progress) if recipe.method == "gptq" and not recipe.sequential else None
        return quantize_int4(reference.load(), calibration.batches, recipe, progress=progress, stats=stats)

    return calibration.shared(key, compute)


# linear roles whose inputs the build's one float pass observes: every recipe's default roles
FLOAT_STATS_ROLES = ("qkv", "attn_out", "fc1", "fc2")


def float_stats(reference, calibration: "Calibration", stages=None, progress=None):
    """The build's float statistics of ``reference`` on the calibration images (calibration.FloatStats): one pass,
    shared by every recipe (int8 ranges and smoothing, int4 / palette / CoreML int8 Hessians); from
    ``calibration.cache_dir`` when an earlier build computed them for the same reference file and images."""
    from ..progress import stages_of

    key = ("float-stats", str(Path(reference.path).resolve()))

    def compute():
        from ..quantization.cache import load_float_stats, save_float_stats
        from ..quantization.calibration import collect_float_stats
        from ..quantization.graph import find_linears

        model = reference.load()
        acts = sorted({l.activation for l in find_linears(model) if l.role in FLOAT_STATS_ROLES})
        cached = load_float_stats(calibration.cache_dir, reference.path, calibration.fingerprint, acts) if calibration.cache_dir else None
        if cached is not None:
            return cached
        with stages_of(stages).stage("float statistics (one pass, shared by every recipe)", total=calibration.count) as tick:
            stats = collect_float_stats(model, acts, calibration.batches, calibration.count, progress=_ticks(tick, progress))
        if calibration.cache_dir:
            save_float_stats(calibration.cache_dir, reference.path, calibration.fingerprint, acts, stats)
        return stats

    return calibration.memo(key, compute)


def recipe_memo(reference, calibration: "Calibration"):
    """memo(key, compute) for one reference: what int8 recipes with the same smoothing and ranges share."""
    ref = str(Path(reference.path).resolve())
    return lambda key, compute: calibration.memo((ref, key), compute)


def quantize_int8_shared(reference, calibration: "Calibration", recipe, options: Mapping[str, Any]):
    """The core int8 recipe on ``reference`` with the build's float statistics and shared per-recipe results."""
    from ..quantization.int8 import quantize_int8

    stages, progress = options.get("stages"), options.get("progress")
    stats = float_stats(reference, calibration, stages, progress)
    return quantize_int8(reference.load(), calibration.batches, recipe, progress=progress, stats=stats, memo=recipe_memo(reference, calibration), stages=stages)


def _ticks(tick, progress):
    def both(n: int) -> None:
        tick(n)
        if progress is not None:
            progress(n)

    return both


def needs_calibration(precision: str) -> bool:
    # int4 and palette4 use calibration activations too: their rounding minimises the error on real inputs, not on
    # weights alone
    return precision in {"int8", "int4", "palette4"}


def parse_precisions(text: str | Iterable[str], backend: Backend) -> list[str]:
    items = [p.strip().lower() for p in (text.split(",") if isinstance(text, str) else text) if p.strip()]
    if not items:
        raise VitexportError("no precision given: pass e.g. --precision fp32,int8,int4")
    bad = [p for p in items if p not in backend.precisions]
    if bad:
        raise VitexportError(f"backend {backend.name} has no precision {', '.join(bad)}: choose from {', '.join(backend.precisions)}")
    return sorted(set(items), key=backend.precisions.index)  # the backend's order: the fp32 reference row first


def recipe_from(cls, overrides: Mapping[str, Any] | None):
    """A recipe dataclass (Int8Recipe, Int4Recipe, ...) from a profile's or caller's overrides: unknown keys are one
    clear error, and TOML's lists become the tuples the frozen recipes use."""
    overrides = dict(overrides or {})
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(overrides) - fields
    if unknown:
        raise VitexportError(f"unknown {cls.__name__} option(s) {', '.join(sorted(unknown))}: known are {', '.join(sorted(fields))}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})
