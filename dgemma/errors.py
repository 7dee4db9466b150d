"""Errors that the CLI turns into one clear line (never a traceback)."""


class DgemmaError(Exception):
    """Base class for every error caused by bad input or a missing resource; its message is meant for the user."""


class CheckpointError(DgemmaError):
    """A model folder or hub id that cannot be read: missing file, corrupt shard, wrong model type."""


class ConfigError(DgemmaError):
    """A config.json / generation_config.json value that is missing or invalid."""


class InputError(DgemmaError):
    """A prompt, token id or sampler value that the model cannot take."""


class BackendUnavailable(DgemmaError):
    """A backend was asked for that is unknown or whose framework is not installed."""
