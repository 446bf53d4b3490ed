"""One typed configuration for the whole pipeline, with environment overrides.

Every address, path and knob the jobs, the stream consumer, the DAGs and the serving layer
use lives here. Defaults are the embedded single-machine setup (Spark ``local[*]``, Redis and a
Kafka-protocol broker on 127.0.0.1); production overrides them through the environment.

Override rule: a field ``section.name`` is read from ``TT_<SECTION>_<NAME>`` (upper case), e.g.
``TT_TRAIN_EPOCHS=20``. The well-known variables ``REDIS_URL``, ``KAFKA_BOOTSTRAP_SERVERS``,
``SPARK_MASTER`` and ``TT_STATE_DIR`` are honoured as well, because ops teams already set them.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def redact_url(url: str) -> str:
    """``url`` with the password of its authority part replaced by ``***`` (for logs and reprs)."""
    from urllib.parse import urlsplit

    try:
        password = urlsplit(url).password
    except ValueError:
        return url
    return url.replace(f":{password}@", ":***@", 1) if password else url


def _redacted_repr(obj: Any) -> str:
    """The dataclass repr with secrets masked: fields named in ``SECRET_FIELDS`` show ``***``
    when set, and fields named in ``URL_FIELDS`` lose the password they may carry."""
    shown = []
    for f in fields(obj):
        value = getattr(obj, f.name)
        if f.name in getattr(obj, "SECRET_FIELDS", ()) and value:
            value = "***"
        elif f.name in getattr(obj, "URL_FIELDS", ()):
            value = redact_url(value)
        shown.append(f"{f.name}={value!r}")
    return f"{type(obj).__name__}({', '.join(shown)})"


@dataclass(frozen=True)
class PathsConfig:
    state_dir: Path = PROJECT_ROOT / "state"
    """Root of everything the pipeline writes locally (raw, prepared, artifacts, logs). Ignored by git."""
    movielens_dir: Path = PROJECT_ROOT.parent / "shared" / "data" / "ml-100k"
    """Where the bundled MovieLens-100K files are read from (never copied into the repo)."""

    @property
    def raw_dir(self) -> Path:
        """Raw event Parquet, partitioned ``dt=YYYY-MM-DD/`` (hour is a column)."""
        return self.state_dir / "raw"

    @property
    def prepared_dir(self) -> Path:
        """Prepared training data, one directory per logical date ``dt=YYYY-MM-DD/``."""
        return self.state_dir / "prepared"

    @property
    def artifacts_dir(self) -> Path:
        """Model versions, one directory each: ``artifacts/<version>/``."""
        return self.state_dir / "artifacts"


@dataclass(frozen=True)
class SparkConfig:
    master: str = "local[*]"
    """Spark master URL; ``local[*]`` on one machine, a cluster URL in production."""
    shuffle_partitions: int = 8
    """spark.sql.shuffle.partitions; small for the local machine, raise on a cluster."""
    driver_memory: str = "4g"
    """spark.driver.memory for local mode."""


@dataclass(frozen=True)
class PrepareConfig:
    window_days: int = 400
    """W: days of raw data ending at the logical date that one nightly run trains on."""
    history_len: int = 50
    """L: items of history kept per training example and per user in Redis."""
    schema_version: int = 1
    """Bumped when the prepared Parquet layout changes."""
    rows_per_file: int = 2_000_000
    """Most rows per Parquet file of train/ and eval/ (more rows: more files, split by user);
    every other prepared table is always one file."""


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "youtubednn"
    """Tower architecture: ``youtubednn`` (ID + profile + pooled history) or ``dssm`` (ID + profile)."""
    dim: int = 64
    """Output embedding dimension d of both towers (L2-normalised)."""
    id_dim: int = 64
    """Width of the user-ID, item-ID and attribute embedding tables."""
    hidden: int = 256
    """Hidden width of each tower's MLP."""
    temperature: float = 0.05
    """tau in score = <u, v> / tau (0.05 beat 0.07 and 0.1 on MovieLens-100K)."""
    pooling: str = "decay"
    """History pooling: ``mean``, ``decay`` (exponential in position, most recent weighted most)
    or ``mean+decay`` (both, concatenated). ``decay`` gave +15% hit@50 over ``mean`` on ML-100K."""
    dropout: float = 0.1
    """Dropout inside the MLPs during training."""
    decay_half_life: float = 3.0
    """``decay`` pooling: an item's weight halves every this many items back from the most recent."""
    init_std: float = 0.1
    """Standard deviation of the normal init of the ID and attribute embedding tables."""


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 12
    """Passes over the training examples."""
    batch_size: int = 1024
    """In-batch softmax batch size (also the number of negatives per positive)."""
    lr: float = 1e-3
    """AdamW learning rate (peak rate under the cosine schedule)."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay. 0: it shrinks every embedding row at every step, rows of
    rare items that get no gradient included (0.1 was within noise on ML-100K)."""
    logq: bool = True
    """Apply the logQ sampling-bias correction (Yi et al., RecSys 2019)."""
    seed: int = 42
    """Seed for parameter init and batch order; same seed and data give the same model."""
    threads: int = 1
    """torch intra-op threads for training; 0 = every core the process may use. Set explicitly
    for the run: bitwise-identical weights need the same seed, data and threads. 1 by default
    because OpenMP threads on busy cores spin-wait each other: on 2 shared cores, 2 threads
    trained at ~600 samples/s against ~10,000 with 1. Raise it on a dedicated host."""
    lr_schedule: str = "constant"
    """``constant`` or ``cosine`` (linear warm-up, then cosine decay to 0 at the last step)."""
    warmup_frac: float = 0.0
    """``cosine``: fraction of all optimiser steps spent warming the learning rate up."""
    logq_source: str = "counts"
    """Where p_i for logQ comes from: ``counts`` (the prepared item frequencies) or
    ``streaming`` (Yi et al.'s hashed estimator, updated batch by batch)."""
    logq_weight: float = 1.0
    """Multiplier of log p_i in the correction (1 = the paper's correction)."""
    user_id_dropout: float = 0.1
    """Fraction of training examples whose user ID is replaced by row 0 (out-of-vocabulary),
    so that row 0 learns a cold-start user and the model leans on attributes and history.
    On ML-100K, 0.1 left warm-user hit@50 unchanged and raised it from 0.37 to 0.42 for users
    scored with row 0 (what a new user gets before the hourly path learns their row)."""
    extra_negatives: int = 0
    """Items drawn uniformly from the corpus per step as extra negatives beside the in-batch
    ones (mixed negative sampling); logQ then uses each candidate's expected draws per step."""


