"""Durable per-key state through the real service and the embedded broker: a stop and a
restart (with a changelog) give every key exactly the state and the predictions of an
uninterrupted run; /readyz is false while restoring; corrupt changelog records are skipped,
counted and logged with their key, and that key starts cold."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from kafka import KafkaProducer

from streamer.broker import EmbeddedBroker
from streamer.checkpoint import MARKER_HEADER, MARKER_KEY, encode_marker, encode_states
from streamer.confluent_edge import ConfluentEdge
from streamer.engine import Engine
from streamer.errors import ConfigError
from streamer.events import Message
from streamer.kafka_edge import KafkaEdge
from streamer.recovery import StateRecovery
from streamer.service import Service
from streamer.state import StateStore

from ..kafka_helpers import Topics, produce
from ..state_reference import ListChangelog, compare, make_events, uninterrupted
from .conftest import make_model
from .fault_scenarios import _read_outputs
from .service_helpers import running_service, sample, scrape, settings_for


def _settings(topics: Topics, artifact_dir: Path, **extra: Any) -> Any:
    return settings_for(topics, artifact_dir, changelog=True, checkpoint_interval_s=None,
                        checkpoint_interval_events=150, max_batch_events=64,
                        session_timeout_ms=3000, heartbeat_interval_ms=500,
                        request_timeout_ms=5000, **extra)


@pytest.fixture
def state_topics(broker: EmbeddedBroker, topics: Topics) -> Topics:
    broker.create_topic(f"g-{topics.input}-state", partitions=4)
    return topics


def test_stop_and_restart_restore_every_key_exactly(
    state_topics: Topics, artifact_dir: Path, kafka_client: str
) -> None:
    topics = state_topics
    records = make_events(1200, 40, seed=1)
    first = produce(topics.bootstrap, topics.input, records[:700])
    settings = _settings(topics, artifact_dir, kafka_client=kafka_client)
    with running_service(settings):
        _read_outputs(topics.bootstrap, topics.output, set(first), timeout_s=60)
    coords = first + produce(topics.bootstrap, topics.input, records[700:])
    reference, engine = uninterrupted(artifact_dir, records, coords)
    with running_service(settings) as second:
        outputs = _read_outputs(topics.bootstrap, topics.output, set(coords), timeout_s=60)
        port = second.http.port
        text = scrape(port)[1]
        # The state after recovery and replay equals the uninterrupted run's, key by key
        # (read while the service runs, idle: confluent's close releases every key).
        ref, got = engine.store, second.store
        for key in {k.decode() for k, _ in records}:
            a, b = ref.slot(key), got.slot(key)
            assert b is not None, key
            torch.testing.assert_close(got.h[:, b], ref.h[:, a], atol=1e-5, rtol=0)
            torch.testing.assert_close(got.c[:, b], ref.c[:, a], atol=1e-5, rtol=0)
            torch.testing.assert_close(got.stats[b], ref.stats[a], atol=1e-5, rtol=0)
            torch.testing.assert_close(got.win[b], ref.win[a], atol=1e-5, rtol=0)
    result = compare(outputs, reference)
    assert result["missing"] == 0 and result["differing"] == 0, result
    assert sample(text, "streamer_state_restored_keys_total") > 0
    assert sample(text, "streamer_state_restore_records_per_second") > 0


def test_readyz_is_false_until_restore_is_done(
    state_topics: Topics, artifact_dir: Path, kafka_client: str
) -> None:
    topics = state_topics
    coords = produce(topics.bootstrap, topics.input, make_events(300, 10))
    settings = _settings(topics, artifact_dir, kafka_client=kafka_client)
    with running_service(settings):
        _read_outputs(topics.bootstrap, topics.output, set(coords), timeout_s=60)
    seen: list[tuple[int, str]] = []
    service = Service.from_settings(settings)

    base = ConfluentEdge if kafka_client == "confluent" else KafkaEdge

    class Watching(base):  # type: ignore[valid-type,misc]
        def read_changelog(self, partitions: set[int]):  # type: ignore[no-untyped-def]
            for record in super().read_changelog(partitions):
                seen.append(scrape(service.http.port, "/readyz"))
                yield record

    stop = threading.Event()
    edge = Watching(
        settings, service._on_assign, service._on_revoke, stop=stop,
        on_revoking=service._on_revoking, changelog_topic=settings.state_topic)
    thread = threading.Thread(target=service.run, args=(stop, edge), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not service.health.ready() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert service.health.ready()
    finally:
        stop.set()
        thread.join(30)
    assert seen, "nothing was restored"
    assert all(code == 503 and "restoring state" in body for code, body in seen), seen[:3]


@pytest.mark.parametrize("state_partitions", [0, 2])
def test_a_missing_or_too_small_changelog_topic_fails_at_start_naming_it(
    broker: EmbeddedBroker, topics: Topics, artifact_dir: Path, kafka_client: str,
    state_partitions: int,
) -> None:
    """Changelog partition N holds input partition N's keys: without the topic, or with fewer
    partitions than the input (4), no restore could succeed, so the service refuses to start
    instead of retrying forever."""
    changelog = f"g-{topics.input}-state"
    if state_partitions:
        broker.create_topic(changelog, partitions=state_partitions)
    service = Service.from_settings(_settings(topics, artifact_dir, kafka_client=kafka_client))
    with pytest.raises(ConfigError, match="changelog_topic") as err:
        service.run(threading.Event())
    assert changelog in str(err.value)
    assert ("does not exist" if not state_partitions else "has 2 partitions") in str(err.value)


def test_an_input_topic_created_after_start_is_served_with_a_changelog(
    broker: EmbeddedBroker, topics: Topics, artifact_dir: Path, kafka_client: str,
) -> None:
    """The start-up check of the changelog topic must not blind the group's subscription to
    an input topic that appears later (kafka-python: a full metadata fetch on the group's
    consumer did)."""
    later = Topics(topics.bootstrap, f"{topics.input}-later", topics.output, topics.dlq)
    broker.create_topic(f"g-{later.input}-state", partitions=4)
    settings = _settings(later, artifact_dir, kafka_client=kafka_client)
    with running_service(settings) as service:
        time.sleep(1.0)
        try:
            broker.create_topic(later.input, partitions=4)
        except RuntimeError as exc:  # kafka-python's metadata request auto-created it
            assert "already exists" in str(exc)
        coords = produce(topics.bootstrap, later.input, make_events(40, 4, seed=5))
        outputs = _read_outputs(topics.bootstrap, topics.output, set(coords), timeout_s=60)
        assert service.health.ready(), service.health.not_ready_reason()
    assert {(o["partition"], o["offset"]) for o in outputs} >= set(coords)


def test_corrupt_record_is_skipped_counted_and_logged_with_its_key(
    state_topics: Topics, artifact_dir: Path, caplog: pytest.LogCaptureFixture,
    kafka_client: str,
) -> None:
    topics = state_topics
    changelog = f"g-{topics.input}-state"
    producer = KafkaProducer(bootstrap_servers=topics.bootstrap)
    producer.send(changelog, key=b"k-broken", value=b"LSTS\x01garbage", partition=2)
    producer.send(changelog, key=MARKER_KEY, value=encode_marker(0, 0.0), partition=2,
                  headers=[MARKER_HEADER])
    producer.flush()
    producer.close()
    records = make_events(200, 8, seed=3)
    coords = produce(topics.bootstrap, topics.input, records)
    caplog.set_level(logging.ERROR, logger="streamer.recovery")
    with running_service(_settings(topics, artifact_dir, kafka_client=kafka_client)) as service:
        outputs = _read_outputs(topics.bootstrap, topics.output, set(coords), timeout_s=60)
        text = scrape(service.http.port)[1]
    assert sample(text, "streamer_state_records_skipped_total", 'reason="corrupt"') == 1
    assert any("k-broken" in r.getMessage() for r in caplog.records)
    reference, _ = uninterrupted(artifact_dir, records, coords)
    assert compare(outputs, reference)["differing"] == 0
    assert np.isfinite([o["prediction"][0] for o in outputs]).all()


def _engine(seed: int = 0, capacity: int = 64) -> Engine:
    model = make_model(seed=seed)
    return Engine(model, StateStore.for_model(model, capacity=capacity, window=8))


def _step(engine: Engine, keys: list[str], part: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    engine.process(keys, [part] * len(keys), rng.normal(size=(len(keys), 4)),
                   1000.0 + seed + np.arange(len(keys), dtype=np.float64), 0.0)


def test_restore_takes_the_last_complete_checkpoint_and_honours_tombstones() -> None:
    source, edge = _engine(), ListChangelog()
    rec = StateRecovery(source, "cl", None, None)
    _step(source, ["a", "b", "c"], 1, 0)
    rec.processed([Message(b"a", b"", 1, 9)])
    rec.checkpoint(edge, {1}, "v1")
    at_marker = {k: source.store.h[:, source.store.slot(k)].clone() for k in "ab"}
    source.store.release(["c"])
    source.store.evictions = [("c", 1)]  # as if evicted for capacity
    _step(source, ["a"], 1, 1)
    rec.processed([Message(b"a", b"", 1, 19)])
    rec.checkpoint(edge, {1}, "v1")  # complete: tombstone for c, a's newer state
    newer_a = source.store.h[:, source.store.slot("a")].clone()
    _step(source, ["a", "b"], 1, 2)
    # A checkpoint cut short by a crash: records without their marker.
    for key in ("a", "b"):
        value = encode_states(source.store, [key], "v1", source.store.last_seen([key]))[0]
        edge.send_changelog(1, key.encode(), value)
    target = _engine()
    stats = StateRecovery(target, "cl", None, None).restore(edge, {1}, "v1")
    assert edge.sought == {1: 20} and stats.keys == 2
    assert "c" not in target.store
    assert torch.equal(target.store.h[:, target.store.slot("a")], newer_a)
    assert torch.equal(target.store.h[:, target.store.slot("b")], at_marker["b"])


def test_restore_of_another_model_version_rewarms_or_resets_per_policy() -> None:
    source, edge = _engine(seed=1), ListChangelog()
    rec = StateRecovery(source, "cl", None, None)
    _step(source, ["a", "b"] * 5, 0, 3)
    rec.processed([Message(b"a", b"", 0, 0)])
    rec.checkpoint(edge, {0}, "old")
    serving = _engine(seed=2)  # another model: its h, c must not come from "old"
    StateRecovery(serving, "cl", None, None, swap_policy="rewarm").restore(edge, {0}, "new")
    store = serving.store
    slots = torch.tensor([store.slot("a"), store.slot("b")])
    x, lengths = store.window_sequences(slots)
    h0, c0 = serving.model.zero_state(2)
    _, h, _ = serving.model.forward_padded(x, lengths.cpu(), h0, c0)
    torch.testing.assert_close(store.h[:, slots], h)
    reset = _engine(seed=2)
    StateRecovery(reset, "cl", None, None, swap_policy="reset").restore(edge, {0}, "new")
    assert float(reset.store.h.abs().sum()) == 0.0
    assert float(reset.store.win.abs().sum()) > 0  # features memory and window kept
