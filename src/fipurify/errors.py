"""Exceptions with messages meant for people: the CLI prints them as one line."""


class FipurifyError(Exception):
    """Base class of every error fipurify raises on bad input."""


class DataError(FipurifyError):
    """A dataset is missing, corrupt, empty or does not fit the model."""


class ModelFileError(FipurifyError):
    """A model file is not a fipurify safetensors file, or it was tampered with."""


class ConfigError(FipurifyError, ValueError):
    """An option is unknown or out of range."""


class AttackError(FipurifyError):
    """An attack could not be built as asked (e.g. its trained trigger generator is degenerate)."""
