"""One calibration per build: the float statistics every recipe shares, the exact percentile ranges from their
tails, the gated sensitivity search (same scores and choices as one model per input), and the on-disk cache."""

from __future__ import annotations

import dataclasses
import sys

import numpy as np
import onnx
import pytest

from vitexport.quantization.calibration import HistogramObserver, collect_float_stats, percentile_range_from_tails, stream_activations
from vitexport.quantization.graph import find_linears
from vitexport.quantization.int4 import HessianObserver, Int4Recipe, quantize_int4
from vitexport.quantization.int8 import Int8Recipe, quantize_int8, select_linears, sensitivity_scores, sensitivity_scores_one_model_each


@pytest.fixture(scope="module")
def tiny_onnx(tiny_vit, tmp_path_factory):
    from vitexport.export import export_reference
    from vitexport.model import ModelSpec

    spec = ModelSpec.load(tiny_vit)
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    return export_reference(spec, tmp_path_factory.mktemp("ref"), x)


def _batches(n=12, bs=4, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, 3, 32, 32)).astype(np.float32)
    return lambda: (x[i : i + bs] for i in range(0, n, bs))


def _acts(model):
    return sorted({l.activation for l in find_linears(model) if l.role in ("qkv", "attn_out", "fc1", "fc2")})


def test_percentile_from_tails_is_the_histogram_answer():
    """Heavy-tailed channels, any positive per-channel scale (SmoothQuant): the same range as the histogram pass."""
    rng = np.random.default_rng(1)
    x = (rng.standard_t(2, size=(40, 50, 24)) * rng.uniform(0.2, 5, 24)).astype(np.float32)
    batches = lambda: (x[i : i + 8] for i in range(0, len(x), 8))  # noqa: E731
    from vitexport.quantization.calibration import FloatStatsObserver

    obs = FloatStatsObserver(images=len(x))
    for b in batches():
        obs("t", b)
    stats = obs.result()
    for scale in (None, rng.uniform(0.1, 10, 24).astype(np.float32)):
        s = np.ones(24, np.float32) if scale is None else scale
        lo, hi = float((stats.min["t"] / s).min()), float((stats.max["t"] / s).max())
        for pct in (99.999, 99.9995, 100.0):
            hist = HistogramObserver({"t": (lo, hi)}, bins=2048)
            for b in batches():
                hist("t", b / s)
            want = hist.percentile_range("t", pct)
            got = percentile_range_from_tails(stats, "t", pct, 2048, scale)
            assert got is not None
            assert got == pytest.approx(want, abs=1e-9), (pct, scale is None)


def test_whole_tensor_tails_give_the_same_unscaled_percentiles():
    """fc2's inputs keep one tail of the whole tensor: the same ranges as per-channel tails and as the histogram,
    and no answer (so a histogram pass) when someone asks for them scaled per channel."""
    from vitexport.quantization.calibration import FloatStatsObserver

    rng = np.random.default_rng(3)
    x = (rng.standard_t(2, size=(40, 50, 24)) * rng.uniform(0.2, 5, 24)).astype(np.float32)
    got = {}
    for whole in ((), ("t",)):
        obs = FloatStatsObserver(images=len(x), whole_tensor_tails=whole)
        for i in range(0, len(x), 8):
            obs("t", x[i : i + 8])
        stats = obs.result()
        got[whole] = [percentile_range_from_tails(stats, "t", p, 2048) for p in (99.999, 99.9995, 100.0)]
    assert stats.top["t"].shape[1] == 1 and None not in got[("t",)]
    assert got[()] == got[("t",)]
    hist = HistogramObserver({"t": (float(x.min()), float(x.max()))}, bins=2048)
    hist("t", x)
    assert got[("t",)][0] == pytest.approx(hist.percentile_range("t", 99.999), abs=1e-9)
    assert percentile_range_from_tails(stats, "t", 99.999, 2048, np.ones(24, np.float32)) is None


