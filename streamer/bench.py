"""``streamer bench``: the streamer against a no-model relay, side by side, in one run.

Setup (project method): an embedded broker (``streamer.broker``, 3 brokers and 4 partitions by
default), identical lz4-compressed generic events (F=8 values, as real producers send them) and
a model with H=64, L=2. Two contenders read the same input and write one record per event:

- the **relay**: a confluent-kafka consumer -> producer with no model, the floor of the setup
  (same fetch wait and producer linger as the streamer, auto-commit);
- the **streamer**: the real service (state store and model on), once per Kafka client.

Measured per repeat, then the median over repeats is printed:

1. full speed: N events are preloaded and the contender is started; the clock runs from its
   first output until the output topic's high watermarks add up to N, and the rate counts the
   events output in that span (start-up and group join left out, alike for every contender);
2. latency at a fixed rate: a load-generator subprocess (its own interpreter, as producers and
   consumers are in production) sends events stamped with the wall time at send and reads the
   outputs; end-to-end latency = receipt time - event time, the first 10% dropped as warm-up;
3. the service's per-stage timers (``streamer.stages``) for both phases, and state bytes per key.

Usage::

    streamer bench --keys 1000 --events 100000 --rate 1000 --repeats 3
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import Consumer, Producer, TopicPartition

F, H, L = 8, 64, 2
RELAY = "relay"


@dataclass(frozen=True)
class BenchConfig:
    keys: int = 1000
    events: int = 100_000
    rate: float = 1000.0
    seconds: float = 10.0
    partitions: int = 4
    brokers: int = 3
    clients: tuple[str, ...] = ("kafka-python", "confluent")
    device: str = "cpu"
    repeats: int = 3
    fetch_max_wait_ms: int = 10
    overrides: tuple[tuple[str, str], ...] = ()  # more streamer settings, as (name, value)
    phases: tuple[str, ...] = ("full", "rate")


@dataclass
class Figures:
    """One contender's figures over the repeats."""

    rate: list[float] = field(default_factory=list)
    p50: list[float] = field(default_factory=list)
    p95: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)
    stages_full: list[dict[str, float]] = field(default_factory=list)
    stages_rate: list[dict[str, float]] = field(default_factory=list)


# --- events and topics ---------------------------------------------------------------------


def _event_bytes(keys: int, n: int, seed: int) -> list[tuple[bytes, bytes]]:
    from streamer.simulate import make_simulator

    sim = make_simulator("generic", keys, seed=seed, n_values=F)
    now = time.time()
    out = []
    for i, ev in enumerate(sim.events(n)):
        ev["ts"] = now + i * 1e-6
        out.append(sim.encode(ev))
    return out


def drain(consumer: Consumer, timeout_s: float, limit: int = 1000) -> list[Any]:
    """Wait up to ``timeout_s`` for one message, then take what is already queued (up to
    ``limit``). ``Consumer.consume(n, timeout)`` alone waits until n messages or the timeout,
    which would add up to the timeout to every record's latency at light load."""
    first = consumer.poll(timeout_s)
    if first is None:
        return []
    return [first, *consumer.consume(limit - 1, timeout=0)]


def _producer(bootstrap: str, **extra: Any) -> Producer:
    return Producer({"bootstrap.servers": bootstrap, "compression.type": "lz4",
                     "linger.ms": 5, "acks": "all", **extra})


def preload(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    producer = _producer(bootstrap)
    for key, value in records:
        while True:
            try:
                producer.produce(topic, value, key)
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    if producer.flush(60):
        raise RuntimeError("preload: records not acknowledged within 60 s")
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "bench-watermarks"})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        dropped = sum(consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=5)[0]
                      for p in partitions)
    finally:
        consumer.close()
    if dropped:  # the contenders would wait for outputs of events that are gone
        raise SystemExit(
            f"streamer bench: the embedded broker dropped {dropped:,} of {len(records):,} "
            "input events (it keeps only the newest 5 MiB per partition): use fewer --events "
            "or more --partitions")


