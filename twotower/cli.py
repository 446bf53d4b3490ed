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


FIRST_DAY, LAST_DAY = dt.date(1990, 1, 1), dt.date(2099, 12, 31)
"""Logical dates outside the range events may have (streaming.events) are typing mistakes."""


def _date_arg(text: str) -> dt.date:
    try:
        day = parse_day(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not FIRST_DAY <= day <= LAST_DAY:
        raise argparse.ArgumentTypeError(f"date {day} is outside {FIRST_DAY}..{LAST_DAY}")
    return day


def _int_arg(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


DATA_SUFFIXES = (".csv", ".tsv", ".txt", ".parquet", ".pq")
"""What jobs.ingest.ingest_file reads (besides a directory of Parquet files)."""


def _data_arg(text: str) -> str:
    path = Path(text).expanduser()
    if not path.exists():
        raise argparse.ArgumentTypeError(f"no such file: {text!r} (give a CSV or Parquet file of user_id,item_id,ts)")
    if path.is_file() and path.suffix.lower() not in DATA_SUFFIXES:
        raise argparse.ArgumentTypeError(f"{text!r}: unsupported file type; use one of {', '.join(DATA_SUFFIXES)} or a Parquet directory")
    return str(path)


def check_args(args: argparse.Namespace, settings: Settings) -> str | None:
    """What is wrong with arguments that parsed, judged against the settings, or None. Pure."""
    if args.command == "recall":
        from serving.recall import k_problem, user_id_problem

        return user_id_problem(args.user, settings.serving) or k_problem(args.k, settings.serving)
    if args.command == "backfill":
        if args.date and (args.start or args.end):
            return "give either --date or --start and --end, not both"
        if args.end and not args.start and not args.date:
            return "--end needs --start"
        if args.date is None and args.start is None:
            return "backfill needs --date YYYY-MM-DD or --start YYYY-MM-DD [--end YYYY-MM-DD]"
        if args.start and args.end and args.end < args.start:
            return f"--end {args.end} is before --start {args.start}"
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="twotower", description="Two-tower recall pipeline")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="ingest, nightly retrain, publish, incremental replay, status")
    run.add_argument("--data", type=_data_arg, default=None, help="CSV/Parquet interactions file (default: MovieLens-100K, else synthetic)")
    run.add_argument("--date", type=_date_arg, default=None, help="logical date D (default: derived from the data)")
    sub.add_parser("status", help="print the freshness/status JSON (last line)")
    rec = sub.add_parser("recall", help="top-k items for a user, from Redis + the artifact directory")
    rec.add_argument("--user", required=True)
    rec.add_argument("--k", type=_int_arg, default=10, help="candidates, 1..serving.max_k")
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
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging()
    try:
        settings = load_settings()
    except ValueError as exc:
        log.error("configuration error: %s", exc)
        return 2
    problem = check_args(args, settings)
    if problem:
        parser.error(problem)  # usage and the problem on stderr, exit status 2
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
    start = args.date or args.start
    end = args.date or args.end or args.start
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
