"""What the consumer already knows about its users' rows and histories, so an hour reads Redis
only for users it has not seen (or cannot vouch for). Write-through: Redis stays the truth.

Why: an hour's update needs each touched user's row and the item ids of their newest L history
events before the hour. Reading them back from Redis every hour cost more than everything else
the hour does (a script call, L item ids to map to the version's indices), while the consumer
itself wrote most of them an hour before. Keyed state in memory, with the store as the durable
copy, is how stream processors avoid that read.

An entry is what a read at the start of the user's NEXT hour would return:
    row      the stored row (StoredRow; None: no row in Redis for this version yet)
    hist     int32 [<= L] the version's item indices of the newest L events, oldest first
It is only ever kept when that is provably so:
  * it was read from Redis (streaming.state.read_users), then
  * each hour that touched the user wrote through streaming.state.apply_users, whose script
    reports ``exact``: every one of the hour's events was new to the history AND the history
    holds nothing else from the hour's start on. Then "newest L before the next hour" is
    "newest L before this hour" + the hour's events in (ts, member) order, the zset's order.
    A replayed hour (events already there), events of later hours already in the set (a new
    version replaying since its cutoff), or anything else another writer put there from the
    hour's start on: the user is dropped and read again next time;
  * a row written as planned updates the entry (w = the hour, n += events, f set once); a row
    the script refused (another writer got there first) drops the user.
The whole cache is dropped on anything that breaks the picture: a version switch (indices and
rows belong to one version), a partition revoke or assign (another member may write those
users), a restart (it is memory), and any error while an hour is applied. What it cannot see:
another process adding OLDER events to a user's history while this consumer owns the user. The
only such writer is the nightly publish, which runs before the pointer moves to its version, and
the move drops the cache; the version it is about to retire may compute a few hours from the
histories as they were without those events.

Bounded: at most ``max_users`` entries, least recently used first out (an evicted user is read
again). About 0.5 KB per user at L = 50, d = 64.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from streaming.state import StoredRow

log = logging.getLogger("streaming.consumer")


@dataclass(slots=True)
class CachedUser:
    """A user's row and history as a read at the start of their next hour would return them."""

    row: StoredRow | None
    hist: np.ndarray
    """int32 [<= L] item_idx (0: an item the version does not know), oldest first."""


class UserCache:
    """LRU map user_id -> CachedUser for one model version (see module docstring)."""

    def __init__(self, version: str, max_users: int):
        self.version = version
        self.max_users = max(0, int(max_users))
        self._users: OrderedDict[str, CachedUser] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._users)

    def get(self, user_id: str) -> CachedUser | None:
        entry = self._users.get(user_id)
        if entry is None:
            self.misses += 1
            return None
        self._users.move_to_end(user_id)
        self.hits += 1
        return entry

    def put(self, user_id: str, entry: CachedUser) -> None:
        if self.max_users == 0:
            return
        self._users[user_id] = entry
        self._users.move_to_end(user_id)
        while len(self._users) > self.max_users:
            self._users.popitem(last=False)

    def drop(self, user_id: str) -> None:
        self._users.pop(user_id, None)

    def clear(self) -> None:
        self._users.clear()

    def forget(self, why: str) -> None:
        """Drop every user, saying why in the log (another member may write them now)."""
        if self._users:
            log.info("%s: forgetting %d cached users (they are read from Redis again)", why, len(self._users))
            self._users.clear()

    def stats(self) -> dict[str, int]:
        """Hits, misses (Redis reads) and the current size."""
        return {"hits": self.hits, "misses": self.misses, "size": len(self._users)}


def next_history(hist: np.ndarray, added: list[int], history_len: int) -> np.ndarray:
    """``hist`` (oldest first) followed by ``added``, keeping the newest ``history_len`` (int32)."""
    if not added:
        return hist
    joined = np.concatenate([hist, np.asarray(added, dtype=np.int32)]) if len(hist) else np.asarray(added, dtype=np.int32)
    return joined[-history_len:].copy() if len(joined) > history_len else joined  # a copy: a view keeps all of joined