def test_threaded_observer_folds_the_same_bits():
    """end_batch folds a batch's tensors on several threads with single-threaded BLAS: every statistic is the same
    bits as folding them one by one on the caller's thread (BLAS on every core), including a tensor kept as one
    whole-tensor tail, and nothing is folded before end_batch (or result)."""
    from vitexport.quantization.calibration import FloatStatsObserver

    rng = np.random.default_rng(5)
    widths = {"narrow": 48, "wide": 384, "fc2": 640}
    batches = [{n: (rng.standard_t(3, size=(4, 197, k)) * rng.uniform(0.2, 4, k)).astype(np.float32) for n, k in widths.items()} for _ in range(3)]
    stats = {}
    for workers in (1, 3):
        obs = FloatStatsObserver(images=12, whole_tensor_tails=("fc2",), workers=workers)
        for i, batch in enumerate(batches):
            for n, a in batch.items():
                obs(n, a)
            if workers > 1 and i == 0:
                assert not obs.min  # held, not folded yet
            if i < len(batches) - 1:
                obs.end_batch()
        stats[workers] = obs.result()  # folds the last batch
    one, many = stats[1], stats[3]
    for field in ("min", "max", "gram", "top", "bottom"):
        for n in widths:
            assert np.array_equal(getattr(one, field)[n], getattr(many, field)[n]), (field, n)
    assert one.elements == many.elements and one.top["fc2"].shape[1] == 1


def test_percentile_beyond_the_tails_asks_for_a_pass():
    from vitexport.quantization.calibration import FloatStatsObserver

    obs = FloatStatsObserver(images=4)
    obs("t", np.random.default_rng(0).standard_normal((4, 50, 8)).astype(np.float32))
    assert percentile_range_from_tails(obs.result(), "t", 90.0, 2048) is None


def test_float_stats_hold_the_gptq_hessians(tiny_onnx):
    model = tiny_onnx.load()
    acts = _acts(model)
    stats = collect_float_stats(model, acts, _batches(), images=12)
    from_path = collect_float_stats(tiny_onnx.path, acts, _batches(), images=12)  # as the build runs it
    obs = HessianObserver()
    stream_activations(model, acts, _batches(), obs)
    assert stats.images == 12
    for a in acts:
        # the same float32 summation as int4's own pass (numpy's): identical, not just close
        np.testing.assert_array_equal(stats.gram[a], obs.h[a])
        np.testing.assert_array_equal(from_path.gram[a], stats.gram[a])
        np.testing.assert_array_equal(from_path.top[a], stats.top[a])
        assert stats.min[a].shape == stats.max[a].shape == (stats.gram[a].shape[0],)
    # int4 GPTQ from the shared statistics gives the codes of its own pass
    own, _ = quantize_int4(model, _batches(), Int4Recipe())
    shared, summary = quantize_int4(model, _batches(), Int4Recipe(), stats=stats)
    assert summary["calibration_images"] == 12
    a = {t.name: onnx.numpy_helper.to_array(t) for t in own.graph.initializer if t.name.endswith("_B")}
    b = {t.name: onnx.numpy_helper.to_array(t) for t in shared.graph.initializer if t.name.endswith("_B")}
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_spilled_grams_are_the_same_read_only_and_cleaned_up(tiny_onnx):
    import gc
    import os

    from vitexport.quantization.calibration import SpilledArrays, spill_grams

    model = tiny_onnx.load()
    stats = collect_float_stats(model, _acts(model), _batches(), images=12)
    assert spill_grams(stats, min_bytes=1 << 40) is stats  # small: stays in memory
    spilled = spill_grams(stats, min_bytes=0)
    assert isinstance(spilled.gram, SpilledArrays) and set(spilled.gram) == set(stats.gram)
    for a in stats.gram:
        np.testing.assert_array_equal(spilled.gram[a], stats.gram[a])
        with pytest.raises(ValueError):
            spilled.gram[a][0, 0] = 1.0  # the shared statistics cannot be changed by a reader
    # int4 GPTQ reads them as it reads the in-memory ones: the same codes
    a_model, _ = quantize_int4(model, _batches(), Int4Recipe(), stats=stats)
    b_model, _ = quantize_int4(model, _batches(), Int4Recipe(), stats=spilled)
    assert all(np.array_equal(onnx.numpy_helper.to_array(x), onnx.numpy_helper.to_array(y)) for x, y in zip(a_model.graph.initializer, b_model.graph.initializer))
    folder = spilled.gram._dir.name
    assert os.path.isdir(folder)
    del spilled, a_model, b_model
    gc.collect()
    assert not os.path.exists(folder)