def high_watermarks(bootstrap: str, topic: str, partitions: int) -> Callable[[], int]:
    """A function returning the sum of ``topic``'s high watermarks (one request per partition)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "bench-watermarks"})
    tps = [TopicPartition(topic, p) for p in range(partitions)]

    def total() -> int:
        return sum(consumer.get_watermark_offsets(tp, timeout=5)[1] for tp in tps)

    return total


# --- the relay -----------------------------------------------------------------------------


class Relay:
    """A no-model consumer -> producer on confluent-kafka (librdkafka), in a thread."""

    def __init__(self, bootstrap: str, source: str, sink: str, group: str,
                 fetch_max_wait_ms: int) -> None:
        self.consumer = Consumer({
            "bootstrap.servers": bootstrap, "group.id": group, "auto.offset.reset": "earliest",
            "fetch.wait.max.ms": fetch_max_wait_ms, "enable.auto.commit": True,
        })
        self.producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 1, "acks": "all"})
        self.source, self.sink = source, sink
        self.assigned = threading.Event()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Relay:
        self.consumer.subscribe([self.source], on_assign=lambda c, ps: self.assigned.set())
        self.thread.start()
        return self

    def _run(self) -> None:
        produce, poll, sink = self.producer.produce, self.producer.poll, self.sink
        while not self.stop.is_set():
            for msg in drain(self.consumer, 0.1):
                if msg.error() is None:
                    while True:
                        try:
                            produce(sink, msg.value(), msg.key())
                            break
                        except BufferError:
                            poll(0.01)
            poll(0)
        self.producer.flush(10)
        self.consumer.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(30)


# --- the streamer --------------------------------------------------------------------------


class StreamerUnderTest:
    """The real service in a thread of this process, so its stage timers can be read."""

    def __init__(self, bootstrap: str, model: Path, source: str, sink: str, group: str,
                 client: str, cfg: BenchConfig) -> None:
        from streamer.service import Service
        from streamer.settings import StreamerSettings

        extra: dict[str, Any] = {}
        if "kafka_client" in StreamerSettings.model_fields:
            extra["kafka_client"] = client
        elif client != "kafka-python":
            raise ValueError(f"this build has no {client} client")
        settings = StreamerSettings(
            bootstrap_servers=bootstrap, model=model, group_id=group, input_topic=source,
            output_topic=sink, device=cfg.device, metrics_address="127.0.0.1:0",
            **{"capacity": max(10_000, cfg.keys), "fetch_max_wait_ms": cfg.fetch_max_wait_ms,
               **extra, **dict(cfg.overrides)},  # --set wins (cli refuses the fixed ones)
        )
        self.service = Service.from_settings(settings)
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.closing = False  # close() was called: the thread ending is expected
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.service.run(self.stop)
        except BaseException as exc:  # noqa: BLE001 - reported by check() on the bench's thread
            self.error = exc

    def check(self) -> None:
        """Raise RuntimeError when the service stopped on its own (e.g. a setting it refused
        at start), so the bench ends at once instead of waiting for outputs that never come."""
        if not self.thread.is_alive() and not self.closing:
            raise RuntimeError(f"bench: the streamer stopped: {type(self.error).__name__}: "
                               f"{self.error}")

    @property
    def assigned(self) -> bool:
        return bool(self.service._assigned)

    def start(self) -> StreamerUnderTest:
        self.thread.start()
        return self

    def close(self) -> None:
        self.closing = True
        self.stop.set()
        self.thread.join(60)
        self.service.edge = None  # its clients go now, not after the broker is gone


# --- the phases ----------------------------------------------------------------------------


def _wait(cond: Callable[[], bool], timeout_s: float, what: str,
          interval_s: float = 0.01, runner: object = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if isinstance(runner, StreamerUnderTest):
            runner.check()
        if time.monotonic() > deadline:
            raise TimeoutError(f"bench: {what} not within {timeout_s:.0f} s")
        time.sleep(interval_s)


def full_speed(bootstrap: str, contender: str, model: Path, cfg: BenchConfig,
               tag: str) -> tuple[float, dict[str, float] | None]:
    """Events/s in the steady state: from the first output in the output topic until every
    event's output is there, counting the events output in between. Start-up (building the
    service, joining the group, the first fetch) is left out alike for every contender; it
    was half of the relay's time at 100,000 events. The stage timers cover the same span. A
    run too short for that (over 90% output before the first reading) is timed from start."""
    sink = f"{tag}.out"
    done = high_watermarks(bootstrap, sink, cfg.partitions)
    started = time.perf_counter()
    runner: Relay | StreamerUnderTest
    if contender == RELAY:
        runner = Relay(bootstrap, "events", sink, f"{tag}-g", cfg.fetch_max_wait_ms).start()
    else:
        runner = StreamerUnderTest(bootstrap, model, "events", sink, f"{tag}-g", contender,
                                   cfg).start()
    try:
        _wait(lambda: done() > 0, 600, f"a first output of {contender}", interval_s=0.002,
              runner=runner)
        t0 = time.perf_counter()
        first = done()
        t0 = (t0 + time.perf_counter()) / 2  # the watermarks were read in between
        steady = first <= 0.9 * cfg.events
        if not steady:
            first, t0 = 0, started
            print(f"bench: {contender} output over 90% of {cfg.events:,} events before the "
                  "first reading: its full speed is timed from start, start-up included, "
                  "and ratios to it compare unlike figures (use more --events)", file=sys.stderr)
        elif isinstance(runner, StreamerUnderTest):
            runner.service.stages.reset()
        _wait(lambda: done() >= cfg.events, 600, f"{cfg.events} outputs of {contender}",
              interval_s=0.002, runner=runner)
        elapsed = time.perf_counter() - t0
    finally:
        runner.close()
    stages = runner.service.stages.totals() if isinstance(runner, StreamerUnderTest) else None
    return (cfg.events - first) / elapsed, stages


def at_rate(bootstrap: str, contender: str, model: Path, cfg: BenchConfig,
            tag: str) -> tuple[dict[str, float], dict[str, float] | None]:
    """p50/p95/p99 end-to-end latency (seconds) at ``cfg.rate`` events/s."""
    source, sink = f"{tag}.in", f"{tag}.out"
    runner: Relay | StreamerUnderTest
    if contender == RELAY:
        runner = Relay(bootstrap, source, sink, f"{tag}-g", cfg.fetch_max_wait_ms).start()
        _wait(runner.assigned.is_set, 60, "relay assignment")
    else:
        runner = StreamerUnderTest(bootstrap, model, source, sink, f"{tag}-g", contender,
                                   cfg).start()
        _wait(lambda: runner.assigned, 60, "streamer assignment",  # type: ignore[union-attr]
              runner=runner)
    try:
        with tempfile.NamedTemporaryFile(suffix=".npy") as out:
            proc = subprocess.run(
                [sys.executable, "-m", "streamer.bench", "--loadgen", bootstrap, source, sink,
                 str(cfg.rate), str(cfg.seconds), str(cfg.keys), str(cfg.partitions), out.name],
                capture_output=True, text=True, timeout=cfg.seconds + 120,
            )
            if proc.returncode != 0:
                raise RuntimeError(f"load generator failed: {proc.stderr[-2000:]}")
            lat = np.load(out.name)
    finally:
        runner.close()
    warm = lat[len(lat) // 10:]
    p50, p95, p99 = np.percentile(warm, [50, 95, 99]) if len(warm) else (np.nan,) * 3
    stages = runner.service.stages.totals() if isinstance(runner, StreamerUnderTest) else None
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99)}, stages


def loadgen(bootstrap: str, source: str, sink: str, rate: float, seconds: float, keys: int,
            partitions: int, out: str) -> None:
    """The load generator (run as a subprocess): paced lz4 events in, latencies out (.npy)."""
    from streamer.simulate import make_simulator

    sim = make_simulator("generic", keys, seed=7, n_values=F)
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "bench-loadgen",
                         "fetch.wait.max.ms": 1, "enable.auto.commit": False})
    consumer.assign([TopicPartition(sink, p, 0) for p in range(partitions)])
    producer = _producer(bootstrap, **{"linger.ms": 1})
    n = int(rate * seconds)
    received: list[tuple[float, bytes]] = []

    def read() -> None:
        deadline = time.monotonic() + seconds + 60
        while len(received) < n and time.monotonic() < deadline:
            for msg in drain(consumer, 0.05):
                if msg.error() is None:
                    received.append((time.time(), msg.value()))

    reader = threading.Thread(target=read)
    reader.start()
    start = time.monotonic()
    for i, ev in enumerate(sim.events(n)):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        ev["ts"] = time.time()
        key, value = sim.encode(ev)
        producer.produce(source, value, key)
        producer.poll(0)
    producer.flush(30)
    reader.join()
    consumer.close()
    lat = [t - float(json.loads(v)["ts"]) for t, v in received]
    np.save(out, np.asarray(lat, dtype=np.float64))


# --- orchestration and printing ------------------------------------------------------------


def make_model(root: Path) -> tuple[Path, int]:
    """A generic F=8, H=64, L=2 model artifact; returns its path and state bytes per key."""
    import torch

    from streamer.artifact import save_artifact
    from streamer.features import default_spec
    from streamer.model import LSTMModel, ModelConfig
    from streamer.state import StateStore

    torch.manual_seed(0)
    spec = default_spec("generic", n_features=F)
    model = LSTMModel(ModelConfig(input_size=F, hidden_size=H, num_layers=L), spec)
    save_artifact(root / "model", model, version="bench")
    return root / "model", StateStore.for_model(model, capacity=1, window=32).bytes_per_key


def run_bench(cfg: BenchConfig, say: Callable[[str], None] = print) -> dict[str, Figures]:
    """Run every repeat, print the table; returns the raw figures per contender."""
    import torch

    from streamer.broker import EmbeddedBroker

    torch.set_num_threads(1)
    contenders = (RELAY, *cfg.clients)
    figures = {c: Figures() for c in contenders}
    with tempfile.TemporaryDirectory() as tmp:
        model, bytes_per_key = make_model(Path(tmp))
        records = _event_bytes(cfg.keys, cfg.events, seed=1)
        for r in range(cfg.repeats):
            with EmbeddedBroker(num_brokers=cfg.brokers) as broker:
                bs = broker.bootstrap_servers
                topics = ["events", *(f"{c}{r}.{p}.{s}" for c in range(len(contenders))
                                      for p in ("full", "rate") for s in ("in", "out"))]
                # Each contender's changelog (group "<tag>-g"), used when --set changelog=true.
                topics += [f"{c}{r}.{p}-g-state" for c in range(len(contenders))
                           for p in ("full", "rate")]
                for t in (*topics, "events.dlq"):
                    broker.create_topic(t, cfg.partitions)
                preload(bs, "events", records)
                for i, c in enumerate(contenders):
                    rate, stages = (full_speed(bs, c, model, cfg, f"{i}{r}.full")
                                    if "full" in cfg.phases else (np.nan, None))
                    figures[c].rate.append(rate)
                    if stages:
                        figures[c].stages_full.append(stages)
                    nan = {"p50": np.nan, "p95": np.nan, "p99": np.nan}
                    lat, stages = (at_rate(bs, c, model, cfg, f"{i}{r}.rate")
                                   if "rate" in cfg.phases else (nan, None))
                    figures[c].p50.append(lat["p50"])
                    figures[c].p95.append(lat["p95"])
                    figures[c].p99.append(lat["p99"])
                    if stages:
                        figures[c].stages_rate.append(stages)
                    say(f"  run {r + 1}/{cfg.repeats} {c:>12}: {rate:>9,.0f} events/s, "
                        f"p50/p95/p99 {lat['p50'] * 1e3:.1f}/{lat['p95'] * 1e3:.1f}/"
                        f"{lat['p99'] * 1e3:.1f} ms at {cfg.rate:,.0f}/s")
    say(format_table(cfg, figures, bytes_per_key))
    return figures


def _ratio(values: list[float], relay: list[float]) -> float:
    return statistics.median(v / r for v, r in zip(values, relay, strict=True))


def format_table(cfg: BenchConfig, figures: dict[str, Figures], bytes_per_key: int) -> str:
    from streamer.stages import STAGES

    relay = figures[RELAY]
    lines = [
        f"streamer bench: {cfg.brokers} brokers, {cfg.partitions} partitions, "
        f"{cfg.events:,} lz4 events over {cfg.keys:,} keys; generic F={F} H={H} L={L} on "
        f"{cfg.device}; median of {cfg.repeats} run(s); ratios per run, then median",
        f"{'':14}{'full speed ev/s':>16}{'x relay':>9}   "
        f"{'at ' + format(cfg.rate, ',.0f') + ' ev/s: p50':>20}{'p95':>8}{'p99 ms':>8}"
        f"{'p99 x relay':>13}",
    ]
    for name, f in figures.items():
        med = statistics.median
        lines.append(
            f"{name:14}{med(f.rate):>16,.0f}{_ratio(f.rate, relay.rate):>9.2f}   "
            f"{med(f.p50) * 1e3:>20.1f}{med(f.p95) * 1e3:>8.1f}{med(f.p99) * 1e3:>8.1f}"
            f"{_ratio(f.p99, relay.p99):>13.2f}"
        )
    lines.append(f"state bytes per key: {bytes_per_key:,}")
    lines.append(f"share of loop time per stage: {', '.join(STAGES)}")
    for name, f in figures.items():
        phases = (("full speed", f.stages_full), (f"{cfg.rate:,.0f} ev/s", f.stages_rate))
        for phase, runs in phases:
            if not runs:
                continue
            total = {s: sum(run[s] for run in runs) for s in STAGES}
            whole = sum(total.values()) or 1.0
            shares = "  ".join(f"{s} {total[s] / whole:5.1%}" for s in STAGES)
            lines.append(f"  {name:12} {phase:>13}: {shares}")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    """Entry of the load-generator subprocess: ``python -m streamer.bench --loadgen ...``."""
    if len(argv) != 9 or argv[0] != "--loadgen":
        raise SystemExit("usage: python -m streamer.bench --loadgen BOOTSTRAP SOURCE SINK "
                         "RATE SECONDS KEYS PARTITIONS OUT.npy (use `streamer bench`)")
    bs, source, sink, rate, seconds, keys, partitions, out = argv[1:]
    loadgen(bs, source, sink, float(rate), float(seconds), int(keys), int(partitions), out)


if __name__ == "__main__":
    main(sys.argv[1:])
