"""Engine-only figures (no Kafka): events/s per batch size, re-warm time, copies per batch.

    .venv/bin/python benchmarks/bench_engine.py [--device cpu|cuda] [--keys 10000]
        [--graphs | --no-graphs]

Prints step p50/p99 and key-steps/s at batch 1..8192 (medians over repeated runs otherwise),
for the eager step and, with ``--graphs`` (the default on CUDA), for the bucketed step of
``streamer/graphs.py`` (CUDA graphs on a GPU, the padded eager function on the CPU), side by
side, with the issue's GPU goals at batch 4,096 (>= 5M key-steps/s, p99 <= 1 ms), and on CUDA
each bucket's graph replay alone (device time of one wave, without host bookkeeping). On CUDA it
also checks GPU predictions (eager and graphs) against CPU predictions (1e-5) and exits
non-zero when they differ, and counts host<->device copies in one ``Engine.process`` call
with the profiler (the design keeps it to one in, one out).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from streamer.engine import Engine
from streamer.features import default_spec
from streamer.graphs import GraphStep
from streamer.model import LSTMModel, ModelConfig
from streamer.state import StateStore

F, H, L = 8, 64, 2


def build(device: torch.device, keys: int, window: int, graphs: bool = False) -> Engine:
    torch.manual_seed(0)
    model = LSTMModel(ModelConfig(input_size=F, hidden_size=H, num_layers=L),
                      default_spec("generic", F)).to(device).eval()
    engine = Engine(model, StateStore.for_model(model, capacity=keys, window=window,
                                                device=device))
    if graphs:
        engine.bucketed = GraphStep(max_batch=8192)
    return engine


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> float:  # type: ignore[no-untyped-def]
    """Median seconds per call (after the warm-up calls of :func:`step_times`)."""
    return float(np.median(step_times(fn, device, repeats)))


def step_times(fn, device: torch.device, repeats: int) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Seconds per call, each synchronized, after two warm-up calls."""
    for _ in range(2):
        fn()
    runs = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        runs.append(time.perf_counter() - t0)
    return np.asarray(runs)


def gpu_vs_cpu(keys: int, window: int, device: torch.device, graphs: bool = False) -> float:
    """Largest difference between predictions of the same batches on ``device`` (eager, or
    the bucketed step with CUDA graphs) and on CPU (eager)."""
    gpu = build(device, keys, window, graphs)
    cpu = build(torch.device("cpu"), keys, window)
    rng, names, worst = np.random.default_rng(5), [f"k{i}" for i in range(keys)], 0.0
    for _ in range(20):
        batch = batch_of(rng, names, 4096)
        a, _ = gpu.process(*batch, 0.0)
        b, _ = cpu.process(*batch, 0.0)
        worst = max(worst, float(np.abs(a - b).max()))
    if graphs and (gpu.bucketed is None or gpu.bucketed.batches != 20
                   or (device.type == "cuda" and gpu.bucketed.captures == 0)):
        raise SystemExit("the graphs run did not go through captured CUDA graphs")
    return worst


def replay_alone(step: GraphStep, device: torch.device) -> None:
    """Device time of one wave alone per captured bucket (graph replay, no host bookkeeping):
    the floor the whole step approaches. Replays advance the keys last in each bucket."""
    for size, bucket in sorted(step.buckets.items()):
        graph = bucket.graph
        if graph is None:
            continue
        p50 = float(np.median(step_times(graph.replay, device, 50)))
        print(f"  replay alone, bucket {size:>5}: {p50 * 1e6:8.1f} us  "
              f"{size / p50:>14,.0f} key-steps/s (one wave, device only)")