@pytest.mark.parametrize("tail", [25, 3, 200])
def test_tails_keep_each_columns_extremes(tail):
    """Batch by batch, with ties, a late outlier and a constant column, merged after one batch or after several:
    the same values as sorting everything."""
    from vitexport.quantization.calibration import _Tails

    rng = np.random.default_rng(3)
    xs = [np.round(rng.standard_t(3, size=(200, 6)) * 4).astype(np.float32) for _ in range(7)]
    xs[5][17, 2] = 1e4
    for x in xs:
        x[:, 4] = 1.5
    top, bottom = _Tails(tail, 6, largest=True), _Tails(tail, 6, largest=False)
    for x in xs:
        top.add(x)
        bottom.add(x)
    every = np.sort(np.concatenate(xs), axis=0)
    np.testing.assert_array_equal(np.sort(top.values(), axis=0), every[-tail:])
    np.testing.assert_array_equal(np.sort(bottom.values(), axis=0), every[:tail])


@pytest.mark.parametrize("k", [7, 40000])  # int16 column indices (radix sort) and wider
def test_hits_by_column_are_nonzero_of_the_transpose(k):
    from vitexport.quantization.calibration import _by_column

    mask = np.random.default_rng(5).random((30, k)) < 0.05
    mask[:, 1] = True
    c, r = _by_column(mask)
    ref_c, ref_r = np.nonzero(mask.T)
    np.testing.assert_array_equal(c, ref_c)
    np.testing.assert_array_equal(r, ref_r)


@pytest.mark.parametrize("scipy", [True, False], ids=["trtri", "without-scipy"])
def test_upper_cholesky_of_inverse(scipy, monkeypatch):
    from vitexport.quantization.gptq import upper_cholesky_of_inverse

    import torch

    solves = []
    if not scipy:  # the package does not depend on scipy: the torch path must give the same factor
        monkeypatch.setitem(sys.modules, "scipy.linalg.lapack", None)
        solve = torch.linalg.solve_triangular
        monkeypatch.setattr(torch.linalg, "solve_triangular", lambda *a, **k: solves.append(1) or solve(*a, **k))
    x = np.random.default_rng(4).standard_normal((500, 40))
    h = x.T @ x + 0.1 * np.eye(40)
    u = upper_cholesky_of_inverse(h)
    assert len(solves) == (0 if scipy else 1)  # the path named by the test id was the one taken
    np.testing.assert_array_equal(u, np.triu(u))
    np.testing.assert_allclose(u, np.linalg.cholesky(np.linalg.inv(h)).T, rtol=1e-9, atol=1e-12)
    with pytest.raises(np.linalg.LinAlgError):
        upper_cholesky_of_inverse(-h)


def test_inverse_factor_is_the_same_bits_whatever_blas_threads_its_caller_runs():
    """The factor is computed once and shared by every layer on its input, by whichever caller comes first: a layer
    rounded alone (BLAS on every core) or beside another on map_layers' threads (BLAS on one). OpenBLAS's trtri on
    a Zen 3 (Haswell kernels) gave other last bits on two threads than on one, so it runs on one either way."""
    pytest.importorskip("scipy.linalg.lapack")  # loaded before the limits below, so that they reach its OpenBLAS
    from threadpoolctl import threadpool_limits

    from vitexport.quantization.gptq import upper_cholesky_of_inverse

    rng = np.random.default_rng(5)
    x = rng.standard_normal((2000, 768)) * rng.uniform(0.1, 3, 768)
    h = x.T @ x + 0.01 * np.eye(768)
    with threadpool_limits(limits=1, user_api="blas"):
        one = upper_cholesky_of_inverse(h)
    with threadpool_limits(limits=2, user_api="blas"):
        two = upper_cholesky_of_inverse(h)
    assert np.array_equal(one, two)


@pytest.mark.parametrize("recipe", [Int8Recipe(), Int8Recipe(symmetric_activations=True, center_activations=True, reduce_range=False, smoothquant_alpha=0.8)], ids=["onnxruntime", "tensorrt"])
def test_gated_sensitivity_scores_match_one_model_per_input(tiny_onnx, recipe):
    model = tiny_onnx.load()
    chosen, _ = select_linears(find_linears(model), recipe)
    stats = collect_float_stats(model, _acts(model), _batches(), images=12, gram=False)
    ranges = {a: (float(stats.min[a].min()), float(stats.max[a].max())) for a in stats.min}
    recipe = dataclasses.replace(recipe, fallback_images=6)
    # the search fake-quantizes in float, which is TensorRT's arithmetic; onnxruntime's integer kernels are not on a
    # CPU without VNNI, where u8*s8 pairs summed in int16 saturate on TensorRT's full 8-bit weights (an AMD EPYC Zen 3
    # scored one input 7.7e-6 that way against 4.7e-8 in float), so that recipe's reference runs in float too
    old = sensitivity_scores_one_model_each(model, chosen, ranges, recipe, _batches(), qdq_fusion=recipe.reduce_range)
    new = sensitivity_scores(model, chosen, ranges, recipe, _batches())
    assert old.keys() == new.keys()
    for a in old:
        assert new[a] == pytest.approx(old[a], rel=0.02, abs=1e-7), a
    assert sorted(old, key=old.get) == sorted(new, key=new.get)  # same ranking, hence the same inputs left float


