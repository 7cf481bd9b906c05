"""The median-absolute-deviation outlier test of Neural Cleanse (Wang et al., S&P 2019, Sec. IV-C).

Given one trigger size ``L_c`` per class (mask L1 norm, perturbation norm, ...), with
``m = median_c L_c``::

    MAD = 1.4826 * median_c |L_c - m|          (1.4826: consistency with a normal's sigma)
    a_c = (m - L_c) / MAD                      (anomaly index, signed toward *small* sizes)

A class whose trigger is much smaller than the others' (``a_c > 2``, i.e. beyond about two
standard deviations, ~95 %) is the suspected backdoor target. Only the small side counts: a
backdoor makes its target *easier* to reach, never harder. Neural Cleanse reports the absolute
index of the smallest class; the signed index equals it there and is negative for large sizes.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

#: the consistency constant turning a median absolute deviation into a normal's sigma
MAD_CONSTANT = 1.4826
#: Neural Cleanse's threshold on the anomaly index
DEFAULT_THRESHOLD = 2.0


def anomaly_indices(sizes: Sequence[float]) -> np.ndarray:
    """Signed small-side anomaly index ``(median - L_c) / (1.4826 * MAD)`` for every size.

    When every deviation is zero (all sizes equal, or only ties around the median), the MAD is
    zero: a size equal to the median gets index 0, any other one +-inf.
    """
    v = np.asarray(sizes, dtype=np.float64)
    if v.ndim != 1 or len(v) == 0:
        raise ValueError("anomaly_indices needs a non-empty 1-D sequence of sizes")
    med = float(np.median(v))
    mad = MAD_CONSTANT * float(np.median(np.abs(v - med)))
    if mad > 0:
        return (med - v) / mad
    diff = med - v
    out = np.zeros_like(v)
    out[diff > 0], out[diff < 0] = np.inf, -np.inf
    return out


def most_anomalous(sizes: Sequence[float]) -> tuple[int, float]:
    """``(position, index)`` of the size with the largest small-side anomaly index."""
    a = anomaly_indices(sizes)
    i = int(np.argmax(a))
    return i, float(a[i])
