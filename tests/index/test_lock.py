"""The index lock: one holder, nesting in the holder, and no folder left behind by a run that wrote nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.index.lock import LOCK_NAME, IndexLock, LockHeld


def test_acquiring_again_in_the_holder_nests(tmp_path: Path) -> None:
    folder = str(tmp_path / "index")
    outer = IndexLock(folder)
    outer.acquire()  # the CLI, before its heavy imports
    with outer:  # the runner, inside
        pass
    with pytest.raises(LockHeld):  # the inner release kept the outer hold
        IndexLock(folder).acquire()
    outer.release()
    with IndexLock(folder):
        pass


def test_a_folder_the_lock_created_is_removed_when_nothing_else_was_written(tmp_path: Path) -> None:
    folder = tmp_path / "index"
    with IndexLock(str(folder)):
        assert (folder / LOCK_NAME).exists()
    assert not folder.exists()
    with IndexLock(str(folder)):
        (folder / "images.lance").mkdir()
    assert (folder / "images.lance").is_dir() and (folder / LOCK_NAME).exists()


def test_an_existing_folder_keeps_its_lock_file(tmp_path: Path) -> None:
    folder = tmp_path / "index"
    folder.mkdir()
    with IndexLock(str(folder)):
        pass
    assert (folder / LOCK_NAME).exists()
