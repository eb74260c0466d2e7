"""Errors raised by the model package."""


class CheckpointError(ValueError):
    """A checkpoint directory is missing files, holds bad tensors, or names an unsupported model."""
