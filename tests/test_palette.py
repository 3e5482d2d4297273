"""GPTQ palettization (vitexport.quantization.palette): palettes, exact placement on them, and the GPTQ gain."""

from __future__ import annotations

import numpy as np
import pytest

from vitexport.quantization.palette import PaletteRecipe, kmeans_1d, nearest_entry, palettize_gptq, searchsorted_rows


def _layer(n=32, k=64, rows=2000, seed=0):
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((k, k)) / np.sqrt(k)  # correlated inputs, as activations are: where GPTQ has work to do
    x = rng.standard_normal((rows, k)) @ mix + 0.3 * rng.standard_normal((rows, k))
    w = rng.standard_normal((n, k)) * 0.05
    return w, x


def test_kmeans_1d_is_a_weighted_lloyd_fixed_point():
    rng = np.random.default_rng(1)
    x, wt = rng.standard_normal((2, 3000)), rng.random((2, 3000))
    c = kmeans_1d(x, wt, 8, iters=1000)  # run to convergence
    assert c.shape == (2, 8) and np.all(np.diff(c, axis=1) > 0)
    for i in range(2):  # each centroid is the weighted mean of the points nearest to it
        idx = np.abs(x[i][:, None] - c[i]).argmin(1)
        for j in range(8):
            np.testing.assert_allclose(c[i, j], np.average(x[i][idx == j], weights=wt[i][idx == j]), atol=1e-6)


