"""Command-line entry points (thin: parse arguments, call typed functions, print).

    python -m twotower.cli run [--data PATH] [--date YYYY-MM-DD]   the main job (make run)
    python -m twotower.cli status                                   status JSON on the last line (make status)
    python -m twotower.cli recall --user ID [--k 10]                serving-side recall from Redis + artifacts
    python -m twotower.cli quality                                  DESIGN §9 protocol numbers (make quality)
    python -m twotower.cli backfill --date D | --start A --end B [--publish auto|force]
    python -m twotower.cli airflow                                  local Airflow 3 with the project's DAGs
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
from pathlib import Path

from twotower.config import Settings, load_settings
from twotower.contracts import parse_day
from twotower.logs import setup_logging

log = logging.getLogger("twotower")


def _date_arg(text: str) -> dt.date:
    try:
        return parse_day(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _k_arg(text: str) -> int:
    try:
        k = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"k must be an integer, got {text!r}") from None
    if not 1 <= k <= 1000:
        raise argparse.ArgumentTypeError(f"k must be between 1 and 1000, got {k}")
    return k


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="twotower", description="Two-tower recall pipeline")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="ingest, nightly retrain, publish, incremental replay, status")
    run.add_argument("--data", default=None, help="CSV/Parquet interactions file (default: MovieLens-100K, else synthetic)")
    run.add_argument("--date", type=_date_arg, default=None, help="logical date D (default: derived from the data)")
    sub.add_parser("status", help="print the freshness/status JSON (last line)")
    rec = sub.add_parser("recall", help="top-k items for a user, from Redis + the artifact directory")
    rec.add_argument("--user", required=True)
    rec.add_argument("--k", type=_k_arg, default=10)
    sub.add_parser("quality", help="MovieLens-100K quality under the DESIGN §9 protocol")
    bf = sub.add_parser("backfill", help="reprocess days through the nightly DAG code")
    bf.add_argument("--date", type=_date_arg, default=None)
    bf.add_argument("--start", type=_date_arg, default=None)
    bf.add_argument("--end", type=_date_arg, default=None)
    bf.add_argument("--publish", choices=["auto", "force", "no"], default="auto")
    sub.add_parser("airflow", help="run a local Airflow 3 with the project's DAGs")
    sub.add_parser("serve", help="run the serving API and dashboard on localhost")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        settings = load_settings()
    except ValueError as exc:
        log.error("configuration error: %s", exc)
        return 2
    if args.command == "run":
        from jobs.main import run_main

        run_main(settings, data=args.data, day=args.date)
        return _print_status(settings)
    if args.command == "status":
        return _print_status(settings)
    if args.command == "recall":
        from serving.recall import NothingPublished, recall

        try:
            items = recall(settings, args.user, args.k)
        except (ValueError, NothingPublished) as exc:
            log.error("recall failed: %s", exc)
            return 2
        for item_id, score in items:
            print(f"{item_id}\t{score:.4f}")
        return 0
    if args.command == "quality":
        from jobs.main import run_quality

        run_quality(settings)
        return 0
    if args.command == "backfill":
        return _backfill(settings, args)
    if args.command == "airflow":
        from infra.airflow_env import run_airflow

        return run_airflow(settings) or 0
    if args.command == "serve":
        from serving.app import serve

        return serve(settings) or 0
    return 2


def _print_status(settings: Settings) -> int:
    from jobs.status import status_json

    print(json.dumps(status_json(settings), sort_keys=True, default=str))
    return 0


def _backfill(settings: Settings, args: argparse.Namespace) -> int:
    if args.date and (args.start or args.end):
        log.error("give either DATE or START and END, not both")
        return 2
    start = args.date or args.start
    end = args.date or args.end or args.start
    if start is None:
        log.error("backfill needs DATE=YYYY-MM-DD or START=... END=...")
        return 2
    if end < start:
        log.error("END (%s) is before START (%s)", end, start)
        return 2
    from jobs.backfill import backfill

    if not any(settings.paths.raw_dir.glob("dt=*")):
        from jobs.main import ingest_input

        log.info("no raw data under %s yet: ingesting the default input first", settings.paths.raw_dir)
        ingest_input(settings, None)
    results = backfill(settings, start, end, args.publish)
    for r in results:
        print(json.dumps(r, sort_keys=True, default=str))
    return 0 if all(r.get("status") != "failed" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
