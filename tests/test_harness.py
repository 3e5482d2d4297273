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
    from vitexport.harness import report

    monkeypatch.setattr(report, "_cpuinfo", lambda: ["model name\t: Some CPU", "flags\t\t: fpu sse avx2 fma avx512f avx512_vnni"])
    assert report.cpu_name() == "Some CPU"
    assert report.cpu_features() == ["avx2", "avx512f", "avx512_vnni"]
    monkeypatch.setattr(report, "_cpuinfo", lambda: ["Features\t: fp asimd asimddp", "Model\t: Raspberry Pi 5 Model B Rev 1.0"])
    assert report.cpu_features() == ["asimddp"] and report.cpu_name().startswith("Raspberry Pi 5")
    monkeypatch.setattr(report, "_cpuinfo", lambda: ["flags\t\t: fpu sse2"])
    md = report.render_markdown(report.Report(model={}, rows=(), host=report.host_info()))
    assert "none of avx2" in md
