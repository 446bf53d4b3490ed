"""Seeded synthetic interactions with realistic structure, for scale benchmarks and as the
fallback input of ``make run`` when MovieLens-100K is not on the machine.

Structure:
  * items belong to ``n_clusters`` taste clusters; popularity within the corpus is power-law
    (Zipf exponent ``zipf_a``);
  * each user has a mixture over 1-3 clusters and a Poisson-like activity level, so some users
    return often and most rarely;
  * tastes drift: at a per-user random time the user's mixture moves to a neighbouring cluster,
    which is what hourly user-row updates should catch;
  * attributes: items carry ``cluster=<c>`` and ``pop=<bucket>``; users carry ``segment=<s>``.

Pure apart from the optional write: same arguments, same events.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from twotower.contracts import day_start_ms


@dataclass(frozen=True)
class SyntheticSpec:
    n_users: int = 2000
    """Users."""
    n_items: int = 1000
    """Items (the corpus)."""
    n_events: int = 100_000
    """Interactions in total."""
    n_clusters: int = 20
    """Taste clusters."""
    days: int = 30
    """Event-time span in days, ending at ``end_day`` (inclusive)."""
    end_day: dt.date = dt.date(2024, 1, 30)
    """Last day of the generated events."""
    zipf_a: float = 1.1
    """Power-law exponent of item popularity."""
    drift_prob: float = 0.5
    """Share of users whose taste drifts once during the span."""
    seed: int = 7
    """Random seed."""


def generate(spec: SyntheticSpec) -> tuple[pa.Table, dict[str, list[str]], dict[str, list[str]]]:
    """Events (generic columns: event_id, user_id, item_id, event_type, ts in ms, weight) plus
    user and item attribute token lists. Events are sorted by ts."""
    rng = np.random.default_rng(spec.seed)
    n_u, n_i, n_c = spec.n_users, spec.n_items, spec.n_clusters
    item_cluster = rng.integers(0, n_c, n_i)
    pop = 1.0 / np.arange(1, n_i + 1) ** spec.zipf_a
    pop = pop[rng.permutation(n_i)]  # popularity rank independent of id
    pop /= pop.sum()
    # per cluster: items and their within-cluster popularity
    cluster_items = [np.flatnonzero(item_cluster == c) for c in range(n_c)]
    cluster_p = [pop[ix] / pop[ix].sum() if ix.size else ix for ix in cluster_items]

    activity = rng.pareto(1.5, n_u) + 1.0
    activity /= activity.sum()
    users = rng.choice(n_u, size=spec.n_events, p=activity)
    start_ms = day_start_ms(spec.end_day) - (spec.days - 1) * 86_400_000
    span_ms = spec.days * 86_400_000
    ts = np.sort(rng.integers(start_ms, start_ms + span_ms, spec.n_events))
    ts = ts[rng.permutation(spec.n_events)]  # timestamps independent of user draw order
    order = np.argsort(ts, kind="stable")
    users, ts = users[order], ts[order]

    home = rng.integers(0, n_c, (n_u, 2))
    drift_at = np.where(rng.random(n_u) < spec.drift_prob, rng.integers(start_ms, start_ms + span_ms, n_u), np.iinfo(np.int64).max)
    drifted = ts >= drift_at[users]
    primary = np.where(drifted, (home[users, 0] + 1) % n_c, home[users, 0])
    cluster = np.where(rng.random(spec.n_events) < 0.75, primary, home[users, 1])
    explore = rng.random(spec.n_events) < 0.1  # 10% global-popularity exploration
    items = np.empty(spec.n_events, dtype=np.int64)
    for c in range(n_c):
        sel = np.flatnonzero((cluster == c) & ~explore)
        if sel.size and cluster_items[c].size:
            items[sel] = rng.choice(cluster_items[c], size=sel.size, p=cluster_p[c])
        elif sel.size:
            explore[sel] = True
    sel = np.flatnonzero(explore)
    items[sel] = rng.choice(n_i, size=sel.size, p=pop)

    user_ids = np.char.add("u", users.astype(str))
    item_ids = np.char.add("i", items.astype(str))
    event_ids = np.char.add("syn-", np.arange(spec.n_events).astype(str))
    table = pa.table(
        {
            "event_id": pa.array(event_ids.tolist(), pa.string()),
            "user_id": pa.array(user_ids.tolist(), pa.string()),
            "item_id": pa.array(item_ids.tolist(), pa.string()),
            "event_type": pa.array(["click"] * spec.n_events, pa.string()),
            "ts": pa.array(ts, pa.int64()),
            "weight": pa.array(np.ones(spec.n_events), pa.float64()),
        }
    )
    pop_bucket = np.digitize(pop, np.quantile(pop, [0.5, 0.9, 0.99]))
    item_attrs = {f"i{i}": [f"cluster={item_cluster[i]}", f"pop={pop_bucket[i]}"] for i in range(n_i)}
    user_attrs = {f"u{u}": [f"segment={home[u, 0] % 5}"] for u in range(n_u)}
    return table, user_attrs, item_attrs
