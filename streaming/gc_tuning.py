"""How often the incremental consumer's processes run Python's cyclic garbage collector.

The reading thread makes several container objects per record (kafka-python's record, the
parsed dict, the Event and its buffer entry) and the applier several per user-hour. With the
default thresholds (a young collection every 700 net allocations, an older one every 10 of
those) the collector runs thousands of times a second, and each older pass walks every event
still buffered for an open hour. The consumer creates almost no reference cycles (its objects
are freed by reference counting), so collecting every 50,000 allocations costs nothing in
memory and, measured on the 2-core machine, lets the sparse synthetic stream through about 15%
faster (benchmarks/RESULTS.md, stream throughput).
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

YOUNG_OBJECTS = 50_000
"""Net container allocations between young-generation collections (Python's default: 700)."""
OLDER_EVERY = 20
"""Collections of a generation between collections of the next one (Python's default: 10)."""


def set_consumer_thresholds() -> tuple[int, int, int]:
    """Apply the consumer's thresholds to this process; returns the previous ones."""
    before = gc.get_threshold()
    gc.set_threshold(YOUNG_OBJECTS, OLDER_EVERY, OLDER_EVERY)
    return before


@contextmanager
def consumer_thresholds() -> Iterator[None]:
    """The consumer's thresholds for the duration of a run, the previous ones restored after
    (the consumer also runs inside other programs: the CLI, an Airflow task, tests)."""
    before = set_consumer_thresholds()
    try:
        yield
    finally:
        gc.set_threshold(*before)
