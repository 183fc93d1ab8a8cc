"""History loading: files (JSONL, CSV) and the input topic through the embedded broker."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from kafka import KafkaProducer

from streamer.broker import EmbeddedBroker
from streamer.errors import ConfigError
from streamer.features import default_spec
from streamer.registry import Registry
from streamer.simulate import make_simulator, write_jsonl
from trainer.cli import main
from trainer.data import (
    decode_history,
    parse_duration,
    parse_offsets,
    parse_time,
    read_files,
    resolve_spec,
)
from trainer.topic import read_topic


def test_time_and_offset_arguments() -> None:
    assert parse_duration("90") == 90 and parse_duration("6h") == 21600
    assert parse_duration("1.5d") == 129600 and parse_duration("250ms") == 0.25
    with pytest.raises(ValueError):
        parse_duration("soon")
    assert parse_time("1735689600") == 1735689600.0
    assert parse_time("1735689600000") == 1735689600.0  # milliseconds by the contract's rule
    assert parse_time("2025-01-01T00:00:00Z") == 1735689600.0
    assert parse_time("2025-01-01T00:00:00") == 1735689600.0  # no zone means UTC
    assert parse_time("7d", now=1_000_000.0) == 1_000_000.0 - 7 * 86400
    assert parse_offsets("1200") == 1200
    assert parse_offsets("0:10,3:7") == {0: 10, 3: 7}


def test_jsonl_and_csv_give_the_same_history(tmp_path: Path) -> None:
    events = make_simulator("tick", 5, seed=1).events(400)
    write_jsonl(tmp_path / "t.jsonl", events)
    with (tmp_path / "t.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, ["symbol", "ts", "price", "size", "bid", "ask"])
        writer.writeheader()
        writer.writerows(events)
    spec = default_spec("tick")
    a = decode_history(read_files([tmp_path / "t.jsonl"]), spec)
    b = decode_history(read_files([tmp_path / "t.csv"]), spec)
    assert a.n_events == b.n_events == 400 and sorted(a.series) == sorted(b.series)
    for key in a.series:
        np.testing.assert_array_equal(a.series[key].ts, b.series[key].ts)
        np.testing.assert_array_equal(a.series[key].raw, b.series[key].raw)
        assert np.all(np.diff(a.series[key].ts) >= 0)


def test_sensor_csv_and_out_of_order_lines_keep_arrival_order(tmp_path: Path) -> None:
    """The event-time policy: a key's events stay in arrival (record) order, as the streamer
    serves them in offset order; the late event's time delta is clamped to 0 in features."""
    path = tmp_path / "s.csv"
    path.write_text("sensor_id,ts,temp,vibration\n"
                    "p1,2025-01-01T00:00:10Z,70.5,0.03\n"
                    "p1,1735689600,70.0,0.02\n"
                    "p2,1735689605000,60.0,0.01\n")
    records = read_files([path])
    spec = resolve_spec(records)
    assert spec.kind == "sensor" and spec.names == ("temp", "vibration")
    history = decode_history(records, spec)
    np.testing.assert_array_equal(history.series["p1"].ts, [1735689610.0, 1735689600.0])
    np.testing.assert_array_equal(history.series["p1"].raw[:, 0], [70.5, 70.0])
    assert history.series["p2"].ts[0] == 1735689605.0


def test_bad_records_are_skipped_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    good = {"key": "k1", "ts": 1735689600.0, "values": [1.0, 2.0]}
    path.write_text("\n".join([
        json.dumps(good), "not json", json.dumps({"key": "k1", "ts": 1.0, "values": [1.0]}),
        json.dumps({"ts": 1735689601.0, "values": [1.0, 2.0]}),
        '{"key":"k1","ts":"x","values":[1,2]}',
    ]) + "\n")
    records = read_files([path])
    spec = resolve_spec(records)
    assert spec.kind == "generic" and spec.n_features == 2
    history = decode_history(records, spec)
    assert history.n_events == 1
    assert dict(history.skipped) == {"not_json": 1, "feature_count": 1, "missing_key": 1,
                                     "bad_timestamp": 1}
    assert history.data_range()["skipped"] == dict(history.skipped)


