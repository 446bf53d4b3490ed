"""The serving process's view of the model version: follow the Redis pointer without a restart
and without a failed request.

    background thread, every serving.pointer_check_s:
        read the pointer -> a different version? load it fully (serving.recall.load_assets:
        model, index, vocabularies) -> swap one reference
    request threads:
        take the reference once -> read the user's row of THAT version and the history
        (one pipelined round trip) -> user tower -> index search (serving.recall)

A request never waits for a load and never mixes two versions: it holds the assets it started
with, and the row it reads is keyed by that same version. The old version keeps serving until
the new one is completely in memory. publish keeps the previous version's rows in Redis
(redis.keep_versions >= 2), so requests still in flight on the old version find their rows; if
they were gone, those users would get the cold-start answer, never an error.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

import redis

from serving.recall import RecallResult, VersionAssets, load_assets, search, user_vector
from twotower import redis_keys
from twotower.config import Settings

log = logging.getLogger(__name__)


class NotReady(RuntimeError):
    """No version is loaded yet (nothing published, or the first load failed)."""


@dataclass(frozen=True)
class PointerState:
    """What the follower last saw and did."""

    pointer_version: str | None
    loaded_version: str | None
    last_check_ms: int
    last_error: str | None


class VersionFollower:
    """Holds the loaded version's assets and swaps them when the pointer moves."""

    def __init__(self, settings: Settings, client: redis.Redis, on_switch: Callable[[str | None, str], None] | None = None):
        self.settings = settings
        self.client = client
        self.prefix = settings.redis.prefix
        self._assets: VersionAssets | None = None
        self._pointer: str | None = None
        self._error: str | None = None
        self._last_check_ms = 0
        self._load_lock = threading.Lock()
        self._on_switch = on_switch

    # --- version following ------------------------------------------------------------------------

    @property
    def assets(self) -> VersionAssets | None:
        return self._assets

    def state(self) -> PointerState:
        loaded = self._assets.version if self._assets else None
        return PointerState(self._pointer, loaded, self._last_check_ms, self._error)

    def check_pointer(self) -> bool:
        """Read the pointer; when it names another version, load that version and swap.

        Returns True when a swap happened. A version that fails to load is logged and retried
        at the next check; the loaded version keeps serving meanwhile.
        """
        with self._load_lock:  # one load at a time; requests never take this lock
            self._last_check_ms = int(time.time() * 1000)
            current = self.client.hget(redis_keys.pointer(self.prefix), "current")
            version = current.decode() if current else None
            self._pointer = version
            loaded = self._assets.version if self._assets else None
            if version is None or version == loaded:
                self._error = None
                return False
            try:
                raw = self.client.get(redis_keys.version_meta(self.prefix, version))
                if raw is None:
                    raise RuntimeError(f"the pointer names version {version} but its metadata key is missing")
                t0 = time.time()
                assets = load_assets(json.loads(raw)["artifact_dir"], version)
            except Exception as exc:  # noqa: BLE001 - keep serving the loaded version whatever went wrong
                message = f"cannot load version {version}: {type(exc).__name__}: {exc}"
                if message != self._error:
                    log.error("serving: %s; still serving %s", message, loaded or "nothing")
                self._error = message
                return False
            self._assets = assets  # the swap: one reference assignment, atomic for readers
            self._error = None
            log.info(
                "serving: now serving version %s (was %s); loaded in %.2f s while the old version kept serving",
                version, loaded or "nothing", time.time() - t0,
            )  # fmt: skip
        if self._on_switch:
            self._on_switch(loaded, version)
        return True

    def run(self, stop: threading.Event, interval_s: float) -> None:
        """Check the pointer every ``interval_s`` until ``stop`` is set (a background thread's body)."""
        while not stop.wait(interval_s):
            try:
                self.check_pointer()
            except redis.RedisError as exc:
                log.warning("serving: cannot read the version pointer from Redis (%s); still serving %s", exc, self.state().loaded_version)

    # --- requests ---------------------------------------------------------------------------------

    def recall(self, user_id: str, k: int) -> RecallResult:
        """Top-``k`` for an already validated ``user_id`` from the loaded version.

        Raises NotReady when no version is loaded.
        """
        assets = self._assets  # one read: the whole request uses this version
        if assets is None:
            raise NotReady(self._error or "no model version is published yet (run `make run` or the nightly DAG first)")
        pipe = self.client.pipeline(transaction=False)
        pipe.hget(redis_keys.user_row(self.prefix, assets.version, user_id), "e")
        pipe.zrange(redis_keys.user_history(self.prefix, user_id), -assets.history_len, -1)
        row, members = pipe.execute()
        history = [redis_keys.history_item(m) for m in members]
        vec, hist = user_vector(assets, user_id, row, history)
        exclude = set(hist)
        items = search(assets, vec, exclude, k)  # widens nprobe itself when the probed lists hold too few
        return RecallResult(assets.version, user_id, row is not None, len(hist), items)

