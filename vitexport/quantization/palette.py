"""4-bit palettization with GPTQ rounding: one 16-entry look-up table per group of output channels.

Stock palettization (coremltools' k-means, per tensor or per grouped channel) rounds every weight to its nearest
palette entry independently; on DeiT-tiny that loses about 3 points of top-1 (measured, benchmarks/). The same
rounding error is what GPTQ removes for int4, and nothing in GPTQ needs a uniform grid: only "the nearest
representable value" changes. So, per linear layer:

1. the palette of each group of output channels is a 1-D k-means of that group's weights, each weight weighted by
   the energy of the input it multiplies (the Hessian diagonal: errors on busy inputs cost more);
2. GPTQ then rounds column by column to the nearest entry of the row's own palette, spreading each column's
   rounding error over the columns not yet rounded (H = X^T X from calibration images, as for int4);
3. ``refine`` times: the palettes are fitted again to the values GPTQ actually rounded (its error-compensated
   targets), and GPTQ runs again with them.

The result is a float weight whose values lie exactly on the palettes, plus the palettes: coremltools stores them
losslessly as ``constexpr_lut_to_dense`` (see vitexport.backends.coreml).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .gptq import array_digest, damped_inverse_factor, gptq_round

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PaletteRecipe:
    bits: int = 4  # palette of 2**bits entries
    group_size: int = 16  # output channels sharing one palette
    damp: float = 0.01  # GPTQ: lambda * mean(diag(H)) added to the Hessian diagonal
    refine: int = 1  # extra rounds: refit the palettes to GPTQ's targets, then round again
    kmeans_iters: int = 30
    lazy_columns: int = 64  # GPTQ lazy-batch width; speed only

    def __post_init__(self):
        if not 1 <= self.bits <= 8:
            raise ValueError(f"palette bits must be 1..8, not {self.bits}")
        if self.group_size < 1:
            raise ValueError("palette group_size must be >= 1")


def kmeans_1d(x: np.ndarray, weights: np.ndarray, k: int, iters: int = 30) -> np.ndarray:
    """Weighted 1-D k-means of each row of ``x`` [G, M] (``weights`` [G, M] >= 0): sorted centroids [G, k].

    Each row is sorted once; a cluster is then a contiguous run, and its weighted mean comes from prefix sums.
    """
    g, m = x.shape
    order = np.argsort(x, axis=1)
    xs = np.take_along_axis(x, order, axis=1)
    ws = np.take_along_axis(np.asarray(weights, np.float64), order, axis=1)
    cw = np.concatenate([np.zeros((g, 1)), np.cumsum(ws, axis=1)], axis=1)
    cwx = np.concatenate([np.zeros((g, 1)), np.cumsum(ws * xs, axis=1)], axis=1)
    c = np.quantile(xs, (np.arange(k) + 0.5) / k, axis=1).T.astype(np.float64)  # [G, k], sorted (xs: the same order statistics, cheaper to select)
    rows = np.arange(g)[:, None]
    for _ in range(iters):
        cuts = searchsorted_rows(xs, (c[:, 1:] + c[:, :-1]) / 2)  # [G, k-1]
        bounds = np.concatenate([np.zeros((g, 1), np.int64), cuts, np.full((g, 1), m)], axis=1)
        cnt = cw[rows, bounds[:, 1:]] - cw[rows, bounds[:, :-1]]
        tot = cwx[rows, bounds[:, 1:]] - cwx[rows, bounds[:, :-1]]
        new = np.sort(np.where(cnt > 0, tot / np.maximum(cnt, 1e-300), c), axis=1)
        if np.allclose(new, c, rtol=0, atol=1e-12):
            return new
        c = new
    return c


def searchsorted_rows(xs: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``np.searchsorted(xs[i], v[i])`` (side "left": how many of the row are below each value) for every row of the
    row-sorted ``xs`` [G, M] at once, ``v`` [G, C]: one binary search vectorised over the rows, the same indices
    without a numpy call per row (ViT-Base's fc1 has 192 palette groups, searched 30 times per k-means)."""
    g, m = xs.shape
    flat = np.ascontiguousarray(xs).ravel()
    base = (np.arange(g, dtype=np.int64) * m)[:, None]
    lo = np.zeros(v.shape, np.int64)
    hi = np.full(v.shape, m, np.int64)
    for _ in range(int(m).bit_length()):  # ceil(log2(m + 1)) halvings close every interval
        mid = (lo + hi) >> 1
        below = flat[base + np.minimum(mid, m - 1)] < v
        open_ = lo < hi
        lo = np.where(open_ & below, mid + 1, lo)
        hi = np.where(open_ & ~below, mid, hi)
    return lo


