"""The prefetch thread: order kept, bounded read-ahead, errors reach the consumer, an early stop stops it."""

from __future__ import annotations

import threading
import time

import pytest

from pipeline.decode.prefetch import prefetch


def test_items_arrive_in_order_and_the_producer_runs_ahead() -> None:
    produced: list[int] = []

    def source():
        for i in range(10):
            produced.append(i)
            yield i

    stream = prefetch(source(), depth=3)
    assert next(stream) == 0
    time.sleep(0.2)  # the consumer is busy: the producer fills the queue meanwhile, no further
    assert 3 <= len(produced) <= 5
    assert list(stream) == list(range(1, 10))


def test_an_error_in_the_producer_reaches_the_consumer() -> None:
    def source():
        yield 1
        raise RuntimeError("all decode slots are held")

    stream = prefetch(source(), depth=2)
    assert next(stream) == 1
    with pytest.raises(RuntimeError, match="slots"):
        next(stream)


def test_a_consumer_that_stops_early_stops_the_producer() -> None:
    def source():
        i = 0
        while True:
            yield i
            i += 1

    before = threading.active_count()
    stream = prefetch(source(), depth=2)
    assert next(stream) == 0
    stream.close()
    assert threading.active_count() == before