@dataclass(frozen=True)
class IndexConfig:
    target_recall: float = 0.95
    """nprobe is raised until ANN recall@100 against exact search reaches this."""
    recall_floor: float = 0.90
    """Below this measured recall the index is refused and nothing is published."""
    eval_queries: int = 1000
    """Sampled queries used to tune nprobe and measure recall."""
    use_gpu: str = "auto"
    """``auto`` (GPU when faiss sees one), ``yes`` or ``no``."""
    seed: int = 1234
    """Seed for k-means training and query sampling."""
    threads: int = 0
    """OpenMP threads Faiss uses on the CPU while building; 0 keeps Faiss's default (all cores)."""
    train_points_per_list: int = 64
    """Training sample per inverted list: the index trains on at most ``nlist`` x this many
    vectors, sampled with ``seed`` (Faiss's guidance is 39-256 per centroid; values below 39 are
    raised to 39). 1M items, nlist 4096: 262,144 training vectors instead of all 1M, which makes
    k-means about 4x faster for a recall@100 change inside the tuning noise. The PQ codebooks
    train on (at most 65,536 of) the same sample. 0 trains on every vector."""


@dataclass(frozen=True)
class GateConfig:
    metric: str = "hit@50"
    """Offline metric (exact search) the quality gate compares."""
    max_regression: float = 0.05
    """Largest relative drop of ``metric`` against the serving version that still publishes."""
    min_value: float = 0.0
    """Absolute floor of ``metric``; a model below it is never published."""


@dataclass(frozen=True, repr=False)
class RedisConfig:
    SECRET_FIELDS = ("password",)
    URL_FIELDS = ("url",)
    __repr__ = _redacted_repr

    url: str = "redis://127.0.0.1:6379/0"
    """Redis URL; ``rediss://`` for TLS. Env: REDIS_URL."""
    prefix: str = "tt"
    """Key prefix per deployment, so several deployments share one Redis."""
    keep_versions: int = 2
    """Versions kept in Redis: current plus previous (rollback). Older ones are deleted."""
    batch_size: int = 2000
    """Keys per pipelined round trip when publishing."""
    password: str = ""
    """Password when the URL carries none (from the environment only, TT_REDIS_PASSWORD; never logged)."""
    socket_timeout_s: float = 10.0
    """Socket connect and read timeout of every Redis call, seconds."""
    retries: int = 5
    """Retries of a Redis call after a connection error or timeout, with exponential backoff."""
    ssl_ca_certs: str = ""
    """CA bundle for ``rediss://`` when the server's certificate is not in the system store."""


