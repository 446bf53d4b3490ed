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
    temperature: float = 0.07
    """tau in score = <u, v> / tau."""
    pooling: str = "mean"
    """History pooling: ``mean`` or ``decay`` (exponential in position, most recent weighted most)."""
    dropout: float = 0.1
    """Dropout inside the MLPs during training."""


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 12
    """Passes over the training examples."""
    batch_size: int = 1024
    """In-batch softmax batch size (also the number of negatives per positive)."""
    lr: float = 1e-3
    """Adam learning rate."""
    weight_decay: float = 0.0
    """Adam weight decay."""
    logq: bool = True
    """Apply the logQ sampling-bias correction (Yi et al., RecSys 2019)."""
    seed: int = 42
    """Seed for parameter init and batch order; same seed and data give the same model."""
    threads: int = 0
    """torch intra-op threads; 0 keeps torch's default (all cores)."""


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


@dataclass(frozen=True)
class GateConfig:
    metric: str = "hit@50"
    """Offline metric (exact search) the quality gate compares."""
    max_regression: float = 0.05
    """Largest relative drop of ``metric`` against the serving version that still publishes."""
    min_value: float = 0.0
    """Absolute floor of ``metric``; a model below it is never published."""


@dataclass(frozen=True)
class RedisConfig:
    url: str = "redis://127.0.0.1:6379/0"
    """Redis URL; ``rediss://`` for TLS. Env: REDIS_URL."""
    prefix: str = "tt"
    """Key prefix per deployment, so several deployments share one Redis."""
    keep_versions: int = 2
    """Versions kept in Redis: current plus previous (rollback). Older ones are deleted."""
    batch_size: int = 2000
    """Keys per pipelined round trip when publishing."""


@dataclass(frozen=True)
class KafkaConfig:
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


@dataclass(frozen=True)
class IncrementalConfig:
    allowed_lateness_s: int = 600
    """An event-time hour closes when the watermark passes its end plus this."""
    steps: int = 5
    """Optimiser steps per closed hour on the touched user-ID rows."""
    lr: float = 0.05
    """Adagrad learning rate for those steps."""
    min_events_new_user: int = 1
    """A user unknown to the current version gets a row after this many events."""


@dataclass(frozen=True)
class RunConfig:
    data: str = ""
    """Input for the main job: empty = MovieLens-100K when present, else synthetic; or a CSV/Parquet path."""
    logical_date: str = ""
    """Nightly logical date D (YYYY-MM-DD); empty = derived from the data (see jobs.nightly)."""
    replay_days: int = 0
    """Days at the end of the data kept out of the nightly run for the streaming path."""
    synthetic_users: int = 2000
    """Synthetic fallback size: users."""
    synthetic_items: int = 1000
    """Synthetic fallback size: items."""
    synthetic_events: int = 100_000
    """Synthetic fallback size: events."""


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
