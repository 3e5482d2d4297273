"""The harness's arithmetic: accuracy figures on hand-made outputs where the right answer is known."""

from __future__ import annotations

import numpy as np

from vitexport.harness.accuracy import score


def test_score_counts_lost_and_gained_images():
    ref = np.eye(4, dtype=np.float32)[[0, 1, 2, 3, 0]]  # predicts 0 1 2 3 0
    out = np.eye(4, dtype=np.float32)[[0, 2, 2, 3, 1]]  # predicts 0 2 2 3 1
    labels = [0, 1, 3, 3, None]  # ref right on 0,1,3; out right on 0,3
    acc = score(out, labels, ref, classifier=True, emulated=False)
    assert acc.top1 == 0.5 and acc.n_labelled == 4
    assert acc.agreement == 0.6
    assert (acc.lost, acc.gained) == (1, 0)  # image 1 lost; image 2 wrong for both
    flipped = score(ref, labels, out, classifier=True, emulated=False)
    assert (flipped.lost, flipped.gained) == (0, 1)


def test_embedding_models_get_cosine_only():
    ref = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    acc = score(2 * ref, [None] * 3, ref, classifier=False, emulated=True)
    assert acc.agreement is None and acc.top1 is None and acc.lost is None
    assert abs(acc.cosine - 1.0) < 1e-6 and acc.emulated


def test_host_records_the_cpu_features_that_decide_int8_arithmetic(monkeypatch):
    from vitexport.harness import host, report

    monkeypatch.setattr(host, "_cpuinfo", lambda: ["model name\t: Some CPU", "flags\t\t: fpu sse avx2 fma avx512f avx512_vnni"])
    assert host.cpu_name() == "Some CPU"
    assert host.cpu_features() == ["avx2", "avx512f", "avx512_vnni"]
    monkeypatch.setattr(host, "_cpuinfo", lambda: ["Features\t: fp asimd asimddp", "Model\t: Raspberry Pi 5 Model B Rev 1.0"])
    assert host.cpu_features() == ["asimddp"] and host.cpu_name().startswith("Raspberry Pi 5")
    monkeypatch.setattr(host, "_cpuinfo", lambda: ["flags\t\t: fpu sse2"])
    md = report.render_markdown(report.Report(model={}, rows=(), host=host.host_info()))
    assert "none of avx2" in md


def test_latency_is_timed_interleaved_across_artifacts():
    """Rows of one table are timed round by round, so drift on the host hits every row alike (no timing asserted)."""
    from vitexport.harness.latency import measure_all

    calls = []

    class Fake:
        threads, device, runtime = 1, "cpu", "fake"

        def __init__(self, name):
            self.name = name

        def run(self, x):
            calls.append((self.name, len(x)))
            return x

    x = np.zeros((4, 3, 8, 8), np.float32)
    lat = measure_all({"a": Fake("a"), "b": Fake("b")}, x, rounds=3, seconds=0.01, warmup_seconds=0.01, throughput_batch=8)
    batch1 = [n for n, b in calls if b == 1]
    switches = sum(1 for p, q in zip(batch1, batch1[1:]) if p != q)
    assert switches >= 2 * 3 - 1  # a, b, a, b, a, b after the warm-up of each
    assert set(lat) == {"a", "b"} and all(v.rounds == 3 and v.spread >= 1.0 and v.throughput_batch == 8 for v in lat.values())
    assert ("a", 8) in calls and ("b", 8) in calls  # throughput at the requested batch


def test_paired_ratio_cancels_drift_that_hits_both_rows():
    """A host that slows down 3x halfway through moves one-second rounds; alternating short blocks see the same
    slowdown on both rows, so the ratio stays the rows' own (a simulated clock: nothing is timed for real)."""
    from vitexport.harness.latency import paired_ratio

    now, runs = [0.0], [0]

    class Fake:
        def __init__(self, cost):
            self.cost = cost

        def run(self, x):
            runs[0] += 1
            now[0] += self.cost * (3.0 if runs[0] > 200 else 1.0)  # the host slows down part way

    clock = lambda: now[0]  # noqa: E731
    x = np.zeros((1, 3, 8, 8), np.float32)
    r = paired_ratio(Fake(0.8), Fake(1.0), x, blocks=40, runs=5, warmup_seconds=0.0, clock=clock)
    assert r["pairs"] == 40 and abs(r["median"] - 0.8) < 1e-9
    assert r["ci95"][0] <= r["median"] <= r["ci95"][1]


def test_median_interval_brackets_the_median_by_order_statistics():
    from vitexport.harness.stats import median_interval

    lo, hi = median_interval(list(range(100)))
    assert lo < 49.5 < hi and (lo, hi) == (40, 60)  # ranks 50 -+ 1.96 * sqrt(100) / 2, rounded outwards
    assert median_interval([2.0]) == (2.0, 2.0)
