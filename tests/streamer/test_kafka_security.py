"""TLS and SASL settings reach real kafka-python clients, for the consumer and the producer
alike, and secrets never show up in logs, reprs or config dumps."""

from __future__ import annotations

import base64
import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest
from kafka import KafkaConsumer, KafkaProducer
from pydantic import SecretStr

from streamer.errors import ConfigError
from streamer.oauth import ClientCredentialsTokenProvider
from streamer.settings import StreamerSettings, load_settings
from trainer.settings import TrainerSettings

SECRETS = ("s3cr3t-scram", "k3y-pa55", "cl13nt-s3cr3t")


@pytest.fixture
def pem_files(tmp_path: Path) -> dict[str, Path]:
    # Only their paths matter here: the clients read them when they connect.
    files = {name: tmp_path / f"{name}.pem" for name in ("ca", "cert", "key")}
    for path in files.values():
        path.write_text("-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n")
    return files


def _real_clients(kwargs: dict[str, Any]) -> tuple[KafkaConsumer, KafkaProducer]:
    """Real clients (api_version given, so construction does not connect)."""
    common = dict(bootstrap_servers="127.0.0.1:1", api_version=(2, 8, 0), **kwargs)
    return KafkaConsumer(**common), KafkaProducer(**common)


def test_tls_and_scram_reach_consumer_and_producer(
    pem_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("STREAMER_SASL_PASSWORD", SECRETS[0])
    monkeypatch.setenv("STREAMER_SSL_KEY_PASSWORD", SECRETS[1])
    settings = load_settings(StreamerSettings, {
        "security_protocol": "sasl_ssl", "sasl_mechanism": "scram-sha-512",
        "sasl_username": "streamer", "ssl_cafile": str(pem_files["ca"]),
        "ssl_certfile": str(pem_files["cert"]), "ssl_keyfile": str(pem_files["key"]),
    }, None)
    consumer, producer = _real_clients(settings.kafka_security_kwargs())
    try:
        for config in (consumer.config, producer.config):
            assert config["security_protocol"] == "SASL_SSL"
            assert config["sasl_mechanism"] == "SCRAM-SHA-512"
            assert config["sasl_plain_username"] == "streamer"
            assert config["sasl_plain_password"] == SECRETS[0]
            assert config["ssl_cafile"] == str(pem_files["ca"])
            assert config["ssl_certfile"] == str(pem_files["cert"])
            assert config["ssl_keyfile"] == str(pem_files["key"])
            assert config["ssl_password"] == SECRETS[1]
            assert config["ssl_check_hostname"] is True
    finally:
        consumer.close()
        producer.close(timeout=0)
    shown = repr(settings) + str(settings) + settings.model_dump_json() + caplog.text
    assert not any(secret in shown for secret in SECRETS)


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-512", "PLAIN"])
def test_trainer_shares_the_security_settings(mechanism: str) -> None:
    settings = TrainerSettings(security_protocol="SASL_PLAINTEXT", sasl_mechanism=mechanism,
                               sasl_username="t", sasl_password=SecretStr("p"))
    consumer, producer = _real_clients(settings.kafka_security_kwargs())
    assert consumer.config["sasl_mechanism"] == mechanism
    consumer.close()
    producer.close(timeout=0)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"security_protocol": "SASL_SSL"}, "sasl_mechanism"),
        ({"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-256"}, "sasl_username"),
        ({"security_protocol": "SASL_SSL", "sasl_mechanism": "OAUTHBEARER"},
         "sasl_oauth_token_url"),
        ({"security_protocol": "SSL", "sasl_mechanism": "PLAIN"}, "security_protocol"),
        ({"sasl_mechanism": "GSSAPI-ish"}, "sasl_mechanism"),
        ({"ssl_cafile": "/nonexistent/ca.pem"}, "ssl_cafile"),
    ],
)
def test_inconsistent_security_fails_at_start_naming_the_field(
    overrides: dict[str, Any], field: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(StreamerSettings, overrides, None)
    assert info.value.field == field


@pytest.fixture
def token_endpoint() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A real OAuth 2.0 token endpoint on loopback that records what it was sent."""
    seen: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"])).decode()
            seen.append({"auth": self.headers["Authorization"], "form": parse_qs(body)})
            reply = json.dumps({"access_token": f"tok-{len(seen)}", "expires_in": 3600})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(reply.encode())

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/token", seen
    server.shutdown()
    server.server_close()


def test_oauthbearer_fetches_a_client_credentials_token_and_reaches_the_clients(
    token_endpoint: tuple[str, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch,
) -> None:
    url, seen = token_endpoint
    monkeypatch.setenv("STREAMER_SASL_OAUTH_CLIENT_SECRET", SECRETS[2])
    settings = load_settings(StreamerSettings, {
        "security_protocol": "SASL_SSL", "sasl_mechanism": "OAUTHBEARER",
        "sasl_oauth_token_url": url, "sasl_oauth_client_id": "streamer",
        "sasl_oauth_scope": "kafka",
    }, None)
    kwargs = settings.kafka_security_kwargs()
    consumer, producer = _real_clients(kwargs)
    provider = consumer.config["sasl_oauth_token_provider"]
    assert isinstance(provider, ClientCredentialsTokenProvider)
    assert producer.config["sasl_mechanism"] == "OAUTHBEARER"
    consumer.close()
    producer.close(timeout=0)
    assert provider.token() == "tok-1"
    assert provider.token() == "tok-1", "cached until it nears expiry"
    assert len(seen) == 1
    expected = base64.b64encode(f"streamer:{SECRETS[2]}".encode()).decode()
    assert seen[0]["auth"] == f"Basic {expected}"
    assert seen[0]["form"] == {"grant_type": ["client_credentials"], "scope": ["kafka"]}
    assert SECRETS[2] not in repr(provider) + repr(settings)
