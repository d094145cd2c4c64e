"""Run a producer generator in its own thread, so it keeps working while the consumer waits on the GPU."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
_DONE = object()


def prefetch(source: Iterable[T], depth: int) -> Iterator[T]:
    """Yield what `source` yields, produced up to `depth` items ahead in a background thread.

    The decode pool is pull-driven: while the main thread blocks on a forward pass, nobody hands
    the workers new files or collects their results, and they go idle (ViT-L/14 ran at 1,000
    images/s with 16 workers that could decode 1,500). Exceptions reach the consumer; a consumer
    that stops early stops the producer at its next item."""
    out: queue.Queue[object] = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in source:
                if not put(item):
                    return
        except BaseException as exc:  # re-raised in the consumer
            put(exc)
            return
        put(_DONE)

    thread = threading.Thread(target=produce, name="prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = out.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        thread.join(timeout=5)
