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


class OutputError(UNetSegmentError, OSError):
    """A result could not be written (read-only folder, full disk, a file where a folder is expected)."""


class MemoryBudgetError(OutOfMemoryError):
    """Refused before allocating: the estimated size is above the memory budget."""


class ConfirmationRequired(InputError):
    """The run is far larger than usual; it needs an explicit --yes."""


class SchemaError(InputError):
    """A field of a file read from disk (dataset.json, checkpoint metadata) has the wrong type or value."""

    def __init__(self, problem: str, fix: str | None = None, field: str = ""):
        self.field = field
        super().__init__(problem, fix)


class MetadataError(SchemaError, CheckpointError):
    """A checkpoint's metadata fails its schema (a CheckpointError, so model lists report it as unusable)."""


# errno -> (what happened, what to do), for errors the operating system reports on files
_ERRNO_FIXES = {
    "EACCES": ("permission denied", "Choose a folder you can write to, or change its permissions."),
    "EPERM": ("operation not permitted", "Choose a folder you can write to, or change its permissions."),
    "EROFS": ("the file system is read-only", "Choose a folder on a writable disk."),
    "ENOSPC": ("the disk is full", "Free disk space or choose a folder on another disk."),
    "EDQUOT": ("the disk quota is exceeded", "Free space in your quota or choose another disk."),
    "EFBIG": ("the file is too large for this file system", "Choose a folder on another file system."),
    "ENOTDIR": ("a part of the path is a file, not a folder", "Check the path: a folder in it is a file."),
    "EISDIR": ("it is a folder", "Give a file name, not a folder."),
    "ENOENT": ("the file or folder does not exist", "Check the path."),
    "ENAMETOOLONG": ("the name is too long", "Use a shorter path."),
    "EEXIST": ("it already exists", "Choose another path or pass --overwrite."),
    "EIO": ("an input/output error occurred on the device", "Check the disk or network share and retry."),
    "EXDEV": ("it is on another device than its temporary file", "Write to a local folder."),
    "ELOOP": ("too many symbolic links", "Check the path for a symlink loop."),
    "EMFILE": ("too many files are open", "Close other programs or raise the open-file limit."),
    "ENOMEM": ("the system is out of memory", "Close other programs or use a smaller input."),
    "ETXTBSY": ("the file is busy", "Close the program that uses it and retry."),
    "EBUSY": ("the file is busy", "Close the program that uses it and retry."),
    "ESTALE": ("the network file handle is stale", "Reconnect the network share and retry."),
}


def from_os_error(error: OSError, action: str = "access", path=None, cls: type = None) -> UNetSegmentError:
    """An OSError as a one-line UNetSegmentError: `Cannot write <path>: the disk is full. Fix: ...`."""
    import errno as errno_module

    name = errno_module.errorcode.get(error.errno or 0, "")
    what, fix = _ERRNO_FIXES.get(name, (error.strerror or str(error) or type(error).__name__,
                                        "Check the path, permissions and free disk space."))
    target = path if path is not None else (error.filename or "a file")
    cls = cls or (OutputError if action in ("write", "create", "publish", "save") else InputError)
    return cls(f"Cannot {action} {target}: {what}.", fix)


def _is_torch_out_of_memory(error: BaseException) -> bool:
    name = type(error).__name__
    return name == "OutOfMemoryError" or (isinstance(error, RuntimeError) and "out of memory" in str(error).lower()
                                          and ("CUDA" in str(error) or "MPS" in str(error) or "DefaultCPUAllocator"
                                               in str(error)))


def _is_itk_error(error: BaseException) -> bool:
    text = str(error)
    return isinstance(error, RuntimeError) and ("sitk::ERROR" in text or "ITK ERROR" in text
                                                or "Exception thrown in SimpleITK" in text)


def translate(error: BaseException) -> UNetSegmentError | None:
    """A known failure class as a UNetSegmentError; None for anything else (a bug: keep its traceback).

    Known: UNetSegmentError itself, OSError (by errno), MemoryError and torch's allocation errors,
    SimpleITK/ITK errors. Front ends (CLI, Logic, worker) call this at their one error boundary.
    """
    if isinstance(error, UNetSegmentError):
        return error
    if isinstance(error, OSError):
        return from_os_error(error, "access", cls=InputError)
    if isinstance(error, MemoryError) or _is_torch_out_of_memory(error):
        detail = str(error).splitlines()[0][:200] if str(error) else "no detail"
        return OutOfMemoryError(f"The run ran out of memory ({detail}).",
                                "Close other programs, use a smaller input or patch, or lower the batch size "
                                "(--memory-budget-mb).")
    if _is_itk_error(error):
        lines = [line.strip() for line in str(error).splitlines() if line.strip()
                 and not line.startswith("Exception thrown in SimpleITK")]
        detail = " ".join(lines)[:300]
        import re

        detail = re.sub(r"(sitk::|ITK )ERROR: (\w+\(0x[0-9a-fA-F]+\): )?", "", detail)
        detail = re.sub(r"/\S+\.(cxx|hxx|h|cpp):\d+:?\s*", "", detail)
        return InputError(f"The image library could not process the data ({detail}).",
                          "Check that the image is a valid scalar volume (not complex or vector) and not corrupt.")
    return None


class UNetSegmentWarning(UserWarning):
    """Something the user accepted or should know (e.g. an irregular DICOM series read anyway)."""
