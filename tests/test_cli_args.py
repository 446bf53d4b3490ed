"""Argument validation of the command line (twotower.cli) and of recall requests
(serving.recall): bad dates, integers, ranges, ids and files are refused with a clear message
and exit status 2 before any work starts; limits come from the settings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from serving.recall import VERSION_NAME, k_problem, user_id_problem, validate_request
from twotower.cli import build_parser, check_args, main
from twotower.config import ServingConfig, load_settings

ROOT = Path(__file__).resolve().parents[1]


def parse_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("argv, words", [
    (["run", "--date", "2024-02-30"], "not a date in YYYY-MM-DD form"),
    (["run", "--date", "yesterday"], "not a date"),
    (["run", "--date", "1970-01-01"], "outside 1990-01-01..2099-12-31"),
    (["run", "--data", "/nonexistent/events.csv"], "no such file"),
    (["recall", "--user", "196", "--k", "ten"], "expected an integer, got 'ten'"),
    (["recall", "--user", "196", "--k", "0"], "k must be between 1 and 1000, got 0"),
    (["recall", "--user", "196", "--k", "1001"], "k must be between 1 and 1000, got 1001"),
    (["recall", "--user", "", "--k", "5"], "user_id is empty"),
    (["recall", "--user", "x" * 257], "at most 256"),
    (["recall", "--user", " 196"], "surrounding blanks"),
    (["recall"], "the following arguments are required: --user"),
    (["backfill"], "backfill needs --date"),
    (["backfill", "--date", "1998-03-01", "--start", "1998-03-01"], "either --date or --start and --end"),
    (["backfill", "--start", "1998-03-05", "--end", "1998-03-01"], "--end 1998-03-01 is before --start 1998-03-05"),
    (["backfill", "--end", "1998-03-01"], "--end needs --start"),
    (["backfill", "--date", "1998-03-01", "--publish", "always"], "invalid choice: 'always'"),
    (["nonsense"], "invalid choice: 'nonsense'"),
])  # fmt: skip
def test_bad_arguments_exit_2_with_the_reason(argv, words, capsys):
    assert words in parse_error(argv, capsys)


def test_limits_come_from_the_settings(monkeypatch, capsys):
    monkeypatch.setenv("TT_SERVING_MAX_K", "50")
    monkeypatch.setenv("TT_SERVING_MAX_USER_ID_LEN", "8")
    assert "k must be between 1 and 50, got 51" in parse_error(["recall", "--user", "196", "--k", "51"], capsys)
    assert "at most 8" in parse_error(["recall", "--user", "u" * 9], capsys)


def test_good_arguments_pass(tmp_path):
    data = tmp_path / "events.csv"
    data.write_text("user_id,item_id,ts\n1,2,881250949\n")
    parser, s = build_parser(), load_settings({})
    for argv in (["run", "--data", str(data), "--date", "1998-04-22"], ["recall", "--user", "196", "--k", "1000"],
                 ["backfill", "--start", "1998-03-01", "--end", "1998-03-03"], ["backfill", "--date", "1998-03-01"],
                 ["backfill", "--start", "1998-03-01"], ["status"]):  # fmt: skip
        assert check_args(parser.parse_args(argv), s) is None, argv


def test_cli_refuses_before_touching_anything():
    """A real process: a bad --k fails in well under the time any job takes, naming the problem."""
    out = subprocess.run([sys.executable, "-m", "twotower.cli", "recall", "--user", "196", "--k", "-3"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 2 and "k must be between 1 and 1000, got -3" in out.stderr and out.stdout == ""


# --- recall requests (the API's rules, which the CLI shares) ------------------------------------------


@pytest.mark.parametrize("user_id, k, words", [
    ("u1", 0, "between 1 and 1000"), ("u1", -1, "between 1 and 1000"), ("u1", 1001, "between 1 and 1000"),
    ("u1", 2.0, "integer"), ("u1", True, "integer"), ("u1", None, "integer"),
    ("", 5, "non-empty"), (None, 5, "non-empty"), (7, 5, "non-empty"), ("   ", 5, "empty"),
    ("x" * 257, 5, "at most 256"), ("a\tb", 5, "control characters"), ("a\x00b", 5, "control characters"),
    ("u1 ", 5, "surrounding blanks"), ("\ud800", 5, "control characters"),
])  # fmt: skip
def test_validate_request_refuses(user_id, k, words):
    with pytest.raises(ValueError, match=words):
        validate_request(user_id, k, ServingConfig())


def test_validate_request_follows_the_serving_settings():
    cfg = ServingConfig(max_k=5, max_user_id_len=3)
    assert validate_request("abc", 5, cfg) == ("abc", 5)
    assert "between 1 and 5" in k_problem(6, cfg) and "at most 3" in user_id_problem("abcd", cfg)
    assert validate_request("x" * 256, 1000, ServingConfig()) == ("x" * 256, 1000)


@pytest.mark.parametrize("name, ok", [
    ("20240131-1a2b3c4d", True), ("v1", True), ("19980301-8816eb6b", True),
    ("", False), ("a{b}", False), ("a:b", False), ("a*", False), ("../etc", False), ("a b", False), ("-x", False),
    ("x" * 129, False),
])  # fmt: skip
def test_version_names(name, ok):
    assert bool(VERSION_NAME.match(name)) is ok