def test_search_weights_passed_as_arrays_give_the_same_scores(tiny_onnx, monkeypatch):
    """The search hands each block's weights to onnxruntime as arrays (graph.light_model) instead of inside the
    serialised graph: the same bits, and the graph it serialises carries no weight."""
    from vitexport.quantization import graph

    model = tiny_onnx.load()
    recipe = dataclasses.replace(Int8Recipe(), fallback_images=6)
    chosen, _ = select_linears(find_linears(model), recipe)
    stats = collect_float_stats(model, _acts(model), _batches(), images=12, gram=False)
    ranges = {a: (float(stats.min[a].min()), float(stats.max[a].max())) for a in stats.min}
    monkeypatch.setattr(graph, "EXTERNAL_BYTES", 1 << 40)  # nothing goes as arrays
    inline = sensitivity_scores(model, chosen, ranges, recipe, _batches())
    monkeypatch.setattr(graph, "EXTERNAL_BYTES", 1)  # every weight does
    light, arrays = graph.light_model(model)
    weights = {l.weight for l in chosen}
    assert weights <= set(arrays) and all(t.name not in weights or not t.raw_data for t in light.graph.initializer)
    assert sensitivity_scores(model, chosen, ranges, recipe, _batches()) == inline


def test_calibration_passes_read_weights_as_arrays_with_the_same_bits(tiny_onnx, monkeypatch):
    """stream_activations hands the weights to onnxruntime as arrays instead of inside the serialised model: every
    statistic of the float pass (min, max, X^T X, tails) is the same bits as with the weights inline."""
    from vitexport.quantization import calibration, graph

    model = tiny_onnx.load()
    sent = []
    real = calibration._session
    monkeypatch.setattr(calibration, "_session", lambda payload, threads, initializers=None: sent.append(len(initializers or {})) or real(payload, threads, initializers))
    runs = {}
    for name, limit in (("inline", 1 << 40), ("arrays", 1)):
        monkeypatch.setattr(graph, "EXTERNAL_BYTES", limit)
        s = collect_float_stats(model, _acts(model), _batches(), images=12)
        runs[name] = [s.min, s.max, dict(s.gram), s.top, s.bottom]
    assert sent[0] == 0 and sent[1] >= len(_acts(model))  # the second pass really took its weights as arrays
    for a, b in zip(runs["inline"], runs["arrays"]):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_cached_sensitivity_scores_are_the_computed_ones_and_any_change_misses(tiny_onnx, tmp_path, monkeypatch):
    """--cache-dir keeps each search's scores under the digest of what they are computed from: the same inputs read
    them back without a session; another range, weight or image set is another entry; a damaged entry is recomputed."""
    from vitexport.quantization import cache, fallback

    model = tiny_onnx.load()
    recipe = dataclasses.replace(Int8Recipe(), fallback_images=6)
    chosen, _ = select_linears(find_linears(model), recipe)
    stats = collect_float_stats(model, _acts(model), _batches(), images=12, gram=False)
    ranges = {a: (float(stats.min[a].min()), float(stats.max[a].max())) for a in stats.min}
    plain = sensitivity_scores(model, chosen, ranges, recipe, _batches())
    assert sensitivity_scores(model, chosen, ranges, recipe, _batches(), cache_dir=str(tmp_path)) == plain
    entries = list(tmp_path.glob("fallback-scores-*.json"))
    assert len(entries) == 1
    real_score = fallback._score
    monkeypatch.setattr(fallback, "_score", lambda *a, **k: pytest.fail("scored again although the entry matches"))
    assert sensitivity_scores(model, chosen, ranges, recipe, _batches(), cache_dir=str(tmp_path)) == plain
    monkeypatch.setattr(fallback, "_score", real_score)
    act = sorted(ranges)[0]
    moved = {**ranges, act: (ranges[act][0], ranges[act][1] * 1.01)}
    changed_weight = tiny_onnx.load()
    w = next(t for t in changed_weight.graph.initializer if t.name == chosen[-1].weight)
    arr = onnx.numpy_helper.to_array(w).copy()
    arr.flat[0] += 0.5
    w.CopyFrom(onnx.numpy_helper.from_array(arr, w.name))
    for args in ((model, chosen, moved, recipe, _batches()), (changed_weight, chosen, ranges, recipe, _batches()), (model, chosen, ranges, recipe, _batches(seed=1))):
        sensitivity_scores(*args, cache_dir=str(tmp_path))
    assert len(list(tmp_path.glob("fallback-scores-*.json"))) == 4
    entries[0].write_text('{"format": 1, "digest": "x", "scores": {}}')
    assert cache.load_scores(tmp_path, "x" * 64, plain) is None
    assert sensitivity_scores(model, chosen, ranges, recipe, _batches(), cache_dir=str(tmp_path)) == plain  # recomputed, rewritten
    assert sensitivity_scores(model, chosen, ranges, recipe, _batches(), cache_dir=str(tmp_path / "other")) == plain


