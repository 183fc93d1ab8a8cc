"""Simulators: deterministic, contract-shaped, carrying a learnable signal; paced producer."""

from __future__ import annotations

import json
import math
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from kafka import KafkaConsumer

from streamer.broker import EmbeddedBroker
from streamer.errors import ConfigError
from streamer.simulate import (
    GenericSimulator,
    SensorSimulator,
    TickSimulator,
    make_simulator,
    run_simulator,
    write_jsonl,
)

KINDS = ["tick", "sensor", "generic"]
KEY_FIELD = {"tick": "symbol", "sensor": "sensor_id", "generic": "key"}


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _check_event(kind: str, ev: dict[str, Any]) -> None:
    """The contract's input formats, checked field by field."""
    assert isinstance(ev[KEY_FIELD[kind]], str) and ev[KEY_FIELD[kind]]
    assert isinstance(ev["ts"], float) and 1e9 < ev["ts"] < 1e11  # epoch seconds, not ms
    if kind == "tick":
        assert set(ev) == {"symbol", "ts", "price", "size", "bid", "ask"}
        assert all(_finite(ev[f]) for f in ("price", "bid", "ask"))
        assert isinstance(ev["size"], int) and ev["size"] >= 1
        assert 0 < ev["bid"] <= ev["price"] <= ev["ask"] and ev["bid"] < ev["ask"]
    elif kind == "sensor":
        assert set(ev) == {"sensor_id", "ts", "readings"}
        assert set(ev["readings"]) == {"temp", "vibration", "pressure"}
        assert all(_finite(v) for v in ev["readings"].values())
        assert ev["readings"]["vibration"] > 0 and ev["readings"]["pressure"] > 0
    else:
        assert set(ev) == {"key", "ts", "values"}
        assert len(ev["values"]) == 8 and all(_finite(v) for v in ev["values"])


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_stream_whatever_the_chunking(kind: str) -> None:
    a, b, c = (make_simulator(kind, 20, seed) for seed in (5, 5, 6))  # type: ignore[arg-type]
    chunked = a.events(300) + a.events(1) + a.events(0) + a.events(199)
    assert chunked == b.events(500)
    assert chunked != c.events(500)


@pytest.mark.parametrize("kind", KINDS)
def test_events_follow_contract_and_time_order(kind: str) -> None:
    sim = make_simulator(kind, 50, seed=1)  # type: ignore[arg-type]
    events = sim.events(3000) + sim.events(3000)
    for ev in events:
        _check_event(kind, ev)
    ts = np.array([ev["ts"] for ev in events])
    assert np.all(np.diff(ts) > 0)
    assert {ev[KEY_FIELD[kind]] for ev in events} == set(sim.keys)
    assert sim.keys[0] == {"tick": "SYM0000", "sensor": "pump-000", "generic": "k0000"}[kind]


@pytest.mark.parametrize("kind", KINDS)
def test_encode_is_compact_json_keyed_by_event_key(kind: str) -> None:
    sim = make_simulator(kind, 3, seed=2)  # type: ignore[arg-type]
    ev = sim.events(1)[0]
    key, value = sim.encode(ev)
    assert key == ev[KEY_FIELD[kind]].encode()
    assert json.loads(value) == ev
    assert b" " not in value


def test_bad_arguments_raise_config_error() -> None:
    with pytest.raises(ConfigError) as exc:
        make_simulator("stocks", 3, 0)  # type: ignore[arg-type]
    assert exc.value.field == "kind"
    with pytest.raises(ConfigError):
        TickSimulator(0)
    with pytest.raises(ConfigError):
        GenericSimulator(3, n_values=0)
    with pytest.raises(ConfigError):
        run_simulator("127.0.0.1:1", "t", rate=0.0)


def test_tick_returns_have_learnable_ar1_momentum() -> None:
    events = TickSimulator(1, seed=11).events(20_000)
    r = np.diff(np.log([ev["price"] for ev in events]))
    fit, hold = r[:10_000], r[10_000:]
    phi = float(fit[1:] @ fit[:-1] / (fit[:-1] @ fit[:-1]))
    assert 0.15 < phi < 0.45
    # out of sample: persistence predicts the last price again, i.e. a zero return
    mse_persist = float(np.mean(hold[1:] ** 2))
    mse_ar = float(np.mean((hold[1:] - phi * hold[:-1]) ** 2))
    assert mse_ar < 0.97 * mse_persist


def test_tick_spread_widens_in_high_volatility() -> None:
    events = TickSimulator(1, seed=4).events(20_000)
    price = np.array([ev["price"] for ev in events])
    rel_spread = np.array([(ev["ask"] - ev["bid"]) for ev in events]) / price
    abs_ret = np.abs(np.diff(np.log(price)))
    wide = rel_spread[1:] > np.median(rel_spread)
    assert abs_ret[wide].mean() > 1.5 * abs_ret[~wide].mean()


