"""The uninterrupted run, computed in-process: every event of the input stepped once, in
offset order per key, through a fresh engine. What a recovered run must equal (1e-5)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from streamer.artifact import load_artifact
from streamer.engine import Engine
from streamer.events import Message, decode_batch
from streamer.state import StateStore


def make_events(n: int, n_keys: int, seed: int = 0) -> list[tuple[bytes, bytes]]:
    """``n`` generic events over ``n_keys`` keys (4 values each), stamped just before now."""
    rng = np.random.default_rng(seed)
    start = time.time() - 60
    out = []
    for i in range(n):
        values = [round(float(v), 4) for v in rng.normal(size=4)]
        out.append((f"k{rng.integers(n_keys)}".encode(),
                    json.dumps({"ts": start + i * 1e-3, "values": values}).encode()))
    return out


def uninterrupted(
    artifact_dir: Path, records: list[tuple[bytes, bytes]], coords: list[tuple[int, int]],
    capacity: int = 4096,
) -> tuple[dict[tuple[int, int], np.ndarray], Engine]:
    """Predictions per (partition, offset) of an uninterrupted run, and its engine."""
    artifact = load_artifact(artifact_dir, "cpu")
    store = StateStore.for_model(artifact.model, capacity)
    engine = Engine(artifact.model, store)
    order = sorted(range(len(records)), key=lambda i: coords[i])
    msgs = [Message(records[i][0], records[i][1], *coords[i]) for i in order]
    decoded = decode_batch(msgs, engine.spec, time.time())
    assert not decoded.bad
    parts = [msgs[i].partition for i in decoded.index]
    preds, _ = engine.process(decoded.keys, parts, decoded.raw, decoded.ts, time.time())
    return {(msgs[i].partition, msgs[i].offset): preds[j]
            for j, i in enumerate(decoded.index)}, engine


def compare(
    outputs: list[dict[str, Any]], reference: dict[tuple[int, int], np.ndarray]
) -> dict[str, int]:
    """events, missing, duplicates, differing (any emitted prediction off by > 1e-5)."""
    seen: dict[tuple[int, int], int] = {}
    differing = 0
    for o in outputs:
        coord = (o["partition"], o["offset"])
        seen[coord] = seen.get(coord, 0) + 1
        ref = reference.get(coord)
        if ref is None or not np.allclose(o["prediction"], ref, atol=1e-5, rtol=0):
            differing += 1
    return {"events": len(reference), "missing": len(set(reference) - set(seen)),
            "duplicates": sum(n - 1 for n in seen.values()), "differing": differing}


class ListChangelog:
    """The changelog as a list (the StateEdge protocol of streamer.recovery): isolates the
    restore rules, and decode + apply in the restore figure, from Kafka."""

    def __init__(self) -> None:
        self.log: list[tuple[int, bytes, bytes | None, list[tuple[str, bytes]] | None]] = []
        self.sought: dict[int, int] = {}

    def send_changelog(self, partition: int, key: bytes, value: bytes | None,
                       headers: list[tuple[str, bytes]] | None = None) -> None:
        self.log.append((partition, key, value, headers))

    def flush(self) -> None:
        pass

    def commit_offsets(self, offsets: dict[int, int]) -> bool:
        return True

    def read_changelog(self, partitions: set[int]) -> Iterator[
            tuple[int, bytes | None, bytes | None, list[tuple[str, bytes]] | None]]:
        return iter([r for r in self.log if r[0] in partitions])

    def seek(self, partition: int, offset: int) -> None:
        self.sought[partition] = offset
