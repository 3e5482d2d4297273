"""How far quantized outputs are from float ones: the one score the fallback search ranks inputs by."""

from __future__ import annotations

import numpy as np


def kl_per_row(ref: np.ndarray, out: np.ndarray) -> np.ndarray:
    """KL(softmax(ref) || softmax(out)) of each row of two logit arrays, in float64."""

    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    lr, lo = log_softmax(ref.astype(np.float64)), log_softmax(out.astype(np.float64))
    return (np.exp(lr) * (lr - lo)).sum(-1)


def kl_divergence(ref: np.ndarray, out: np.ndarray) -> float:
    """Mean KL(softmax(ref) || softmax(out)) over the rows of two logit arrays, in float64."""
    return float(kl_per_row(ref, out).mean())
