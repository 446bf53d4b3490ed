"""Logging set-up for entry points: one line per event, UTC timestamps, logger name."""

from __future__ import annotations

import logging
import os
import time


def setup_logging(level: str | None = None) -> None:
    """Configure the root logger once (level from TT_LOG_LEVEL, default INFO)."""
    level = (level or os.environ.get("TT_LOG_LEVEL") or "INFO").upper()
    logging.Formatter.converter = time.gmtime
    logging.basicConfig(
        level=level,
        format="%(asctime)sZ %(levelname)s %(name)s: %(message)s",
        datefmt="%Y-%m-%dT%H:%M:%S",
        force=True,
    )
    for noisy in ("py4j", "kafka", "urllib3", "faiss"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
