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
from typing import Any, Callable, Hashable, Iterable, Iterator, Literal, Mapping, Protocol

import numpy as np

from ..errors import VitexportError

# name -> "module:Class"; the module is imported only when the backend is asked for.
REGISTRY: dict[str, str] = {
    "onnxruntime": "vitexport.backends.onnxruntime:OnnxRuntimeBackend",
    "openvino": "vitexport.backends.openvino:OpenVinoBackend",
    "coreml": "vitexport.backends.coreml:CoreMLBackend",
    "tensorrt": "vitexport.backends.tensorrt:TensorRTBackend",
    "litert": "vitexport.backends.litert:LiteRTBackend",
}


RunsHere = Literal["measured", "emulated", "not run"]


@dataclass(frozen=True)
class Capability:
    """What one precision of a backend needs and where it runs: central code derives from these, keeps no lists.

    ``runs_here`` is what a Linux x86 host without the target's hardware (vitexport's CI) measures; the runner still
    decides on each host (a Mac predicts CoreML for real, a host with TensorRT and a GPU runs the engine).
    ``recipe`` names the core recipe class ("module:Class", imported only when a profile is checked or a build
    runs) that ``[options.<backend>.<precision>] recipe = {...}`` overrides; ``settings`` are the other keys that
    precision table accepts, with their defaults (their types are the defaults' types).
    """

    calibration: bool  # uses calibration images by default: the build passes them
    runs_here: RunsHere
    min_target: str | None = None  # minimum deployment target, where the target has one
    recipe: str | None = None
    settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    builds_on: str | None = None  # platform.system() the build needs (None: anywhere)


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

        Quantized-input Gram matrices (kind "quantized-gram", about 0.7 GB on ViT-Base) are kept only while a recipe
        that can use them may still come: a new quantized-gram entry replaces the others, and a recipe with another
        reference or smoothing (its first memo call is its search) drops them. The recipes that share them
        (ONNX Runtime's and OpenVINO's) build one after the other; held under TensorRT's search they were its peak.
        """
        store = self._shared.setdefault("__memo__", {})
        if key not in store:
            kind = _int8_memo_kind(key)
            if kind in ("quantized-gram", "fallback"):
                for k in [k for k in store if _int8_memo_kind(k) == "quantized-gram" and (kind == "quantized-gram" or _int8_memo_owner(k) != _int8_memo_owner(key))]:
                    del store[k]
            store[key] = compute()
        return store[key]

    def spill_quantized_grams(self) -> None:
        """Once a recipe has its GPTQ codes, its quantized-input Gram matrices are read again only for codes the memo
        does not hold (OpenVINO's recipe reuses ONNX Runtime's): they wait on disk (SPILL_GRAM_BYTES and more) instead
        of in memory under the OpenVINO and CoreML builds that follow (ViT-Base: 0.7 GB)."""
        from ..quantization.int8 import spill_quantized_grams

        store = self._shared.get("__memo__", {})
        for key in [k for k in store if _int8_memo_kind(k) == "quantized-gram"]:
            store[key] = spill_quantized_grams(store[key], SPILL_GRAM_BYTES)


def _int8_memo_kind(key: Hashable) -> str | None:
    """The kind of a recipe_memo key ((reference, (smoothing key, kind, ...))), else None."""
    inner = key[1] if isinstance(key, tuple) and len(key) > 1 else None
    return inner[1] if isinstance(inner, tuple) and len(inner) > 1 and isinstance(inner[1], str) else None


def _int8_memo_owner(key: tuple) -> tuple:
    """(reference, smoothing key): what decides whether a recipe can use another's Gram matrices."""
    return key[0], key[1][0]


class Runner(Protocol):
    emulated: bool  # True when the arithmetic is reproduced by another runtime, not measured on the target's own
    device: str
    runtime: str
    threads: int | None

    def run(self, batch: np.ndarray) -> np.ndarray: ...


class Backend(Protocol):
    name: str
    precisions: tuple[str, ...]  # == tuple(capabilities): the fp32 reference first
    capabilities: Mapping[str, Capability]
    settings: Any  # [options.<backend>]: a frozen dataclass type, or a mapping of key -> default
    summary: Mapping[str, str]  # the README target table's words: devices, artifact

    def available(self) -> tuple[bool, str]: ...

    def build(self, reference, calibration: Calibration | None, precision: str, options: Mapping[str, Any], out_dir: Path, stages=None): ...

    def runner(self, artifact, threads: int | None = None) -> Runner: ...


def names() -> list[str]:
    return list(REGISTRY)


def get(name: str) -> Backend:
    if name not in REGISTRY:
        raise VitexportError(f"unknown backend '{name}': choose one of {', '.join(REGISTRY)}")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)()


