"""A published deployment for the serving tests, built through the real pipeline.

MovieLens-100K users 1..120 (the ``ml_small_raw_dir`` fixture's raw partitions, linked into a
private state dir) -> jobs.nightly.run_nightly (real Spark prepare, PyTorch training at a few
epochs, evaluation, gate, Faiss index, Redis publish) under a private Redis prefix. A second
version (another training seed: another version name) can be built from the same prepared
partition and published, which moves the pointer the way a nightly run does.
"""

from __future__ import annotations

import atexit
import datetime as dt
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow.dataset as ds
import pyarrow.compute as pc

from twotower.config import Settings, load_settings
from twotower.contracts import day_of_ms

SMALL_EPOCHS = 2


@dataclass(frozen=True)
class Deployment:
    """A published version: its settings, logical date and the nightly result."""

    settings: Settings
    day: dt.date
    version: str
    artifact_dir: Path
    users: list[str]  # every user id of the slice
    items: list[str]  # every item id of the corpus


def small_settings(state_dir: Path) -> Settings:
    """Settings for a private, small deployment (own state dir, own Redis prefix)."""
    s = load_settings().replace("paths", state_dir=state_dir)
    s = s.replace("redis", prefix=f"tt-test-serving-{uuid.uuid4().hex[:8]}")
    s = s.replace("train", epochs=SMALL_EPOCHS, threads=1)
    return s.replace("index", eval_queries=200)


def last_day(raw_dir: Path) -> dt.date:
    """The UTC day of the newest raw event."""
    table = ds.dataset(raw_dir, format="parquet", partitioning="hive", exclude_invalid_files=True).to_table(columns=["ts"])
    return day_of_ms(int(pc.max(table["ts"]).as_py()))


def publish_small(state_dir: Path, raw_dir: Path) -> Deployment:
    """Run the nightly pipeline on ``raw_dir`` (linked, not copied) and publish; returns the deployment."""
    import pyarrow.parquet as pq

    from jobs.nightly import run_nightly

    settings = small_settings(state_dir)
    settings.paths.state_dir.mkdir(parents=True, exist_ok=True)
    settings.paths.raw_dir.symlink_to(raw_dir, target_is_directory=True)
    day = last_day(raw_dir)
    result = run_nightly(settings, day)
    assert result.published, f"the small nightly run did not publish: {result.status} {result.gate} {result.error}"
    art = Path(result.artifact_dir)
    users = pq.read_table(art / "vocab_users.parquet", columns=["user_id"])["user_id"].to_pylist()
    items = pq.read_table(art / "vocab_items.parquet", columns=["item_id"])["item_id"].to_pylist()
    return Deployment(settings, day, result.version, art, users, items)


def publish_other_version(dep: Deployment, seed: int) -> str:
    """Train, evaluate, index and publish another version from the same prepared partition
    (a different seed gives a different version name); returns it. Force: same data cutoff."""
    from jobs.nightly import stage_evaluate, stage_index, stage_publish, stage_train

    settings = dep.settings.replace("train", seed=seed, epochs=1)
    art = stage_train(settings, dep.day)
    stage_evaluate(settings, art, dep.day)
    stage_index(settings, art, dep.day)
    out = stage_publish(settings, art, force=True)
    assert out["switched"], out
    return art.name


# --- a real server on a free port ---------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn serving ``app`` on 127.0.0.1:<free port> in a thread, for real HTTP tests."""

    def __init__(self, app, port: int | None = None):
        import uvicorn

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name=f"uvicorn-{self.port}", daemon=True)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"uvicorn did not start on port {self.port}")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


# --- one deployment per test session, shared by the serving test files ---------------------------

_DEPLOYMENTS: dict[str, Deployment] = {}


def shared_deployment(raw_dir: Path, tmp_root: Path) -> Deployment:
    """The session's published ML-100K slice, built on first use (the nightly run takes minutes)."""
    key = str(raw_dir)
    if key not in _DEPLOYMENTS:
        dep = publish_small(tmp_root / "state", raw_dir)
        _DEPLOYMENTS[key] = dep
        atexit.register(_forget_prefix, dep.settings)
    return _DEPLOYMENTS[key]


