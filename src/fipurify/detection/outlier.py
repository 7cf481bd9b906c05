"""The median-absolute-deviation outlier test of Neural Cleanse (Wang et al., S&P 2019, Sec. IV-C).

Given one trigger size ``L_c`` per class (mask L1 norm, perturbation norm, ...), with
``m = median_c L_c``::

    MAD = 1.4826 * median_c |L_c - m|          (1.4826: consistency with a normal's sigma)
    a_c = (m - L_c) / MAD                      (anomaly index, signed toward *small* sizes)

A class whose trigger is much smaller than the others' (``a_c > 2``, i.e. beyond about two
standard deviations, ~95 %) is the suspected backdoor target. Only the small side counts: a
backdoor makes its target *easier* to reach, never harder. Neural Cleanse reports the absolute
index of the smallest class; the signed index equals it there and is negative for large sizes.

**The threshold and the number of classes.** Under the normal model that the constant 1.4826
assumes, each clean class's index is about standard normal, so the chance that the *largest*
of ``K`` indices crosses a fixed threshold ``t`` grows with ``K``: :math:`1 - \\Phi(t)^K`, 0.21 at
``t = 2`` for ``K = 10`` (Neural Cleanse's CIFAR-10 and MNIST setting) but 0.63 for ``K = 43``
(GTSRB). :func:`class_count_threshold` keeps the chance at its ``K = 10`` level:
``t_K`` solves :math:`\\Phi(t_K)^K = \\Phi(t)^{10}`, i.e. :math:`t_K = \\Phi^{-1}(\\Phi(t)^{10/K})`
(2.55 for ``K = 43``, 2 for ``K = 10``), and is never lowered below ``t`` for fewer classes.
This is a derivation from the test's own model, not a fit to any measurement.
"""
from __future__ import annotations

from statistics import NormalDist
from typing import Sequence

import numpy as np

#: the consistency constant turning a median absolute deviation into a normal's sigma
MAD_CONSTANT = 1.4826
#: Neural Cleanse's threshold on the anomaly index
DEFAULT_THRESHOLD = 2.0
#: the number of classes Neural Cleanse's threshold was set for (CIFAR-10, MNIST)
REFERENCE_CLASSES = 10


def class_count_threshold(threshold: float, num_classes: int, reference: int = REFERENCE_CLASSES) -> float:
    """``threshold`` (meant for ``reference`` classes) raised for ``num_classes`` classes so that a
    clean model's largest anomaly index crosses it as often as with ``reference`` classes (module
    doc): ``Phi^-1(Phi(threshold) ** (reference / num_classes))``, never below ``threshold``."""
    if num_classes < 1 or reference < 1:
        raise ValueError(f"class counts must be >= 1, got {num_classes} and {reference}")
    if num_classes <= reference:
        return float(threshold)
    normal = NormalDist()
    return max(float(threshold), normal.inv_cdf(normal.cdf(threshold) ** (reference / num_classes)))


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