def shared_int4(reference, calibration: "Calibration | None", recipe, stages=None):
    """The core int4 recipe on ``reference``: (MatMulNBits model, summary), computed once per build and recipe,
    its Hessians taken from the build's float statistics."""
    from ..quantization.int4 import quantize_int4

    if calibration is None:  # RTN needs no images, and there is nothing to share it through
        return quantize_int4(reference.load(), None, recipe)
    key = ("int4", str(Path(reference.path).resolve()), recipe)

    def compute():
        stats = float_stats(reference, calibration, stages) if recipe.method == "gptq" and not recipe.sequential else None
        return quantize_int4(reference.load(), calibration.batches, recipe, stats=stats)

    return calibration.shared(key, compute)


# linear roles whose inputs the build's one float pass observes: every recipe's default roles
FLOAT_STATS_ROLES = ("qkv", "attn_out", "fc1", "fc2")
# float-statistics Gram matrices at least this large wait on disk until int4 / palette / CoreML int8 read them
# (ViT-Base: 1.1 GB, DeiT-tiny: 60 MB stays in memory)
SPILL_GRAM_BYTES = 256 << 20


def float_stats(reference, calibration: "Calibration", stages=None):
    """The build's float statistics of ``reference`` on the calibration images (calibration.FloatStats): one pass,
    shared by every recipe (int8 ranges and smoothing, int4 / palette / CoreML int8 Hessians); from
    ``calibration.cache_dir`` when an earlier build computed them for the same reference file and images (and then
    the GPTQ codes rounded against them are kept there too: FloatStats.derived)."""
    from ..progress import stages_of

    key = ("float-stats", str(Path(reference.path).resolve()))

    def compute():
        from ..quantization.cache import load_float_stats, save_float_stats, with_codes_cache
        from ..ort_session import release_freed_memory
        from ..quantization.calibration import collect_float_stats, spill_grams
        from ..quantization.graph import find_linears, unscaled_inputs

        model = reference.load()
        linears = [l for l in find_linears(model) if l.role in FLOAT_STATS_ROLES]
        acts = sorted({l.activation for l in linears})
        cached = load_float_stats(calibration.cache_dir, reference.path, calibration.fingerprint, acts) if calibration.cache_dir else None
        if cached is not None:
            return with_codes_cache(spill_grams(cached, SPILL_GRAM_BYTES), calibration.cache_dir, reference.path, calibration.fingerprint, acts)
        unscaled = unscaled_inputs(linears)
        del model, linears  # the pass loads its own copy and drops it once serialized
        with stages_of(stages).stage("float statistics (one pass, shared by every recipe)", total=calibration.count) as tick:
            stats = collect_float_stats(reference.path, acts, calibration.batches, calibration.count, progress=tick, whole_tensor_tails=unscaled)
        if calibration.cache_dir:
            save_float_stats(calibration.cache_dir, reference.path, calibration.fingerprint, acts, stats)
        stats = spill_grams(stats, SPILL_GRAM_BYTES)
        release_freed_memory()  # the in-memory Grams just written out
        return with_codes_cache(stats, calibration.cache_dir, reference.path, calibration.fingerprint, acts)

    return calibration.memo(key, compute)


def recipe_memo(reference, calibration: "Calibration"):
    """memo(key, compute) for one reference: what int8 recipes with the same smoothing and ranges share."""
    ref = str(Path(reference.path).resolve())
    return lambda key, compute: calibration.memo((ref, key), compute)


def quantize_int8_shared(reference, calibration: "Calibration", recipe, stages=None):
    """The core int8 recipe on ``reference`` with the build's float statistics and shared per-recipe results (and
    its sensitivity scores from ``calibration.cache_dir`` when an earlier build searched the same candidates)."""
    from ..quantization.int8 import quantize_int8

    stats = float_stats(reference, calibration, stages)
    result = quantize_int8(reference.load(), calibration.batches, recipe, stats=stats, memo=recipe_memo(reference, calibration), stages=stages, owned=True,
                           cache_dir=calibration.cache_dir)
    calibration.spill_quantized_grams()
    return result


def require_calibration(calibration: "Calibration | None", what: str) -> "Calibration":
    """The calibration images ``what`` (e.g. "openvino int8") cannot build without, or one clear error."""
    if calibration is None or calibration.count == 0:
        raise VitexportError(f"{what} needs calibration images: pass --calib DIR")
    return calibration


def read_rows_only(model) -> dict[str, Any]:
    """Run an artifact graph's last row-wise ops on the rows its output reads (quantization/unread_rows.py), in
    place; what the recipe records about it."""
    from ..quantization.unread_rows import drop_unread_rows, summary

    return summary(drop_unread_rows(model))


def reference_on_read_rows(reference, target: Path) -> dict[str, Any]:
    """The verified fp32 reference as an artifact's model file, its unread rows dropped (export.write_read_rows
    wrote that graph once, checked against the reference): the same logits, less arithmetic. A graph with nothing to
    drop is copied as it is."""
    import shutil

    if reference.read_rows_path is None:
        copy_reference(reference, target)
    else:
        shutil.copyfile(reference.read_rows_path, target)
        if Path(str(reference.read_rows_path) + ".data").exists():
            shutil.copyfile(str(reference.read_rows_path) + ".data", str(target) + ".data")
    return dict(reference.read_rows)