def batch_of(rng: np.random.Generator, names: list[str], n: int):  # type: ignore[no-untyped-def]
    keys = [names[i] for i in rng.integers(0, len(names), size=n)]
    return keys, [0] * n, rng.normal(size=(n, F)), np.arange(n, dtype=np.float64)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--keys", type=int, default=10_000)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=None,
                    help="also time the bucketed step (CUDA graphs on CUDA); default: on CUDA")
    args = ap.parse_args()
    device = torch.device(args.device)
    graphs = device.type == "cuda" if args.graphs is None else args.graphs
    rng = np.random.default_rng(0)
    names = [f"k{i}" for i in range(args.keys)]
    engine = build(device, args.keys, args.window)
    print(f"device={device} F={F} H={H} L={L} keys={args.keys} W={args.window} "
          f"torch threads={torch.get_num_threads()}")
    print(f"state bytes per key: {engine.store.bytes_per_key}")
    modes = {"eager": engine}
    if graphs:
        modes["graphs" if device.type == "cuda" else "bucketed"] = build(
            device, args.keys, args.window, graphs=True)
    at_4096: dict[str, tuple[float, float]] = {}
    for n in (1, 8, 64, 512, 2048, 4096, 8192):
        batch = batch_of(rng, names, n)
        for mode, eng in modes.items():
            steps = step_times(lambda b=batch, e=eng: e.process(*b, 0.0), device,
                               60 if n < 4096 else 25)
            p50, p99 = np.percentile(steps, [50, 99])
            print(f"batch {n:>5} {mode:>8}: step p50 {p50 * 1e3:8.3f} ms  p99 {p99 * 1e3:8.3f} ms"
                  f"  {n / p50:>12,.0f} key-steps/s")
            if n == 4096:
                at_4096[mode] = (n / p50, p99)
    for mode, (rate, p99) in at_4096.items():
        print(f"goal at batch 4,096 ({mode}): >= 5,000,000 key-steps/s: "
              f"{'met' if rate >= 5e6 else 'missed'} ({rate:,.0f}); step p99 <= 1 ms: "
              f"{'met' if p99 <= 1e-3 else 'missed'} ({p99 * 1e3:.3f} ms)")
    for mode, eng in modes.items():
        if eng.bucketed is not None:
            print(f"{mode}: {eng.bucketed.batches} of the timed batches by waves, "
                  f"{eng.bucketed.captures} CUDA graphs captured (buckets "
                  f"{sorted(eng.bucketed.buckets)})")
            replay_alone(eng.bucketed, device)
    if device.type == "cuda" or graphs:  # on the CPU: the bucketed step against the eager one
        worst = {mode: gpu_vs_cpu(args.keys, args.window, device, mode != "eager")
                 for mode in modes if device.type == "cuda" or mode != "eager"}
        for mode, diff in worst.items():  # every mode measured before judging any
            print(f"{device.type} ({mode}) vs CPU eager, 20 steps of 4,096 events: "
                  f"max |difference| {diff:.2e} (must be <= 1e-5)")
        if max(worst.values()) > 1e-5:
            raise SystemExit("GPU results differ from CPU results by more than 1e-5")
    # Fill every key's window, then time a re-warming swap over all live keys.
    for _ in range(0, args.keys * args.window, 8192):
        engine.process(*batch_of(rng, names, 8192), 0.0)
    live = len(engine.store)
    torch.manual_seed(1)
    new = LSTMModel(engine.model.config, engine.model.spec).to(device).eval()
    for policy in ("rewarm", "reset", "keep"):
        s = timed(lambda p=policy: engine.swap_model(new, p), device, 5)
        print(f"swap pause, policy {policy}, {live:,} live keys (window {args.window}): "
              f"{s * 1e3:.1f} ms")
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        batch = batch_of(rng, names, 2048)
        for mode, eng in modes.items():
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                eng.process(*batch, 0.0)
                sync(device)
            copies = [e.name for e in prof.events() if "Memcpy" in e.name]
            print(f"memcpy events in one process() call ({mode}): {len(copies)} "
                  f"(HtoD {sum('HtoD' in c for c in copies)}, "
                  f"DtoH {sum('DtoH' in c for c in copies)})")


if __name__ == "__main__":
    main()
