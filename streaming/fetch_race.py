"""A mend for kafka-python 3.0.12's consumer, which can sleep 100 ms with records in its buffer.

``KafkaConsumer.poll`` runs ``_poll_once``, which asks ``Fetcher.fetch_records`` for records:

  1. drain the fetch responses already buffered;
  2. send new fetch requests for the partitions with nothing buffered;
  3. if nothing was drained, wait for the fetches in flight; if none are in flight, report
     "idle", and ``_poll_once`` then sleeps ``retry_backoff_ms`` (100 ms) before looking again.

The fetch responses arrive on kafka-python's own network thread. When one lands between 1 and 2,
its partitions count as "data buffered" in 2, so no request goes out for them; the finished fetch
is cleared, nothing is in flight, and 3 reports idle. The consumer then sleeps 100 ms while those
records sit in the buffer. It happens when the caller takes about a fetch's round trip between
polls, which is what the incremental consumer does while it parses a batch: on MovieLens it
stalled five times in a 2 s catch-up read, half a second in all (measured with a
``retry_backoff_ms`` of 5 ms instead: the stalls went away; that setting is not the mend, since
kafka-python also waits it between retries after errors, where 100 ms keeps it from hammering a
broker that is down).

The mend wraps that one consumer's ``fetch_records``: "idle" with a response buffered is not
idle, so ``poll`` looks again at once and drains it. Each look takes the buffered responses out,
so it cannot spin. kafka-python is pinned (pyproject), and the test of ``make_consumer`` checks
that the mend is in place, so an upgrade that changes these internals fails there, not in
production.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


def mend_idle_race(consumer: Any) -> bool:
    """Install the mend on ``consumer`` (a KafkaConsumer); False, with a warning, when this
    kafka-python lacks the internals it relies on (the consumer then works as it came)."""
    fetcher = getattr(consumer, "_fetcher", None)
    original = getattr(fetcher, "fetch_records", None)
    if original is None or not hasattr(fetcher, "_completed_fetches"):
        log.warning("this kafka-python has no Fetcher.fetch_records/_completed_fetches: its poll may stall 100 ms at times")
        return False

    def fetch_records(max_records: int | None = None, update_offsets: bool = True, timeout_ms: int | None = None):
        records, idle = original(max_records, update_offsets=update_offsets, timeout_ms=timeout_ms)
        return records, idle_unless_buffered(idle, fetcher._completed_fetches)

    fetch_records.mends_idle_race = True  # type: ignore[attr-defined]
    fetch_records.__wrapped__ = original  # type: ignore[attr-defined]
    fetcher.fetch_records = fetch_records
    return True


def idle_unless_buffered(idle: bool, buffered: Any) -> bool:
    """fetch_records's idle flag, corrected: a fetch response in ``buffered`` (the fetcher's
    completed fetches, a deque) means there is something to drain, so not idle (pure)."""
    return idle and not buffered