@dataclass(frozen=True, repr=False)
class KafkaConfig:
    SECRET_FIELDS = ("sasl_password",)
    __repr__ = _redacted_repr

    bootstrap_servers: str = "127.0.0.1:9092"
    """Comma-separated brokers. Env: KAFKA_BOOTSTRAP_SERVERS."""
    topic: str = "interactions"
    """Input topic, keyed by user_id."""
    dead_letter_topic: str = "interactions.dlq"
    """Where events that fail validation go, with the reason."""
    partitions: int = 4
    """Partition count used when this project creates the topics."""
    group_id: str = "tt-incremental"
    """Consumer group of the incremental updater."""
    security_protocol: str = "PLAINTEXT"
    """PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL."""
    sasl_mechanism: str = ""
    """e.g. PLAIN or SCRAM-SHA-512 when SASL is used."""
    sasl_username: str = ""
    """SASL user (from the environment only)."""
    sasl_password: str = ""
    """SASL password (from the environment only; never logged)."""
    ssl_cafile: str = ""
    """CA bundle for SSL / SASL_SSL when the broker's certificate is not in the system store."""
    ssl_certfile: str = ""
    """Client certificate (PEM) for mutual TLS; empty = none."""
    ssl_keyfile: str = ""
    """Private key (PEM) of ``ssl_certfile``."""
    session_timeout_ms: int = 10_000
    """Consumer-group session timeout; a consumer killed without leaving is replaced after it.
    Joining a group takes about this long on the local broker, so tests set it low."""
    request_timeout_ms: int = 30_000
    """Timeout of one Kafka request (metadata, fetch, produce, commit)."""
    archiver_group_id: str = "tt-archiver"
    """Consumer group of the archiver (lands the topic as raw Parquet)."""
    max_partition_fetch_bytes: int = 256 * 1024
    """Most bytes one fetch takes from one partition (kafka-python's default is 1 MiB). Smaller
    keeps the partitions of a backlog in step in event time: an hour closes only when every
    partition has passed it, so reading one partition far ahead of the others only buffers
    events (memory) and delays the first applied hours."""


@dataclass(frozen=True)
class IncrementalConfig:
    allowed_lateness_s: int = 600
    """An event-time hour closes when the watermark passes its end plus this."""
    steps: int = 2
    """Optimiser steps per closed hour on the touched user-ID rows. 2 steps at lr 0.002 was the
    setting under which hourly updates did not lose to live histories alone on the mean of any
    replay window of either stream (benchmarks/RESULTS.md, temporal replay; the latest replay, with the
    numpy update and its permutation-window negatives, has it +0.0021 on MovieLens' 47 days and
    +0.0111 on the synthetic stream); DESIGN §9's 5 steps at 0.05 lost everywhere, and lr 0.01
    lost one query on MovieLens' first 3 days."""
    lr: float = 0.002
    """Adagrad learning rate for those steps."""
    min_events_new_user: int = 1
    """A user unknown to the current version gets a row after this many events."""
    history_retention_s: int = 2 * 86400
    """History events this recent (before the end of the last applied hour) are kept even beyond
    the newest L, so a new version replaying the hours since its cutoff reads exact histories."""
    snapshot_retention_s: int = 7 * 86400
    """How long per-partition position snapshots are kept for seeding a new version's replay."""
    idle_partition_s: int = 300
    """Continuous mode: a partition caught up this long stops holding the watermark back (0 = never).
    Bounded mode never does this, so its results are exactly reproducible."""
    checkpoint_interval_s: float = 10.0
    """Continuous mode: positions are stored at least this often even when no hour closes."""
    negatives: int = 512
    """Items each hour's softmax normalises over besides the users' own positives: a uniform
    sample of this many, seeded by the hour (identical in every attempt), with the log(N / S)
    correction; 0 or >= the corpus size = the full corpus. 512 keeps the update cost independent
    of corpus size (benchmarks/RESULTS.md: replay quality and consumer throughput)."""
    logit_budget: int = 16_000_000
    """Largest users x items logit matrix of one update chunk (floats); bounds memory on big corpora."""
    max_event_bytes: int = 64 * 1024
    """Messages larger than this are dead-lettered (payload_too_large)."""
    max_event_ahead_s: int = 3600
    """An event's ts may be at most this far after its Kafka record timestamp (producer clock skew)."""
    poll_max_records: int = 5000
    """Records per consumer poll."""
    applier: str = "thread"
    """Who applies closed hours: ``thread`` (in the consumer process) or ``process`` (a worker
    process, so the Kafka side and the update side do not share one interpreter lock; see
    streaming.applier). On the 2-core reference machine the process applies a backlog 8-18%
    faster (MovieLens 55,534 against 47,071 events/s), while the thread starts 1.5 s sooner and
    holds one copy of the model instead of two (benchmarks/RESULTS.md); ``process`` pays off
    most on hosts with cores to spare."""
    applier_workers: int = 1
    """Worker processes of the ``process`` applier; worker k applies the partitions p with
    p mod workers = k (streaming.applier.ShardedApplier). On the 2-core reference machine 2
    workers apply the synthetic stream 1.17-1.30x faster than one, and MovieLens (bound by its
    reader) no faster (benchmarks/RESULTS.md)."""
    cache_users: int = 200_000
    """Users whose row and history the consumer keeps in memory between hours, so an hour reads
    Redis only for the others (streaming.user_cache; about 0.5 KB each; 0 = read every hour)."""
    threads: int = 1
    """torch threads of the update. Fixed (not "all cores") because a different thread count may
    sum floats in a different order, and a restart on another machine must compute the same rows."""


