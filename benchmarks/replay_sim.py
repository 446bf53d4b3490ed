"""In-memory temporal replay: the event log, next-hour queries, the variants' user vectors and
the hourly user-row updates (benchmarks.temporal_replay drives it).

Protocol (what "next-hour hit@50" means here). Time is cut into UTC event-time hours
``[t, t + 1 h)``. For a target hour t of the replay:

  * queries: every user with at least one event in hour t whose TARGETS are not empty;
  * targets: the distinct items of the user's events in hour t that the user had not
    interacted with before t (a seen item is excluded from the ranking, so it could never be
    hit); an item the scoring model does not know stays a target and counts as a miss;
  * seen set: every item of the user's events with ts < t, the whole log (before and after the
    cutoff), for every variant alike, so all variants answer the same queries;
  * ranking: exact inner product of the user vector with every item vector of the model's
    corpus (no ANN index), seen items excluded, top 50;
  * hit@50 of a query: 1 when at least one target is in the top 50; recall@50: the share of
    the targets in the top 50, out of min(|targets|, 50).
  * a variant's hit@50 is the mean over all queries of all replayed hours (hours without a
    query contribute nothing).

State used to answer hour t (everything strictly before t; nothing of hour t leaks in):

  * history: the user's last L events with ts < t in (ts, event_id) order, oldest first,
    items the model does not know skipped (as serving.recall.user_vector does); "as of the
    cutoff" variants use ts < cutoff instead;
  * ID row: the row the hourly path wrote for this version through hour t - 1 if any, else
    the model's own row for a vocabulary user, else the out-of-vocabulary row 0 (the same
    choice serving makes from Redis: publish writes the model's row of every vocabulary user);
  * attributes: the model's attribute row of the user's vocabulary index (none when unknown).

The hourly row updates (``HourlyRows``) call the product's own update code,
streaming.hour.plan_users and streaming.hour.compute_rows (hence streaming.update.run_jobs),
with the hour's events grouped by streaming.windows.events_by_user and histories as of the
hour's start. The rows live in a dict here instead of Redis: what is measured is model quality,
and the consumer's Kafka/Redis plumbing is exactly-once (its own tests prove the rows equal an
uninterrupted run), so it cannot change the rows. One simplification: an hour's rows are used
from the start of the next hour, while the real consumer writes them once the watermark has
passed the hour's end plus the allowed lateness (``allowed_lateness_s``, 10 min by default).
"""

from __future__ import annotations

import bisect
import datetime as dt
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import pyarrow as pa
import torch

from models.features import history_tensor
from models.ranking import exact_topk, mask_and_topk
from streaming.events import Event
from streaming.hour import UPDATE, compute_rows, plan_users
from streaming.state import StoredRow
from streaming.version import LoadedVersion
from streaming.windows import Buffered, events_by_user
from twotower.config import IncrementalConfig
from twotower.contracts import day_of_ms

HOUR_MS = 3_600_000
DAY_MS = 86_400_000
K = 50


