"""Streaming calibration: run the float model batch by batch and hand each requested intermediate tensor to an
observer, which folds it into fixed-size statistics. Nothing is kept per image, so memory does not grow with the
number of calibration images (unlike onnxruntime.quantization's calibrators, which keep every intermediate).

``batches()`` must return a *fresh* iterator of float32 NCHW arrays on every call, so that two passes (e.g. a
min/max pass to fix histogram ranges, then a histogram pass) see the same data.
"""

from __future__ import annotations

import os
import tempfile
import threading
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import onnx

from ..ort_session import ort_session, release_freed_memory, usable_cores
from .gptq import one_blas_thread
from .graph import light_model

Batches = Callable[[], Iterable[np.ndarray]]

_TWO_GB = 2**31 - 1


def _session(model_bytes_or_path, threads: int, initializers=None):
    # no busy-waiting (on a small shared host spinning threads burned a third of a pass's CPU time); basic
    # optimisations only, so no fusion swallows an observed tensor
    return ort_session(model_bytes_or_path, threads, optimization="basic", spinning=False, user_model=False, initializers=initializers)


def _elem_type(model: onnx.ModelProto, name: str) -> int:
    for vi in list(model.graph.value_info) + list(model.graph.output) + list(model.graph.input):
        if vi.name == name and vi.type.HasField("tensor_type"):
            return vi.type.tensor_type.elem_type
    return onnx.TensorProto.FLOAT


