"""Linear algebra shared by the GPTQ roundings of the int8 and int4 recipes."""

from __future__ import annotations

import numpy as np


def upper_cholesky_of_inverse(h: np.ndarray) -> np.ndarray:
    """U upper triangular with H^-1 = U^T U (float64). Raises ``np.linalg.LinAlgError`` when H is not SPD.

    For large K (ViT-Base fc2: K=3072) torch's Cholesky + cholesky_inverse is about twice as fast as numpy's general
    inverse; for small K numpy's lower call overhead wins.
    """
    torch = None
    if h.shape[0] >= 1024:
        try:
            import torch
        except ImportError:  # pragma: no cover - torch is a dependency of the package
            torch = None
    if torch is not None:
        t = torch.from_numpy(np.ascontiguousarray(h, dtype=np.float64))
        l, info = torch.linalg.cholesky_ex(t)
        if int(info) == 0:
            u, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(l), upper=True)
            if int(info) == 0 and bool(torch.isfinite(u).all()):
                return u.numpy()
        raise np.linalg.LinAlgError("Hessian is not positive definite")
    return np.linalg.cholesky(np.linalg.inv(h)).T
