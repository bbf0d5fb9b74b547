"""Writes that cannot lose data: temp file beside the target, then a no-replace publish.

Checking `exists()` before a long run and `os.replace` at the end leaves a window in which a file
that appears at the output path (or a dangling symlink already there) is silently replaced. Here
the promise holds at the moment of the rename: without overwrite the temp file is published with
`renameat2(RENAME_NOREPLACE)` (Linux), else `os.link` + unlink, else an exclusive claim of the name;
each fails if anything exists at the target by then. Temp files are hidden (leading dot), removed on
any error, on Ctrl+C and on SIGTERM (`install_signal_cleanup`), and at interpreter exit.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
import datetime
import errno
import os
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

from .errors import Cancelled, InputError, OutputError, UNetSegmentError, from_os_error

_LIVE: set[str] = set()  # temp files being written by this process
_LOCK = threading.Lock()
_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that `finally` blocks remove temp files."""


def _remove_live_temps() -> None:
    with _LOCK:
        names = list(_LIVE)
        _LIVE.clear()
    for name in names:
        with contextlib.suppress(OSError):
            os.unlink(name)


atexit.register(_remove_live_temps)


def live_temp_files() -> list[str]:
    with _LOCK:
        return sorted(_LIVE)


def _raise_terminated(signum, _frame):
    raise Terminated(f"signal {signum}")


def install_signal_cleanup() -> None:
    """SIGTERM raises `Terminated` (a KeyboardInterrupt) in the main thread: the run unwinds, temp files go."""
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, _raise_terminated)


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        library = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function = library.renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_renameat2 = _libc()


def _renameat2_noreplace(source: str, target: str) -> bool:
    """True when moved; False when this system or file system has no RENAME_NOREPLACE; FileExistsError."""
    if _renameat2 is None:
        return False
    result = _renameat2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), _RENAME_NOREPLACE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code == errno.EEXIST:
        raise FileExistsError(code, os.strerror(code), target)
    if code not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        raise OSError(code, os.strerror(code), target)
    return False


def _rename_noreplace(source: str, target: str) -> None:
    """Atomic move that raises FileExistsError if anything (even a dangling symlink) is at `target`."""
    if _renameat2_noreplace(source, target):
        return
    try:
        os.link(source, target)  # fails with EEXIST whatever is there
    except FileExistsError:
        raise
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.EACCES):
            raise
        # no hard links here (e.g. FAT, some network shares): claim the name exclusively, then replace it
        handle = os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        os.close(handle)
        os.replace(source, target)
        return
    os.unlink(source)


def exists_or_link(path) -> bool:
    """True for anything at `path`, a dangling symlink included (Path.exists() says False for one)."""
    return os.path.lexists(path)


def already_exists_error(path, count: int = 1) -> InputError:
    more = f" ({count} output file(s) would be overwritten)" if count > 1 else ""
    return InputError(f"{path} already exists{more}; it was not overwritten.",
                      "Choose another output path or pass --overwrite.")