def copy_reference(reference, target: Path) -> None:
    """The verified fp32 reference ONNX as an artifact's model file (with its external weights, if it has them)."""
    import shutil

    shutil.copyfile(reference.path, target)
    if Path(str(reference.path) + ".data").exists():
        shutil.copyfile(str(reference.path) + ".data", str(target) + ".data")


def needs_calibration(precision: str, backend: "Backend | str | None" = None) -> bool:
    """Whether ``backend`` builds ``precision`` from calibration images, as the backend declares it. Without a
    backend: whether any registered backend does (int4 and palette4 use calibration activations too: their rounding
    minimises the error on real inputs, not on weights alone)."""
    if backend is None:
        return any(needs_calibration(precision, n) for n in REGISTRY if precision in get(n).capabilities)
    b = get(backend) if isinstance(backend, str) else backend
    cap = b.capabilities.get(precision)
    return bool(cap and cap.calibration)


def precision_options(options: Mapping[str, Any] | None, backend: str, precision: str) -> dict[str, Any]:
    """The ``[options.<backend>.<precision>]`` table (empty if absent)."""
    return dict(((options or {}).get(backend) or {}).get(precision) or {})


def backend_options(options: Mapping[str, Any] | None, backend: str) -> dict[str, Any]:
    """The ``[options.<backend>]`` settings, without its precision tables."""
    mine = dict((options or {}).get(backend) or {})
    return {k: v for k, v in mine.items() if not isinstance(v, Mapping)}


def recipe_overrides(options: Mapping[str, Any] | None, backend: str, precision: str) -> dict[str, Any]:
    """``recipe = {...}`` of ``[options.<backend>.<precision>]``: overrides of the precision's core recipe."""
    return dict(precision_options(options, backend, precision).get("recipe") or {})


def load_class(ref: str) -> type:
    module, cls = ref.split(":")
    return getattr(importlib.import_module(module), cls)


def parse_precisions(text: str | Iterable[str], backend: Backend) -> list[str]:
    items = [p.strip().lower() for p in (text.split(",") if isinstance(text, str) else text) if p.strip()]
    if not items:
        raise VitexportError("no precision given: pass e.g. --precision fp32,int8,int4")
    bad = [p for p in items if p not in backend.precisions]
    if bad:
        raise VitexportError(f"backend {backend.name} has no precision {', '.join(bad)}: choose from {', '.join(backend.precisions)}")
    return sorted(set(items), key=backend.precisions.index)  # the backend's order: the fp32 reference row first


def recipe_from(cls, overrides: Mapping[str, Any] | None, what: str | None = None):
    """A recipe or settings dataclass (Int8Recipe, CoreMLOptions, ...) from a profile's or caller's overrides: unknown
    keys are one clear error (naming `what`, e.g. the backend, else the class), and TOML's lists become the tuples the
    frozen dataclasses use."""
    what = what or cls.__name__
    overrides = dict(overrides or {})
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(overrides) - fields
    if unknown:
        raise VitexportError(f"unknown {what} option(s) {', '.join(sorted(unknown))}: known are {', '.join(sorted(fields))}")
    try:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})
    except (ValueError, TypeError) as e:  # a recipe's own checks: the user's value, not a bug
        raise VitexportError(f"bad {what} option: {e}") from None


def target_table() -> str:
    """The README's target table, derived from every registered backend's declarations (a test keeps them equal)."""
    rows = [
        "| backend | precisions | calibration images for | artifact | on a Linux host without the device | minimum deployment target |",
        "|---|---|---|---|---|---|",
    ]
    for name in names():
        b = get(name)
        caps = b.capabilities
        precisions = ", ".join(p + (f" ({'macOS' if c.builds_on == 'Darwin' else c.builds_on} only)" if c.builds_on else "") for p, c in caps.items())
        calib = ", ".join(p for p, c in caps.items() if c.calibration) or "–"
        targets = _grouped({p: c.min_target for p, c in caps.items() if c.min_target})
        runs = _grouped({p: c.runs_here for p, c in caps.items()})
        rows.append(f"| `{name}` ({b.summary['devices']}) | {precisions} | {calib} | {b.summary['artifact']} | {runs} ({b.summary['measured']}) | {targets or '–'} |")
    return "\n".join(rows)


def _grouped(values: Mapping[str, str]) -> str:
    """{"fp32": "a", "fp16": "a", "int8": "b"} -> "fp32, fp16: a; int8: b" (just "a" when all agree)."""
    groups: dict[str, list[str]] = {}
    for p, v in values.items():
        groups.setdefault(v, []).append(p)
    if len(groups) == 1:
        return next(iter(groups))
    return "; ".join(f"{', '.join(ps)}: {v}" for v, ps in groups.items())
