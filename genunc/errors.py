"""Exceptions genunc raises for user mistakes.

They subclass ValueError so that code written against plain Python conventions keeps working,
while callers who care can catch genunc's own failures precisely.
"""

from __future__ import annotations


class GenuncError(ValueError):
    """Base class for every error genunc raises on bad input."""


class HeadNotFoundError(GenuncError, KeyError):
    """The named head module does not exist in the model."""

    def __str__(self) -> str:  # KeyError would otherwise wrap the message in quotes
        return str(self.args[0]) if self.args else ""


class HeadNotCalledError(GenuncError):
    """The head module was not evaluated (or evaluated more than once) during a forward pass."""


class ShapeMismatchError(GenuncError):
    """Tensors handed to genunc do not have the shapes the head or the posterior expects."""


class NonFiniteError(GenuncError):
    """NaN or infinity found where genunc needs finite numbers."""


class FingerprintMismatchError(GenuncError):
    """A saved posterior does not belong to the model it is being loaded onto."""


class MissingFileError(GenuncError, FileNotFoundError):
    """A file or folder genunc needs (model, posterior, config, data) does not exist."""


class ConfigError(GenuncError):
    """A run configuration names an unknown key, value or combination."""


def describe(err: BaseException) -> str:
    """A library's exception as one line, ``Type: first line``, for errors that name a file."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else "unreadable"
    return f"{type(err).__name__}: {text}"