def test_shared_statistics_give_the_same_int8_model(tiny_onnx):
    """quantize_int8 with the build's float statistics == with its own passes; a second recipe with the same ranges
    (OpenVINO's: only the fallback budget differs) reuses the sensitivity scores and the Gram matrices."""
    from vitexport.progress import Stages

    model = tiny_onnx.load()
    recipe = Int8Recipe(fallback_budget=0.3, fallback_images=4)
    own, s_own = quantize_int8(model, _batches(), recipe)
    stats = collect_float_stats(model, _acts(model), _batches(), images=12)
    store: dict = {}
    memo = lambda k, f: store[k] if k in store else store.setdefault(k, f())  # noqa: E731
    st = Stages()
    shared, s_shared = quantize_int8(model, _batches(), recipe, stats=stats, memo=memo, stages=st)
    assert s_shared["calibration"]["passes"] == 1  # the quantized-input Grams only
    assert [r["activation_range"] for r in s_own["quantized"]] == [r["activation_range"] for r in s_shared["quantized"]]
    assert s_own["sensitivity_fallback"]["kept_float"] == s_shared["sensitivity_fallback"]["kept_float"]
    w = lambda m: {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer if t.name.endswith("_weight_quantized")}  # noqa: E731
    a, b = w(own), w(shared)
    assert a.keys() == b.keys() and np.mean([np.mean(np.abs(a[k].astype(int) - b[k]) <= 1) for k in a]) == 1.0
    st2 = Stages()
    _, s_ov = quantize_int8(model, _batches(), dataclasses.replace(recipe, fallback_budget=0.5), stats=stats, memo=memo, stages=st2)
    assert s_ov["calibration"]["passes"] == 0
    names = [r["stage"] for r in st2.records]
    assert "quantized-input Gram matrices" not in names and "sensitivity search" in names
    assert len(s_ov["sensitivity_fallback"]["kept_float"]) >= len(s_shared["sensitivity_fallback"]["kept_float"])


def test_without_activation_compensation_gptq_reads_the_float_statistics(tiny_onnx):
    """compensate_activations=False rounds against X^T X of the smoothed inputs: taken from the build's float
    statistics (the reference's X^T X divided by s_i s_j), no pass; the same codes as streaming the smoothed model,
    up to the rounding of the two sums (float64 there, float32 here)."""
    from vitexport.progress import Stages

    model = tiny_onnx.load()
    recipe = Int8Recipe(fallback_budget=0.0, compensate_activations=False, smooth_outlier_ratio=1.0)
    own, s_own = quantize_int8(model, _batches(), recipe)
    stats = collect_float_stats(model, _acts(model), _batches(), images=12)
    st = Stages()
    shared, s_shared = quantize_int8(model, _batches(), recipe, stats=stats, stages=st)
    assert s_shared["calibration"]["passes"] == 0 and "quantized-input Gram matrices" not in [r["stage"] for r in st.records]
    assert s_shared["smoothquant"]["tensors"]  # the scaled path is exercised
    w = lambda m: {t.name: onnx.numpy_helper.to_array(t).astype(int) for t in m.graph.initializer if t.name.endswith("_weight_quantized")}  # noqa: E731
    a, b = w(own), w(shared)
    assert a.keys() == b.keys()
    same = np.mean([np.mean(a[k] == b[k]) for k in a])
    assert same > 0.97 and max(np.abs(a[k] - b[k]).max() for k in a) <= 1, same


