"""Fault injection for the exactly-once tests: die with SIGKILL at a named point.

``TT_STREAM_CRASH_AT=<point>:<n>`` kills the process (SIGKILL, no cleanup, like ``kill -9``) the
n-th time it reaches ``<point>``. Unset (always, in production) it costs one dict lookup.
Points, in the order one hour's apply reaches them:

    mid_rows          half of the hour's users written, the rest not
    after_rows        every row and history of the hour written, counters and checkpoint not
    after_checkpoint  checkpoint stored, Kafka offsets not committed yet
"""

from __future__ import annotations

import os
import signal

ENV = "TT_STREAM_CRASH_AT"
_seen: dict[str, int] = {}


def crash_point(name: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point != name:
        return
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
