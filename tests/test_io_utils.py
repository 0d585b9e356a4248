"""Atomic writes: the file appears whole or not at all, with the mode the umask gives."""

import os
import stat

import pytest

from opera_jax.io_utils import atomic_path, write_json, write_text


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_respect_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        write_text(tmp_path / "a.txt", "x")
        write_json(tmp_path / "sub" / "b.json", {"k": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "sub" / "b.json").stat().st_mode) == mode


def test_a_failed_write_leaves_nothing(tmp_path):
    (tmp_path / "kept.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "kept.txt") as tmp:
            tmp.write_text("new")
            raise RuntimeError("boom")
    assert (tmp_path / "kept.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["kept.txt"]
