from __future__ import annotations

import argparse
import os
import pickle
from pathlib import Path

import pytest
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from streamer.errors import ConfigError
from streamer.settings import (
    LayeredSettings,
    StreamerSettings,
    add_settings_arguments,
    load_settings,
    settings_from_args,
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's own STREAMER_* variables must not leak into the tests."""
    for name in list(os.environ):
        if name.upper().startswith(("STREAMER_", "TOY_")):
            monkeypatch.delenv(name)


def parse(argv: list[str], cls: type[LayeredSettings] = StreamerSettings) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="streamer")
    add_settings_arguments(parser, cls)
    return parser.parse_args(argv)


def write_config(tmp_path: Path, suffix: str, values: dict[str, object]) -> Path:
    path = tmp_path / f"streamer{suffix}"
    if suffix == ".toml":
        lines = [f"{k} = {v!r}" if isinstance(v, str) else f"{k} = {v}" for k, v in values.items()]
        text = "\n".join(line.replace("'", '"') for line in lines)
    else:
        text = "\n".join(f"{k}: {v}" for k, v in values.items())
    path.write_text(text + "\n", encoding="utf-8")
    return path


def refused(overrides: dict[str, str] | None = None, path: Path | None = None) -> ConfigError:
    """The ConfigError that loading these values (and this config file) raises."""
    with pytest.raises(ConfigError) as info:
        load_settings(StreamerSettings, overrides, path)
    return info.value


def test_defaults_and_dead_letter_topic() -> None:
    s = load_settings(StreamerSettings, {}, None)
    assert s.input_topic == "events" and s.capacity == 100_000 and s.device == "auto"
    assert s.dead_letter_topic == "events.dlq"
    assert load_settings(StreamerSettings, {"input_topic": "ticks"}, None).dead_letter_topic == (
        "ticks.dlq"
    )
    assert load_settings(StreamerSettings, {"dlq_topic": "bad"}, None).dead_letter_topic == "bad"


@pytest.mark.parametrize("suffix", [".yaml", ".toml"])
def test_precedence_file_then_env_then_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str
) -> None:
    path = write_config(
        tmp_path, suffix,
        {"input_topic": "from-file", "window": 8, "capacity": 500, "max_batch_events": 100},
    )
    monkeypatch.setenv("STREAMER_INPUT_TOPIC", "from-env")
    monkeypatch.setenv("STREAMER_WINDOW", "16")
    s = settings_from_args(
        StreamerSettings, parse(["--input-topic", "from-cli", "--config", str(path)])
    )
    assert s.input_topic == "from-cli"  # CLI beats env and file
    assert s.window == 16  # env beats file
    assert (s.capacity, s.max_batch_events) == (500, 100)  # file beats defaults
    assert s.group_id == "streamer"  # default
    assert type(s) is StreamerSettings
    assert pickle.loads(pickle.dumps(s)) == s


def test_config_path_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_config(tmp_path, ".yml", {"group_id": "g-file", "max-batch-wait-ms": 7})
    monkeypatch.setenv("STREAMER_CONFIG", str(path))
    s = settings_from_args(StreamerSettings, parse([]))
    assert (s.group_id, s.max_batch_wait_ms) == ("g-file", 7)


def test_flag_strings_are_coerced() -> None:
    s = settings_from_args(
        StreamerSettings,
        parse(["--max-batch-events", "64", "--key-ttl-s", "2.5", "--model", "/srv/m",
               "--log-level", "debug"]),
    )
    assert s.max_batch_events == 64 and s.key_ttl_s == 2.5
    assert s.model == Path("/srv/m") and s.log_level == "DEBUG"


def test_frozen() -> None:
    s = load_settings(StreamerSettings, {}, None)
    with pytest.raises(ValueError):
        s.window = 3  # type: ignore[misc]


def test_bad_env_var_names_field_env_and_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMER_MAX_BATCH_EVENTS", "lots")
    error = refused()
    assert error.field == "max_batch_events"
    text = str(error)
    assert "'max_batch_events'" in text and "'lots'" in text
    assert "STREAMER_MAX_BATCH_EVENTS" in text and "--max-batch-events" in text


def test_bad_file_value(tmp_path: Path) -> None:
    path = write_config(tmp_path, ".yaml", {"window": 0})
    error = refused(path=path)
    assert error.field == "window"
    assert "STREAMER_WINDOW" in str(error) and "--window" in str(error)