def _forget_prefix(settings: Settings) -> None:
    """Delete the shared deployment's Redis keys when the test process ends."""
    import redis

    client = redis.Redis.from_url(settings.redis.url)
    try:
        delete_prefix(client, settings.redis.prefix)
    except redis.RedisError:
        pass
    finally:
        client.close()


def clone_deployment(dep: Deployment, client) -> Deployment:
    """The same version published again under a fresh prefix (jobs.publish), with the nightly
    run record copied (jobs.runs), so a test can change incremental state without touching
    the other tests' prefix."""
    import json as _json

    from jobs.publish import publish_version
    from jobs.runs import record_run
    from twotower import redis_keys

    settings = dep.settings.replace("redis", prefix=f"tt-test-serving-{uuid.uuid4().hex[:8]}")
    out = publish_version(settings, dep.artifact_dir, client=client)
    assert out["switched"], out
    for raw in reversed(client.lrange(redis_keys.runs(dep.settings.redis.prefix), 0, -1)):
        run = _json.loads(raw)
        record_run(settings, run["kind"], run["logical_date"], run["started_at_epoch"], run["finished_at_epoch"],
                   run["status"], run["details"], client=client)  # fmt: skip
    return Deployment(settings, dep.day, dep.version, dep.artifact_dir, dep.users, dep.items)


def delete_prefix(client, prefix: str) -> None:
    for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        client.delete(key)


# --- incremental consumer state, written through the consumer's own state API --------------------

HOUR_MS = 3_600_000


@dataclass(frozen=True)
class IncrementalScenario:
    """What the hourly path last did, as the consumer records it (streaming.state)."""

    version: str
    last_window_ms: int  # start of the last applied event-time hour
    published_at_ms: int  # wall clock of the last incremental publish
    watermark_ms: int
    users: list[int]  # users updated per hour, oldest first, ending at last_window_ms
    events: list[int]  # events applied per hour, same hours
    lag: dict[int, int]
    dead: dict[int, int]


