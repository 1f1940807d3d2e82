"""Errors that rotaq reports to the user as one line, never as a traceback.

The CLI catches `RotaqError` and prints its message; anything else is a bug and keeps its traceback.
"""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when empty): what a one-line error quotes."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class RotaqError(Exception):
    """A problem with the user's input or environment, explained in the message."""


class UnsupportedModelError(RotaqError):
    """The model's architecture is not one rotaq knows how to rotate and quantize."""


class NoHadamardError(RotaqError):
    """No Hadamard construction exists (in rotaq) for a requested width."""


class DataError(RotaqError):
    """The text source is missing, empty, or too short for the requested windows."""


class ArtifactError(RotaqError):
    """A stage folder is missing, incomplete, or of the wrong kind for the next stage."""


class NonFiniteError(RotaqError):
    """A NaN or inf appeared where a finite number is required (a loss, a Hessian, a weight)."""
