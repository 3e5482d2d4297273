"""Linear algebra shared by the GPTQ roundings of the int8 and int4 recipes."""

from __future__ import annotations

import hashlib
import math
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np

from ..ort_session import usable_cores


T, R = TypeVar("T"), TypeVar("R")

SUB_BLOCK = 32  # GPTQ columns whose errors reach each other by rank-1 updates (speed only)


def array_digest(a: np.ndarray | None) -> str | None:
    """A short content digest of a weight (as float32) for the keys of its rounded codes; None for None. sha256
    (hashed in place, no bytes copy): twice blake2b's speed where the CPU has SHA extensions, and ViT-Base's keys
    hash its weights a few times over."""
    if a is None:
        return None
    return hashlib.sha256(memoryview(np.ascontiguousarray(a, np.float32)).cast("B")).hexdigest()[:32]


ROUNDING_WORKERS = 4  # layers rounded at once (map_layers); each holds a few copies of its weight

_BLAS = None


def one_blas_thread():
    """A context in which BLAS runs on one thread: every product whose bits decide GPTQ codes runs inside one (the
    float statistics' X^T X, map_layers' roundings, the inverse factors' trtri). OpenBLAS's Haswell kernels (an AMD
    EPYC Zen 3) sum syrk and trtri in another order on two threads than on one (its AVX-512 kernels did not), so
    without it the codes would depend on how many workers ran beside them. One controller, found once
    (threadpool_limits looks the libraries up again on every call: 1.3 ms against 0.03 ms); it sees only the libraries
    loaded when it is made, so scipy's own OpenBLAS (trtri) is loaded first."""
    global _BLAS
    if _BLAS is None:
        from threadpoolctl import ThreadpoolController

        try:
            import scipy.linalg.lapack  # noqa: F401
        except ImportError:  # not a dependency: upper_cholesky_of_inverse solves with torch instead
            pass
        _BLAS = ThreadpoolController()
    return _BLAS.limit(limits=1, user_api="blas")


def map_layers(fn: Callable[[T], R], items: Iterable[T]) -> Iterator[tuple[T, R]]:
    """``(item, fn(item))`` for each item (layer), in order, yielded as each is done, the items on up to ROUNDING_WORKERS
    threads (no more than the usable cores) with BLAS limited to one thread: a layer's rounding is a column loop of
    small numpy calls, which use one core whatever BLAS does in between, and two ViT-Base palette layers at once took
    0.77x the time of one after the other on two cores. The same results: each layer's arithmetic runs as before,
    its BLAS products give the same bits on one thread as on two (tests/test_palette.py), and the inverse factors it
    may compute run on one BLAS thread in either branch (upper_cholesky_of_inverse). Consume it whole: BLAS stays on
    one thread until the loop over it ends."""
    items = list(items)
    workers = min(usable_cores(), ROUNDING_WORKERS, len(items))
    if workers <= 1:
        yield from ((i, fn(i)) for i in items)
        return
    from concurrent.futures import ThreadPoolExecutor

    with one_blas_thread(), ThreadPoolExecutor(workers, thread_name_prefix="vitexport-round") as pool:
        yield from zip(items, pool.map(fn, items))


def upper_cholesky_of_inverse(h: np.ndarray) -> np.ndarray:
    """U upper triangular with H^-1 = U^T U (float64). Raises ``np.linalg.LinAlgError`` when H is not SPD.

    With J the order-reversing permutation and J H J = L L^T, U = J L^-1 J (the Cholesky factor is unique): one
    Cholesky on torch's threads and one triangular inverse, about half the work of inverting H and factoring again.
    L^-1 by LAPACK's trtri (scipy's, where installed: nncf brings it) does a third of the arithmetic of solving
    L X = I (ViT-Base's fc2, 3072 wide: 0.42 s against 0.82 s in all, the same U to 4e-16).
    """
    import torch  # LAPACK through torch's threads

    t = torch.from_numpy(np.ascontiguousarray(h[::-1, ::-1], dtype=np.float64))
    l, info = torch.linalg.cholesky_ex(t)
    if int(info) != 0:
        raise np.linalg.LinAlgError("Hessian is not positive definite")
    try:
        from scipy.linalg.lapack import dtrtri
    except ImportError:
        inv = torch.linalg.solve_triangular(l, torch.eye(len(h), dtype=torch.float64), upper=False).numpy()
    else:
        # on one BLAS thread wherever it is called: the factor is computed once and shared, so its bits must not
        # depend on whether a layer was rounded alone (map_layers' serial branch) or beside another (its threads)
        with one_blas_thread():
            inv, info = dtrtri(l.numpy(), lower=1, overwrite_c=1)
        if info != 0:
            raise np.linalg.LinAlgError("Hessian is not positive definite")
    u = np.ascontiguousarray(inv[::-1, ::-1])  # trtri leaves the strict upper triangle as torch left it: zeros
    if not np.isfinite(u).all():
        raise np.linalg.LinAlgError("Hessian is not positive definite")
    return u