def hour_start(ts_ms: int) -> int:
    """Start (epoch ms) of the UTC hour holding ``ts_ms``. Pure."""
    return (int(ts_ms) // HOUR_MS) * HOUR_MS


def cutoff_day(ts_ms: np.ndarray, quantile: float) -> dt.date:
    """The logical date D whose data cutoff (midnight UTC after D, see jobs.prepare) is the
    midnight nearest to the ``quantile`` of the event times. Pure."""
    q = float(np.quantile(np.asarray(ts_ms, dtype=np.float64), quantile))
    midnight = int(round(q / DAY_MS)) * DAY_MS
    return day_of_ms(midnight) - dt.timedelta(days=1)


@dataclass(frozen=True)
class Query:
    """One user in one target hour: what they did (targets) and what they had done (seen)."""

    user_id: str
    targets: tuple[str, ...]
    """Distinct item ids of the hour not seen before it, in first-occurrence order."""
    seen: frozenset[str]
    """Item ids of all the user's events before the hour."""


@dataclass
class _UserLog:
    ts: list[int] = field(default_factory=list)
    items: list[str] = field(default_factory=list)


class EventLog:
    """All events of a stream in memory, ordered by (ts, event_id), indexed by user and by hour.

    ``events`` has the raw columns event_id, user_id, item_id, event_type, ts (epoch ms) and
    weight (null = 1.0); duplicate event ids keep their first row in (ts, event_id) order.
    """

    def __init__(self, events: pa.Table):
        ts = events["ts"].to_numpy().astype(np.int64)
        eid = np.asarray(events["event_id"].to_pylist(), dtype=object)
        order = np.lexsort((eid.astype(str), ts))
        weight = events["weight"].to_pylist() if "weight" in events.column_names else [None] * len(ts)
        etype = events["event_type"].to_pylist() if "event_type" in events.column_names else ["event"] * len(ts)
        users, items = events["user_id"].to_pylist(), events["item_id"].to_pylist()
        self.events: list[Event] = []
        self._users: dict[str, _UserLog] = {}
        self._hours: dict[int, list[Event]] = {}
        seen_ids: set[str] = set()
        for i in order:
            if eid[i] in seen_ids:
                continue
            seen_ids.add(eid[i])
            w = 1.0 if weight[i] is None else float(weight[i])
            e = Event(str(eid[i]), users[i], items[i], etype[i], int(ts[i]), w)
            self.events.append(e)
            u = self._users.setdefault(e.user_id, _UserLog())
            u.ts.append(e.ts)
            u.items.append(e.item_id)
            self._hours.setdefault(hour_start(e.ts), []).append(e)

    @property
    def ts(self) -> np.ndarray:
        """int64 [N] event times, ascending."""
        return np.fromiter((e.ts for e in self.events), dtype=np.int64, count=len(self.events))

    def history(self, user_id: str, before_ms: int, n: int) -> list[str]:
        """Item ids of the user's last ``n`` events with ts < ``before_ms``, oldest first."""
        u = self._users.get(user_id)
        if u is None or n <= 0:
            return []
        end = bisect.bisect_left(u.ts, before_ms)
        return u.items[max(0, end - n) : end]

    def seen(self, user_id: str, before_ms: int) -> set[str]:
        """Distinct item ids of the user's events with ts < ``before_ms``."""
        u = self._users.get(user_id)
        return set() if u is None else set(u.items[: bisect.bisect_left(u.ts, before_ms)])

    def hour_events(self, hour_ms: int) -> list[Event]:
        """Events of the hour starting at ``hour_ms``, in (ts, event_id) order."""
        return list(self._hours.get(hour_ms, []))

    def users_before(self, before_ms: int) -> set[str]:
        """Users with at least one event before ``before_ms``."""
        return {uid for uid, u in self._users.items() if u.ts[0] < before_ms}

    def between(self, start_ms: int, end_ms: int) -> list[Event]:
        """Events with start_ms <= ts < end_ms."""
        ts = [e.ts for e in self.events]
        return self.events[bisect.bisect_left(ts, start_ms) : bisect.bisect_left(ts, end_ms)]


def next_hour_queries(log: EventLog, hour_ms: int) -> list[Query]:
    """The queries of target hour ``hour_ms`` (see the module docstring), users in sorted order."""
    by_user: dict[str, list[str]] = {}
    for e in log.hour_events(hour_ms):
        by_user.setdefault(e.user_id, []).append(e.item_id)
    out = []
    for uid in sorted(by_user):
        seen = log.seen(uid, hour_ms)
        targets = tuple(dict.fromkeys(i for i in by_user[uid] if i not in seen))
        if targets:
            out.append(Query(uid, targets, frozenset(seen)))
    return out


def hits(topk: np.ndarray, targets: Sequence[Sequence[int]], k: int = K) -> tuple[np.ndarray, np.ndarray]:
    """(hit [Q] in {0, 1}, recall [Q]) of top-k lists ``topk[Q, >=k]`` (item_idx, 0 = nothing)
    against each query's target item_idx (0 = unknown to the model: never a hit). Pure."""
    hit = np.zeros(len(targets), dtype=np.float64)
    recall = np.zeros(len(targets), dtype=np.float64)
    for q, tgt in enumerate(targets):
        top = set(int(x) for x in topk[q, :k] if x > 0)
        found = sum(1 for t in tgt if t > 0 and t in top)
        hit[q] = float(found > 0)
        recall[q] = found / max(1, min(len(tgt), k))
    return hit, recall


def _idx(version: LoadedVersion, item_ids) -> list[int]:
    return [version.item_index.get(i, 0) for i in item_ids]


@torch.no_grad()
def user_vectors(version: LoadedVersion, user_ids: list[str], rows: Mapping[str, np.ndarray], hists: list[list[str]]) -> np.ndarray:
    """User vectors float32 [U, d] as serving computes them (see the module docstring):
    the row from ``rows`` (the hourly path's) or the model's, attributes, known history items."""
    user_idx = [version.user_index.get(u, 0) for u in user_ids]
    id_rows = np.stack([rows[u] if u in rows else version.model_row(i) for u, i in zip(user_ids, user_idx)])
    hist = history_tensor([[i for i in _idx(version, h) if i > 0][-version.history_len :] for h in hists], version.history_len)
    vecs = version.model.user_vectors_from_rows(torch.from_numpy(id_rows), version.attrs_of(user_idx), hist)
    return vecs.numpy().astype(np.float32)


def rank_model(version: LoadedVersion, queries: list[Query], rows: Mapping[str, np.ndarray], hists: list[list[str]]) -> tuple[np.ndarray, np.ndarray]:
    """(hit, recall) per query of ``version`` scored with the given rows and histories."""
    vecs = user_vectors(version, [q.user_id for q in queries], rows, hists)
    seen = [np.array([i for i in _idx(version, q.seen) if i > 0], dtype=np.int64) for q in queries]
    topk = exact_topk(vecs, version.item_vectors.numpy(), seen, K)
    return hits(topk, [_idx(version, q.targets) for q in queries])


def rank_popularity(counts: np.ndarray, item_index: Mapping[str, int], queries: list[Query]) -> tuple[np.ndarray, np.ndarray]:
    """(hit, recall) per query of the popularity ranking ``counts[n_items + 1]`` (by item_idx)."""
    scores = np.tile(counts[1:].astype(np.float64), (len(queries), 1))
    seen = [np.array([item_index[i] for i in q.seen if i in item_index], dtype=np.int64) for q in queries]
    topk = mask_and_topk(scores, seen, K)
    return hits(topk, [[item_index.get(i, 0) for i in q.targets] for q in queries])


def popularity_counts(events: list[Event], item_index: Mapping[str, int]) -> np.ndarray:
    """Interaction count per item_idx (int64 [n_items + 1]) of ``events``. Pure."""
    counts = np.zeros(max(item_index.values(), default=0) + 1, dtype=np.int64)
    for e in events:
        i = item_index.get(e.item_id, 0)
        if i:
            counts[i] += 1
    return counts


class HourlyRows:
    """The user-ID rows of one version as the hourly path keeps them, in memory instead of Redis.

    ``apply_hour`` is what streaming.hour.apply_hour does for a closed hour, minus the I/O:
    group the hour's events by user (streaming.windows.events_by_user), read histories as of the
    hour's start, classify users (streaming.hour.plan_users), run the update
    (streaming.hour.compute_rows) and store the rows of UPDATE users with the hour and the count
    of events absorbed, as the Redis script does.
    """

    def __init__(self, version: LoadedVersion, cfg: IncrementalConfig, log: EventLog):
        self.version, self.cfg, self.log = version, cfg, log
        self.stored: dict[str, StoredRow] = {}
        self.users_updated = 0
        self.new_users = 0

    def apply_hour(self, hour_ms: int) -> int:
        """Apply the hour starting at ``hour_ms``; returns the number of rows written."""
        events = self.log.hour_events(hour_ms)
        if not events:
            return 0
        by_user = events_by_user([Buffered(0, n, e, 0, 0, 0) for n, e in enumerate(events)])
        hists = {u: np.array(self.version.item_idx(self.log.history(u, hour_ms, self.version.history_len)), dtype=np.int32) for u in by_user}
        plans = plan_users(hour_ms, by_user, self.stored, hists, self.version, self.cfg.min_events_new_user)
        new_rows = compute_rows(self.version, plans, hists, self.cfg)
        written = 0
        for p in plans:
            if p.kind != UPDATE:
                continue
            before = self.stored.get(p.user_id)
            self.stored[p.user_id] = StoredRow(new_rows[p.user_id], hour_ms, (before.n if before else 0) + p.n_known)
            written += 1
            self.new_users += int(p.new_user)
        self.users_updated += written
        return written

    def rows(self) -> dict[str, np.ndarray]:
        """user_id -> current row (float32 [e]) of every user the hourly path has written."""
        return {u: r.e for u, r in self.stored.items()}


def with_oov_rows(version: LoadedVersion, trained_users: set[str]) -> LoadedVersion:
    """A copy of ``version`` whose vocabulary users outside ``trained_users`` carry the
    out-of-vocabulary row 0 instead of their never-trained (randomly initialised) ID row.

    Diagnostic only: prepare gives every user of the attribute table a vocabulary index, so a
    user who first acts after the cutoff is "known" to the version with a random row, which
    serving reads and the hourly update starts from. This copy shows what replacing such rows
    by the trained cold-start row would do. The version passed in is not modified.
    """
    import copy
    import dataclasses

    model = copy.deepcopy(version.model)
    untrained = [i for u, i in version.user_index.items() if u not in trained_users and i > 0]
    with torch.no_grad():
        table = model.user_id_embedding.weight
        if untrained:
            table[torch.tensor(untrained, dtype=torch.long)] = table[0].clone()
    return dataclasses.replace(version, model=model, version=version.version + "+oov-rows")
