"""Errors a user can act on. The CLI prints their message (no traceback unless ``--debug``)."""


class BitDanceError(Exception):
    """Base class: the message names the problem and the fix."""


class CheckpointError(BitDanceError):
    """A checkpoint directory is incomplete or does not match the model it claims to be."""


class UnsupportedSizeError(BitDanceError, ValueError):
    """The requested image size is not one the model was trained for."""


class ResourceError(BitDanceError):
    """Not enough memory for the requested work."""


class EngineError(BitDanceError):
    """An exported graph or engine directory is missing, corrupt or built for another model."""


class RequestError(BitDanceError, ValueError):
    """A generation setting (prompt, size, steps, guidance, seed, number of images) is invalid."""