def scenario(version: str, now_ms: int, publish_age_s: float, hours: int = 48, seed: int = 7) -> IncrementalScenario:
    """A deterministic state: ``hours`` applied hours ending 1-2 h before now, last published
    ``publish_age_s`` ago, four partitions with some lag and dead letters."""
    import numpy as np

    rng = np.random.default_rng(seed)
    last = (now_ms - 2 * HOUR_MS) - (now_ms - 2 * HOUR_MS) % HOUR_MS
    events = [int(x) for x in rng.integers(20, 400, size=hours)]
    users = [max(1, e // int(rng.integers(2, 6))) for e in events]
    return IncrementalScenario(
        version=version,
        last_window_ms=last,
        published_at_ms=int(now_ms - publish_age_s * 1000),
        watermark_ms=last + HOUR_MS + 11 * 60_000,
        users=users,
        events=events,
        lag={0: 5, 1: 0, 2: 12, 3: 3},
        dead={0: 2, 1: 0, 2: 1, 3: 0},
    )


def write_incremental_state(client, prefix: str, sc: IncrementalScenario) -> None:
    """Record ``sc`` with streaming.state.StreamState's writers (what the consumer calls)."""
    from streaming.state import StreamState
    from streaming.windows import Checkpoint

    state = StreamState(client, prefix)
    n = len(sc.events)
    for i in range(n):
        hour = sc.last_window_ms - (n - 1 - i) * HOUR_MS
        # split the hour's counts over two partitions, as a 2-partition consumer would record them
        per_partition = {
            0: {"users": sc.users[i] // 2, "events": sc.events[i] // 2},
            1: {"users": sc.users[i] - sc.users[i] // 2, "events": sc.events[i] - sc.events[i] // 2},
        }
        state.record_window(sc.version, hour, per_partition)
    ckpts = {p: Checkpoint(offset=100 + p, dead=d, applied_through=sc.last_window_ms) for p, d in sc.dead.items()}
    state.save_checkpoints(sc.version, ckpts, history_retention_ms=7 * 24 * HOUR_MS)
    state.set_lag(sc.lag)
    state.set_status(sc.version, sc.watermark_ms, sc.last_window_ms, sc.published_at_ms, sc.published_at_ms)


def write_archive_state(client, prefix: str, checked_ms: int, newest_event_ts: int) -> None:
    """The archiver's status record (streaming.archiver.archive_status) of a run at ``checked_ms``
    that landed events up to ``newest_event_ts``."""
    import json

    from streaming.archiver import ArchiveReport, archive_status
    from twotower import redis_keys

    status = archive_status(None, ArchiveReport(events_written=42), newest_event_ts, checked_ms)
    client.set(redis_keys.archive(prefix), json.dumps(status))


# --- headless Chromium (Debian's package; infra/install_chromium.sh installs it) -----------------

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars", "--disable-dev-shm-usage",
)  # fmt: skip


def run_chromium(args: list[str], profile_dir: Path, timeout_s: float = 90) -> str:
    """Run headless Chromium with a fresh profile; returns stdout. Fails the test when the
    browser is missing or exits non-zero (a missing browser is an error, not a skip)."""
    import subprocess

    if not CHROMIUM.exists():
        raise AssertionError(f"{CHROMIUM} is missing: run `bash infra/install_chromium.sh` (the Makefile's test target does)")
    profile_dir.mkdir(parents=True, exist_ok=True)
    cmd = [str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={profile_dir}", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise AssertionError(f"chromium exited {done.returncode}: {done.stderr[-2000:]}")
    return done.stdout


def dump_dom(url: str, profile_dir: Path, budget_ms: int = 10_000) -> str:
    """The page's DOM after its scripts ran (virtual time: fetches complete, timers fast-forward)."""
    return run_chromium([f"--virtual-time-budget={budget_ms}", "--dump-dom", url], profile_dir)


def screenshot(url: str, path: Path, profile_dir: Path, size: tuple[int, int] = (1280, 1400), budget_ms: int = 10_000) -> Path:
    """A PNG of the rendered page at ``size``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    run_chromium(
        [f"--virtual-time-budget={budget_ms}", f"--window-size={size[0]},{size[1]}", f"--screenshot={path}", url], profile_dir
    )
    if not path.exists() or path.stat().st_size == 0:
        raise AssertionError(f"chromium wrote no screenshot to {path}")
    return path


@dataclass
class Element:
    tag: str
    attrs: dict
    text: str = ""

    @property
    def classes(self) -> set[str]:
        return set((self.attrs.get("class") or "").split())

    @property
    def value(self) -> str | None:
        return self.attrs.get("data-value")


def elements_by_id(html: str) -> dict[str, Element]:
    """Every element with an id in a serialised DOM: tag, attributes, text content (descendants included)."""
    from html.parser import HTMLParser

    void = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
    found: dict[str, Element] = {}

    class Parser(HTMLParser):
        def __init__(self):
            super().__init__(convert_charrefs=True)
            self.stack: list[Element | None] = []

        def handle_starttag(self, tag, attrs):
            a = {k: (v if v is not None else "") for k, v in attrs}
            el = Element(tag, a) if "id" in a else None
            if el is not None:
                found[a["id"]] = el
            if tag not in void:
                self.stack.append(el)

        def handle_startendtag(self, tag, attrs):
            a = {k: (v if v is not None else "") for k, v in attrs}
            if "id" in a:
                found[a["id"]] = Element(tag, a)

        def handle_endtag(self, tag):
            if tag not in void and self.stack:
                self.stack.pop()

        def handle_data(self, data):
            for el in self.stack:
                if el is not None:
                    el.text += data

    Parser().feed(html)
    return found
