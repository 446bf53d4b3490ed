"""The one place a SparkSession is created (DESIGN §10: clients made in one place, injected)."""

from __future__ import annotations

import logging

from twotower.config import SparkConfig

log = logging.getLogger(__name__)


def get_spark(cfg: SparkConfig, app_name: str = "twotower"):
    """A SparkSession for ``cfg.master`` (``local[*]`` by default), reused if one is active.

    Local mode starts in ~15 s on a 2-core machine, so callers (and the test suite) share one.
    Timestamps are handled in UTC everywhere.
    """
    from pyspark.sql import SparkSession

    log.info("starting Spark session (master %s)", cfg.master)
    builder = SparkSession.builder
    if cfg.master.startswith("local"):
        # Short local jobs are dominated by JIT warm-up: the C1-only tier cut a fresh-session
        # MovieLens prepare from 57 to 41 CPU-seconds on 2 cores. Clusters keep the full JIT.
        builder = builder.config("spark.driver.extraJavaOptions", "-XX:TieredStopAtLevel=1")
    return (
        builder.master(cfg.master)
        .appName(app_name)
        .config("spark.sql.shuffle.partitions", str(cfg.shuffle_partitions))
        .config("spark.driver.memory", cfg.driver_memory)
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")  # progress is logged in words instead
        .config("spark.sql.parquet.compression.codec", "snappy")
        .config("spark.sql.sources.partitionOverwriteMode", "dynamic")
        .getOrCreate()
    )