def test_searchsorted_rows_is_numpys_per_row():
    rng = np.random.default_rng(2)
    for m in (1, 2, 7, 1000, 1024):
        xs = np.sort(np.round(rng.standard_normal((6, m)), 1), axis=1)  # ties
        v = np.concatenate([rng.standard_normal((6, 9)), xs[:, [0, -1, m // 2]], xs[:, [0]] - 1, xs[:, [-1]] + 1], axis=1)
        want = np.stack([np.searchsorted(xs[i], v[i]) for i in range(6)])
        np.testing.assert_array_equal(searchsorted_rows(xs, v), want)


def test_nearest_entry_rounds_to_the_nearest_palette_entry_ties_down():
    rng = np.random.default_rng(3)
    for entries in (2, 4, 16):
        lut = np.sort(np.round(rng.standard_normal((40, entries)), 1), axis=1)  # repeated entries too
        mids = (lut[:, 1:] + lut[:, :-1]) / 2
        nearest = nearest_entry(lut)
        for x in (rng.standard_normal(40) * 2, mids[:, 0], lut[:, -1] + 1, lut[:, 0] - 1):
            np.testing.assert_array_equal(nearest(x), lut[np.arange(40), (x[:, None] > mids).sum(axis=1)])
    with pytest.raises(ValueError):
        nearest_entry(np.zeros((2, 3)))


def test_values_lie_on_their_groups_palette():
    w, x = _layer()
    q, lut = palettize_gptq(w, x.T @ x, PaletteRecipe(group_size=8))
    assert lut.shape == (4, 16) and q.shape == w.shape and q.dtype == np.float32
    np.testing.assert_array_equal(lut, lut.astype(np.float16).astype(np.float32))  # fp16 palettes, as stored
    for r in range(w.shape[0]):
        assert np.isin(q[r], lut[r // 8]).all()


def test_gptq_rounding_beats_nearest_entry_on_the_layer_output():
    w, x = _layer()
    h = x.T @ x
    q, lut = palettize_gptq(w, h, PaletteRecipe(group_size=8, refine=0))
    rows = np.repeat(lut, 8, axis=0)
    nearest = rows[np.arange(w.shape[0])[:, None], np.abs(w[:, :, None] - rows[:, None, :]).argmin(-1)]
    err = lambda v: np.linalg.norm(x @ (v - w).T)  # noqa: E731
    assert err(q) < 0.9 * err(nearest)  # measured 0.83 here


def test_group_size_must_divide_output_channels():
    w, x = _layer(n=30)
    with pytest.raises(ValueError, match="multiple of the palette group size"):
        palettize_gptq(w, x.T @ x, PaletteRecipe(group_size=8))


def test_cached_palettes_are_the_computed_ones_and_a_bad_entry_is_recomputed(tmp_path, monkeypatch):
    """With --cache-dir a layer's palettes are kept as palettes and 4-bit indices (FloatStats.derived): the weight
    read back is palettize_gptq's bit for bit, a second build computes nothing, another weight or recipe misses, and a
    corrupt or non-finite entry is ignored and written again."""
    import dataclasses
    from types import SimpleNamespace

    from vitexport.quantization import palette
    from vitexport.quantization.cache import CodesCache
    from vitexport.quantization.calibration import FloatStats

    w, x = _layer()
    stats = FloatStats(min={"x": x.min(0)}, max={"x": x.max(0)}, gram={"x": x.T @ x}, top={}, bottom={}, elements={"x": x.size}, images=1)
    cached = dataclasses.replace(stats, codes_cache=CodesCache(tmp_path, "stats-key"))
    layer = SimpleNamespace(activation="x", node=SimpleNamespace(name="fc"))
    recipe = PaletteRecipe(group_size=8)
    want_q, want_lut = palettize_gptq(w, x.T @ x, recipe)
    for s in (stats, cached, cached):  # no cache; cache miss; cache hit
        q, lut = palette.palettize_cached(s, layer, w, recipe)
        np.testing.assert_array_equal(q, want_q)
        np.testing.assert_array_equal(lut, want_lut)
        assert q.dtype == np.float32
    entries = list(tmp_path.glob("codes-*.npz"))
    assert len(entries) == 1
    monkeypatch.setattr(palette, "palettize_gptq", lambda *a, **kw: pytest.fail("palettes computed although cached"))
    palette.palettize_cached(cached, layer, w, recipe)
    monkeypatch.undo()
    palette.palettize_cached(cached, layer, w * 1.01, recipe)  # another weight
    palette.palettize_cached(cached, layer, w, PaletteRecipe(group_size=8, refine=0))  # another recipe
    assert len(list(tmp_path.glob("codes-*.npz"))) == 3
    from vitexport.quantization import cache

    key = ("palette", "fc", "x", None, "r")
    before = cached.codes_cache.path(key)
    monkeypatch.setattr(cache, "_code_sources", lambda: "an edited gptq.py")  # rounding code changed: another entry
    assert cached.codes_cache.path(key) != before
    monkeypatch.undo()
    entries[0].write_bytes(b"not an npz")
    np.testing.assert_array_equal(palette.palettize_cached(cached, layer, w, recipe)[0], want_q)
    path, digest = cached.codes_cache.path(key)
    np.savez(path, digest=np.array(digest), count=np.array(1), a0=np.array([np.nan], np.float32))
    calls = []
    assert np.isfinite(cached.codes_cache.get(key, lambda: calls.append(1) or (np.ones(1, np.float32),))[0]).all() and calls


def test_layers_rounded_on_threads_are_the_same_bits(monkeypatch):
    """gptq.map_layers rounds layers on threads with single-threaded BLAS: the same palettes and weights, bit for
    bit, as one layer after the other with BLAS on every core (layers wide enough for BLAS to thread), in order."""
    from vitexport.quantization import gptq

    monkeypatch.setattr(gptq, "usable_cores", lambda: 3)  # threads even on one core
    rng = np.random.default_rng(7)
    layers = []
    for n, k in ((256, 384), (384, 256), (256, 384)):
        x = (rng.standard_normal((900, k)) * rng.uniform(0.1, 3, k)).astype(np.float32)
        layers.append(((rng.standard_normal((n, k)) * 0.02).astype(np.float32), x.T.astype(np.float64) @ x))
    one = [palettize_gptq(w, h) for w, h in layers]
    many = [r for _, r in gptq.map_layers(lambda wh: palettize_gptq(*wh), layers)]
    assert len(many) == len(one)
    for (q1, lut1), (q2, lut2) in zip(one, many):
        assert np.array_equal(q1, q2) and np.array_equal(lut1, lut2)
