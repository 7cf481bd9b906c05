"""The package version (one place; the package __init__ and every module that records it import it from here)."""
__version__ = "0.1.0"