def test_sensor_has_daily_seasonality_and_plausible_values() -> None:
    sim = SensorSimulator(3, seed=3, dt_mean=120.0)
    events = sim.events(6_500)
    ts = np.array([ev["ts"] for ev in events])
    assert ts[-1] - ts[0] >= 2 * 86_400
    temp = np.array([ev["readings"]["temp"] for ev in events])
    season = np.sin(2 * np.pi * (ts % 86_400) / 86_400)
    assert np.corrcoef(temp, season)[0, 1] > 0.5
    assert 60 < np.median(temp) < 80
    assert np.mean((temp > 55) & (temp < 85)) > 0.98


def test_sensor_anomalies_are_occasional_spikes() -> None:
    events = SensorSimulator(1, seed=9, anomaly_p=0.01).events(5_000)
    vib = np.array([ev["readings"]["vibration"] for ev in events])
    spikes = vib > 2.5 * np.median(vib)
    assert 0.002 < spikes.mean() < 0.03


def test_generic_values0_is_autocorrelated_per_key() -> None:
    sim = GenericSimulator(4, seed=8)
    events = sim.events(8_000)
    for key in sim.keys:
        v = np.array([ev["values"][0] for ev in events if ev["key"] == key])
        assert np.corrcoef(v[1:], v[:-1])[0, 1] > 0.3


def test_write_jsonl_round_trips(tmp_path: Any) -> None:
    events = make_simulator("sensor", 4, seed=0).events(100)
    path = tmp_path / "hist" / "sensor.jsonl"
    assert write_jsonl(path, events) == 100
    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == events


# ------------------------------------------------------------- through the real broker


@pytest.fixture(scope="module")
def broker() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker() as b:
        yield b


def _consume(broker: EmbeddedBroker, topic: str, expected: int) -> list[Any]:
    consumer = KafkaConsumer(
        topic, bootstrap_servers=broker.bootstrap_servers, group_id=None,
        auto_offset_reset="earliest", fetch_max_wait_ms=10, consumer_timeout_ms=3000,
    )
    try:
        out = []
        for msg in consumer:
            out.append(msg)
            if len(out) >= expected:
                break
        return out
    finally:
        consumer.close()


@pytest.mark.integration
@pytest.mark.parametrize("kind", KINDS)
def test_all_events_arrive_keyed_by_payload_key(broker: EmbeddedBroker, kind: str) -> None:
    topic = f"sim-fast-{kind}"
    broker.create_topic(topic, partitions=4)
    before = time.time()
    sent = run_simulator(broker.bootstrap_servers, topic, kind, n_keys=50, max_events=2000)  # type: ignore[arg-type]
    after = time.time()
    assert sent == 2000
    msgs = _consume(broker, topic, 2000)
    assert len(msgs) == 2000
    partition_of: dict[bytes, int] = {}
    for msg in msgs:
        ev = json.loads(msg.value)
        _check_event(kind, ev)
        assert msg.key == ev[KEY_FIELD[kind]].encode()
        assert partition_of.setdefault(msg.key, msg.partition) == msg.partition
        assert before <= ev["ts"] <= after  # live_ts: stamped at send


@pytest.mark.integration
def test_simulated_ts_keeps_the_seeded_stream(broker: EmbeddedBroker) -> None:
    broker.create_topic("sim-replay", partitions=4)
    sent = run_simulator(broker.bootstrap_servers, "sim-replay", "generic", n_keys=10,
                         max_events=300, seed=42, live_ts=False)
    assert sent == 300
    got: dict[str, list[Any]] = defaultdict(list)
    for msg in _consume(broker, "sim-replay", 300):
        got[msg.key.decode()].append(json.loads(msg.value))
    want: dict[str, list[Any]] = defaultdict(list)
    for ev in GenericSimulator(10, seed=42).events(300):
        want[ev["key"]].append(ev)
    assert got == want  # per-key order survives partitioning


@pytest.mark.integration
def test_rate_is_held_over_the_window(broker: EmbeddedBroker) -> None:
    broker.create_topic("sim-rate", partitions=4)
    sent = run_simulator(broker.bootstrap_servers, "sim-rate", "tick", n_keys=100,
                         rate=2000, duration_s=1.0, progress=True)
    assert 1500 <= sent <= 2500
    ts = sorted(json.loads(m.value)["ts"] for m in _consume(broker, "sim-rate", sent))
    assert len(ts) == sent
    assert 0.7 < ts[-1] - ts[0] < 1.5  # spread over the second, not one burst


@pytest.mark.integration
def test_stop_event_ends_an_unbounded_run(broker: EmbeddedBroker) -> None:
    broker.create_topic("sim-stop", partitions=4)
    stop = threading.Event()
    timer = threading.Timer(0.5, stop.set)
    timer.start()
    t0 = time.monotonic()
    sent = run_simulator(broker.bootstrap_servers, "sim-stop", "sensor", n_keys=5,
                         rate=1000, stop_event=stop)
    timer.join()
    assert time.monotonic() - t0 < 3.0
    assert 100 <= sent <= 1000
