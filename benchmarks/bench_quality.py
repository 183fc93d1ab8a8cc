"""Prediction quality on real public series (prints the figures; a benchmark, not a test).

For each dataset: write its events as generic JSONL, train with the trainer's defaults
(`trainer train --input FILE`, candidate written with ``--out`` so it is served even when the
gate refuses it), serve that model through the streamer's Service on the embedded broker, and
print per key and overall, on the final test window: the model, persistence (no change),
seasonal naive, AR(p) on differences and the moving average (MAE, RMSE, direction accuracy
over events that moved, MASE against persistence), plus the largest |streamed - offline|
difference between the predictions the streamer produced and the trainer's offline ones.

Data (shipped inside the vega_datasets wheel, read offline with the csv module):
    temps     hourly air temperature 2010, San Francisco and Seattle (2 keys x 8,759)
    weather   daily Seattle weather 2012-2015: temp_max, temp_min, precipitation, wind (1 key)
    stocks    monthly closing prices 2000-2010 of MSFT, AMZN, IBM, GOOG, AAPL (5 keys)

    .venv/bin/python benchmarks/bench_quality.py [--datasets temps,weather,stocks]
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from confluent_kafka import Consumer, Producer
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streamer.artifact import load_artifact  # noqa: E402
from streamer.broker import EmbeddedBroker  # noqa: E402
from streamer.service import Service  # noqa: E402
from streamer.settings import StreamerSettings  # noqa: E402
from trainer.dataset import predict  # noqa: E402
from trainer.pipeline import run_training  # noqa: E402
from trainer.settings import TrainerSettings  # noqa: E402

Event = dict[str, Any]
NAMES = {"candidate": "model", "persistence": "persistence", "seasonal_naive": "seasonal naive",
         "ar": "AR(p) on differences", "moving_average": "moving average"}


def _data_dir() -> Path:
    spec = importlib.util.find_spec("vega_datasets")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("vega_datasets is not installed: make venv (it is in the dev extra)")
    return Path(next(iter(spec.submodule_search_locations))) / "_data"


def _rows(name: str) -> Iterator[dict[str, str]]:
    with (_data_dir() / name).open(newline="") as f:
        yield from csv.DictReader(f)


def _ts(text: str, fmt: str) -> float:
    return datetime.strptime(text, fmt).replace(tzinfo=timezone.utc).timestamp()


def temps() -> list[Event]:
    events = [{"key": "sf", "ts": _ts(r["date"], "%Y/%m/%d %H:%M:%S"),
               "values": [float(r["temp"])]} for r in _rows("sf-temps.csv")]
    events += [{"key": "seattle", "ts": _ts(r["date"], "%Y/%m/%d %H:%M"),
                "values": [float(r["temp"])]} for r in _rows("seattle-temps.csv")]
    return events


def weather() -> list[Event]:
    cols = ("temp_max", "temp_min", "precipitation", "wind")
    return [{"key": "seattle", "ts": _ts(r["date"], "%Y/%m/%d"),
             "values": [float(r[c]) for c in cols]} for r in _rows("seattle-weather.csv")]


def stocks() -> list[Event]:
    return [{"key": r["symbol"], "ts": _ts(r["date"], "%b %d %Y"), "values": [float(r["price"])]}
            for r in _rows("stocks.csv")]


DATASETS = {"temps": temps, "weather": weather, "stocks": stocks}


def serve(artifact: Path, events: list[Event]) -> dict[tuple[str, float], float]:
    """Every event through the streamer on the embedded broker: (key, ts) -> prediction."""
    with EmbeddedBroker() as broker:
        for topic, parts in (("events", 4), ("predictions", 4), ("events.dlq", 1)):
            broker.create_topic(topic, parts)
        settings = StreamerSettings(bootstrap_servers=broker.bootstrap_servers, model=artifact,
                                    group_id="quality", device="cpu",
                                    metrics_address="127.0.0.1:0", capacity=10_000)
        service = Service.from_settings(settings)
        stop = threading.Event()
        thread = threading.Thread(target=service.run, args=(stop,), daemon=True)
        thread.start()
        producer = Producer({"bootstrap.servers": broker.bootstrap_servers, "linger.ms": 5})
        for ev in events:
            producer.produce("events", json.dumps(ev).encode(), ev["key"].encode())
            producer.poll(0)
        producer.flush(60)
        consumer = Consumer({"bootstrap.servers": broker.bootstrap_servers,
                             "group.id": "quality-reader", "auto.offset.reset": "earliest"})
        consumer.subscribe(["predictions"])
        out: dict[tuple[str, float], float] = {}
        deadline = time.monotonic() + 600
        while len(out) < len(events) and time.monotonic() < deadline:
            for msg in consumer.consume(5000, timeout=0.5):
                if msg.error():
                    continue
                o = json.loads(msg.value())
                out[(o["key"], float(o["ts"]))] = float(o["prediction"][0])
        consumer.close()
        stop.set()
        thread.join(60)
    if len(out) < len(events):
        raise SystemExit(f"only {len(out)} of {len(events)} predictions came back")
    return out


def run(name: str, events: list[Event], tmp: Path, console: Console) -> None:
    events.sort(key=lambda e: e["ts"])
    path = tmp / f"{name}.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    settings = TrainerSettings(registry=tmp / f"{name}-models", device="cpu")
    started = time.perf_counter()
    result = run_training(settings, [path], out=tmp / f"{name}-model")
    train_s = time.perf_counter() - started
    streamed = serve(tmp / f"{name}-model", events)
    model = load_artifact(tmp / f"{name}-model").model
    data = result.data
    offline = predict(model, data)[..., 0]
    ts_of = {k: sorted(e["ts"] for e in events if e["key"] == k) for k in data.keys}
    gap = max(abs(streamed[(k, t)] - offline[i, j]) for i, k in enumerate(data.keys)
              for j, t in enumerate(ts_of[k]))
    chosen = result.training.chosen
    report = result.report
    console.print(
        f"[bold]{name}[/]: {len(events)} events, {len(data.keys)} keys; model {chosen.layers} "
        f"layers x {chosen.hidden}, target {data.spec.target} as {data.spec.target_kind}, "
        f"half-life {data.spec.half_life} events; trained in {train_s:.0f} s; test window "
        f"{data.split['test_pairs']} events; season {report['baselines']['season']}; "
        f"gate: {'passes' if result.decision.publish else 'refuses'} "
        f"({'; '.join(result.decision.reasons)}); max |streamed - offline| = {gap:.2e}")
    table = Table(show_lines=False)
    for col in ("key", "predictor", "MAE", "RMSE", "dir. acc", "MASE"):
        table.add_column(col, justify="left" if col in ("key", "predictor") else "right")
    scopes = [("all", report["overall"])] + sorted(report["per_key"].items())
    for key, scores in scopes:
        for p in ("candidate", "persistence", "seasonal_naive", "ar", "moving_average"):
            if p in scores:
                m = scores[p]
                table.add_row(key, NAMES[p], _f(m["mae"]), _f(m["rmse"]),
                              _f(m["direction_accuracy"]), _f(m["mase"]))
        table.add_section()
    console.print(table)


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", default=",".join(DATASETS))
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    np.set_printoptions(precision=4)
    console = Console(width=120)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.datasets.split(","):
            run(name, DATASETS[name](), Path(tmp), console)
    return 0


if __name__ == "__main__":
    sys.exit(main())