def test_bad_flag() -> None:
    with pytest.raises(ConfigError) as info:
        settings_from_args(StreamerSettings, parse(["--device", "gpu"]))
    assert info.value.field == "device"
    assert "'gpu'" in str(info.value) and "--device" in str(info.value)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"capacity": "0"}, "capacity"),
        ({"max_batch_events": "4096", "capacity": "1000"}, "max_batch_events"),
        ({"swap_policy": "drop"}, "swap_policy"),
        ({"auto_offset_reset": "middle"}, "auto_offset_reset"),
        ({"registry_poll_s": "-1"}, "registry_poll_s"),
    ],
)
def test_validators(overrides: dict[str, str], field: str) -> None:
    error = refused(overrides)
    assert error.field == field


def test_unknown_file_key_is_named(tmp_path: Path) -> None:
    path = write_config(tmp_path, ".toml", {"max_batch_evnts": 10})
    error = refused(path=path)
    assert error.field == "max_batch_evnts"
    assert "unknown key" in str(error) and "max_batch_events" in str(error)


@pytest.mark.parametrize(
    ("name", "text"),
    [("missing.yaml", None), ("broken.yaml", "window: [1,\n"), ("broken.toml", "window = \n"),
     ("list.yaml", "- 1\n- 2\n"), ("settings.ini", "window=3\n")],
)
def test_unusable_config_file(tmp_path: Path, name: str, text: str | None) -> None:
    path = tmp_path / name
    if text is not None:
        path.write_text(text, encoding="utf-8")
    error = refused(path=path)
    assert error.field == "config"
    assert str(path) in str(error)


def test_help_shows_env_var_and_default() -> None:
    parser = argparse.ArgumentParser(prog="streamer")
    add_settings_arguments(parser, StreamerSettings, exclude={"model_name"})
    text = " ".join(parser.format_help().split())  # undo argparse's line wrapping
    assert "--max-batch-events int most events per engine step (default: 2048) " \
        "[env: STREAMER_MAX_BATCH_EVENTS]" in text
    assert "--device {auto,cpu,cuda}" in text
    assert "[env: STREAMER_CONFIG]" in text and "--config Path" in text
    assert "--model-name" not in text
    for name in StreamerSettings.model_fields:  # every other flag, with its default and env
        if name != "model_name":
            assert f"--{name.replace('_', '-')} " in text, name
            assert f"[env: STREAMER_{name.upper()}]" in text, name
    assert text.count("(default: ") == len(StreamerSettings.model_fields) - 1


def test_only_given_flags_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMER_GROUP_ID", "from-env")
    ns = parse(["--window", "4"])
    assert not hasattr(ns, "group_id")
    assert settings_from_args(StreamerSettings, ns).group_id == "from-env"


@pytest.mark.parametrize(
    ("address", "host", "port"),
    [("0.0.0.0:9108", "0.0.0.0", 9108), (":9200", "0.0.0.0", 9200),
     ("127.0.0.1:0", "127.0.0.1", 0), ("[::1]:9108", "::1", 9108)],
)
def test_metrics_address(address: str, host: str, port: int) -> None:
    s = load_settings(StreamerSettings, {"metrics_address": address}, None)
    assert (s.metrics_host, s.metrics_port) == (host, port)


@pytest.mark.parametrize("address", ["localhost", "h:70000", "h:-1", "h:http"])
def test_bad_metrics_address(address: str) -> None:
    error = refused({"metrics_address": address})
    assert error.field == "metrics_address"
    assert str(error).count(repr(address)) == 1, "the bad value is named once"


