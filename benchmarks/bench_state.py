"""Durable state figures: the scale-out/crash run, restore speed, changelog bytes per key and
the cost of checkpointing.

1. scale-out/crash: three ``streamer run`` processes on the embedded broker (one joins
   mid-stream, one SIGKILLed, one SIGTERMed), with the changelog (at-least-once and
   exactly-once) and without: events, missing, duplicates, predictions differing from an
   uninterrupted run (tests/e2e/state_scenarios.py). Exactly-once duplicates here are aborted
   records, which the embedded broker hands to every reader.
2. restore of --keys keys (default 100,000): decode + apply from changelog records held in
   memory (the embedded broker keeps only 5 MiB per partition, too little for 100,000 keys),
   and end to end through the embedded broker for as many keys as fit there.
3. changelog bytes per key, for the test model and the default-size model.
4. service throughput and p99 processing latency with checkpoints off, every 1 s, every 500
   events, every 0.1 s, and exactly-once committing every 0.1 s (in-process service,
   embedded broker; exactly-once outputs become visible at the commit, not at the ack).

Runs 1, 2 (through the broker) and 4 for each Kafka client of ``--client`` (kafka-python,
confluent or both).

    .venv/bin/python benchmarks/bench_state.py
    .venv/bin/python benchmarks/bench_state.py --client confluent
    .venv/bin/python benchmarks/bench_state.py --keys 100000 --events 20000 --skip-scaleout
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from streamer.artifact import save_artifact  # noqa: E402
from streamer.broker import EmbeddedBroker  # noqa: E402
from streamer.checkpoint import encode_states  # noqa: E402
from streamer.confluent_edge import ConfluentEdge  # noqa: E402
from streamer.engine import Engine  # noqa: E402
from streamer.kafka_edge import KafkaEdge  # noqa: E402
from streamer.recovery import StateRecovery  # noqa: E402
from streamer.state import StateStore  # noqa: E402
from tests.e2e.state_scenarios import scale_out_with_crashes  # noqa: E402
from tests.kafka_helpers import Topics, produce  # noqa: E402
from tests.state_reference import ListChangelog, make_events  # noqa: E402
from tests.streamer.conftest import make_model  # noqa: E402
from tests.streamer.fault_scenarios import _read_outputs  # noqa: E402
from tests.streamer.service_helpers import running_service, scrape  # noqa: E402
from tests.streamer.service_helpers import settings_for as base_settings  # noqa: E402


def warm_engine(keys: int, hidden: int, seed: int = 0) -> Engine:
    model = make_model(hidden=hidden, seed=seed)
    engine = Engine(model, StateStore.for_model(model, capacity=keys))
    rng = np.random.default_rng(seed)
    names = [f"k{i}" for i in range(keys)]
    for lo in range(0, keys, 8192):
        chunk = names[lo:lo + 8192]
        engine.process(chunk, [i % 4 for i in range(lo, lo + len(chunk))],
                       rng.normal(size=(len(chunk), 4)), np.full(len(chunk), 1e9), 0.0)
    return engine


def restore_in_memory(keys: int, hidden: int) -> tuple[float, float, float]:
    engine = warm_engine(keys, hidden)
    source = StateRecovery(engine, "mem", None, None)
    for p in range(4):
        source.position[p] = 100
    edge = ListChangelog()
    t0 = time.perf_counter()
    source.checkpoint(edge, range(4), "v")
    encode_s = time.perf_counter() - t0
    target = Engine(engine.model, StateStore.for_model(engine.model, capacity=keys))
    stats = StateRecovery(target, "mem", None, None).restore(edge, {0, 1, 2, 3}, "v")
    assert stats.keys == keys, stats
    return stats.seconds, stats.records_per_s, encode_s


class _Unassigned(KafkaEdge):
    """The real edge, outside a group: nothing to seek (the restore figure needs no input)."""

    def seek(self, partition: int, offset: int) -> None:
        pass


class _UnassignedConfluent(ConfluentEdge):
    def seek(self, partition: int, offset: int) -> None:
        pass


def restore_through_broker(keys: int, hidden: int,
                           client: str = "kafka-python") -> tuple[int, float, float]:
    """Checkpoint ``keys`` keys to the embedded broker and restore them with the real edge."""
    with EmbeddedBroker() as broker:
        name = f"r-{uuid.uuid4().hex[:6]}"
        topics = Topics(broker.bootstrap_servers, name, f"{name}.out", f"{name}.dlq")
        for t, n in [(name, 4), (f"{name}.out", 4), (f"{name}.dlq", 1), (f"{name}-state", 4)]:
            broker.create_topic(t, partitions=n)
        s = base_settings(topics, Path("."), changelog=True, changelog_topic=f"{name}-state",
                          capacity=keys, max_batch_events=64, check_crcs=False,
                          kafka_client=client)
        engine = warm_engine(keys, hidden)
        cls = _UnassignedConfluent if client == "confluent" else _Unassigned
        edge = cls(s, lambda p: None, lambda p: None, changelog_topic=f"{name}-state")
        try:
            source = StateRecovery(engine, s.state_topic, None, None)
            for p in range(4):
                source.position[p] = 0
            source.checkpoint(edge, range(4), "v")
            target = Engine(engine.model, StateStore.for_model(engine.model, capacity=keys))
            stats = StateRecovery(target, s.state_topic, None, None).restore(
                edge, {0, 1, 2, 3}, "v")
        finally:
            edge.close()
        return stats.keys, stats.seconds, stats.records_per_s


def checkpoint_cost(model_dir: Path, n: int, keys: int,
                    client: str = "kafka-python") -> list[tuple[str, float, float, float]]:
    rows = []
    for label, extra in [("off", {}),
                         ("every 1 s", dict(changelog=True, checkpoint_interval_s=1.0)),
                         ("every 500 events", dict(changelog=True, checkpoint_interval_s=None,
                                                   checkpoint_interval_events=500)),
                         ("every 0.1 s", dict(changelog=True, checkpoint_interval_s=0.1)),
                         ("exactly-once 0.1 s", dict(
                             changelog=True, checkpoint_interval_s=0.1, check_crcs=False,
                             processing_guarantee="exactly_once"))]:
        with EmbeddedBroker() as broker:
            name = f"c-{uuid.uuid4().hex[:6]}"
            topics = Topics(broker.bootstrap_servers, name, f"{name}.out", f"{name}.dlq")
            for t, parts in [(name, 4), (f"{name}.out", 4), (f"{name}.dlq", 1),
                             (f"g-{name}-state", 4)]:
                broker.create_topic(t, partitions=parts)
            coords = produce(topics.bootstrap, name, make_events(n, keys, seed=5))
            s = base_settings(topics, model_dir, max_batch_events=256, kafka_client=client,
                              **extra)
            t0 = time.perf_counter()
            with running_service(s) as service:
                _read_outputs(topics.bootstrap, topics.output, set(coords), timeout_s=300)
                elapsed = time.perf_counter() - t0
                text = scrape(service.http.port)[1]
            p99 = histogram_quantile(text, "streamer_processing_latency_seconds", 0.99)
            ckpt = (histogram_quantile(text, "streamer_checkpoint_seconds", 0.99)
                    if extra else 0.0)
        rows.append((label, n / elapsed, p99, ckpt))
    return rows


def histogram_quantile(text: str, name: str, q: float) -> float:
    """Upper bound of the bucket holding quantile ``q`` (Prometheus bucket resolution)."""
    buckets: list[tuple[float, float]] = []
    for line in text.splitlines():
        if line.startswith(f"{name}_bucket"):
            le = line.split('le="')[1].split('"')[0]
            buckets.append((float("inf") if le == "+Inf" else float(le),
                            float(line.rsplit(" ", 1)[1])))
    total = buckets[-1][1] if buckets else 0.0
    for le, count in buckets:
        if total and count >= q * total:
            return le
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=100_000, help="keys for the restore figure")
    parser.add_argument("--hidden", type=int, default=64, help="hidden size of the model")
    parser.add_argument("--events", type=int, default=20_000, help="events for the cost run")
    parser.add_argument("--skip-scaleout", action="store_true")
    parser.add_argument("--client", choices=["kafka-python", "confluent", "both"],
                        default="both", help="Kafka client(s) of the runs through the broker")
    ns = parser.parse_args()
    clients = ["kafka-python", "confluent"] if ns.client == "both" else [ns.client]
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    model_dir = Path(tempfile.mkdtemp(prefix="bench-state-")) / "model"
    save_artifact(model_dir, make_model(seed=7), version="bench")

    for client in clients if not ns.skip_scaleout else []:
        print(f"scale-out/crash run, {client} (3 processes: join, SIGKILL, SIGTERM; 4000 "
              "events, 100 keys)")
        for changelog, guarantee in ((True, "at_least_once"), (True, "exactly_once"),
                                     (False, "at_least_once")):
            with EmbeddedBroker() as broker:
                r = scale_out_with_crashes(broker, model_dir, changelog=changelog, check=False,
                                           client=client, guarantee=guarantee)
            label = "on, exactly-once" if guarantee == "exactly_once" else (
                "on " if changelog else "off")
            print(f"  changelog {label}: events {r['events']}, "
                  f"missing {r['missing']}, duplicates {r['duplicates']}, differing from "
                  f"uninterrupted {r['differing']} ({100 * r['differing'] / r['events']:.1f}%)",
                  flush=True)

    for hidden in (16, ns.hidden):
        engine = warm_engine(4, hidden)
        size = len(encode_states(engine.store, ["k0"], "v", np.zeros(1))[0])
        print(f"changelog bytes per key (L=2, H={hidden}, window 32, F=4): {size} "
              f"(+ key and Kafka record framing)")

    seconds, rate, encode_s = restore_in_memory(ns.keys, ns.hidden)
    print(f"restore {ns.keys} keys (H={ns.hidden}), decode+apply only: {seconds:.2f} s, "
          f"{rate:,.0f} records/s (checkpoint encode of all keys: {encode_s:.2f} s)")
    fit = 6000  # ~1.3 MiB per partition at H=16: fits the mock broker's 5 MiB
    for client in clients:
        keys, seconds, rate = restore_through_broker(fit, 16, client)
        print(f"restore {keys} keys (H=16) through the embedded broker, {client} (read + "
              f"decode + apply): {seconds:.2f} s, {rate:,.0f} records/s", flush=True)

    for client in clients:
        print(f"checkpoint cost, {client}, in-process service, {ns.events} events over 2000 "
              f"keys (p99 at Prometheus bucket resolution)")
        for label, eps, p99, ckpt in checkpoint_cost(model_dir, ns.events, 2000, client):
            print(f"  checkpoints {label:<17} {eps:>9,.0f} events/s   processing p99 <= "
                  f"{p99 * 1e3:.0f} ms   checkpoint p99 <= {ckpt * 1e3:.0f} ms", flush=True)


if __name__ == "__main__":
    main()
