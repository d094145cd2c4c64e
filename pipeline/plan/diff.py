"""Diff the scan against what the index holds: new, changed, unchanged and deleted files."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.index.schema import KEY_COLUMNS

PENDING_COLUMNS = ["root", "path", "size_bytes", "mtime_ns", "attempts", "was_in"]


@dataclass
class Plan:
    pending: pa.Table  # files to read now, sorted: PENDING_COLUMNS
    deleted_images: pa.Table  # keys of rows whose file is gone
    deleted_errors: pa.Table
    n_scanned: int
    n_new: int
    n_changed: int
    n_unchanged: int
    n_retried: int  # unchanged files in images_errors tried again (--retry-errors)

    @property
    def n_deleted(self) -> int:
        return self.deleted_images.num_rows + self.deleted_errors.num_rows


def _match(scan: pa.Table, existing: pa.Table, tag: str) -> pa.Table:
    """Left-join the scan with one committed table: adds `<tag>_size`, `<tag>_mtime`, `<tag>_attempts`."""
    right = existing.select(KEY_COLUMNS + ["size_bytes", "mtime_ns"]).rename_columns(
        KEY_COLUMNS + [f"{tag}_size", f"{tag}_mtime"]
    )
    if "attempts" in existing.column_names:
        right = right.append_column(f"{tag}_attempts", existing["attempts"])
    return scan.join(right, keys=KEY_COLUMNS, join_type="left outer")


def _anti(existing: pa.Table, scan: pa.Table) -> pa.Table:
    return existing.select(KEY_COLUMNS).join(scan.select(KEY_COLUMNS), keys=KEY_COLUMNS, join_type="left anti")


def make_plan(scan: pa.Table, images: pa.Table, errors: pa.Table, retry_errors: bool = False) -> Plan:
    joined = _match(_match(scan, images, "img"), errors, "err")
    in_images = pc.is_valid(joined["img_size"])
    in_errors = pc.is_valid(joined["err_size"])
    same_image = pc.and_(pc.equal(joined["size_bytes"], joined["img_size"]),
                         pc.equal(joined["mtime_ns"], joined["img_mtime"]))
    same_error = pc.and_(pc.equal(joined["size_bytes"], joined["err_size"]),
                         pc.equal(joined["mtime_ns"], joined["err_mtime"]))
    unchanged_image = pc.fill_null(pc.and_(in_images, same_image), False)
    unchanged_error = pc.fill_null(pc.and_(in_errors, same_error), False)
    known = pc.or_(in_images, in_errors)
    new = pc.invert(known)
    changed = pc.and_(known, pc.invert(pc.or_(unchanged_image, unchanged_error)))
    retried = pc.and_(unchanged_error, pa.scalar(retry_errors))
    todo = pc.or_(pc.or_(new, changed), retried)

    attempts = pc.if_else(pc.and_(in_errors, pc.invert(changed)), pc.fill_null(joined["err_attempts"], 0), 0)
    was_in = pc.if_else(in_images, "images", pc.if_else(in_errors, "errors", pa.scalar(None, pa.string())))
    pending = (
        joined.select(["root", "path", "size_bytes", "mtime_ns"])
        .append_column("attempts", pc.cast(attempts, pa.int32()))
        .append_column("was_in", was_in)
        .filter(todo)
        .sort_by([("root", "ascending"), ("path", "ascending")])
    )
    return Plan(
        pending=pending.select(PENDING_COLUMNS),
        deleted_images=_anti(images, scan),
        deleted_errors=_anti(errors, scan),
        n_scanned=scan.num_rows,
        n_new=pc.sum(new).as_py() or 0,
        n_changed=pc.sum(changed).as_py() or 0,
        n_unchanged=scan.num_rows - (pc.sum(new).as_py() or 0) - (pc.sum(changed).as_py() or 0),
        n_retried=pc.sum(retried).as_py() or 0,
    )