def nearest_entry(lut_rows: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """x [N] -> each x[n] rounded to the nearest entry of its own sorted palette ``lut_rows[n]`` (ties to the lower
    entry): the entry after as many midpoints as lie below x, found by a binary search over the midpoints, vectorised
    over the rows (GPTQ calls this once per column: ViT-Base's fc1 rounds 3072 rows per call, 2x faster than
    comparing every row with all 15 midpoints)."""
    n, entries = lut_rows.shape
    mids = np.ascontiguousarray((lut_rows[:, 1:] + lut_rows[:, :-1]) / 2).ravel()
    lut = np.ascontiguousarray(lut_rows).ravel()
    mid_base, lut_base = np.arange(n) * (entries - 1), np.arange(n) * entries
    steps = [1 << b for b in reversed(range((entries - 1).bit_length()))]
    if sum(steps) != entries - 1:
        raise ValueError(f"palettes of {entries} entries: a power of two is needed")

    def nearest(x: np.ndarray) -> np.ndarray:
        idx = np.zeros(n, np.intp)  # midpoints known to lie below x
        for step in steps:
            cand = idx + step  # the steps sum to entries - 1: entries is a power of two
            idx = np.where(x > mids[mid_base + cand - 1], cand, idx)
        return lut[lut_base + idx]

    return nearest


def palettize_gptq(w_nk: np.ndarray, hessian: np.ndarray, recipe: PaletteRecipe = PaletteRecipe(), factor=None) -> tuple[np.ndarray, np.ndarray]:
    """Palettize ``w_nk`` [N, K] (rows = output channels) given H = X^T X [K, K] of its inputs (``factor()``: its
    damped inverse factor computed elsewhere, FloatStats.inverse_factor).

    Returns (weight [N, K] float32 whose every value is an entry of its row group's palette, palettes
    [N // group_size, 2**bits] float32).
    """
    w = np.asarray(w_nk, dtype=np.float64, order="C")
    n, k = w.shape
    g = recipe.group_size
    if n % g:
        raise ValueError(f"{n} output channels are not a multiple of the palette group size {g}")
    entries = 2**recipe.bits
    try:
        u, dead = factor() if factor is not None else damped_inverse_factor(hessian, recipe.damp)
    except np.linalg.LinAlgError:  # pragma: no cover - degenerate statistics: plain nearest-entry rounding
        log.warning("palette GPTQ: Hessian not positive definite, rounding to nearest")
        u, dead = np.eye(k), np.zeros(k, bool)
    # k-means weight of each input: its damped energy (as GPTQ sees it; dead inputs get the damping alone)
    hdiag = np.diag(np.asarray(hessian, np.float64)).copy()
    hdiag[dead] = 1.0
    hdiag += recipe.damp * float(np.mean(hdiag))
    importance = np.broadcast_to(hdiag[None, :], (n, k))
    fit = w
    for _ in range(1 + max(0, recipe.refine)):
        lut = kmeans_1d(fit.reshape(n // g, g * k), importance.reshape(n // g, g * k), entries, recipe.kmeans_iters)
        lut = lut.astype(np.float16).astype(np.float64)  # the package stores fp16 palettes: round against those
        nearest = nearest_entry(np.repeat(lut, g, axis=0))
        q, fit = gptq_round(w, u, lambda x, _col: nearest(x), recipe.lazy_columns)
    return q.astype(np.float32), lut.astype(np.float32)


def palettize_cached(stats, l, w_nk: np.ndarray, recipe: PaletteRecipe = PaletteRecipe()) -> tuple[np.ndarray, np.ndarray]:
    """``palettize_gptq`` of linear ``l``'s weight ``w_nk`` against the build's float statistics ``stats`` (its
    input's X^T X and shared inverse factor), kept as palettes and 4-bit indices between builds with --cache-dir
    (FloatStats.derived): a quarter of the float weight's bytes, decoded exactly."""
    act, g = l.activation, recipe.group_size

    def compute() -> tuple[np.ndarray, np.ndarray]:
        q, lut = palettize_gptq(w_nk, stats.gram[act], recipe, factor=lambda: stats.inverse_factor(act, recipe.damp))
        rows = np.repeat(lut, g, axis=0)
        idx = (q[:, :, None] > rows[:, None, :]).sum(-1).astype(np.uint8)  # sorted palettes: the first entry equal to q
        if not np.array_equal(np.take_along_axis(rows, idx.astype(np.intp), axis=1), q):
            raise RuntimeError(f"palette: {l.node.name}'s weight does not lie on its palettes")
        return idx, lut

    idx, lut = stats.derived(("palette", l.node.name, act, array_digest(w_nk), repr(recipe)), compute)
    return np.take_along_axis(np.repeat(lut, g, axis=0), idx.astype(np.intp), axis=1), lut
