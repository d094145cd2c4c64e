"""make_plan: the diff of a scan against the committed images and images_errors tables."""

from __future__ import annotations

import pyarrow as pa

from pipeline.index.sinks.base import EXISTING_ERROR_COLUMNS, EXISTING_IMAGE_COLUMNS
from pipeline.plan.diff import PENDING_COLUMNS, Plan, make_plan
from pipeline.plan.scan import SCAN_SCHEMA

IMAGES_SCHEMA = pa.schema([
    ("root", pa.string()), ("path", pa.string()), ("size_bytes", pa.int64()), ("mtime_ns", pa.int64()),
    ("content_hash", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
])
ERRORS_SCHEMA = pa.schema([
    ("root", pa.string()), ("path", pa.string()), ("size_bytes", pa.int64()), ("mtime_ns", pa.int64()),
    ("attempts", pa.int32()),
])


def table(schema: pa.Schema, rows: tuple[tuple, ...]) -> pa.Table:
    return pa.Table.from_pylist([dict(zip(schema.names, row, strict=True)) for row in rows], schema=schema)


def scan(*rows: tuple[str, str, int, int]) -> pa.Table:
    """(root, path, size, mtime) rows as a scan table."""
    return table(SCAN_SCHEMA, rows)


def images(*rows: tuple[str, str, int, int]) -> pa.Table:
    """(root, path, size, mtime) rows as the committed `images` columns that existing() returns."""
    return table(IMAGES_SCHEMA, tuple((*row, "hash", 640, 480) for row in rows))


def errors(*rows: tuple[str, str, int, int, int]) -> pa.Table:
    """(root, path, size, mtime, attempts) rows as the committed `images_errors` columns."""
    return table(ERRORS_SCHEMA, rows)


def pending(plan: Plan) -> dict[tuple[str, str], dict]:
    """The pending rows keyed by (root, path)."""
    return {(row["root"], row["path"]): row for row in plan.pending.to_pylist()}


def keys(table: pa.Table) -> set[tuple[str, str]]:
    return {(row["root"], row["path"]) for row in table.select(["root", "path"]).to_pylist()}


def counts(plan: Plan) -> tuple[int, int, int, int, int, int]:
    return plan.n_scanned, plan.n_new, plan.n_changed, plan.n_unchanged, plan.n_retried, plan.n_deleted


def test_helper_tables_have_the_columns_sinks_return() -> None:
    assert IMAGES_SCHEMA.names == EXISTING_IMAGE_COLUMNS
    assert ERRORS_SCHEMA.names == EXISTING_ERROR_COLUMNS


def test_everything_is_new_against_an_empty_index() -> None:
    plan = make_plan(scan(("/r", "b.jpg", 1, 1), ("/r", "a.jpg", 2, 2)), images(), errors())
    assert counts(plan) == (2, 2, 0, 0, 0, 0)
    assert plan.pending.column_names == PENDING_COLUMNS
    assert plan.pending.to_pylist() == [
        {"root": "/r", "path": "a.jpg", "size_bytes": 2, "mtime_ns": 2, "attempts": 0, "was_in": None},
        {"root": "/r", "path": "b.jpg", "size_bytes": 1, "mtime_ns": 1, "attempts": 0, "was_in": None},
    ]


def test_unchanged_image_is_not_pending() -> None:
    plan = make_plan(scan(("/r", "a.jpg", 10, 100)), images(("/r", "a.jpg", 10, 100)), errors())
    assert counts(plan) == (1, 0, 0, 1, 0, 0)
    assert plan.pending.num_rows == 0


def test_image_with_a_new_size_is_changed() -> None:
    plan = make_plan(scan(("/r", "a.jpg", 11, 100)), images(("/r", "a.jpg", 10, 100)), errors())
    assert counts(plan) == (1, 0, 1, 0, 0, 0)
    assert pending(plan)[("/r", "a.jpg")] == {
        "root": "/r", "path": "a.jpg", "size_bytes": 11, "mtime_ns": 100, "attempts": 0, "was_in": "images",
    }


def test_image_with_a_new_mtime_is_changed() -> None:
    plan = make_plan(scan(("/r", "a.jpg", 10, 101)), images(("/r", "a.jpg", 10, 100)), errors())
    assert counts(plan) == (1, 0, 1, 0, 0, 0)
    assert pending(plan)[("/r", "a.jpg")]["was_in"] == "images"


def test_same_path_under_another_root_is_new() -> None:
    plan = make_plan(scan(("/r1", "a.jpg", 10, 100), ("/r2", "a.jpg", 10, 100)),
                     images(("/r1", "a.jpg", 10, 100)), errors())
    assert counts(plan) == (2, 1, 0, 1, 0, 0)
    assert set(pending(plan)) == {("/r2", "a.jpg")}


def test_deleted_files_are_reported_per_table() -> None:
    plan = make_plan(
        scan(("/r", "kept.jpg", 1, 1)),
        images(("/r", "kept.jpg", 1, 1), ("/r", "gone.jpg", 1, 1), ("/other", "kept.jpg", 1, 1)),
        errors(("/r", "broken_gone.png", 0, 1, 2)),
    )
    assert keys(plan.deleted_images) == {("/r", "gone.jpg"), ("/other", "kept.jpg")}
    assert keys(plan.deleted_errors) == {("/r", "broken_gone.png")}
    assert plan.deleted_images.column_names == ["root", "path"]
    assert counts(plan) == (1, 0, 0, 1, 0, 3)
    assert plan.pending.num_rows == 0


def test_unchanged_error_is_skipped_without_retry() -> None:
    plan = make_plan(scan(("/r", "bad.jpg", 5, 50)), images(), errors(("/r", "bad.jpg", 5, 50, 3)))
    assert counts(plan) == (1, 0, 0, 1, 0, 0)
    assert plan.pending.num_rows == 0


def test_unchanged_error_is_retried_with_its_attempts() -> None:
    plan = make_plan(scan(("/r", "bad.jpg", 5, 50)), images(), errors(("/r", "bad.jpg", 5, 50, 3)),
                     retry_errors=True)
    assert counts(plan) == (1, 0, 0, 1, 1, 0)
    assert pending(plan)[("/r", "bad.jpg")] == {
        "root": "/r", "path": "bad.jpg", "size_bytes": 5, "mtime_ns": 50, "attempts": 3, "was_in": "errors",
    }


def test_changed_error_is_pending_with_attempts_reset() -> None:
    plan = make_plan(scan(("/r", "fixed.jpg", 6, 60)), images(), errors(("/r", "fixed.jpg", 5, 50, 4)))
    assert counts(plan) == (1, 0, 1, 0, 0, 0)
    row = pending(plan)[("/r", "fixed.jpg")]
    assert row["attempts"] == 0 and row["was_in"] == "errors"


def test_changed_error_is_not_counted_as_retried() -> None:
    plan = make_plan(scan(("/r", "fixed.jpg", 6, 60)), images(), errors(("/r", "fixed.jpg", 5, 50, 4)),
                     retry_errors=True)
    assert (plan.n_changed, plan.n_retried) == (1, 0)
    assert pending(plan)[("/r", "fixed.jpg")]["attempts"] == 0


def test_retry_errors_leaves_unchanged_images_alone() -> None:
    plan = make_plan(scan(("/r", "a.jpg", 1, 1)), images(("/r", "a.jpg", 1, 1)), errors(), retry_errors=True)
    assert counts(plan) == (1, 0, 0, 1, 0, 0)
    assert plan.pending.num_rows == 0


def mixed_plan(retry_errors: bool) -> Plan:
    return make_plan(
        scan(
            ("/z", "new.jpg", 1, 1),
            ("/a", "changed.jpg", 2, 99),
            ("/a", "same.jpg", 3, 3),
            ("/a", "bad.jpg", 4, 4),
            ("/a", "bad_changed.jpg", 9, 9),
            ("/a", "dir/new.png", 5, 5),
        ),
        images(("/a", "changed.jpg", 2, 2), ("/a", "same.jpg", 3, 3), ("/a", "gone.jpg", 1, 1)),
        errors(("/a", "bad.jpg", 4, 4, 1), ("/a", "bad_changed.jpg", 8, 8, 2), ("/a", "err_gone.jpg", 1, 1, 1)),
        retry_errors=retry_errors,
    )


def test_mixed_plan_counts_add_up() -> None:
    for retry_errors in (False, True):
        plan = mixed_plan(retry_errors)
        assert plan.n_new + plan.n_changed + plan.n_unchanged == plan.n_scanned == 6
        assert (plan.n_new, plan.n_changed, plan.n_unchanged, plan.n_deleted) == (2, 2, 2, 2)
        assert plan.n_retried == int(retry_errors)
        assert plan.pending.num_rows == plan.n_new + plan.n_changed + plan.n_retried


def test_mixed_plan_was_in_and_attempts() -> None:
    rows = pending(mixed_plan(retry_errors=True))
    assert {k: (r["was_in"], r["attempts"]) for k, r in rows.items()} == {
        ("/z", "new.jpg"): (None, 0),
        ("/a", "dir/new.png"): (None, 0),
        ("/a", "changed.jpg"): ("images", 0),
        ("/a", "bad.jpg"): ("errors", 1),
        ("/a", "bad_changed.jpg"): ("errors", 0),
    }


def test_pending_is_sorted_by_root_then_path() -> None:
    plan = mixed_plan(retry_errors=True)
    order = [(r["root"], r["path"]) for r in plan.pending.to_pylist()]
    assert order == sorted(order)
    assert order[0][0] == "/a" and order[-1] == ("/z", "new.jpg")


def test_pending_schema() -> None:
    plan = mixed_plan(retry_errors=False)
    assert plan.pending.column_names == PENDING_COLUMNS
    assert plan.pending.schema.field("attempts").type == pa.int32()
    assert plan.pending.schema.field("was_in").type == pa.string()


def test_empty_scan_deletes_everything() -> None:
    plan = make_plan(scan(), images(("/r", "a.jpg", 1, 1)), errors(("/r", "b.jpg", 1, 1, 1)))
    assert counts(plan) == (0, 0, 0, 0, 0, 2)
    assert plan.pending.num_rows == 0
