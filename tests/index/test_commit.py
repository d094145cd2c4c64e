"""Shard commits: every shard but the last holds exactly run.shard_size files, whatever the batch size."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.index.commit import ShardCommitter
from pipeline.index.schema import images_schema
from pipeline.records import DecodeResult, Embedded


class RecordingSink:
    """Keeps what each commit wrote."""

    def __init__(self) -> None:
        self.shards: list[tuple[int, int]] = []

    def write(self, rows: pa.Table, errors: pa.Table) -> None:
        self.shards.append((rows.num_rows, errors.num_rows))

    def delete(self, keys: pa.Table, which: str) -> None:
        pass


def _item(n: int) -> DecodeResult:
    key = {"root": "/r", "path": f"{n}.jpg", "size_bytes": 1, "mtime_ns": 1, "attempts": 0, "was_in": None}
    return DecodeResult(key, None, None, 10, 10, f"{n:032x}")


def test_a_batch_larger_than_the_room_left_is_split_across_shards() -> None:
    sink = RecordingSink()
    committer = ShardCommitter([sink], images_schema(4), "m", shard_size=50)
    for start in (0, 64):  # two batches of 64 with shard_size 50: 50, 50, 28
        items = [_item(n) for n in range(start, start + 64)]
        committer.add(Embedded(items, np.ones((64, 4), np.float32)))
    committer.commit()
    assert sink.shards == [(50, 0), (50, 0), (28, 0)]
    assert committer.rows_written == 128


def test_multi_vector_batches_split_too() -> None:
    sink = RecordingSink()
    committer = ShardCommitter([sink], images_schema(4, multivector=True), "m", shard_size=3)
    items = [_item(n) for n in range(5)]
    committer.add(Embedded(items, [np.ones((n + 1, 4), np.float32) for n in range(5)]))
    committer.commit()
    assert sink.shards == [(3, 0), (2, 0)]
