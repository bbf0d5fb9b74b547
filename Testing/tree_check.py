"""Which files a test session added to the working tree (tests must write under tmp_path only).

Caches that pytest and hypothesis keep by design (.pytest_cache, .hypothesis, __pycache__) and the
virtual environment are not counted.
"""

from __future__ import annotations

import os
from pathlib import Path

SKIPPED_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", ".hypothesis"}


def snapshot(root: Path) -> set:
    files = set()
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS and not d.endswith(".egg-info")]
        for name in names:
            files.add(os.path.relpath(os.path.join(folder, name), root))
    return files


def new_files(root: Path, before: set) -> list:
    return sorted(snapshot(root) - before)
