"""Hot swap under load through the embedded broker: no event lost or duplicated, versions
switch cleanly per partition, re-warmed predictions equal a replay of the buffered window with
the new model, and a corrupt version is refused while the old one keeps serving."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from streamer.features import sequence_inputs
from streamer.registry import CURRENT, Registry

from ..kafka_helpers import Topics, json_values, produce, read_topic
from .conftest import make_model
from .service_helpers import running_service, sample, scrape, settings_for

WINDOW = 8


def _wait(predicate, timeout_s: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.parametrize("layers,hidden", [(2, 16), (3, 24)], ids=["same-shape", "deeper"])
def test_swap_under_load_rewarms_and_loses_nothing(
    topics: Topics, tmp_path: Path, layers: int, hidden: int
) -> None:
    """The deeper case re-allocates the state store for 3 layers x 24 between batches."""
    registry = Registry(tmp_path / "registry")
    old, new = make_model(seed=1), make_model(seed=2, layers=layers, hidden=hidden)
    v_old = registry.publish(old, make_current=True)
    rng = np.random.default_rng(0)
    n, n_keys = 3000, 40
    keys = [f"k{int(k)}" for k in rng.integers(0, n_keys, size=n)]
    values = rng.normal(size=(n, 4)).round(5)
    now = time.time()
    records = [(k.encode(), json.dumps({"ts": now + i * 1e-4, "values": v.tolist()}).encode())
               for i, (k, v) in enumerate(zip(keys, values, strict=True))]
    coords: list[tuple[int, int]] = []
    settings = settings_for(topics, tmp_path / "registry", window=WINDOW, registry_poll_s=0.05)
    with running_service(settings) as service:
        feeder_done = threading.Event()

        def feed() -> None:
            for lo in range(0, n, 100):
                coords.extend(produce(topics.bootstrap, topics.input, records[lo:lo + 100]))
                time.sleep(0.03)
            feeder_done.set()

        feeder = threading.Thread(target=feed)
        feeder.start()
        _wait(lambda: len(coords) >= n // 3)
        v_new = registry.publish(new, make_current=True)  # mid-stream, while events flow
        _wait(lambda: service.version == v_new)
        feeder.join()
        out = json_values(read_topic(topics.bootstrap, topics.output, expect=n, timeout_s=60))
        _, text = scrape(service.http.port)

    assert len(out) == n and {(o["partition"], o["offset"]) for o in out} == set(coords)
    assert sample(text, "streamer_model_swaps_total", 'outcome="success"') == 1
    assert sample(text, "streamer_model_info", f'version="{v_new}"') == 1
    # Per partition, versions switch once: old before, new after, never back.
    by_part: dict[int, list[dict]] = defaultdict(list)
    for o in out:
        by_part[o["partition"]].append(o)
    for preds in by_part.values():
        versions = [o["model_version"] for o in sorted(preds, key=lambda o: o["offset"])]
        switch = versions.index(v_new) if v_new in versions else len(versions)
        assert set(versions[:switch]) <= {v_old} and set(versions[switch:]) <= {v_new}
    assert {o["model_version"] for o in out} == {v_old, v_new}

    # Each key's first predictions from the new model come from state re-warmed over its last
    # WINDOW events: replay exactly that with the new model from zeros.
    offset_of = {c: i for i, c in enumerate(coords)}
    ordered = sorted(out, key=lambda o: offset_of[(o["partition"], o["offset"])])
    per_key: dict[str, list[dict]] = defaultdict(list)
    for o in ordered:
        per_key[o["key"]].append(o)
    checked = 0
    for preds in per_key.values():
        idx = [offset_of[(o["partition"], o["offset"])] for o in preds]
        m = sum(o["model_version"] == v_old for o in preds)
        if m == 0 or m == len(preds):
            continue
        feats, _, _ = sequence_inputs(new.spec, torch.as_tensor(values[idx], dtype=torch.float64),
                                      torch.zeros(len(idx), dtype=torch.float64))
        start = max(0, m - WINDOW)
        with torch.no_grad():
            y, _ = new(feats[start:].unsqueeze(0))
        expected = new.to_prediction(y[0, m - start:]).numpy()
        got = np.asarray([o["prediction"] for o in preds[m:]], dtype=np.float32)
        assert_close(got, expected, atol=1e-5, rtol=1e-5)
        checked += 1
    assert checked >= n_keys // 2, "most keys must straddle the swap"


def test_corrupt_version_is_refused_and_old_keeps_serving(
    topics: Topics, tmp_path: Path
) -> None:
    registry = Registry(tmp_path / "registry")
    good = registry.publish(make_model(seed=1), make_current=True)
    bad = registry.publish(make_model(seed=3))
    settings = settings_for(topics, tmp_path / "registry", registry_poll_s=0.05)
    now = time.time()
    event = json.dumps({"key": "a", "ts": now, "values": [1, 2, 3, 4]}).encode()
    with running_service(settings) as service:
        weights = registry.path(bad) / "model.safetensors"
        blob = bytearray(weights.read_bytes())
        blob[-1] ^= 0xFF  # a flipped bit on the shared volume after publication
        weights.write_bytes(bytes(blob))
        (registry.dir / CURRENT).write_text(bad)  # someone points the registry at it anyway
        _wait(lambda: sample(scrape(service.http.port)[1], "streamer_model_swaps_total",
                             'outcome="refused"') == 1)
        produce(topics.bootstrap, topics.input, [(b"a", event)])
        out = json_values(read_topic(topics.bootstrap, topics.output, expect=1))
        assert service.version == good
    assert [o["model_version"] for o in out] == [good]


def test_start_on_corrupt_current_falls_back_to_newest_loadable_in_history(
    topics: Topics, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    registry = Registry(tmp_path / "registry")
    registry.publish(make_model(seed=1), make_current=True)
    good = registry.publish(make_model(seed=2), make_current=True)
    bad = registry.publish(make_model(seed=3), make_current=True)
    weights = registry.path(bad) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])  # truncated on the shared volume
    settings = settings_for(topics, tmp_path / "registry", registry_poll_s=0.05)
    event = json.dumps({"key": "a", "ts": time.time(), "values": [1, 2, 3, 4]}).encode()
    caplog.set_level(logging.ERROR, logger="streamer.hotswap")
    with running_service(settings) as service:
        assert service.version == good, "the newest loadable version, not the oldest"
        text = scrape(service.http.port)[1]
        assert sample(text, "streamer_model_fallbacks_total") == 1
        produce(topics.bootstrap, topics.input, [(b"a", event)])
        out = json_values(read_topic(topics.bootstrap, topics.output, expect=1))
        time.sleep(0.3)  # several watcher polls: the refused CURRENT is not swapped in
        assert service.version == good
    assert [o["model_version"] for o in out] == [good]
    assert any(bad in r.getMessage() and good in r.getMessage() for r in caplog.records)


def test_unreadable_current_pointer_falls_back_too(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "registry")
    good = registry.publish(make_model(seed=1), make_current=True)
    (registry.dir / CURRENT).write_text("../../etc/passwd\n")
    artifact, refused, reasons = registry.load_serving()
    assert artifact.metadata.version == good and refused == CURRENT and reasons
    (registry.dir / CURRENT).write_bytes(b"\x00\xffgarbage../../etc\n")  # not even UTF-8
    artifact, refused, reasons = registry.load_serving()
    assert artifact.metadata.version == good and refused == CURRENT
    assert "unreadable" in reasons[0]


def test_incomplete_version_is_retried_until_its_weights_arrive(
    topics: Topics, tmp_path: Path
) -> None:
    """CURRENT names a version whose weights file arrives later (a file-by-file sync): the
    running streamer retries it with backoff and then serves it, as a fresh start would."""
    registry = Registry(tmp_path / "registry")
    good = registry.publish(make_model(seed=1), make_current=True)
    late = registry.publish(make_model(seed=3))
    weights = registry.path(late) / "model.safetensors"
    parked = tmp_path / "in-transit.safetensors"
    weights.rename(parked)  # the sync has not copied it yet
    settings = settings_for(topics, tmp_path / "registry", registry_poll_s=0.05)
    with running_service(settings) as service:
        (registry.dir / CURRENT).write_text(late)
        _wait(lambda: sample(scrape(service.http.port)[1], "streamer_model_swaps_total",
                             'outcome="refused"') >= 1)
        assert service.version == good
        time.sleep(2.0)  # the weights arrive 2 s later
        parked.rename(weights)
        _wait(lambda: service.version == late)
        text = scrape(service.http.port)[1]
    assert sample(text, "streamer_model_swaps_total", 'outcome="retried"') >= 1
    assert sample(text, "streamer_model_swaps_total", 'outcome="success"') == 1
    assert sample(text, "streamer_model_info", f'version="{late}"') == 1


def test_a_newer_version_replaces_one_being_retried(topics: Topics, tmp_path: Path) -> None:
    registry = Registry(tmp_path / "registry")
    registry.publish(make_model(seed=1), make_current=True)
    stuck = registry.publish(make_model(seed=3))
    (registry.path(stuck) / "model.safetensors").unlink()
    settings = settings_for(topics, tmp_path / "registry", registry_poll_s=0.05)
    with running_service(settings) as service:
        (registry.dir / CURRENT).write_text(stuck)
        _wait(lambda: sample(scrape(service.http.port)[1], "streamer_model_swaps_total",
                             'outcome="refused"') >= 1)
        newer = registry.publish(make_model(seed=5), make_current=True)
        _wait(lambda: service.version == newer, timeout_s=10)