@dataclass(frozen=True)
class RunConfig:
    data: str = ""
    """Input for the main job: empty = MovieLens-100K when present, else synthetic; or a CSV/Parquet path."""
    logical_date: str = ""
    """Nightly logical date D (YYYY-MM-DD); empty = derived from the data (see jobs.nightly)."""
    replay_days: int = 7
    """Days at the end of the data kept out of the nightly run and streamed through Kafka
    afterwards, so ``make run`` exercises the hourly path on real data (0 = train on all)."""
    replay_speedup: float = 0.0
    """Event-time seconds replayed per wall second by ``make run`` (0 = as fast as possible)."""
    synthetic_users: int = 2000
    """Synthetic fallback size: users."""
    synthetic_items: int = 1000
    """Synthetic fallback size: items."""
    synthetic_events: int = 100_000
    """Synthetic fallback size: events."""


@dataclass(frozen=True, repr=False)
class AirflowConfig:
    URL_FIELDS = ("db_url",)
    __repr__ = _redacted_repr

    home: str = ""
    """AIRFLOW_HOME; empty = ``<state_dir>/airflow`` (config, SQLite DB, task logs; ignored by git)."""
    dags_folder: Path = PROJECT_ROOT / "dags"
    """Folder the scheduler and dag-processor read DAG files from."""
    db_url: str = ""
    """SQLAlchemy URL of the Airflow metadata DB; empty = SQLite in ``home``. The local PostgreSQL:
    ``postgresql+psycopg2://USER:PASS@127.0.0.1:5432/airflow`` (needs the psycopg2 driver)."""
    executor: str = "LocalExecutor"
    """Airflow executor; LocalExecutor works with SQLite. Production: CeleryExecutor or KubernetesExecutor."""
    parallelism: int = 4
    """Task instances running at once (LocalExecutor worker processes); Airflow's 32 swamps a laptop."""
    api_host: str = "127.0.0.1"
    """Address the Airflow UI/API server binds to (localhost only by default)."""
    api_port: int = 8080
    """Port of the Airflow UI/API server (also the tasks' execution API)."""
    retries: int = 2
    """Retries of each task after a failure (the quality gate and index validation never retry)."""
    retry_delay_s: int = 300
    """Seconds between retries."""
    task_timeout_s: int = 4 * 3600
    """execution_timeout of each nightly task (prepare, train, evaluate, index, publish)."""
    raw_wait_timeout_s: int = 6 * 3600
    """How long the nightly DAG waits for the day's raw partition before failing."""
    raw_poke_interval_s: int = 300
    """Seconds between checks for the day's raw partition (reschedule mode frees the slot in between)."""
    gpu_pool: str = "gpu"
    """Pool of the index task; ``make airflow`` creates it with ``gpu_pool_slots`` slots."""
    gpu_pool_slots: int = 1
    """Index builds allowed at once (one per GPU)."""
    gpu_queue: str = "default"
    """Executor queue of the index task; ``gpu`` where GPU workers listen on it (Celery)."""
    hourly_timeout_s: int = 50 * 60
    """execution_timeout of the hourly consumer run; it must finish before the next hour starts."""
    lag_threshold: int = 100_000
    """Consumer lag (records behind the log end, all partitions) after an hourly run that fails the run."""
    backfill_day_timeout_s: int = 6 * 3600
    """Wall-clock limit of one backfilled day (one ``airflow dags test`` subprocess)."""