def test_recipes_with_other_smoothing_share_the_codes_of_layers_they_leave_alone(tiny_onnx, monkeypatch):
    """Rounded against float X^T X, a layer's codes depend on its weight and its input's smoothing only: a second
    recipe with another SmoothQuant alpha (TensorRT's against the core's) rounds only the layers it smooths, and the
    codes it reuses are the ones it would have computed."""
    import vitexport.quantization.int8 as int8

    model = tiny_onnx.load()
    stats = collect_float_stats(model, _acts(model), _batches(), images=12)
    store: dict = {}
    memo = lambda k, f: store[k] if k in store else store.setdefault(k, f())  # noqa: E731
    calls: list = []
    real = int8.gptq_weight
    monkeypatch.setattr(int8, "gptq_weight", lambda w, *a, **k: calls.append(w.shape) or real(w, *a, **k))
    first = Int8Recipe(fallback_budget=0.0, compensate_activations=False, reduce_range=False, smooth_outlier_ratio=1.0)
    quantize_int8(model, _batches(), first, stats=stats, memo=memo)
    n_first = len(calls)
    other = dataclasses.replace(first, smoothquant_alpha=0.8, symmetric_activations=True, center_activations=True)
    shared, summary = quantize_int8(model, _batches(), other, stats=stats, memo=memo)
    smoothed = {c for t in summary["smoothquant"]["tensors"] for c in t["consumers"]}
    assert smoothed and len(calls) - n_first == len(smoothed) < summary["counts"]["quantized"]
    alone, _ = quantize_int8(model, _batches(), other, stats=stats)
    w = lambda m: {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer if t.name.endswith("_weight_quantized")}  # noqa: E731
    a, b = w(shared), w(alone)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_inverse_factors_are_computed_once_per_build_and_wait_on_disk(tiny_onnx, monkeypatch):
    """Every recipe rounding against an unscaled X^T X (int8, CoreML int8, palettes, int4) asks the float statistics
    for its damped inverse factor: one factorisation per input and damping, spilled to a file when large, the
    same numbers as computing it in place."""
    import vitexport.quantization.calibration as calibration
    import vitexport.quantization.gptq as gptq

    model = tiny_onnx.load()
    stats = collect_float_stats(model, _acts(model), _batches(), images=12)
    monkeypatch.setattr(calibration, "FACTOR_SPILL_BYTES", 0)
    calls: list = []
    real = gptq.damped_inverse_factor
    monkeypatch.setattr(gptq, "damped_inverse_factor", lambda h, d: calls.append(d) or real(h, d))
    act = _acts(model)[0]
    u1, dead1 = stats.inverse_factor(act, 0.01)
    u2, _ = stats.inverse_factor(act, 0.01)
    assert len(calls) == 1 and isinstance(u1, np.memmap) and not u1.flags.writeable
    want, dead = real(stats.gram[act], 0.01)
    np.testing.assert_array_equal(u2, want)
    np.testing.assert_array_equal(dead1, dead)
    stats.inverse_factor(act, 0.1)
    assert len(calls) == 2


def test_float_stats_cache_round_trip(tiny_onnx, tmp_path):
    from vitexport.quantization.cache import entry_path, images_sha256, load_float_stats, save_float_stats

    model = tiny_onnx.load()
    acts = _acts(model)
    stats = collect_float_stats(model, acts, _batches(), images=12)
    fp = images_sha256(_batches()())
    assert load_float_stats(tmp_path, tiny_onnx.path, fp, acts) is None
    path = save_float_stats(tmp_path, tiny_onnx.path, fp, acts, stats)
    assert path is not None and path.is_file() and not list(tmp_path.glob(".float-stats-*"))
    back = load_float_stats(tmp_path, tiny_onnx.path, fp, acts)
    assert back is not None and back.images == stats.images
    for a in acts:
        np.testing.assert_array_equal(back.gram[a], stats.gram[a])
        np.testing.assert_array_equal(back.top[a], stats.top[a])
    # other images, other entry; a corrupt entry is ignored, not trusted
    assert images_sha256(_batches(seed=1)()) != fp
    assert entry_path(tmp_path, tiny_onnx.path, images_sha256(_batches(seed=1)()), acts) != path
    path.write_bytes(b"not an npz")
    assert load_float_stats(tmp_path, tiny_onnx.path, fp, acts) is None


