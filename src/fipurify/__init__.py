"""fipurify: remove backdoors from trained PyTorch models with Fisher Information guided Purification.

Public entry points::

    fipurify.datasets.load(name, root=None, split="train")
    fipurify.models.create(name, num_classes=10, **kw)
    fipurify.attacks.create(name, target=0, poison_rate=0.1, **kw)
    fipurify.metrics.evaluate(model, clean_test, backdoor_test)
    fipurify.purify(model, clean_data, method=None, **options)   # None: the measured default
    fipurify.detect(model, clean_data, method="neural-cleanse", **options) -> DetectionReport
    fipurify.save_model(model, path, metadata) / fipurify.load_model(path)
"""
from .version import __version__  # noqa: E402

from .io import load_model, save_model  # noqa: E402


def purify(model, clean_data, method: str | None = None, **options):
    """Purify ``model`` on ``clean_data`` with ``method`` (see :mod:`fipurify.defenses`); None is the
    default measured for the data's task (``detect-unlearn-clip-all`` for image classification)."""
    from .defenses import purify as _purify
    return _purify(model, clean_data, method=method, **options)


def detect(model, clean_data, method: str = "neural-cleanse", **options):
    """Is ``model`` backdoored, and toward which class? From ``clean_data`` alone (see :mod:`fipurify.detection`)."""
    from .detection import detect as _detect
    return _detect(model, clean_data, method=method, **options)


def __getattr__(name: str):
    if name == "DetectionReport":  # imported on first use, like the detectors themselves
        from .detection.report import DetectionReport
        return DetectionReport
    raise AttributeError(f"module 'fipurify' has no attribute {name!r}")


__all__ = ["DetectionReport", "__version__", "detect", "load_model", "purify", "save_model"]
