"""Typed config with environment overrides."""

from pathlib import Path

import pytest

from twotower.config import Settings, load_settings


def test_defaults_are_embedded_single_machine():
    s = load_settings({})
    assert s.redis.url == "redis://127.0.0.1:6379/0"
    assert s.kafka.bootstrap_servers == "127.0.0.1:9092"
    assert s.spark.master == "local[*]"


def test_env_overrides_and_aliases(tmp_path: Path):
    s = load_settings(
        {
            "REDIS_URL": "rediss://:secret@redis.example:6380/1",
            "KAFKA_BOOTSTRAP_SERVERS": "k1:9093,k2:9093",
            "TT_STATE_DIR": str(tmp_path),
            "TT_TRAIN_EPOCHS": "3",
            "TT_TRAIN_LOGQ": "false",
            "TT_MODEL_TEMPERATURE": "0.1",
        }
    )
    assert s.redis.url.startswith("rediss://")
    assert s.kafka.bootstrap_servers == "k1:9093,k2:9093"
    assert s.paths.state_dir == tmp_path.resolve()
    assert s.train.epochs == 3 and s.train.logq is False and s.model.temperature == 0.1


def test_bad_override_names_the_variable():
    with pytest.raises(ValueError, match="TT_TRAIN_EPOCHS"):
        load_settings({"TT_TRAIN_EPOCHS": "many"})


def test_replace_returns_a_copy():
    s = Settings()
    t = s.replace("train", epochs=1)
    assert t.train.epochs == 1 and s.train.epochs != 1
