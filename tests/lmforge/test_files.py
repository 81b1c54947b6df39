"""lmforge.files.write_atomic: the one atomic write (bytes, text, or a writer function)."""
from __future__ import annotations

import pytest

from lmforge.errors import LmforgeError
from lmforge.files import atomic_write_bytes, write_atomic


def test_bytes_text_and_writer_functions_land_whole_with_no_temp_left(tmp_path):
    write_atomic(tmp_path / "a.bin", b"\x00\x01")
    write_atomic(tmp_path / "b.txt", "héllo\n")
    write_atomic(tmp_path / "c.txt", lambda temp: temp.write_text("from a writer"))
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "b.txt").read_text(encoding="utf-8") == "héllo\n"
    assert (tmp_path / "c.txt").read_text() == "from a writer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.txt", "c.txt"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temp(tmp_path):
    target = tmp_path / "keep.txt"
    target.write_text("old")

    def fails(temp):
        temp.write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_atomic(target, fails)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_atomic_write_bytes_turns_an_unwritable_path_into_one_line(tmp_path):
    with pytest.raises(LmforgeError, match=r"missing/x.bin: cannot write .*choose a writable location"):
        atomic_write_bytes(tmp_path / "missing" / "x.bin", b"1")