def test_secret_not_leaked_and_security_kwargs(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings(StreamerSettings, {}, None).kafka_security_kwargs() == {
        "security_protocol": "PLAINTEXT"
    }
    monkeypatch.setenv("STREAMER_SASL_PASSWORD", "hunter2")
    s = settings_from_args(
        StreamerSettings,
        parse(["--security-protocol", "sasl_ssl", "--sasl-mechanism", "PLAIN",
               "--sasl-username", "svc"]),
    )
    assert "hunter2" not in repr(s) and "hunter2" not in str(s)
    assert "hunter2" not in s.model_dump_json()
    assert s.kafka_security_kwargs() == {
        "security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN",
        "sasl_plain_username": "svc", "sasl_plain_password": "hunter2",
        "ssl_check_hostname": True,
    }


class _Toy(LayeredSettings):
    """Stands in for the trainer's settings: another prefix, a bool flag."""

    model_config = SettingsConfigDict(env_prefix="TOY_", frozen=True, extra="forbid")
    dry_run: bool = Field(False, description="do nothing")
    rounds: int = Field(3, gt=0, description="how many")


def test_helpers_are_generic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert settings_from_args(_Toy, parse(["--dry-run"], _Toy)).dry_run is True
    monkeypatch.setenv("TOY_DRY_RUN", "true")
    assert settings_from_args(_Toy, parse(["--no-dry-run"], _Toy)).dry_run is False
    path = write_config(tmp_path, ".yaml", {"rounds": 9})
    monkeypatch.setenv("TOY_CONFIG", str(path))
    assert settings_from_args(_Toy, parse([], _Toy)) == _Toy(dry_run=True, rounds=9, config=path)
    with pytest.raises(ConfigError, match=r"env TOY_ROUNDS, flag --rounds"):
        settings_from_args(_Toy, parse(["--rounds", "0"], _Toy))
    parser = argparse.ArgumentParser(prog="toy")
    add_settings_arguments(parser, _Toy)
    text = " ".join(parser.format_help().split())
    assert "--dry-run, --no-dry-run" in text and "[env: TOY_DRY_RUN]" in text


def test_group_timeouts_are_checked_against_each_other() -> None:
    from streamer.errors import ConfigError
    from streamer.settings import StreamerSettings, load_settings

    with pytest.raises(ConfigError) as err:
        load_settings(StreamerSettings, {"session_timeout_ms": 6000,
                                         "heartbeat_interval_ms": 3000}, None)
    assert err.value.field == "heartbeat_interval_ms"
    with pytest.raises(ConfigError) as err:
        load_settings(StreamerSettings, {"request_timeout_ms": 10000}, None)
    assert err.value.field == "request_timeout_ms"


def test_group_settings_reach_the_consumer() -> None:
    from kafka.coordinator.assignors.sticky.sticky_assignor import StickyPartitionAssignor

    from streamer.broker import EmbeddedBroker
    from streamer.kafka_edge import KafkaEdge
    from streamer.settings import StreamerSettings

    with EmbeddedBroker() as broker:
        broker.create_topic("events", 1)
        settings = StreamerSettings(
            bootstrap_servers=broker.bootstrap_servers, group_instance_id="pod-0",
            session_timeout_ms=6000, heartbeat_interval_ms=1000, max_poll_interval_ms=20000,
            isolation_level="read_uncommitted",
        )
        edge = KafkaEdge(settings, lambda p: None, lambda p: None)
        try:
            config = edge.consumer.config
            assert config["group_instance_id"] == "pod-0"
            assert config["partition_assignment_strategy"] == (StickyPartitionAssignor,)
            assert (config["session_timeout_ms"], config["heartbeat_interval_ms"],
                    config["max_poll_interval_ms"]) == (6000, 1000, 20000)
            assert config["isolation_level"] == "read_uncommitted"
        finally:
            edge.close()


def test_exactly_once_needs_the_changelog_and_read_committed() -> None:
    from streamer.settings import StreamerSettings, load_settings

    with pytest.raises(ConfigError) as err:
        load_settings(StreamerSettings, {"processing_guarantee": "exactly_once"}, None)
    assert err.value.field == "processing_guarantee"
    with pytest.raises(ConfigError) as err:
        load_settings(StreamerSettings, {"processing_guarantee": "exactly_once",
                                         "changelog": True,
                                         "isolation_level": "read_uncommitted"}, None)
    assert err.value.field == "isolation_level"
    ok = load_settings(StreamerSettings, {"processing_guarantee": "exactly_once",
                                          "changelog": True, "group_id": "g"}, None)
    assert ok.state_topic == "g-state"
    both = load_settings(StreamerSettings, {"processing_guarantee": "exactly_once",
                                            "changelog": True, "kafka_client": "confluent"},
                         None)  # durable state and exactly-once run on either client
    assert both.kafka_client == "confluent" and both.changelog
