"""Streamer figures for the README and closing notes (prints them; not a test).

    .venv/bin/python benchmarks/bench_streamer.py [--events 100000] [--keys 1000] [--rate 5000]

1. full-speed throughput: N events preloaded into the embedded broker, then the service is
   started and timed until every prediction is acknowledged (median of --repeats runs);
2. end-to-end latency at a steady --rate: the simulator stamps each event with the wall time at
   send; we report emitted_at - ts from the predictions and the service's own histogram;
3. state bytes per key; engine-only steps/s for reference.
Default model: generic F=8, H=64, L=2, 1,000 keys.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from confluent_kafka import Consumer, Producer

from streamer.artifact import save_artifact
from streamer.broker import EmbeddedBroker
from streamer.engine import Engine
from streamer.features import default_spec
from streamer.model import LSTMModel, ModelConfig
from streamer.service import Service
from streamer.settings import StreamerSettings
from streamer.simulate import make_simulator
from streamer.state import StateStore

F, H, L = 8, 64, 2


def make_artifact(root: Path) -> Path:
    torch.manual_seed(0)
    spec = default_spec("generic", n_features=F)
    model = LSTMModel(ModelConfig(input_size=F, hidden_size=H, num_layers=L), spec)
    save_artifact(root / "model", model, version="bench")
    return root / "model"


def preload(bootstrap: str, topic: str, n: int, keys: int) -> None:
    sim = make_simulator("generic", keys, seed=1, n_values=F)
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    now = time.time()
    for i, ev in enumerate(sim.events(n)):
        ev["ts"] = now + i * 1e-6
        key, value = sim.encode(ev)
        while True:
            try:
                producer.produce(topic, value, key)
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    producer.flush(30)


def count_output(bootstrap: str, topic: str, expect: int, timeout_s: float,
                 latencies: list[float] | None = None) -> int:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-{time.time()}",
                         "auto.offset.reset": "earliest", "fetch.wait.max.ms": 10})
    consumer.subscribe([topic])
    got, deadline, values = 0, time.monotonic() + timeout_s, []
    while got < expect and time.monotonic() < deadline:
        for msg in consumer.consume(10000, timeout=0.2):
            if msg.error():
                continue
            got += 1
            if latencies is not None:
                values.append(msg.value())  # parsed afterwards: no GIL taken from the service
    consumer.close()
    for value in values:
        o = json.loads(value)
        latencies.append(o["emitted_at"] - o["ts"])  # type: ignore[union-attr]
    return got


def settings(bootstrap: str, model: Path, group: str) -> StreamerSettings:
    return StreamerSettings(bootstrap_servers=bootstrap, model=model, group_id=group,
                            device="cpu", metrics_address="127.0.0.1:0", capacity=10_000)


def run_service(s: StreamerSettings) -> tuple[Service, threading.Event, threading.Thread]:
    service = Service.from_settings(s)
    stop = threading.Event()
    thread = threading.Thread(target=service.run, args=(stop,), daemon=True)
    thread.start()
    return service, stop, thread


def throughput(model: Path, n: int, keys: int) -> float:
    with EmbeddedBroker() as broker:
        for t, p in (("events", 8), ("predictions", 8), ("events.dlq", 1)):
            broker.create_topic(t, p)
        preload(broker.bootstrap_servers, "events", n, keys)
        t0 = time.perf_counter()
        service, stop, thread = run_service(settings(broker.bootstrap_servers, model, "tp"))
        got = count_output(broker.bootstrap_servers, "predictions", n, timeout_s=600)
        elapsed = time.perf_counter() - t0
        stop.set()
        thread.join()
        assert got == n, f"only {got} of {n} predictions"
        return n / elapsed


def steady_latency(model: Path, rate: float, seconds: float, keys: int, partitions: int,
                   linger_ms: int) -> dict[str, float]:
    with EmbeddedBroker() as broker:
        for t, p in (("events", partitions), ("predictions", partitions), ("events.dlq", 1)):
            broker.create_topic(t, p)
        service, stop, thread = run_service(settings(broker.bootstrap_servers, model, "lat"))
        time.sleep(2.0)  # group join
        lat: list[float] = []
        reader = threading.Thread(target=count_output, args=(
            broker.bootstrap_servers, "predictions", int(rate * seconds), seconds + 30, lat))
        reader.start()
        # The simulator gets its own process (as in production) so it does not compete with
        # the service for this interpreter's GIL.
        sim = subprocess.run(
            [sys.executable, "-m", "streamer.cli", "simulate", "--bootstrap-servers",
             broker.bootstrap_servers, "--kind", "generic", "--keys", str(keys), "--rate",
             str(rate), "--duration", str(seconds), "--linger-ms", str(linger_ms), "--quiet"],
            capture_output=True, text=True,
        )
        sent = int(rate * seconds) if sim.returncode == 0 else -1
        reader.join()
        stop.set()
        thread.join()
        warm = np.asarray(lat[len(lat) // 10:])  # drop the first 10% (warm-up)
        return {"sent": sent, "received": len(lat), "p50": float(np.percentile(warm, 50)),
                "p99": float(np.percentile(warm, 99)),
                "achieved_rate": len(lat) / seconds}


def engine_only(model_dir: Path, keys: int, batch: int) -> float:
    from streamer.artifact import load_artifact

    model = load_artifact(model_dir).model
    store = StateStore(L, H, F, F, capacity=keys, window=32)
    engine = Engine(model, store)
    rng = np.random.default_rng(0)
    names = [f"k{i}" for i in range(keys)]
    runs = []
    for _ in range(20):
        ks = [names[i] for i in rng.integers(0, keys, size=batch)]
        raw, ts = rng.normal(size=(batch, F)), np.arange(batch, dtype=np.float64)
        t0 = time.perf_counter()
        engine.process(ks, [0] * batch, raw, ts, 0.0)
        runs.append(time.perf_counter() - t0)
    return batch / statistics.median(runs[2:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--keys", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=5000)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        model = make_artifact(Path(tmp))
        store = StateStore(L, H, F, F, capacity=args.keys, window=32)
        print(f"model: generic F={F} H={H} L={L}; keys={args.keys}; torch threads=1")
        print(f"state bytes per key: {store.bytes_per_key} "
              f"({store.bytes_per_key * args.keys / 2**20:.2f} MiB for {args.keys} keys)")
        print(f"engine only, batch 2048: {engine_only(model, args.keys, 2048):,.0f} events/s")
        rates = [throughput(model, args.events, args.keys) for _ in range(args.repeats)]
        print(f"full speed through the embedded broker ({args.events:,} events): median "
              f"{statistics.median(rates):,.0f} events/s (runs: "
              f"{', '.join(f'{r:,.0f}' for r in rates)})")
        for partitions, linger in ((8, 5), (4, 5), (4, 20)):
            lat = steady_latency(model, args.rate, args.seconds, args.keys, partitions, linger)
            print(f"steady {args.rate:,.0f} events/s for {args.seconds:.0f}s, {partitions} "
                  f"partitions, producer linger {linger} ms: achieved "
                  f"{lat['achieved_rate']:,.0f}/s, end-to-end (emitted_at - ts) "
                  f"p50 {lat['p50'] * 1e3:.1f} ms, p99 {lat['p99'] * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
