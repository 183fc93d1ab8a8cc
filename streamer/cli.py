"""The ``streamer`` console script: run, broker, simulate, demo, bench.

Every ``run`` setting is a flag, an env var (STREAMER_*) and a config-file key; ``--help``
names all three. A bad setting exits with status 2 and the field's name before anything starts.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from streamer.errors import ConfigError, StreamerError
from streamer.settings import (
    StreamerSettings,
    add_settings_arguments,
    env_prefix,
    settings_from_args,
)

log = logging.getLogger("streamer")


@contextlib.contextmanager
def stop_on_signals(stop: threading.Event | None = None) -> Iterator[threading.Event]:
    """SIGTERM/SIGINT set ``stop`` (a graceful stop: finish the batch or run, flush, commit,
    close) while the block runs; the previous handlers come back after it. The one home of
    signal handling for both console scripts (``trainer`` imports it). Off the main thread no
    handler can be installed: the caller stops the loop through the event instead.
    """
    stop = stop if stop is not None else threading.Event()

    def handler(signum: int, _frame: object) -> None:
        log.info("received %s, draining", signal.Signals(signum).name)
        stop.set()

    previous: dict[signal.Signals, Any] = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread
        pass
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    logging.getLogger("kafka").setLevel(max(logging.WARNING, logging.getLevelName(level)))


def cmd_run(ns: argparse.Namespace) -> int:
    from streamer.service import Service

    settings = settings_from_args(StreamerSettings, ns)
    _setup_logging(settings.log_level)
    with stop_on_signals() as stop:
        service = Service.from_settings(settings)
        log.info("metrics on %s, consuming %s from %s", settings.metrics_address,
                 settings.input_topic, settings.bootstrap_servers)
        service.run(stop)
    return 0


def cmd_broker(ns: argparse.Namespace) -> int:
    from streamer.broker import EmbeddedBroker

    _setup_logging("INFO")
    with stop_on_signals() as stop, EmbeddedBroker(num_brokers=ns.brokers) as broker:
        for topic in ns.topics.split(","):
            if topic:
                broker.create_topic(topic, partitions=ns.partitions)
        print(broker.bootstrap_servers, flush=True)
        log.info("embedded broker on %s (topics %s); Ctrl-C to stop", broker.bootstrap_servers,
                 ns.topics)
        stop.wait()
    return 0


def cmd_simulate(ns: argparse.Namespace) -> int:
    from streamer.simulate import run_simulator

    _setup_logging("INFO")
    with stop_on_signals() as stop:
        run_simulator(
            ns.bootstrap_servers, ns.topic, ns.kind, ns.keys, rate=ns.rate,
            duration_s=ns.duration, max_events=ns.max_events, seed=ns.seed,
            progress=not ns.quiet, stop_event=stop, producer_config={"linger_ms": ns.linger_ms},
        )
    return 0


def cmd_demo(ns: argparse.Namespace) -> int:
    from streamer.demo import run_demo

    _setup_logging("WARNING")
    # kafka-python logs its ApiVersions fallback against the embedded broker as errors.
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    with stop_on_signals() as stop:
        return run_demo(
            duration_s=ns.duration, kind=ns.kind, n_keys=ns.keys, rate=ns.rate, seed=ns.seed,
            metrics_address=ns.metrics_address, workdir=ns.workdir, stop=stop,
            n_history=ns.history,
        )


# Settings `streamer bench` gives the streamer itself; `--set` may not change them.
BENCH_OWNS = {"bootstrap_servers", "model", "group_id", "input_topic", "output_topic",
              "dlq_topic", "changelog_topic", "device", "kafka_client", "metrics_address"}


def _how_to_set_for_bench(field: str) -> str:
    """How a streamer setting is given to ``streamer bench`` (its env var still applies)."""
    return f"(streamer bench --set {field}=VALUE, or env {env_prefix(StreamerSettings)}" \
        f"{field.upper()})"


def cmd_bench(ns: argparse.Namespace) -> int:
    from streamer.bench import BenchConfig, run_bench
    from streamer.model import resolve_device
    from streamer.settings import load_settings

    _setup_logging("WARNING")
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    clients = ("kafka-python", "confluent") if ns.client == "both" else (ns.client,)
    phases = tuple(dict.fromkeys(p for p in ns.phases.split(",") if p))
    if not phases or set(phases) - {"full", "rate"}:
        raise ConfigError("phases", f"{ns.phases!r}: give full, rate or full,rate")
    for name in ("keys", "events", "partitions", "brokers", "repeats"):
        if getattr(ns, name) < 1:
            raise ConfigError(name, f"must be at least 1, got {getattr(ns, name)}")
    for name in ("rate", "seconds"):
        if not 0 < getattr(ns, name) < float("inf"):
            raise ConfigError(name, f"must be finite and > 0, got {getattr(ns, name)}")
    bad = [kv for kv in ns.set if "=" not in kv]
    if bad:
        raise ConfigError("set", f"{bad[0]!r}: give NAME=VALUE")
    overrides = tuple(tuple(kv.split("=", 1)) for kv in ns.set)
    own = {n for n, _ in overrides} & BENCH_OWNS
    if own:
        raise ConfigError(sorted(own)[0], "set by the bench itself, streamer bench --set may not "
                          "change it (use --device, --client; topics, group, model and "
                          "addresses are the bench's)")
    unknown = [n for n, _ in overrides if n not in StreamerSettings.model_fields]
    if unknown:
        raise ConfigError(unknown[0], "not a streamer setting (streamer bench --set NAME=VALUE "
                          "takes the names of `streamer run --help`, with underscores)")
    resolve_device(ns.device)  # before anything runs: ConfigError when it is not there
    # The streamer's settings as the bench will build them, checked before the relay runs.
    load_settings(StreamerSettings, {"bootstrap_servers": "127.0.0.1:9", "device": ns.device,
                                     "kafka_client": clients[0], **dict(overrides)},
                  how_to_set=_how_to_set_for_bench)
    run_bench(BenchConfig(
        keys=ns.keys, events=ns.events, rate=ns.rate, seconds=ns.seconds,
        partitions=ns.partitions, brokers=ns.brokers, clients=clients, device=ns.device,
        repeats=ns.repeats, phases=phases, overrides=overrides,  # type: ignore[arg-type]
    ))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="consume events, serve predictions and metrics")
    add_settings_arguments(run, StreamerSettings)
    run.set_defaults(func=cmd_run)

    broker = sub.add_parser("broker", help="start an embedded Kafka broker (librdkafka mock)")
    broker.add_argument("--partitions", type=int, default=4)
    broker.add_argument("--brokers", type=int, default=1)
    broker.add_argument("--topics", default="events,predictions,events.dlq")
    broker.set_defaults(func=cmd_broker)

    sim = sub.add_parser("simulate", help="produce synthetic ticks, sensor readings or vectors")
    sim.add_argument("--bootstrap-servers", default="localhost:9092")
    sim.add_argument("--topic", default="events")
    sim.add_argument("--kind", choices=("tick", "sensor", "generic"), default="tick")
    sim.add_argument("--keys", type=int, default=100, help="number of symbols/sensors/keys")
    sim.add_argument("--rate", type=float, default=None, help="events/s (default: max speed)")
    sim.add_argument("--duration", type=float, default=None, help="seconds to run")
    sim.add_argument("--max-events", type=int, default=None)
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--linger-ms", type=int, default=5,
                     help="producer linger: larger means bigger batches, fewer requests")
    sim.add_argument("--quiet", action="store_true", help="no progress display")
    sim.set_defaults(func=cmd_simulate)

    demo = sub.add_parser("demo", help="the whole product on an embedded broker, for a while")
    demo.add_argument("--duration", type=float, default=60.0, help="seconds to stream")
    demo.add_argument("--kind", choices=("tick", "sensor", "generic"), default="tick")
    demo.add_argument("--keys", type=int, default=200)
    demo.add_argument("--rate", type=float, default=2000.0, help="simulated events/s")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--history", type=int, default=40_000,
                      help="simulated events each training run learns from")
    demo.add_argument("--metrics-address", default="127.0.0.1:9108")
    demo.add_argument("--workdir", default=None, help="where models go (default: a temp dir)")
    demo.set_defaults(func=cmd_demo)

    bench = sub.add_parser("bench", help="throughput and latency against a no-model relay",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    bench.add_argument("--keys", type=int, default=1000, help="distinct event keys")
    bench.add_argument("--events", type=int, default=100_000, help="events for full speed")
    bench.add_argument("--rate", type=float, default=1000.0, help="events/s for latency")
    bench.add_argument("--seconds", type=float, default=10.0, help="length of the latency run")
    bench.add_argument("--partitions", type=int, default=4, help="input/output partitions")
    bench.add_argument("--brokers", type=int, default=3, help="embedded brokers")
    bench.add_argument("--client", choices=("kafka-python", "confluent", "both"),
                       default="both", help="Kafka client(s) of the streamer")
    bench.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                       help="torch device of the streamer")
    bench.add_argument("--repeats", type=int, default=3, help="runs; medians are printed")
    bench.add_argument("--phases", default="full,rate", help="full, rate or full,rate")
    bench.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                       help="a streamer setting for the run (e.g. max_batch_wait_ms=0)")
    bench.set_defaults(func=cmd_bench)
    return parser


def exit_status(prog: str, command: str, call: Callable[[], int]) -> int:
    """Run one command of a console script (``streamer`` or ``trainer``) and map its outcome
    to the exit status: what ``call`` returns, 2 for a bad setting (``ConfigError``, printed
    with the field and how to set it), 1 for any other ``StreamerError`` (printed with its type).
    """
    try:
        return int(call())
    except ConfigError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    except StreamerError as exc:
        print(f"{prog} {command} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    return exit_status("streamer", ns.command, lambda: ns.func(ns))


if __name__ == "__main__":
    sys.exit(main())