def damped_inverse_factor(hessian: np.ndarray, damp: float) -> tuple[np.ndarray, np.ndarray]:
    """(U with (H + damp * mean(diag H) * I)^-1 = U^T U, mask of dead inputs) for H = X^T X [K, K].

    Dead inputs (never non-zero in calibration) get a unit diagonal so H stays invertible; their weights do not
    matter to the output. Raises ``np.linalg.LinAlgError`` when H is numerically not SPD.
    """
    h = np.array(hessian, dtype=np.float64)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    h[np.diag_indices(len(h))] += damp * float(np.mean(np.diag(h)))
    return upper_cholesky_of_inverse(h), dead


def gptq_round(w: np.ndarray, u: np.ndarray, round_column, lazy: int = 128, group: int = 0, start_group=None, sub: int = SUB_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ (Frantar et al. 2022) with any rounding: ``round_column(values [N], column) -> rounded [N]``.

    Rounds ``w`` [N, K] (rows = output channels) one input column at a time and spreads each column's error over
    the columns not yet rounded through U (H^-1 = U^T U), so the layer's *output* error on the calibration inputs is
    what gets minimised, not the weights'. Returns (rounded [N, K], the error-compensated values each column was
    rounded from), both float64. ``start_group(values [group, N], column)``, when given, is called at every column
    that is a multiple of ``group`` with the next ``group`` columns (one per row), each already carrying the error
    of every column rounded before: where a group's scale is chosen (int4's blocks).

    Each lazy block is held transposed, a column per contiguous row, and updated in two levels: a column takes the
    errors of the columns before it in its ``sub``-column sub-block when its turn comes (one matrix-vector product),
    the rest of the lazy block takes a sub-block's errors after it (one product), the rest of the weight a lazy
    block's (one product). The same sums as the textbook loop (Algorithm 1 with lazy batches) in another order, on
    BLAS instead of a rank-1 update of the whole lazy block per column: ViT-Base's linears round 1.5-2.8x faster,
    with the same codes (tested). Taking a sub-block's errors column by column (gathered) rather than spreading each
    (a rank-1 update of the rest of the sub-block, writing an outer product first) did a third of the memory
    traffic: 10-30 % off each ViT-Base linear, the same codes and models (benchmarks/results/artifact-diff-*).
    """
    w = np.array(w, dtype=np.float64, order="C")  # a transposed [K, N] weight arrives F-ordered: 4x slower updates
    n, k = w.shape
    if start_group is not None:
        if lazy % group:
            raise ValueError(f"GPTQ: lazy batches of {lazy} columns do not hold whole groups of {group}")
        sub = math.gcd(sub, group)  # every group starts a sub-block: its columns then carry every earlier error
    q = np.empty((k, n))
    targets = np.empty((k, n))
    for i1 in range(0, k, lazy):
        i2 = min(i1 + lazy, k)
        w1 = np.ascontiguousarray(w[:, i1:i2].T)
        err = np.empty((i2 - i1, n))  # a column's error per row, as w1
        u1 = u[i1:i2, i1:i2]
        u1t = np.ascontiguousarray(u1.T)  # row i: what column i takes from each error before it
        for j1 in range(0, i2 - i1, sub):
            j2 = min(j1 + sub, i2 - i1)
            for i in range(j1, j2):
                if i > j1:  # the errors of the sub-block's columns before it (at j1 every earlier error is in)
                    w1[i] -= u1t[i, j1:i] @ err[j1:i]
                if start_group is not None and (i1 + i) % group == 0:
                    start_group(w1[i : i + group], i1 + i)
                x = w1[i]
                targets[i1 + i] = x
                qi = round_column(x, i1 + i)
                q[i1 + i] = qi
                np.subtract(x, qi, out=err[i])
                err[i] /= u1[i, i]
            if j2 < i2 - i1:
                w1[j2:] -= u1[j1:j2, j2:].T @ err[j1:j2]
        w[:, i2:] -= err.T @ u[i1:i2, i2:]
    return np.ascontiguousarray(q.T), np.ascontiguousarray(targets.T)
