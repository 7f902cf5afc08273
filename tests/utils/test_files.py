"""The package's one atomic write: a reader sees the old file or the whole new one, never a part."""
import os

import pytest

from sage_fast.utils import files


def test_success_replaces_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    files.atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_failure_keeps_the_old_file(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with files.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_durable_write_fsyncs_file_and_folder(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    files.atomic_write_bytes(tmp_path / "b", b"x")
    assert len(synced) == 2  # the data, then the rename
    synced.clear()
    files.atomic_write_bytes(tmp_path / "b", b"y", durable=False)
    assert synced == []


def test_stale_temporaries_of_named_files_only(tmp_path):
    (tmp_path / ".last.pt.123.tmp").write_bytes(b"")
    (tmp_path / ".mine.txt.9.tmp").write_bytes(b"")
    (tmp_path / "last.pt").write_bytes(b"")
    removed = files.remove_stale_temporaries(tmp_path, ["last.pt"])
    assert [p.name for p in removed] == [".last.pt.123.tmp"]
    assert (tmp_path / ".mine.txt.9.tmp").exists()
    assert files.temporary_name(tmp_path / "x").name == f".x.{os.getpid()}.tmp"