def test_build_calibrates_once_times_every_stage_and_reuses_the_cache(tiny_vit, image_folder, calib_folder, tmp_path, monkeypatch):
    """One build, ORT + TensorRT int8 and int4: one float pass for all of them, every stage in report.json, and a
    second build with --cache-dir traces no ONNX and runs neither a float pass nor a sensitivity search, and leaves
    the same inputs float."""
    import json

    from vitexport import export
    from vitexport.cli import main
    from vitexport.quantization import fallback, int4, int8

    args = ["build", "--model", str(tiny_vit), "--eval", str(image_folder), "--calib", str(calib_folder), "--backend", "onnxruntime,tensorrt",
            "--precision", "fp32,int8,int4", "--no-latency", "--quiet", "--cache-dir", str(tmp_path / "cache")]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    stages = [s["stage"] for s in json.loads((tmp_path / "a" / "report.json").read_text())["stages"]]
    assert sum("float statistics" in s for s in stages) == 1, stages
    assert any(s.startswith("tensorrt int8: sensitivity search") for s in stages) and any(s.startswith("evaluation") for s in stages)
    assert "export and verification" in stages and "build tensorrt int8" in stages
    assert len(list((tmp_path / "cache").glob("float-stats-*.npz"))) == 1
    assert "Longest build stages" in (tmp_path / "a" / "report.md").read_text()
    assert len(list((tmp_path / "cache").glob("fallback-scores-*.json"))) == 1  # TensorRT's search (ONNX Runtime's default runs none)
    assert len(list((tmp_path / "cache").glob("reference-*"))) == 1
    assert len(list((tmp_path / "cache").glob("codes-*.npz"))) >= 2 * 4  # each GPTQ-rounded layer's int8 and int4 codes
    import os

    cache = tmp_path / "cache"
    entries = sorted(p.name for p in cache.iterdir())
    for p in cache.iterdir():  # as if written an hour ago: only a hit in the next build keeps them under a 1-byte bound
        os.utime(p, (p.stat().st_atime, p.stat().st_mtime - 3600))
    (cache / "codes-0123456789abcdef.npz").write_bytes(b"x" * 100)  # an entry no build uses any more
    os.utime(cache / "codes-0123456789abcdef.npz", (0, 1e9))
    (cache / "notes.txt").write_text("not an entry")
    monkeypatch.setattr(fallback, "_score", lambda *a, **k: pytest.fail("a search ran although its scores are cached"))
    monkeypatch.setattr(export, "_trace", lambda *a, **k: pytest.fail("traced although the cache holds the reference"))
    monkeypatch.setattr(int8, "gptq_weight", lambda *a, **k: pytest.fail("GPTQ int8 ran although the cache holds its codes"))
    monkeypatch.setattr(int4, "quantize_gptq", lambda *a, **k: pytest.fail("GPTQ int4 ran although the cache holds its codes"))
    assert main([*args, "--out", str(tmp_path / "b"), "--cache-max-size", "1"]) == 0
    # the unused entry is gone, every entry the build read is kept (its hit marked it used), the rest untouched
    assert sorted(p.name for p in cache.iterdir()) == sorted([*entries, "notes.txt"])
    again = [s["stage"] for s in json.loads((tmp_path / "b" / "report.json").read_text())["stages"]]
    assert not any("float statistics" in s for s in again), again
    ra, rb = (json.loads((tmp_path / d / "report.json").read_text())["rows"] for d in ("a", "b"))
    assert [r["size_bytes"] for r in ra] == [r["size_bytes"] for r in rb]
    fa, fb = (json.loads((tmp_path / d / "tensorrt-int8" / "manifest.json").read_text())["recipe"]["sensitivity_fallback"] for d in ("a", "b"))
    assert fa == fb and fa["kept_float"]
    for row in ("onnxruntime-int8", "onnxruntime-int4", "tensorrt-int8"):  # the cached codes are the computed ones, bit for bit
        assert (tmp_path / "a" / row / "model.onnx").read_bytes() == (tmp_path / "b" / row / "model.onnx").read_bytes(), row


