"""Prometheus metrics of the serving layer (GET /metrics).

Two kinds, one registry per app (so several apps in one process, as in tests, never collide):

* request metrics, updated on the request path: ``tt_recall_requests_total{code}``,
  ``tt_recall_latency_seconds`` (histogram), ``tt_recall_cold_start_total``,
  ``tt_serving_version_switches_total``;
* freshness gauges, computed at scrape time from the derived freshness dict
  (serving.freshness.derive) by a custom collector, so a scrape always sees Redis as it is now:
  model version age, last incremental publish age, watermark lag, consumer lag per partition,
  dead letters, index size and measured ANN recall, stale flags.

The names here are the ones infra/grafana_dashboard.json queries; rename both together.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
"""/recall latency buckets, seconds: dense around the 1-30 ms a CPU recall takes."""

FRESHNESS_GAUGES: dict[str, tuple[str, str]] = {
    # metric name -> (key in the freshness dict, help)
    "tt_model_version_age_seconds": ("model_age_s", "Seconds since the serving model version was trained."),
    "tt_incremental_last_publish_age_seconds": (
        "incremental_age_s",
        "Seconds since the hourly incremental path last published user-ID rows.",
    ),
    "tt_watermark_lag_seconds": ("watermark_lag_s", "Wall-clock now minus the consumer's event-time watermark, seconds."),
    "tt_consumer_lag_total_records": ("consumer_lag_total", "Records the incremental consumer is behind the log end, all partitions."),
    "tt_index_items": ("index_n_items", "Items in the serving version's Faiss index."),
    "tt_index_ann_recall_at_100": ("ann_recall_at_100", "Measured ANN recall@100 against exact search of the serving index."),
    "tt_users_updated_last_hour": ("users_updated_last_hour", "User-ID rows the incremental path updated in the last closed hour."),
    "tt_events_applied_last_hour": ("events_applied_last_hour", "Events the incremental path applied in the last closed hour."),
    "tt_archive_last_run_age_seconds": ("archive_age_s", "Seconds since the archiver last landed the topic as raw Parquet."),
}


class FreshnessCollector(Collector):
    """Yields the freshness gauges from ``get_freshness()`` at each scrape.

    A failure to read freshness (Redis down) is reported as ``tt_freshness_up 0`` instead of
    failing the scrape, so the request metrics still reach Prometheus.
    """

    def __init__(self, get_freshness: Callable[[], dict[str, Any]]):
        self._get = get_freshness

    def describe(self) -> list[Metric]:
        return []  # computed at scrape time; no fixed description (avoids a Redis read at registration)

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("tt_freshness_up", "1 when the freshness state could be read from Redis.")
        try:
            fresh = self._get()
        except Exception:  # noqa: BLE001 - a scrape must not fail because Redis is briefly away
            up.add_metric([], 0.0)
            yield up
            return
        up.add_metric([], 1.0)
        yield up
        yield from freshness_metrics(fresh)


def freshness_metrics(fresh: dict[str, Any]) -> Iterator[Metric]:
    """Prometheus metric families of one derived freshness dict (pure; absent values are skipped)."""
    info = GaugeMetricFamily("tt_model_version_info", "1 for the serving model version.", labels=["version", "previous"])
    if fresh.get("version"):
        info.add_metric([str(fresh["version"]), str(fresh.get("previous_version") or "")], 1.0)
    yield info
    for name, (key, help_text) in FRESHNESS_GAUGES.items():
        family = GaugeMetricFamily(name, help_text)
        if fresh.get(key) is not None:
            family.add_metric([], float(fresh[key]))
        yield family
    lag = GaugeMetricFamily("tt_consumer_lag_records", "Records behind the log end per partition.", labels=["partition"])
    for partition, value in sorted((fresh.get("consumer_lag") or {}).items(), key=lambda kv: str(kv[0])):
        if value is not None:
            lag.add_metric([str(partition)], float(value))
    yield lag
    dead = CounterMetricFamily("tt_dead_letters", "Events sent to the dead-letter topic since the consumer state began.")
    if fresh.get("dead_letters") is not None:
        dead.add_metric([], float(fresh["dead_letters"]))
    yield dead
    stale = GaugeMetricFamily("tt_stale", "1 when a freshness threshold is exceeded.", labels=["what"])
    for what in ("model", "incremental", "watermark", "archive"):
        stale.add_metric([what], 1.0 if fresh.get(f"{what}_stale") else 0.0)
    yield stale


class ServingMetrics:
    """The per-app registry and the request-path instruments."""

    def __init__(self, get_freshness: Callable[[], dict[str, Any]]):
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = Counter(
            "tt_recall_requests", "GET /recall requests by HTTP status code.", ["code"], registry=self.registry
        )
        self.latency = Histogram(
            "tt_recall_latency_seconds",
            "GET /recall latency in seconds (validation, Redis reads, user tower, index search).",
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.cold_start = Counter(
            "tt_recall_cold_start", "GET /recall answers for users without a row of their own.", registry=self.registry
        )
        self.switches = Counter(
            "tt_serving_version_switches", "Times the server swapped to a newly published version.", registry=self.registry
        )
        self.registry.register(FreshnessCollector(get_freshness))

    def observe(self, code: int, seconds: float) -> None:
        """Count one /recall answer and its latency."""
        self.requests.labels(code=str(code)).inc()
        self.latency.observe(seconds)

    def render(self) -> bytes:
        """The Prometheus text exposition of everything in the registry."""
        return generate_latest(self.registry)
