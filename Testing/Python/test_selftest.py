"""The module's own self-test (what real Slicer runs via selfTest / ctest), through the adapter.

It needs the shipped model Resources/Models/default.pt and the shipped sample: when they are
missing the self-test fails with a message naming them, it is never skipped.
"""

from __future__ import annotations

import pytest


def test_self_test_reaches_dice_threshold_with_shipped_model(module, scene):
    tester = module.UNetSegmentTest()
    tester.runTest()
    assert tester.dice, "the self-test compared no labels"
    for value, score in tester.dice.items():
        assert score >= module.SELF_TEST_DICE_THRESHOLD, (value, score)
    assert "Self-test passed" in tester.messages


def test_self_test_fails_loudly_without_shipped_model(module, scene, tmp_path, monkeypatch):
    monkeypatch.setenv("UNETSEGMENT_MODELS_DIR", str(tmp_path))
    with pytest.raises(AssertionError, match="missing.*default"):
        module.UNetSegmentTest().runTest()
