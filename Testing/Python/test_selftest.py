"""The module's own self-test, registered and run as real Slicer does (`slicer.selfTests`), and the
headless command that docs/slicer.md gives for it.

It needs the shipped model and sample: when they are missing the self-test fails with a message
naming them; without PyTorch it reports "skipped: PyTorch not installed" (a build machine).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import slicer

DOCS = Path(__file__).resolve().parents[2] / "docs" / "slicer.md"


def test_self_test_is_registered_and_reaches_dice_threshold(module, scene):
    assert "UNetSegment" in slicer.selfTests
    slicer.selfTests["UNetSegment"]()  # ScriptedLoadableModule.runTest -> UNetSegmentTest().runTest()
    tester = module.UNetSegmentTest()
    tester.runTest()
    assert tester.dice, "the self-test compared no labels"
    for value, score in tester.dice.items():
        assert score >= module.SELF_TEST_DICE_THRESHOLD, (value, score)


def test_self_test_fails_loudly_without_shipped_model(module, scene, tmp_path, monkeypatch):
    monkeypatch.setenv("UNETSEGMENT_MODELS_DIR", str(tmp_path))
    with pytest.raises(AssertionError, match="missing"):
        module.UNetSegmentTest().runTest()


def test_self_test_reports_skipped_without_torch(module, scene, monkeypatch, caplog):
    monkeypatch.setattr(module, "isTorchInstalled", lambda: False)
    tester = module.UNetSegmentTest()
    tester.runTest()  # returns normally: ctest passes on a machine without PyTorch
    assert tester.skipped == "skipped: PyTorch not installed"
    assert "skipped: PyTorch not installed" in caplog.text


def _documented_headless_code() -> str:
    """The --python-code argument of the headless self-test command in docs/slicer.md."""
    text = DOCS.read_text()
    match = re.search(r'--python-code "(.+?)"\n', text, re.S)
    assert match, "docs/slicer.md lacks the headless self-test command"
    return match.group(1).replace("\\\n", "\n")


def test_documented_headless_command_runs_selftests_and_exits_with_status(module, scene, monkeypatch):
    code = _documented_headless_code()
    assert "slicer.selfTests['UNetSegment']" in code and "slicer.util.exit" in code
    calls = []
    monkeypatch.setitem(slicer.selfTests, "UNetSegment", lambda: calls.append("ran"))
    slicer.app.exitCodes.clear()
    exec(compile(code, "headless", "exec"), {"slicer": slicer})
    assert calls == ["ran"] and slicer.app.exitCodes == [0]

    def failing():
        raise AssertionError("Dice too low")

    monkeypatch.setitem(slicer.selfTests, "UNetSegment", failing)
    exec(compile(code, "headless", "exec"), {"slicer": slicer})
    assert slicer.app.exitCodes[-1] == 1