def test_spec_resolution_prefers_flags_then_the_current_model(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "g.jsonl", make_simulator("generic", 2, seed=0, n_values=3).events(5))
    records = read_files([tmp_path / "g.jsonl"])
    assert resolve_spec(records).names == ("v0", "v1", "v2")
    base = default_spec("generic", n_features=3, target="v2").with_stats([1.0] * 3, [2.0] * 3)
    assert resolve_spec(records, base=base) == base
    assert resolve_spec(records, target="v1", base=base).target == "v1"
    with pytest.raises(ConfigError, match="target"):
        resolve_spec(records, target="nope")
    with pytest.raises(ConfigError):
        read_files([tmp_path / "missing.jsonl"])


# --- Kafka ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def broker() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker() as b:
        yield b


def _produce(broker: EmbeddedBroker, topic: str, events: list[dict[str, Any]], kind: str) -> None:
    """Record timestamp = event time, as most producers of event data set it."""
    sim = make_simulator(kind, 1)  # only for its encoder
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap_servers, linger_ms=5)
    try:
        for ev in events:
            key, value = sim.encode(ev)
            producer.send(topic, key=key, value=value, timestamp_ms=int(ev["ts"] * 1000))
        producer.flush()
    finally:
        producer.close()


@pytest.mark.integration
def test_read_topic_whole_by_offsets_and_by_time(broker: EmbeddedBroker) -> None:
    broker.create_topic("hist-read", partitions=3)
    events = make_simulator("tick", 9, seed=4).events(900)
    _produce(broker, "hist-read", events, "tick")
    whole = read_topic(broker.bootstrap_servers, "hist-read", timeout_s=30)
    assert len(whole.records) == 900
    assert sum(stop - start for start, stop in whole.offsets.values()) == 900
    history = decode_history(whole.records, default_spec("tick"))
    assert history.n_events == 900 and len(history.series) == 9

    skipped = read_topic(broker.bootstrap_servers, "hist-read", start_offsets={0: 10},
                         timeout_s=30)
    # Partitions not named start at their end: only partition 0 from offset 10 is read.
    assert len(skipped.records) == whole.offsets[0][1] - 10
    assert {r.partition for r in skipped.records} == {0}
    every = read_topic(broker.bootstrap_servers, "hist-read", start_offsets=5, timeout_s=30)
    assert len(every.records) == 900 - 3 * 5

    ms = sorted(int(ev["ts"] * 1000) for ev in events)
    since, until = ms[200] / 1000, ms[700] / 1000
    window = read_topic(broker.bootstrap_servers, "hist-read", since=since, until=until,
                        timeout_s=30)
    assert len(window.records) == 500
    got = sorted(json.loads(r.value)["ts"] for r in window.records)
    assert got == sorted(ev["ts"] for ev in events if ms[200] <= int(ev["ts"] * 1000) < ms[700])


@pytest.mark.integration
def test_train_from_the_topic(broker: EmbeddedBroker, tmp_path: Path) -> None:
    broker.create_topic("hist-train", partitions=4)
    events = make_simulator("generic", 12, seed=3, n_values=4).events(6000)
    _produce(broker, "hist-train", events, "generic")
    root = tmp_path / "models"
    code = main([
        "train", "--bootstrap-servers", broker.bootstrap_servers, "--topic", "hist-train",
        "--registry", str(root), "--hidden", "16", "--layers", "1", "--epochs", "4",
        "--seq-len", "32", "--device", "cpu", "--no-progress",
    ])
    assert code == 0
    art = Registry(root, "default").load()
    meta = art.metadata
    assert meta.data_range is not None and meta.data_range["source"] == "kafka"
    assert meta.data_range["events"] == 6000 and meta.data_range["keys"] == 12
    assert set(meta.data_range["offsets"]) == {"0", "1", "2", "3"}
    overall = meta.metrics["evaluation"]["overall"]
    assert overall["candidate"]["mae"] < min(overall[b]["mae"] for b in ("persistence", "ar"))
    assert meta.metrics["gate"]["publish"] and not meta.metrics["gate"]["forced"]
