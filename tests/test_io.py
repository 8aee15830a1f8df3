"""atomic_write: complete files or none, with the permissions a plain write would give."""

import os
import stat

import pytest

from genunc._io import atomic_write


def test_writes_bytes_text_and_callables_and_follows_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "a.bin", b"\x00\x01")
        atomic_write(tmp_path / "sub" / "b.txt", "hello")
        atomic_write(tmp_path / "c.txt", lambda path: path.write_text("from a writer"))
    finally:
        os.umask(old)
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "sub" / "b.txt").read_text() == "hello"
    assert (tmp_path / "c.txt").read_text() == "from a writer"
    for name in ("a.bin", "sub/b.txt", "c.txt"):  # readable by colleagues, as open() would make it
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "keep.txt"
    atomic_write(path, "old")

    def dying(p):
        p.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, dying)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
