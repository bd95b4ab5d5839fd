"""worldmodel/files.py: a file or a folder is either the old one or the whole new one, never a mix, and an
interrupted write leaves nothing behind."""
import pytest

from worldmodel.files import atomic_folder, atomic_write_text, is_temp_file


def test_a_folder_is_replaced_whole_or_not_at_all(tmp_path):
    dest = tmp_path / "export"
    with atomic_folder(dest) as tmp:
        (tmp / "a.txt").write_text("one")
    assert sorted(p.name for p in dest.iterdir()) == ["a.txt"]
    with pytest.raises(RuntimeError):
        with atomic_folder(dest) as tmp:
            (tmp / "b.txt").write_text("two")
            raise RuntimeError("killed mid-write")
    assert sorted(p.name for p in dest.iterdir()) == ["a.txt"]  # the old folder, untouched
    with atomic_folder(dest) as tmp:
        (tmp / "b.txt").write_text("two")
    assert sorted(p.name for p in dest.iterdir()) == ["b.txt"]  # the new one, nothing of the old
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temporary or old folder left


def test_a_file_is_replaced_whole_or_not_at_all(tmp_path):
    dest = tmp_path / "meta.json"
    atomic_write_text(dest, "old")
    with pytest.raises(KeyboardInterrupt):
        from worldmodel.files import atomic_path

        with atomic_path(dest) as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    assert dest.read_text() == "old"
    assert not [p for p in tmp_path.iterdir() if is_temp_file(p.name)]
