"""The clean-tree check that Testing/conftest.py runs around every session finds what a test left."""

from tree_check import new_files, snapshot


def test_new_files_are_found_and_caches_ignored(tmp_path):
    (tmp_path / "kept.txt").write_text("x")
    before = snapshot(tmp_path)
    (tmp_path / "zero.nrrd").write_bytes(b"left by a test")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "out.mha").write_bytes(b"")
    (tmp_path / ".pytest_cache").mkdir()
    (tmp_path / ".pytest_cache" / "v").write_text("cache")
    assert new_files(tmp_path, before) == ["sub/out.mha", "zero.nrrd"]
    assert new_files(tmp_path, snapshot(tmp_path)) == []