def test_memo_drops_quantized_grams_when_no_later_recipe_can_use_them():
    """Held from ONNX Runtime's int8 under TensorRT's search they were the build's peak: a recipe with another
    smoothing drops them at its first memo call; one with the same smoothing keeps them."""
    from vitexport.backends import Calibration

    cal = Calibration(batches=lambda: iter([]), count=0, source="test")
    ort, trt = ("int8-ranges", 0.5), ("int8-ranges", 0.8)
    grams = ("ref", (ort, "quantized-gram", True, False))
    cal.memo(("ref", (ort, "fallback", 16)), lambda: {})
    g = cal.memo(grams, lambda: {"act": 1})
    cal.memo(("ref", (ort, "fallback", 16, "budget 0.2")), lambda: {})  # OpenVINO: same smoothing
    assert cal.memo(grams, lambda: {"act": 2}) is g
    cal.memo(("ref", (trt, "fallback", 16)), lambda: {})  # TensorRT: another smoothing
    assert cal.memo(grams, lambda: {"act": 3}) == {"act": 3}


def test_quantized_grams_wait_on_disk_after_a_recipe_and_give_the_same_codes(tiny_onnx, monkeypatch):
    """After a recipe's GPTQ its quantized-input Grams go to memory-mapped files (they sat under the OpenVINO and
    CoreML builds): a later recipe with the same smoothing that needs them (another GPTQ damping: no codes in the
    memo) reads them from there and writes the same model as from memory; the files go with the entry."""
    import os

    import vitexport.backends as B
    from vitexport.quantization.int8 import SpilledQuantizedGrams

    first = Int8Recipe(fallback_budget=0.0)
    second = dataclasses.replace(first, gptq_damp=0.05)

    def build(spill_bytes):
        monkeypatch.setattr(B, "SPILL_GRAM_BYTES", spill_bytes)
        cal = B.Calibration(batches=_batches(), count=12, source="test")
        B.quantize_int8_shared(tiny_onnx, cal, first)
        entries = [v for k, v in cal._shared["__memo__"].items() if B._int8_memo_kind(k) == "quantized-gram"]
        model, _ = B.quantize_int8_shared(tiny_onnx, cal, second)
        return model.SerializeToString(), entries

    in_memory, kept = build(1 << 40)
    assert kept and not isinstance(kept[0], SpilledQuantizedGrams)
    spilled_model, spilled = build(0)
    assert len(spilled) == 1 and isinstance(spilled[0], SpilledQuantizedGrams)
    qq, _ = next(iter(spilled[0].values()))
    assert isinstance(qq, np.memmap) and not qq.flags.writeable
    assert spilled_model == in_memory
    folder = spilled[0].files._dir.name
    assert os.path.isdir(folder)
    del spilled, qq
    import gc

    gc.collect()
    assert not os.path.exists(folder)


def test_cache_prune_removes_least_recently_used_entries_only(tmp_path):
    """--cache-max-size: oldest-used entries go first until the folder fits; entries used since the build began,
    files that are not entries and a live build's temporary entry stay; a killed build's old temporary goes."""
    import os

    from vitexport.quantization.cache import Pruned, prune

    root = tmp_path / "cache"
    root.mkdir()

    def entry(name: str, size: int, mtime: float) -> None:
        p = root / name
        if name.startswith("reference-"):
            p.mkdir()
            (p / "model.onnx").write_bytes(b"r" * size)
        else:
            p.write_bytes(b"e" * size)
        os.utime(p, (mtime, mtime))

    now = 1e9
    entry("codes-a.npz", 100, now - 500)  # least recently used
    entry("reference-b", 100, now - 400)  # a folder entry, sized by its files
    entry("fallback-scores-c.json", 100, now - 300)
    entry("float-stats-d.npz", 100, now - 5)  # used by this build (started at now - 10)
    entry("notes.txt", 1000, now - 10_000)  # not an entry: never removed, never counted
    entry(".codes-killed.npz", 50, now - 7200)  # a killed build's temporary
    entry(".float-stats-live.npz", 50, now - 60)  # a running build's
    done = prune(root, 250, used_since=now - 10, now=now)
    assert sorted(p.name for p in root.iterdir()) == [".float-stats-live.npz", "fallback-scores-c.json", "float-stats-d.npz", "notes.txt"]
    assert (done.removed, done.removed_bytes, done.stale_temporaries, done.kept_bytes, done.over) == (2, 200, 1, 200, False)
    done = prune(root, 50, used_since=now - 10, now=now)  # this build's own entry alone is over the bound: kept
    assert sorted(p.name for p in root.iterdir()) == [".float-stats-live.npz", "float-stats-d.npz", "notes.txt"]
    assert (done.removed, done.kept_bytes, done.over) == (1, 100, True)
    assert prune(tmp_path / "none", 0, used_since=now) == Pruned(0, 0, 0, 0, False)  # no folder: nothing to do
