"""Curvature math shared by the defenses, training and analysis: Fisher-information estimators
(:mod:`.fisher`), the spectral re-parametrisation of weights (:mod:`.spectral`), matrix-free
Hessian-vector products (:mod:`.hvp`) and the eval mode they run the model in (:mod:`.mode`).

It sits below :mod:`fipurify.defenses`, :mod:`fipurify.training` and :mod:`fipurify.analysis`
and imports none of them (only :mod:`fipurify.errors`), so every import arrow points down.
"""
