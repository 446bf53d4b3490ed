"""Kafka client factory: security settings reach every client; secrets never reach logs."""

from __future__ import annotations

import pytest

from streaming.clients import bootstrap_list, common_options, describe
from twotower.config import KafkaConfig, load_settings


def test_plaintext_defaults():
    opts = common_options(KafkaConfig(bootstrap_servers="a:9092, b:9093"))
    assert opts == {"bootstrap_servers": ["a:9092", "b:9093"], "security_protocol": "PLAINTEXT", "request_timeout_ms": 30_000}


def test_sasl_ssl_settings_pass_through_from_the_environment():
    s = load_settings({
        "KAFKA_BOOTSTRAP_SERVERS": "kafka-0.prod:9094",
        "TT_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "TT_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "TT_KAFKA_SASL_USERNAME": "recsys",
        "TT_KAFKA_SASL_PASSWORD": "s3cret-value",
        "TT_KAFKA_SSL_CAFILE": "/etc/ssl/kafka-ca.pem",
    })
    opts = common_options(s.kafka)
    assert opts["security_protocol"] == "SASL_SSL" and opts["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (opts["sasl_plain_username"], opts["sasl_plain_password"]) == ("recsys", "s3cret-value")
    assert opts["ssl_cafile"] == "/etc/ssl/kafka-ca.pem" and "ssl_certfile" not in opts
    text = describe(s.kafka)
    assert "recsys" in text and "SCRAM-SHA-512" in text and "s3cret" not in text


def test_bad_security_settings_fail_with_the_setting_named():
    with pytest.raises(ValueError, match="sasl_mechanism"):
        common_options(KafkaConfig(security_protocol="SASL_PLAINTEXT"))
    with pytest.raises(ValueError, match="security_protocol"):
        common_options(KafkaConfig(security_protocol="TLS"))
    with pytest.raises(ValueError, match="KAFKA_BOOTSTRAP_SERVERS"):
        bootstrap_list(KafkaConfig(bootstrap_servers=" , "))
