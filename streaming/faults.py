"""Fault injection for the exactly-once and fault tests: die with SIGKILL at a named point.

``TT_CRASH_AT=<point>:<n>`` kills the process (SIGKILL, no cleanup, like ``kill -9``) the n-th
time it reaches ``<point>`` (``TT_STREAM_CRASH_AT`` is read too, the name the consumer tests
first used). Unset (always, in production) it costs one dict lookup.

Points of the incremental consumer, in the order one hour's apply reaches them:

    mid_rows          half of the hour's users written, the rest not
    after_rows        every row and history of the hour written, counters and checkpoint not
    after_checkpoint  checkpoint stored, Kafka offsets not committed yet

Points of the nightly run (jobs.nightly), between its stages:

    nightly_after_prepare   prepared/dt=D complete, nothing trained
    nightly_after_train     the artifact directory complete, not evaluated
    nightly_after_index     evaluated, gated and indexed, nothing published
    nightly_mid_publish     after each pipelined batch of the publish (``:2`` = after the second)
"""

from __future__ import annotations

import os
import signal

ENVS = ("TT_CRASH_AT", "TT_STREAM_CRASH_AT")
_seen: dict[str, int] = {}


def crash_point(name: str) -> None:
    spec = next((os.environ[e] for e in ENVS if os.environ.get(e)), "")
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point != name:
        return
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
