"""Errors that reach a user as one line that says what to do."""


class AdaViTError(ValueError):
    """Base class for input, configuration and checkpoint errors; its message is a single line."""

    def __init__(self, message: str) -> None:
        super().__init__(' '.join(str(message).split()))


class InputError(AdaViTError):
    """An image batch that does not fit the model (size, channels, rank)."""


class CheckpointError(AdaViTError):
    """A file or state dict that is not a checkpoint this model can load."""


class ConfigError(AdaViTError):
    """An unknown model name, option or configuration key."""
