"""Suite-wide check: a test run leaves no file in the working tree.

The tree is listed when the session starts and when it ends; any new file fails the run and is
named. Set UNETSEGMENT_ALLOW_NEW_FILES=1 to only warn (e.g. while someone edits the tree during a run).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tree_check import new_files, snapshot  # noqa: E402

REPOSITORY = Path(__file__).resolve().parents[1]
_BEFORE = {}


def pytest_sessionstart(session):
    _BEFORE["files"] = snapshot(REPOSITORY)


def pytest_sessionfinish(session, exitstatus):
    if "files" not in _BEFORE:
        return
    added = new_files(REPOSITORY, _BEFORE["files"])
    if not added:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    message = (f"The test run left {len(added)} file(s) in the working tree (write under tmp_path): "
               + ", ".join(added[:20]))
    if reporter is not None:
        reporter.write_line(message, red=True)
    else:
        print(message, file=sys.stderr)
    if os.environ.get("UNETSEGMENT_ALLOW_NEW_FILES") != "1":
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def nnunet_ct_models(tmp_path_factory):
    """(root, [3d_fullres folds 0+1, 2d, ResEnc M]) results folders written by nnU-Net itself, built once."""
    import nnunetv2  # noqa: F401 - part of the test extra: a missing install fails the tests that need it
    from nnunet_folders import CT_BUILD, build_folders

    root = tmp_path_factory.mktemp("nnunet_ct")
    return root, build_folders(root, *CT_BUILD)
