"""The package's error types.

Every error a user can cause (a bad file, a bad argument, a missing download) is raised as one of
these, with a message that says what was wrong, where, and what to do. The CLI prints the message
as one line; the Python API lets it propagate.
"""


class Gemma4UError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(Gemma4UError, ValueError):
    """config.json is missing, unreadable or inconsistent."""


class CheckpointError(Gemma4UError, ValueError):
    """Weights are missing, unreadable or do not fit the config."""


class InputError(Gemma4UError, ValueError):
    """A prompt, media file or argument given at run time is unusable."""


class DownloadError(Gemma4UError, OSError):
    """A Hugging Face repo could not be fetched (offline, missing, or gated)."""


class MemoryLimitError(Gemma4UError, MemoryError):
    """The model would not fit in this machine's memory."""


class GroupError(Gemma4UError, RuntimeError):
    """A process of an mx.distributed group failed, hung or loaded another model. Every process
    raises it; `shown` is False where the CLI should leave the message to the first process."""

    def __init__(self, message: str, shown: bool = True):
        super().__init__(message)
        self.shown = shown
