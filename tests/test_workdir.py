"""spcl_jax.storage.write_atomic: whole files only, with the permissions of any other file the run writes."""
import os
import stat

import pytest

from spcl_jax.storage import write_atomic


@pytest.fixture
def umask():
    """set(mask): the process umask for this test; the previous one comes back after it."""
    previous = os.umask(0o022)
    yield os.umask
    os.umask(previous)


@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)], ids=["022", "077", "002"])
def test_atomic_files_follow_the_umask(tmp_path, umask, mask, mode):
    umask(mask)
    path = tmp_path / "config.json"
    write_atomic(str(path), lambda f: f.write(b"{}"))
    (tmp_path / "plain.txt").write_text("")
    assert stat.S_IMODE(path.stat().st_mode) == mode == stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode)
    write_atomic(str(path), lambda f: f.write(b"[]"))  # replacing keeps it so
    assert path.read_bytes() == b"[]" and stat.S_IMODE(path.stat().st_mode) == mode
    assert sorted(os.listdir(tmp_path)) == ["config.json", "plain.txt"]
