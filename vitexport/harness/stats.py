"""95 % intervals for the report's accuracy figures.

On a quick-eval set of ~100 images one image is about one point: a table without intervals invites reading noise as
a difference. Agreement and top-1 are binomial proportions: Wilson score interval, sensible at 0 % and 100 %, where
the textbook normal interval collapses to a point. Δ top-1 compares two classifiers on the same images, so it is a
paired difference: only the images one gets right and the other wrong (lost / gained) carry information about it.
Its interval is Agresti & Min's adjusted Wald interval (Stat. Med. 24:729, 2005, their "Wald+2"; R's
PropCIs::diffpropci.mp): add 1/2 to each cell of the paired 2x2 table, then Wald. Unlike the plain Wald interval on
(gained - lost) / n it does not collapse to a point when nothing flipped: no flip in 94 images is not proof of none.
"""

from __future__ import annotations

import math

Z95 = 1.959963984540054


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes out of n (as fractions)."""
    if n <= 0:
        return (0.0, 1.0)
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, centre - half), min(1.0, centre + half))


def paired_delta(lost: int, gained: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Interval for top-1(artifact) - top-1(reference) on the same n labelled images (fractions).

    lost: images the reference gets right and the artifact wrong; gained: the reverse.
    """
    if n <= 0:
        return (-1.0, 1.0)
    nt = n + 2  # four cells, half an image added to each
    p_lost, p_gained = (lost + 0.5) / nt, (gained + 0.5) / nt
    centre = p_gained - p_lost
    half = z * math.sqrt(max((p_lost + p_gained - centre * centre) / nt, 0.0))
    return (max(-1.0, centre - half), min(1.0, centre + half))


def median_interval(values, z: float = Z95) -> tuple[float, float]:
    """Distribution-free interval for the median of ``values``: the order statistics whose ranks the binomial(n, 1/2)
    count of values below the median puts at n/2 -+ z sqrt(n)/2 (normal approximation, rounded outwards). Latency
    ratios on a shared host are skewed by bursts from other jobs, so no normal interval on their mean is honest."""
    v = sorted(values)
    n = len(v)
    if n == 0:
        return (math.nan, math.nan)
    half = z * math.sqrt(n) / 2
    lo, hi = max(int(math.floor(n / 2 - half)), 0), min(int(math.ceil(n / 2 + half)), n - 1)
    return (v[lo], v[hi])
