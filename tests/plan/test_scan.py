"""The scanner: which files are listed, in what order, under which relative path, with which stat facts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.plan.scan import SCAN_SCHEMA, FileRecord, scan_roots, scan_table
from tests.conftest import HOSTILE, HOSTILE_EMBEDDED, HOSTILE_ERRORS, HOSTILE_SKIPPED

EXTENSIONS = ["jpg", "jpeg", "png", "bmp", "gif", "tif", "tiff", "webp"]


def make_tree(root: Path, files: list[str]) -> Path:
    """Create each POSIX relative path under root with a few bytes of content; returns root."""
    for rel in files:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * (len(rel) + 1))
    return root


def listed(roots: Path | list[Path], **options: bool) -> list[str]:
    """The relative paths scan_roots yields, in order."""
    roots = roots if isinstance(roots, list) else [roots]
    return [r.path for r in scan_roots([str(r) for r in roots], EXTENSIONS, **options)]


def test_recurses_into_subfolders_in_sorted_order(tmp_path: Path) -> None:
    make_tree(tmp_path, ["b.jpg", "a.jpg", "sub/z.png", "sub/deeper/m.gif", "c/x.bmp", "A.jpg"])
    assert listed(tmp_path) == ["A.jpg", "a.jpg", "b.jpg", "c/x.bmp", "sub/deeper/m.gif", "sub/z.png"]


def test_order_is_deterministic_across_scans(tmp_path: Path) -> None:
    make_tree(tmp_path, [f"d{i % 3}/f{i:03d}.jpg" for i in range(30)])
    first = listed(tmp_path)
    assert first == listed(tmp_path) == sorted(first)
    assert len(first) == 30


def test_order_is_sorted_within_each_folder(tmp_path: Path) -> None:
    # A folder's whole subtree comes at its name's place: "a/" before "a-b/" and "a.jpg", though "a-b/x.jpg" and
    # "a.jpg" sort before "a/y.jpg" as strings. plan.make_plan sorts pending itself, so this is only the walk order.
    make_tree(tmp_path, ["a/y.jpg", "a-b/x.jpg", "a.jpg"])
    assert listed(tmp_path) == ["a/y.jpg", "a-b/x.jpg", "a.jpg"]


def test_extension_filter_is_case_insensitive(tmp_path: Path) -> None:
    make_tree(tmp_path, ["upper.JPG", "mixed.Png", "lower.webp", "tiff.TIFF"])
    assert listed(tmp_path) == ["lower.webp", "mixed.Png", "tiff.TIFF", "upper.JPG"]


def test_configured_extensions_are_normalised(tmp_path: Path) -> None:
    make_tree(tmp_path, ["a.jpg", "b.PNG", "c.gif"])
    records = scan_roots([str(tmp_path)], [".JPG", "png"])
    assert [r.path for r in records] == ["a.jpg", "b.PNG"]


def test_non_image_extensions_are_skipped(tmp_path: Path) -> None:
    make_tree(tmp_path, ["keep.jpg", "notes.txt", "data.json", "noext", "archive.jpg.zip", "jpg"])
    assert listed(tmp_path) == ["keep.jpg"]


def test_hidden_files_and_folders_are_skipped_by_default(tmp_path: Path) -> None:
    make_tree(tmp_path, ["visible.jpg", ".hidden.jpg", ".cache/inside.jpg", "sub/.also_hidden.png", "sub/ok.png"])
    assert listed(tmp_path) == ["sub/ok.png", "visible.jpg"]


def test_hidden_files_and_folders_are_listed_with_include_hidden(tmp_path: Path) -> None:
    make_tree(tmp_path, ["visible.jpg", ".hidden.jpg", ".cache/inside.jpg", "sub/.also_hidden.png"])
    assert listed(tmp_path, include_hidden=True) == [
        ".cache/inside.jpg", ".hidden.jpg", "sub/.also_hidden.png", "visible.jpg",
    ]


def make_symlinks(tmp_path: Path) -> Path:
    """root/real.jpg, root/link.jpg -> outside file, root/linkdir -> outside folder holding one image."""
    outside = make_tree(tmp_path / "outside", ["target.jpg", "folder/inner.jpg"])
    root = make_tree(tmp_path / "root", ["real.jpg"])
    (root / "link.jpg").symlink_to(outside / "target.jpg")
    (root / "linkdir").symlink_to(outside / "folder", target_is_directory=True)
    return root


def test_symlinks_are_skipped_by_default(tmp_path: Path) -> None:
    assert listed(make_symlinks(tmp_path)) == ["real.jpg"]


def test_symlinks_are_followed_when_asked(tmp_path: Path) -> None:
    assert listed(make_symlinks(tmp_path), follow_symlinks=True) == ["link.jpg", "linkdir/inner.jpg", "real.jpg"]


def test_followed_symlink_reports_the_target_stat(tmp_path: Path) -> None:
    root = make_symlinks(tmp_path)
    record = next(r for r in scan_roots([str(root)], EXTENSIONS, follow_symlinks=True) if r.path == "link.jpg")
    assert record.size_bytes == (tmp_path / "outside" / "target.jpg").stat().st_size


def test_symlink_loop_terminates_and_lists_each_file_once(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "root", ["top.jpg", "a/one.jpg", "a/b/two.jpg"])
    (root / "a" / "b" / "up").symlink_to(root / "a", target_is_directory=True)  # b/up -> its parent a
    (root / "a" / "self").symlink_to(root / "a", target_is_directory=True)  # a/self -> a
    (root / "a" / "to_root").symlink_to(root, target_is_directory=True)
    paths = listed(root, follow_symlinks=True)
    assert paths == ["a/b/two.jpg", "a/one.jpg", "top.jpg"]


def test_broken_symlink_is_skipped_when_following(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "root", ["ok.jpg"])
    (root / "dangling.jpg").symlink_to(tmp_path / "missing.jpg")
    assert listed(root, follow_symlinks=True) == ["ok.jpg"]


def test_several_roots_keep_their_own_relative_paths(tmp_path: Path) -> None:
    first = make_tree(tmp_path / "first", ["same.jpg", "x/a.png"])
    second = make_tree(tmp_path / "second", ["same.jpg"])
    records = list(scan_roots([str(first), str(second)], EXTENSIONS))
    assert [(r.root, r.path) for r in records] == [
        (str(first), "same.jpg"), (str(first), "x/a.png"), (str(second), "same.jpg"),
    ]


def test_paths_are_posix_and_relative_to_their_root(tmp_path: Path) -> None:
    make_tree(tmp_path, ["one/two/three/deep.jpg"])
    (record,) = scan_roots([str(tmp_path)], EXTENSIONS)
    assert record.root == str(tmp_path)
    assert record.path == "one/two/three/deep.jpg"
    assert not os.path.isabs(record.path) and "\\" not in record.path


def test_size_and_mtime_come_from_stat(tmp_path: Path) -> None:
    path = tmp_path / "photo.jpg"
    path.write_bytes(b"\xff" * 1234)
    mtime_ns = 1_600_000_000_123_456_789
    os.utime(path, ns=(mtime_ns, mtime_ns))
    (record,) = scan_roots([str(tmp_path)], EXTENSIONS)
    assert record == FileRecord(str(tmp_path), "photo.jpg", 1234, path.stat().st_mtime_ns)
    assert record.size_bytes == 1234
    assert abs(record.mtime_ns - mtime_ns) < 1_000  # the filesystem may round below a microsecond


def test_empty_root_lists_nothing(tmp_path: Path) -> None:
    assert listed(tmp_path) == []
    table = scan_table([str(tmp_path)], EXTENSIONS)
    assert table.num_rows == 0 and table.schema == SCAN_SCHEMA


@pytest.mark.parametrize("chunk_rows", [1, 3, 65_536])
def test_scan_table_matches_scan_roots(tmp_path: Path, chunk_rows: int) -> None:
    first = make_tree(tmp_path / "r1", ["a.jpg", "b/c.png", "b/d.PNG", "z.gif"])
    second = make_tree(tmp_path / "r2", ["e.webp"])
    roots = [str(first), str(second)]
    table = scan_table(roots, EXTENSIONS, chunk_rows=chunk_rows)
    assert table.schema == SCAN_SCHEMA
    assert [FileRecord(**row) for row in table.to_pylist()] == list(scan_roots(roots, EXTENSIONS))
    assert table.num_rows == 5


def test_hostile_folder_lists_exactly_the_image_files() -> None:
    paths = listed(HOSTILE)
    assert sorted(paths) == sorted(HOSTILE_EMBEDDED + HOSTILE_ERRORS)
    assert len(paths) == len(set(paths))
    assert not set(paths) & set(HOSTILE_SKIPPED)


def test_hostile_hidden_file_is_listed_only_with_include_hidden() -> None:
    assert ".hidden_file.jpg" in listed(HOSTILE, include_hidden=True)
    assert ".hidden_file.jpg" not in listed(HOSTILE)
