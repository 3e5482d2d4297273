"""Accuracy against labels and agreement with the fp32 reference outputs."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np


@dataclass(frozen=True)
class Accuracy:
    n: int
    top1: float | None  # against labels, over the labelled images
    top5: float | None
    agreement: float | None  # top-1 agreement with the fp32 reference
    cosine: float | None  # mean cosine similarity of outputs with the fp32 reference
    n_labelled: int
    emulated: bool
    # labelled images the fp32 reference gets right and this artifact wrong, and the reverse: a top-1 delta of a few
    # images is noise, and these two counts show whether it is a handful of flips either way or a systematic loss
    lost: int | None = None
    gained: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def run_all(runner, inputs: np.ndarray, batch_size: int = 32, progress: Callable[[int], None] | None = None) -> np.ndarray:
    outs = []
    for i in range(0, len(inputs), batch_size):
        x = np.ascontiguousarray(inputs[i : i + batch_size], dtype=np.float32)
        outs.append(np.asarray(runner.run(x), dtype=np.float32))
        if progress:
            progress(len(x))
    return np.concatenate(outs)


def score(outputs: np.ndarray, labels: Sequence[int | None], reference: np.ndarray | None, classifier: bool, emulated: bool) -> Accuracy:
    """Metrics for one artifact's outputs. Embedding models get cosine only: their argmax means nothing."""
    n = len(outputs)
    top1 = top5 = agreement = cosine = None
    lost = gained = None
    idx = [i for i, lab in enumerate(labels) if lab is not None]
    if classifier and idx:
        y = np.asarray([labels[i] for i in idx])
        o = outputs[idx]
        top1 = float((o.argmax(-1) == y).mean())
        k = min(5, o.shape[-1])
        top5 = float((np.argpartition(-o, k - 1, axis=-1)[:, :k] == y[:, None]).any(-1).mean())
    if reference is not None:
        if classifier:
            agreement = float((outputs.argmax(-1) == reference.argmax(-1)).mean())
            if idx:
                ok_ref, ok_out = reference[idx].argmax(-1) == y, outputs[idx].argmax(-1) == y
                lost, gained = int((ok_ref & ~ok_out).sum()), int((~ok_ref & ok_out).sum())
        a = outputs.reshape(n, -1).astype(np.float64)
        b = reference.reshape(n, -1).astype(np.float64)
        denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        cosine = float(np.mean((a * b).sum(1) / np.maximum(denom, 1e-12)))
    return Accuracy(n, top1, top5, agreement, cosine, len(idx) if classifier else 0, emulated, lost, gained)
