"""fipurify: remove backdoors from trained PyTorch models with Fisher Information guided Purification."""
__version__ = "0.1.0"