@dataclass(frozen=True)
class ServingConfig:
    host: str = "127.0.0.1"
    """Address the serving API and ops dashboard bind to (localhost only by default)."""
    port: int = 8000
    """Port of the serving API and ops dashboard."""
    default_k: int = 10
    """Candidates returned by /recall when the request names no ``k``."""
    max_k: int = 1000
    """Largest ``k`` a /recall request may ask for; larger gets HTTP 422."""
    max_user_id_len: int = 256
    """Longest user id (characters) /recall accepts; longer gets HTTP 422."""
    incremental_stale_s: int = 2 * 3600
    """The hourly path is flagged stale when its last publish is older than this (seconds); so is
    the archiver when its last run is (serving.freshness: it runs beside the consumer hourly)."""
    model_stale_s: int = 36 * 3600
    """The model version is flagged stale when it was trained longer ago than this (seconds)."""
    watermark_stale_s: int = 2 * 3600
    """The event-time watermark is flagged stale when it lags wall-clock time by more than this."""
    history_hours: int = 48
    """Hours of per-hour counters and freshness samples the dashboard charts."""
    sample_interval_s: int = 60
    """Least seconds between two freshness samples the server appends to the Redis history."""
    pointer_check_s: float = 1.0
    """Least seconds between two reads of the version pointer by the request path."""
    compute_threads: int = 1
    """torch and Faiss threads per request (``make serve`` only): requests already run in
    parallel, so more threads per request only oversubscribe the cores."""
    redis_timeout_s: float = 1.0
    """Socket timeout of the server's Redis calls: a request fails fast (HTTP 503) rather than
    queueing behind a Redis that does not answer."""
    redis_retries: int = 1
    """Retries of a failed Redis call on the request path (the jobs retry more)."""


@dataclass(frozen=True)
class Settings:
    paths: PathsConfig = field(default_factory=PathsConfig)
    spark: SparkConfig = field(default_factory=SparkConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    incremental: IncrementalConfig = field(default_factory=IncrementalConfig)
    run: RunConfig = field(default_factory=RunConfig)
    airflow: AirflowConfig = field(default_factory=AirflowConfig)
    serving: ServingConfig = field(default_factory=ServingConfig)

    def replace(self, section: str, **changes: Any) -> "Settings":
        """A copy with some fields of one section changed, e.g. ``s.replace("train", epochs=1)``."""
        return dataclasses.replace(self, **{section: dataclasses.replace(getattr(self, section), **changes)})


_ALIASES = {
    ("redis", "url"): "REDIS_URL",
    ("kafka", "bootstrap_servers"): "KAFKA_BOOTSTRAP_SERVERS",
    ("spark", "master"): "SPARK_MASTER",
    ("paths", "state_dir"): "TT_STATE_DIR",
}


def _coerce(raw: str, current: Any) -> Any:
    """Parse an environment string into the type of the field's default."""
    if isinstance(current, bool):
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {raw!r}")
    if isinstance(current, int):
        return int(raw)
    if isinstance(current, float):
        return float(raw)
    if isinstance(current, Path):
        return Path(raw).expanduser().resolve()
    return raw


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Build Settings from defaults plus environment overrides.

    Raises ValueError naming the variable when an override does not parse.
    """
    env = os.environ if env is None else env
    settings = Settings()
    for section in fields(Settings):
        sub = getattr(settings, section.name)
        changes: dict[str, Any] = {}
        for f in fields(sub):
            names = [f"TT_{section.name.upper()}_{f.name.upper()}"]
            alias = _ALIASES.get((section.name, f.name))
            if alias:
                names.insert(0, alias)
            for name in names:
                if name in env and env[name] != "":
                    try:
                        changes[f.name] = _coerce(env[name], getattr(sub, f.name))
                    except ValueError as exc:
                        raise ValueError(f"environment variable {name}: {exc}") from None
                    break
        if changes:
            settings = settings.replace(section.name, **changes)
    return settings


def settings_env(settings: Settings) -> dict[str, str]:
    """Every Settings field as the environment variable load_settings() reads it from.

    Well-known aliases (REDIS_URL, TT_STATE_DIR, ...) are set too, because load_settings()
    prefers them: a stale REDIS_URL inherited from the shell must not win over the caller's value.
    Empty strings are left out (load_settings() treats them as unset, i.e. the default).
    """
    env: dict[str, str] = {}
    for section in dataclasses.fields(settings):
        sub = getattr(settings, section.name)
        for f in dataclasses.fields(sub):
            value = getattr(sub, f.name)
            text = ("true" if value else "false") if isinstance(value, bool) else str(value)
            if text == "":
                continue
            env[f"TT_{section.name.upper()}_{f.name.upper()}"] = text
            alias = _ALIASES.get((section.name, f.name))
            if alias:
                env[alias] = text
    return env