def stream_activations(
    model: onnx.ModelProto | str | os.PathLike,
    tensor_names: list[str],
    batches: Batches,
    observe: Callable[[str, np.ndarray], None],
    threads: int = 0,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Run ``model`` on every batch of ``batches()`` and call ``observe(name, array)`` for each requested tensor.

    The tensors are added as graph outputs on a copy serialised without its weights, which onnxruntime copies in
    from arrays (graph.light_model; the caller's model is left unchanged); the model runs in onnxruntime (CPU,
    ``threads`` intra-op threads, 0 = onnxruntime's default), one batch at a time.
    Arrays passed to ``observe`` are only valid until ``progress`` is called for their batch (after its last
    ``observe``): observers must reduce them by then, not keep them (FloatStatsObserver folds a batch's tensors at
    that point, on several threads). ``progress(n)`` is called after each batch with the number of images in it.
    Given a path, the model is loaded here and dropped once serialized: a caller's ModelProto stays alive for the
    whole pass (ViT-Base: 0.33 GB of the pass that holds the build's memory peak; deleting its weights in place frees
    nothing of protobuf's arena).
    """
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(os.fspath(model))
    names = list(dict.fromkeys(tensor_names))
    inputs = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    if len(inputs) != 1:
        raise ValueError(f"streaming calibration expects one graph input, found {inputs}")
    input_name = inputs[0]
    existing = {o.name for o in model.graph.output}
    added = [n for n in names if n not in existing and n != input_name]

    # the weights go to onnxruntime as arrays, not inside a serialised copy of the model (ViT-Base: 346 MB written
    # and parsed again by every pass); the same kernels on the same values (tests/test_calibration_shared.py)
    light, arrays = light_model(model)
    del model  # the last reference when loaded here
    payload, tmpdir = _with_outputs(light, added)
    del light
    sess = None
    try:
        sess = _session(payload, threads, arrays)
        del payload, arrays  # onnxruntime holds its own copy of the weights now: ours would sit on the pass's peak
        fetch = names
        fetch_model = [n for n in fetch if n != input_name]
        for batch in batches():
            x = np.ascontiguousarray(batch, dtype=np.float32)
            outs = sess.run(fetch_model, {input_name: x}) if fetch_model else []
            got = dict(zip(fetch_model, outs))
            if input_name in fetch:
                got[input_name] = x
            for n in fetch:
                observe(n, got[n])
            del outs, got
            if progress is not None:
                progress(int(x.shape[0]))
    finally:
        if tmpdir is not None:
            tmpdir.cleanup()
        del sess
        release_freed_memory()


def _with_outputs(model: onnx.ModelProto, added: list[str]) -> tuple[bytes | str, tempfile.TemporaryDirectory | None]:
    """``model`` serialized with ``added`` as extra graph outputs (a file in a temporary folder past protobuf's 2 GB):
    the outputs are added, serialized and removed again, so the caller's model ends unchanged and no second in-memory
    copy is made."""
    extra = [onnx.helper.make_tensor_value_info(n, _elem_type(model, n), None) for n in added]
    model.graph.output.extend(extra)
    tmpdir = None
    try:
        if model.ByteSize() < _TWO_GB:
            return model.SerializeToString(), None
        tmpdir = tempfile.TemporaryDirectory(prefix="vitexport-calib-")
        path = os.path.join(tmpdir.name, "model.onnx")
        onnx.save_model(model, path, save_as_external_data=True, location="model.onnx.data")
        return path, tmpdir
    finally:
        for _ in extra:
            model.graph.output.pop()


# ----------------------------------------------------------------------------------------------------------------
# observers: each is a callable observe(name, array) holding O(1) state per tensor (or O(channels))


class MinMaxObserver:
    """Running per-tensor min and max."""

    def __init__(self):
        self.min: dict[str, float] = {}
        self.max: dict[str, float] = {}

    def __call__(self, name: str, a: np.ndarray) -> None:
        lo, hi = float(np.min(a)), float(np.max(a))
        self.min[name] = min(self.min.get(name, lo), lo)
        self.max[name] = max(self.max.get(name, hi), hi)

    def range(self, name: str) -> tuple[float, float]:
        return self.min[name], self.max[name]


class HistogramObserver:
    """Fixed-range histogram per tensor, for a second calibration pass.

    ``ranges`` maps name -> (min, max) from a first pass; values are counted in ``bins`` equal bins over that
    range (anything outside is clipped into the edge bins, which cannot happen when ranges come from the same data).
    """

    def __init__(self, ranges: dict[str, tuple[float, float]], bins: int = 2048):
        self.bins = bins
        self.edges: dict[str, tuple[float, float]] = {}
        self.counts: dict[str, np.ndarray] = {}
        for n, (lo, hi) in ranges.items():
            lo, hi = float(min(lo, 0.0)), float(max(hi, 0.0))
            if hi - lo < 1e-12:
                hi = lo + 1e-6
            self.edges[n] = (lo, hi)
            self.counts[n] = np.zeros(bins, dtype=np.int64)

    def __call__(self, name: str, a: np.ndarray) -> None:
        lo, hi = self.edges[name]
        scale = self.bins / (hi - lo)
        idx = np.clip(((a.ravel() - lo) * scale).astype(np.int64), 0, self.bins - 1)
        self.counts[name] += np.bincount(idx, minlength=self.bins)

    def centers(self, name: str) -> np.ndarray:
        lo, hi = self.edges[name]
        w = (hi - lo) / self.bins
        return lo + (np.arange(self.bins) + 0.5) * w

    # ---- range selection -------------------------------------------------------------------------------------

    def percentile_range(self, name: str, percentile: float) -> tuple[float, float]:
        """Symmetric-tail percentile clipping: drop (100-percentile)/2 % of the mass on each side."""
        c = self.counts[name].astype(np.float64)
        cdf = np.cumsum(c) / max(c.sum(), 1.0)
        tail = (100.0 - percentile) / 200.0
        lo, hi = self.edges[name]
        w = (hi - lo) / self.bins
        i_lo = int(np.searchsorted(cdf, tail, side="left"))
        i_hi = int(np.searchsorted(cdf, 1.0 - tail, side="left"))
        return min(lo + i_lo * w, 0.0), max(lo + (i_hi + 1) * w, 0.0)

    def mse_range(self, name: str, symmetric: bool = False, levels: int = 256, candidates: int = 96) -> tuple[float, float]:
        """Clipping range minimising the expected squared quantization error (rounding + clipping) over the histogram.

        Asymmetric: the range [a, b] is searched jointly as shrink factors of the observed min and max;
        symmetric: [-t, t] with t a fraction of max(|min|, |max|).
        """
        c = self.counts[name].astype(np.float64)
        x = self.centers(name)
        lo, hi = self.edges[name]
        if symmetric:
            amax = max(abs(lo), abs(hi))
            best, best_t = np.inf, amax
            for f in np.linspace(1.0, 0.05, candidates):
                t = amax * f
                err = _quant_mse(x, c, -t, t, levels)
                if err < best:
                    best, best_t = err, t
            return -best_t, best_t
        best, best_r = np.inf, (lo, hi)
        fs = np.linspace(1.0, 0.05, candidates)
        # coarse joint search on a grid of shrink factors for each side
        coarse = fs[:: max(1, candidates // 24)]
        for fl in coarse:
            for fh in coarse:
                a, b = lo * fl, hi * fh
                err = _quant_mse(x, c, a, b, levels)
                if err < best:
                    best, best_r = err, (a, b)
        # refine each side around the coarse optimum
        a0, b0 = best_r
        for _ in range(2):
            for a in np.linspace(a0 * 0.8, min(a0 * 1.25, 0.0) if a0 < 0 else a0, 25) if a0 < 0 else [a0]:
                a = max(a, lo)
                err = _quant_mse(x, c, a, b0, levels)
                if err < best:
                    best, best_r = err, (a, b0)
            a0 = best_r[0]
            for b in np.linspace(b0 * 0.8, min(b0 * 1.25, hi), 25) if b0 > 0 else [b0]:
                err = _quant_mse(x, c, a0, b, levels)
                if err < best:
                    best, best_r = err, (a0, b)
            b0 = best_r[1]
        return float(min(best_r[0], 0.0)), float(max(best_r[1], 0.0))


def _quant_mse(x: np.ndarray, counts: np.ndarray, a: float, b: float, levels: int) -> float:
    """Expected squared error of fake-quantizing values x (weighted by counts) with range [a, b] and ``levels`` levels."""
    scale = (b - a) / (levels - 1)
    if scale <= 0:
        return float(np.sum(counts * x * x))
    zp = np.round(-a / scale)
    q = np.clip(np.round(x / scale) + zp, 0, levels - 1)
    xq = (q - zp) * scale
    return float(np.sum(counts * (x - xq) ** 2))


# ----------------------------------------------------------------------------------------------------------------
# one float pass for every recipe of a build

FACTOR_SPILL_BYTES = 1 << 20  # FloatStats.inverse_factor: larger factors wait on disk (ViT-Base's 768-wide ones held 0.17 GB)

# The float statistics keep each channel's most extreme values down to this percentile (symmetric tails) so that
# percentile ranges >= it come out exactly, for any positive per-channel scaling (SmoothQuant), without a second pass.
TAIL_PERCENTILE = 99.999

# threads folding a batch's tensors into the float statistics (each holds a batch-sized temporary or two)
OBSERVER_WORKERS = 4


@dataclass(frozen=True)
class FloatStats:
    """Statistics of the float reference on the calibration images that no recipe changes, from one pass.

    Per observed tensor (the inputs of the linear layers), channels on the last axis: ``min``/``max`` per channel,
    ``gram`` X^T X (float64, [K, K]; the GPTQ Hessian of int4, palette and CoreML int8), ``top``/``bottom`` the
    ``tail`` largest/smallest values of each channel ([tail, K], the rest of each channel lies between them) and
    ``elements`` the number of values of the tensor. Read-only once built: recipes share one instance.
    """

    min: dict[str, np.ndarray]
    max: dict[str, np.ndarray]
    gram: Mapping[str, np.ndarray]  # a dict, or SpilledArrays (on disk) on large models
    top: dict[str, np.ndarray]
    bottom: dict[str, np.ndarray]
    elements: dict[str, int]
    images: int
    # where results rounded against these statistics are kept between builds (cache.CodesCache, --cache-dir), or None
    codes_cache: Any = dataclasses.field(default=None, compare=False, repr=False)
    _factors: dict = dataclasses.field(default_factory=dict, init=False, compare=False, repr=False)
    _lock: Any = dataclasses.field(default_factory=threading.Lock, init=False, compare=False, repr=False)
    _factor_locks: dict = dataclasses.field(default_factory=dict, init=False, compare=False, repr=False)

    def absmax(self) -> dict[str, np.ndarray]:
        return {n: np.maximum(np.abs(self.min[n]), np.abs(self.max[n])) for n in self.min}

    def inverse_factor(self, name: str, damp: float) -> tuple[np.ndarray, np.ndarray]:
        """gptq.damped_inverse_factor of ``gram[name]``, computed once for every recipe that rounds against the
        unscaled X^T X (int8 on inputs no SmoothQuant touches, CoreML int8, palettes, int4): on ViT-Base each fc2
        factor took 0.5 s and was computed four times. Factors of FACTOR_SPILL_BYTES or more wait in memory-mapped
        files (ViT-Base's are 1.1 GB of float64). Raises ``np.linalg.LinAlgError`` as the function does."""
        from .gptq import damped_inverse_factor

        key = (name, float(damp))
        with self._lock:  # layers rounded on threads (gptq.map_layers) share inputs (q, k and v): one factor each
            lock = self._factor_locks.setdefault(key, threading.Lock())
        with lock:
            if key not in self._factors:
                u, dead = damped_inverse_factor(self.gram[name], damp)
                if u.nbytes >= FACTOR_SPILL_BYTES:
                    try:
                        u = SpilledArrays({"u": u}, prefix="vitexport-factor-")
                    except OSError:  # no room in the temporary folder: keep it in memory
                        pass
                self._factors[key] = (u, dead)
        u, dead = self._factors[key]
        return (u["u"] if isinstance(u, SpilledArrays) else u), dead

    def derived(self, key: tuple, compute: Callable[[], tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
        """``compute()``: arrays that depend only on these statistics and on what ``key`` names (a layer's GPTQ codes:
        its weight's digest, the recipe's settings); read from the build's --cache-dir when an earlier build rounded
        the same, else computed (and stored there)."""
        return compute() if self.codes_cache is None else self.codes_cache.get(key, compute)

    def nbytes(self) -> int:
        return sum(a.nbytes for d in (self.min, self.max, self.gram, self.top, self.bottom) for a in d.values())


class SpilledArrays(Mapping):
    """Read-only arrays kept in .npy files of a private temporary folder, memory-mapped on each access.

    The float statistics' Gram matrices (1.1 GB of float64 on ViT-Base) are read only by int4, palette and CoreML
    int8, one matrix at a time; held in memory they sat under every int8 recipe's passes and search, the build's
    peak. The folder goes with the object."""

    def __init__(self, arrays: dict[str, np.ndarray], prefix: str = "vitexport-stats-"):
        self._dir = tempfile.TemporaryDirectory(prefix=prefix)
        self._paths: dict[str, str] = {}
        try:
            for i, (name, a) in enumerate(arrays.items()):
                path = os.path.join(self._dir.name, f"{i}.npy")
                np.save(path, np.ascontiguousarray(a))
                self._paths[name] = path
        except BaseException:
            self._dir.cleanup()
            raise

    def __getitem__(self, name: str) -> np.ndarray:
        return np.load(self._paths[name], mmap_mode="r")

    def __iter__(self):
        return iter(self._paths)

    def __len__(self) -> int:
        return len(self._paths)


def spill_grams(stats: "FloatStats", min_bytes: int) -> "FloatStats":
    """``stats`` with its Gram matrices on disk (SpilledArrays) when they take at least ``min_bytes``; unchanged
    when they are smaller or the temporary folder cannot take them."""
    size = sum(a.nbytes for a in stats.gram.values())
    if isinstance(stats.gram, SpilledArrays) or size < min_bytes:
        return stats
    try:
        return dataclasses.replace(stats, gram=SpilledArrays(stats.gram))
    except OSError:  # no room in the temporary folder: keep them in memory
        return stats


class FloatStatsObserver:
    """Folds each batch into per-channel min/max, X^T X and per-channel extreme-value tails (all bounded in size).

    ``tail`` per channel is sized from the first batch for ``images`` images so that a TAIL_PERCENTILE percentile
    of the whole tensor is among the kept values; the Gram sums run on numpy's BLAS (GramSums), one BLAS thread per product.
    Tensors in ``whole_tensor_tails`` (ones no per-channel scaling will touch: fc2's GELU outputs) keep one tail of
    the whole tensor instead, stored as a single channel ([tail, 1]): the same percentiles, unscaled, at a fraction of
    the cost (ViT-Base fc2: 777 values per channel of 3072 were merged on every batch).

    With ``workers`` > 1, calls only collect a batch's tensors and ``end_batch()`` folds them, their X^T X on that
    many threads. Every X^T X runs on single-threaded BLAS either way (one_blas_thread), so every statistic is the
    same bits either way.
    """

    def __init__(self, images: int, gram: bool = True, tail_percentile: float = TAIL_PERCENTILE, whole_tensor_tails: Iterable[str] = (),
                 workers: int = 1):
        self.images, self.want_gram, self.tail_fraction = images, gram, (100.0 - tail_percentile) / 200.0
        self.whole = set(whole_tensor_tails)
        self.workers = max(1, int(workers))
        self._held: list[tuple[str, np.ndarray]] = []
        self._pool = None
        self.min: dict[str, np.ndarray] = {}
        self.max: dict[str, np.ndarray] = {}
        self.gram: dict[str, np.ndarray] = {}
        self.top: dict[str, np.ndarray] = {}
        self.bottom: dict[str, np.ndarray] = {}
        self.elements: dict[str, int] = {}
        self.seen = 0
        self._tails: dict[str, tuple[_Tails, _Tails]] = {}
        self._grams = GramSums(np.float64)

    def __call__(self, name: str, a: np.ndarray) -> None:
        if self.workers > 1:
            self._held.append((name, a))
        else:
            self._fold(name, a)

    def end_batch(self) -> None:
        """Fold the tensors held since the last call: their X^T X on ``workers`` threads, widest first, each with
        BLAS limited to one thread (two single-threaded products run 1.2x the rate of one on two threads, ViT-Base's
        shapes on AMD EPYC), while this thread folds the rest (the tails: single-threaded numpy, which left a core
        idle). Every lasting array is allocated on this thread (memory that threads allocate stays in their own
        malloc arenas, and folding whole tensors on them cost 0.1-0.4 GB more peak): the sums before the first
        batch's products (which ran here alone until then, a core idle for 2-3 s of ViT-Base's pass), the tails by
        _fold; the workers allocate only their scratch product, once. The same bits: each tensor's sums take its
        batches in order, each product on one BLAS thread as _fold takes it (one_blas_thread;
        tests/test_calibration_shared.py)."""
        held, self._held = self._held, []
        if not held:
            return
        if self.want_gram:
            for name, a in held:
                if name not in self._grams:
                    self._grams.reserve(name, a.shape[-1])
        from concurrent.futures import ThreadPoolExecutor

        if self._pool is None:  # one set of threads for the pass: each keeps its scratch products
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="vitexport-stats")
        held.sort(key=lambda t: t[1].shape[-1], reverse=True)  # widest (fc2's X^T X) first: the longest tasks
        with one_blas_thread():
            grams = [self._pool.submit(self._grams.add, name, _rows(a)) for name, a in held] if self.want_gram else []
            for name, a in held:
                self._fold(name, a, gram=False)
            for f in grams:
                f.result()

    def close(self) -> None:
        """Stop end_batch's threads (result() does too)."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def _fold(self, name: str, a: np.ndarray, gram: bool = True) -> None:
        x = _rows(a)
        rows, k = x.shape
        mn, mx = x.min(axis=0), x.max(axis=0)
        lo, hi = mn.astype(np.float64), mx.astype(np.float64)
        if name not in self.min:
            per_image = rows / max(int(a.shape[0]) if a.ndim > 2 else 1, 1)
            # the rank a percentile needs, counted from the end, for the whole tensor (+2: rounding of the rank)
            tail = int(np.ceil(self.tail_fraction * per_image * max(self.images, 1) * k)) + 2
            self.min[name], self.max[name] = lo, hi
            kind = _WholeTail if name in self.whole else _Tails
            self._tails[name] = (kind(tail, k, largest=True), kind(tail, k, largest=False))
            self.elements[name] = 0
        else:
            np.minimum(self.min[name], lo, out=self.min[name])
            np.maximum(self.max[name], hi, out=self.max[name])
        top, bottom = self._tails[name]
        if isinstance(top, _WholeTail):
            top.add(x, float(mx.max()))
            bottom.add(x, float(mn.min()))
        else:
            top.add(x)
            bottom.add(x)
        self.elements[name] += x.size
        if self.want_gram and gram:
            with one_blas_thread():  # the workers' order (end_batch), on this thread too
                self._grams.add(name, x)

    def result(self) -> FloatStats:
        self.end_batch()
        self.close()
        for name, (top, bottom) in self._tails.items():
            self.top[name], self.bottom[name] = top.values(), bottom.values()
        self.gram = self._grams.sums
        return FloatStats(self.min, self.max, self.gram, self.top, self.bottom, self.elements, self.images)


def _rows(a: np.ndarray) -> np.ndarray:
    """[rows, channels] float32 C-ordered (a view of ORT's outputs, which are)."""
    return np.ascontiguousarray(np.asarray(a, np.float32).reshape(-1, a.shape[-1]))


class _Tails:
    """Each column's ``n`` largest (or smallest) values seen so far: the same multisets as sorting everything.

    Only values beyond a column's current tail can enter it, so each batch only gathers those (after the first
    batches a few per column) into the column's pending buffer; a column is merged (a selection over its tail and
    its pending values, on torch's threads) only when its buffer is full, not after every batch: merging every
    column of every tensor after each batch cost the size of all tails each time, a third of ViT-Base's float pass.
    Until a column is merged its threshold is the last merge's, so a few more values are gathered than could enter;
    never fewer. Stored column by column (one contiguous row per column), so a merge reads and writes whole rows."""

    def __init__(self, n: int, k: int, largest: bool):
        self.largest, self.fill = largest, (-np.inf if largest else np.inf)
        self.tails = np.full((k, n), self.fill, np.float32)
        self.edge = np.full(k, self.fill, np.float32)  # per column, what a value must be beyond to be gathered
        self.cap = max(n // 2, 1)
        self.pending = np.full((k, self.cap), self.fill, np.float32)  # gathered values of each column
        self.count = np.zeros(k, np.int64)  # pending values per column

    def add(self, x: np.ndarray) -> None:
        beyond = (x > self.edge) if self.largest else (x < self.edge)
        counts = np.count_nonzero(beyond, axis=0)
        over = self.count + counts > self.cap
        if over.any():  # these columns' buffers would overflow: merge them with this batch's values right away
            cols = np.flatnonzero(over)
            whole = len(cols) == len(over)  # the first batch: no column copies
            xs, bs = (x, beyond) if whole else (x[:, cols], beyond[:, cols])
            self._merge(cols, _column_candidates(xs, bs, counts[cols], np.arange(len(cols)), self.fill).T)
            counts[cols] = 0
            beyond &= ~over  # their values are in; the first batches (every value flagged) stop here
        if not counts.any():
            return
        c, r = _by_column(beyond)
        first = np.flatnonzero(np.r_[True, c[1:] != c[:-1]])
        rank = np.arange(len(c)) - np.repeat(first, np.diff(np.r_[first, len(c)]))
        self.pending[c, self.count[c] + rank] = x[r, c]
        self.count += counts

    def _merge(self, cols: np.ndarray, extra: np.ndarray | None = None) -> None:
        """Merge the pending values of ``cols`` (and ``extra`` [len(cols), values]) into their tails."""
        import torch

        m = int(self.count[cols].max())
        both = np.concatenate([self.tails[cols], self.pending[cols, :m]] + ([extra] if extra is not None else []), axis=1)
        kept = torch.topk(torch.from_numpy(both), self.tails.shape[1], dim=1, largest=self.largest, sorted=False).values.numpy()
        self.tails[cols] = kept
        self.pending[cols, :m] = self.fill
        self.count[cols] = 0
        self.edge[cols] = kept.min(axis=1) if self.largest else kept.max(axis=1)

    def values(self) -> np.ndarray:
        """[n, k]: the tails, column ``j`` holding column ``j``'s values."""
        cols = np.flatnonzero(self.count)
        if len(cols):
            self._merge(cols)
        return np.ascontiguousarray(self.tails.T)


class _WholeTail:
    """The ``n`` largest (or smallest) values of a whole tensor: what ``_Tails`` keeps over all channels, for a tensor
    whose percentiles are only ever taken unscaled. A batch whose extreme is not beyond the tail's edge is skipped."""

    def __init__(self, n: int, k: int, largest: bool):
        self.n, self.largest, self.fill = n, largest, (-np.inf if largest else np.inf)
        self.tail = np.empty(0, np.float32)
        self.edge = self.fill  # what a value must be beyond to enter: the tail's last value once it is full

    def add(self, x: np.ndarray, extreme: float) -> None:
        if not (extreme > self.edge if self.largest else extreme < self.edge):
            return
        both = np.concatenate([self.tail, x[x > self.edge] if self.largest else x[x < self.edge]])
        if len(both) >= self.n:
            both = np.partition(both, len(both) - self.n)[-self.n :] if self.largest else np.partition(both, self.n - 1)[: self.n]
            self.edge = both.min() if self.largest else both.max()
        self.tail = both

    def values(self) -> np.ndarray:
        """[n, 1]: the tail as one channel, padded with the fill value while fewer than ``n`` values were seen."""
        out = np.full((self.n, 1), self.fill, np.float32)
        out[: len(self.tail), 0] = self.tail
        return out


class GramSums:
    """Running x^T x (or x^T y) per tensor, each batch's product summed in float32 by numpy's BLAS into one reused
    scratch array, then added to the ``dtype`` sum: a fresh 37 MB product per batch and layer (ViT-Base's fc2) cost
    page faults on every call.

    numpy's and not torch's: both sum in float32, in different orders, and that order decides a few GPTQ codes
    (0.07% of int8 codes on DeiT-tiny, enough to move agreement by 3 of 375 images). numpy's is the order the
    published figures were made with (benchmarks/calibration_equivalence.py --codes)."""

    def __init__(self, dtype=np.float64):
        self.dtype = dtype
        self.sums: dict[str, np.ndarray] = {}
        self._scratch: dict[tuple[int, int, int], np.ndarray] = {}
        self._empty: set[str] = set()  # reserved sums no product has been added to yet

    def reserve(self, name: str, k: int) -> None:
        """Allocate ``name``'s x^T x sum [k, k] here, for a first ``add`` on another thread to fill (the thread that
        allocates a lasting array decides which malloc arena keeps it)."""
        self.sums[name] = np.empty((k, k), self.dtype)
        self._empty.add(name)

    def add(self, name: str, x: np.ndarray, y: np.ndarray | None = None) -> None:
        x = np.ascontiguousarray(x, dtype=np.float32)
        y = x if y is None else np.ascontiguousarray(y, dtype=np.float32)
        key = (threading.get_ident(), x.shape[1], y.shape[1])  # one scratch per thread: FloatStatsObserver.end_batch
        buf = self._scratch.get(key)
        if buf is None:
            buf = self._scratch[key] = np.empty(key[1:], np.float32)
        np.matmul(x.T, y, out=buf)  # x.T @ x: numpy's syrk, bit for bit x.T @ x without ``out``
        s = self.sums.get(name)
        if s is None:
            self.sums[name] = buf.astype(self.dtype)
        elif name in self._empty:
            np.copyto(s, buf)  # what astype gives, -0.0 included (0.0 + -0.0 would not be)
            self._empty.discard(name)
        else:
            np.add(s, buf, out=s)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.sums[name]

    def __contains__(self, name: str) -> bool:
        return name in self.sums

    def pop(self, name: str, *default):
        return self.sums.pop(name, *default)


def _by_column(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(columns, rows) of ``mask``'s True entries, column by column and rows in order within each: what
    ``np.nonzero(mask.T)`` gives, without transposing the whole mask. After the first batches a few percent of it is
    set, and transposing and scanning the [rows, K] mask cost more than the rest of the tails (ViT-Base fc2: 18 ms per
    side and batch, against under 1 ms to find the hits row by row and sort them by column, a radix sort)."""
    k = mask.shape[1]
    r, c = np.divmod(np.flatnonzero(mask), k)
    order = np.argsort(c.astype(np.int16) if k <= np.iinfo(np.int16).max else c, kind="stable")
    return c[order], r[order]


def _column_candidates(x: np.ndarray, beyond: np.ndarray, counts: np.ndarray, cols: np.ndarray, fill: float) -> np.ndarray:
    """[most flagged in a column, len(cols)]: each column's values flagged in ``beyond``, padded with ``fill``."""
    n = counts[cols]
    if int(n.max()) * 4 >= x.shape[0]:  # dense (the first batches): every row is cheaper than gathering
        return x[:, cols]
    out = np.full((int(n.max()), len(cols)), fill, np.float32)
    c_idx, r_idx = _by_column(beyond[:, cols])
    starts = np.cumsum(n) - n
    out[np.arange(len(c_idx)) - np.repeat(starts, n), c_idx] = x[r_idx, cols[c_idx]]
    return out


def collect_float_stats(
    model: onnx.ModelProto | str | os.PathLike, tensor_names: list[str], batches: Batches, images: int, gram: bool = True, threads: int = 0, progress: Callable[[int], None] | None = None,
    whole_tensor_tails: Iterable[str] = (),
) -> FloatStats:
    """One streaming pass of ``model`` (a ModelProto or a path, see stream_activations) over the calibration images,
    folding every named tensor into FloatStats (``whole_tensor_tails``: tensors never scaled per channel, see
    FloatStatsObserver) on as many threads as onnxruntime runs (``threads``, 0: the usable cores, at most
    OBSERVER_WORKERS)."""
    workers = min(threads or usable_cores(), OBSERVER_WORKERS)
    obs = FloatStatsObserver(images, gram=gram, whole_tensor_tails=whole_tensor_tails, workers=workers)
    seen = [0]

    def count(n: int) -> None:  # stream_activations calls it after each batch's tensors went to obs
        obs.end_batch()
        seen[0] += n
        if progress is not None:
            progress(n)

    try:
        stream_activations(model, list(tensor_names), batches, obs, threads=threads, progress=count)
        return dataclasses.replace(obs.result(), images=seen[0])
    finally:
        obs.close()


def order_statistic(top: np.ndarray, bottom: np.ndarray, rank: int, elements: int, scale: np.ndarray | None = None) -> float | None:
    """The ``rank``-th smallest (1-based) of all values of a tensor of ``elements`` values, each channel divided by
    ``scale`` (> 0), from the per-channel tails; None when the tails are too short to know it.

    A value among the r largest of the whole tensor is among the r largest of its own channel, whatever positive
    per-channel scale is applied, so the tails answer any rank within their length from either end.
    """
    t = top.shape[0]
    s = np.ones(top.shape[1], np.float32) if scale is None else np.asarray(scale, np.float32)
    from_top = elements - rank + 1
    if 1 <= from_top <= t:
        v = (top / s).ravel()
        v = v[np.isfinite(v)]
        if len(v) < from_top:
            return None
        return float(np.partition(v, len(v) - from_top)[len(v) - from_top])
    if 1 <= rank <= t:
        v = (bottom / s).ravel()
        v = v[np.isfinite(v)]
        if len(v) < rank:
            return None
        return float(np.partition(v, rank - 1)[rank - 1])
    return None


def percentile_range_from_tails(stats: FloatStats, name: str, percentile: float, bins: int, scale: np.ndarray | None = None) -> tuple[float, float] | None:
    """What ``HistogramObserver.percentile_range`` returns for the tensor (divided by ``scale`` per channel), without
    a histogram pass: the same fixed bins over [min, max], the same cumulative-count rule, the bin found from the
    exact order statistic. None when the percentile is beyond the kept tails (then run the histogram pass)."""
    n = stats.elements[name]
    if scale is not None and stats.top[name].shape[1] != len(stats.min[name]):
        return None  # a whole-tensor tail (FloatStatsObserver) knows no channel: the histogram pass answers
    s = np.ones_like(stats.min[name]) if scale is None else np.asarray(scale, np.float64)
    lo, hi = float((stats.min[name] / s).min()), float((stats.max[name] / s).max())
    lo, hi = float(min(lo, 0.0)), float(max(hi, 0.0))
    if hi - lo < 1e-12:
        hi = lo + 1e-6
    tail = (100.0 - percentile) / 200.0
    w = (hi - lo) / bins

    def first_rank(target: float) -> int:  # smallest r with r / n >= target, as cumsum(counts) / n compares
        r = max(int(np.ceil(target * n)), 1)
        while r > 1 and (r - 1) / n >= target:
            r -= 1
        while r < n and r / n < target:
            r += 1
        return r

    out = []
    for target in (tail, 1.0 - tail):
        v = order_statistic(stats.top[name], stats.bottom[name], first_rank(target), n, None if scale is None else scale)
        if v is None:
            return None
        # the histogram's own bin arithmetic (float32, as HistogramObserver computes on float32 activations)
        idx = int(np.clip((np.float32(v) - np.float32(lo)) * np.float32(bins / (hi - lo)), 0, bins - 1))
        out.append(idx)
    i_lo, i_hi = out
    return min(lo + i_lo * w, 0.0), max(lo + (i_hi + 1) * w, 0.0)
