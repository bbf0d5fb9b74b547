"""Errors the user sees.

Every error raised for bad input or a failed run derives from `UNetSegmentError` and carries two
parts: what is wrong and what to do about it. Front ends (CLI, Slicer panel) print `str(error)`
and never need a traceback to explain the problem.
"""

from __future__ import annotations


class UNetSegmentError(Exception):
    """Base class: a problem the user can act on."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(problem if not fix else f"{problem} Fix: {fix}")


class InputError(UNetSegmentError, ValueError):
    """The image, label or argument handed in cannot be used as it is."""


class ImageReadError(InputError):
    """A file could not be read as an image (corrupt, truncated, not an image, mixed DICOM series)."""


class GeometryError(InputError):
    """Spacing, direction or grid of an image is invalid or does not match its partner."""


class CheckpointError(UNetSegmentError, ValueError):
    """A model file is not a valid UNetSegment checkpoint, or does not match what it is used for."""


class UnknownArchitectureError(UNetSegmentError, KeyError):
    """An architecture name is not in the registry."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return Exception.__str__(self)


class DeviceError(UNetSegmentError, RuntimeError):
    """The requested compute device is not available."""


class OutOfMemoryError(UNetSegmentError, MemoryError):
    """The work does not fit the memory budget even after every fallback was tried."""


class Cancelled(UNetSegmentError):
    """The user cancelled a long-running operation; nothing was written."""

    def __init__(self, problem: str = "Cancelled by the user.", fix: str | None = None):
        super().__init__(problem, fix)