def check_target(path, overwrite: bool) -> None:
    """Refuse early what the publish would refuse late: a folder at the path, or an existing file without
    overwrite (the publish checks again at the rename)."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        raise InputError(f"{path} is a folder.", "Give a file name such as segmentation.nrrd.")
    if exists_or_link(path) and not overwrite:
        raise already_exists_error(path)


def check_writable_folder(folder) -> None:
    """The nearest existing folder of `folder` must accept new files (checked before a long run)."""
    folder = Path(folder).absolute()
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise OutputError(f"Cannot write into {folder}: {probe} is a file, not a folder.",
                          "Choose an output path whose folders are folders.")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"Cannot write into {folder}: {probe} is not writable.",
                          "Choose a folder you can write to, or change its permissions.")


def publish(temp, target, overwrite: bool = False, cancel=None) -> Path:
    """Move a complete temp file onto `target`. Without overwrite nothing that exists is ever replaced."""
    temp, target = str(temp), Path(target)
    if cancel is not None and getattr(cancel, "cancelled", False):
        raise Cancelled()
    if target.is_dir() and not target.is_symlink():
        raise InputError(f"{target} is a folder.", "Give a file name such as segmentation.nrrd.")
    try:
        if overwrite:
            os.replace(temp, target)
        else:
            _rename_noreplace(temp, str(target))
    except FileExistsError:
        raise already_exists_error(target) from None
    except OSError as error:
        raise from_os_error(error, "write", target) from None
    return target


def publish_folder(temp_folder, target, overwrite: bool = False) -> Path:
    """Move a complete temp folder onto `target`. Without overwrite nothing that exists is replaced:
    RENAME_NOREPLACE, else an exclusive `mkdir` claim that the rename then replaces (rename() replaces
    only an empty folder, so anything put into the claim meanwhile makes it fail instead)."""
    temp, target = str(temp_folder), Path(target)
    try:
        if overwrite and exists_or_link(target):
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink()
        if not _renameat2_noreplace(temp, str(target)):
            os.mkdir(target)
            os.replace(temp, target)
    except FileExistsError:
        raise already_exists_error(target) from None
    except OSError as error:
        raise from_os_error(error, "write", target) from None
    return target


def _fsync(name: str) -> None:
    with contextlib.suppress(OSError):
        handle = os.open(name, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)


@contextlib.contextmanager
def temporary_output(target, overwrite: bool = False, suffix: str = ".tmp", cancel=None) -> Iterator[Path]:
    """Yield a hidden temp path in the target's folder; publish it when the block ends without error.

    Any error (OSError -> OutputError naming the errno's fix), Ctrl+C, SIGTERM or cancel removes the temp
    file and leaves `target` as it was.
    """
    target = Path(target)
    check_target(target, overwrite)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=str(target.parent))
        os.close(handle)
    except OSError as error:
        raise from_os_error(error, "write", target) from None
    with _LOCK:
        _LIVE.add(name)
    try:
        try:
            yield Path(name)
        except OSError as error:
            if isinstance(error, UNetSegmentError):
                raise
            raise from_os_error(error, "write", target) from None
        with contextlib.suppress(OSError):
            os.chmod(name, 0o644)
        _fsync(name)
        publish(name, target, overwrite, cancel)
    finally:
        with _LOCK:
            _LIVE.discard(name)
        with contextlib.suppress(OSError):
            os.unlink(name)


def refuse_outputs_over_inputs(outputs: Iterable, inputs: Iterable) -> None:
    """An output that is (or resolves to, or hard-links) an input would destroy it, even with --overwrite."""
    inputs = [Path(path) for path in inputs]
    for output in outputs:
        output = Path(output)
        for source in inputs:
            same = os.path.realpath(output) == os.path.realpath(source)
            if not same and output.exists() and source.exists():
                with contextlib.suppress(OSError):
                    same = os.path.samefile(output, source)
            if same:
                raise InputError(f"The output {output} is the input {source}; writing it would destroy the input.",
                                 "Choose an output path that is not one of the inputs.")


def refuse_colliding_outputs(pairs: Iterable) -> None:
    """Two inputs mapping to one output (a.nrrd and a.nii.gz -> out/a.nrrd): refuse before any work."""
    seen: dict[str, Path] = {}
    for source, output in pairs:
        key = os.path.normcase(os.path.abspath(output))
        if key in seen:
            raise InputError(f"{seen[key]} and {source} would both be written to {output}; the first result "
                             "would be lost.", "Rename one of the inputs, or segment them into separate folders.")
        seen[key] = Path(source)


def fallback_folder() -> Path:
    """Where a result goes when its own path cannot take it: $UNETSEGMENT_RESCUE_DIR, else the temp folder."""
    override = os.environ.get("UNETSEGMENT_RESCUE_DIR")
    return Path(override) if override else Path(tempfile.gettempdir()) / "UNetSegment-rescued"


def write_with_fallback(write: Callable[[Path], object], target, overwrite: bool = False) -> Path:
    """`write(path)` to `target`; if that fails, write to a named fallback path and say where it went.

    For results that took long to make (a trained model): the failure message names the fallback file.
    """
    target = Path(target)
    try:
        write(target)
        return target
    except (UNetSegmentError, OSError) as error:
        if isinstance(error, Cancelled):
            raise
        first = error
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    candidates = [fallback_folder(), Path.home() / "UNetSegment-rescued", Path.cwd()]
    for folder in candidates:
        rescue = folder / f"{target.stem}-{stamp}-{os.getpid()}{target.suffix}"
        try:
            write(rescue)
        except (UNetSegmentError, OSError):
            continue
        problem = first.problem if isinstance(first, UNetSegmentError) else str(first)
        raise OutputError(f"{problem} The result was kept: it was written to {rescue} instead.",
                          f"Move {rescue} to where you want it (e.g. {target}).") from None
    raise first
