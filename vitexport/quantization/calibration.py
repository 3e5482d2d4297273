"""Streaming calibration: run the float model batch by batch and hand each requested intermediate tensor to an
observer, which folds it into fixed-size statistics. Nothing is kept per image, so memory does not grow with the
number of calibration images (unlike onnxruntime.quantization's calibrators, which keep every intermediate).

``batches()`` must return a *fresh* iterator of float32 NCHW arrays on every call, so that two passes (e.g. a
min/max pass to fix histogram ranges, then a histogram pass) see the same data.
"""

from __future__ import annotations

import os
import tempfile
from typing import Callable, Iterable

import numpy as np
import onnx

Batches = Callable[[], Iterable[np.ndarray]]

_TWO_GB = 2**31 - 1


def _session(model_bytes_or_path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads or 0)
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    # the extra outputs must survive: basic optimisations only (no fusion may swallow an observed tensor)
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(model_bytes_or_path, sess_options=so, providers=["CPUExecutionProvider"])


def _elem_type(model: onnx.ModelProto, name: str) -> int:
    for vi in list(model.graph.value_info) + list(model.graph.output) + list(model.graph.input):
        if vi.name == name and vi.type.HasField("tensor_type"):
            return vi.type.tensor_type.elem_type
    return onnx.TensorProto.FLOAT


def stream_activations(
    model: onnx.ModelProto,
    tensor_names: list[str],
    batches: Batches,
    observe: Callable[[str, np.ndarray], None],
    threads: int = 0,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Run ``model`` on every batch of ``batches()`` and call ``observe(name, array)`` for each requested tensor.

    The tensors are added as graph outputs on a serialized copy (the caller's model is left unchanged), the model
    runs in onnxruntime (CPU, ``threads`` intra-op threads, 0 = onnxruntime's default), one batch at a time.
    Arrays passed to ``observe`` are only valid during the call: observers must reduce them, not keep them.
    ``progress(n)`` is called after each batch with the number of images in it.
    """
    names = list(dict.fromkeys(tensor_names))
    inputs = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    if len(inputs) != 1:
        raise ValueError(f"streaming calibration expects one graph input, found {inputs}")
    input_name = inputs[0]
    existing = {o.name for o in model.graph.output}
    added = [n for n in names if n not in existing and n != input_name]

    # add the outputs, serialize, restore: the caller's model ends unchanged and no second in-memory copy is made
    extra = [onnx.helper.make_tensor_value_info(n, _elem_type(model, n), None) for n in added]
    model.graph.output.extend(extra)
    tmpdir = None
    try:
        if model.ByteSize() < _TWO_GB:
            payload = model.SerializeToString()
        else:
            tmpdir = tempfile.TemporaryDirectory(prefix="vitexport-calib-")
            payload = os.path.join(tmpdir.name, "model.onnx")
            onnx.save_model(model, payload, save_as_external_data=True, location="model.onnx.data")
    finally:
        for _ in extra:
            model.graph.output.pop()
    try:
        sess = _session(payload, threads)
        del payload
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
