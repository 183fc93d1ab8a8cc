"""The composition root: wires settings, model, state store, engine, Kafka edge, metrics and
the model watcher into one consume -> decode -> step -> produce -> commit loop.

Nothing else in the package knows both Kafka and Prometheus. The loop is single-threaded on
purpose: the engine owns the state tensors, and swaps, evictions and partition releases all
happen between batches on this thread, so no lock guards the hot path.

Usage::

    service = Service.from_settings(settings)
    service.run(stop_event)          # returns after a graceful drain
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Sequence

import numpy as np
import torch
from prometheus_client import CollectorRegistry

from streamer.artifact import Artifact
from streamer.engine import Engine
from streamer.events import DecodedBatch, Message, decode_batch
from streamer.hotswap import ModelWatcher, open_model_source
from streamer.kafka_edge import KafkaEdge
from streamer.metrics import HealthState, Metrics, MetricsServer
from streamer.model import resolve_device
from streamer.settings import StreamerSettings
from streamer.state import StateStore

log = logging.getLogger(__name__)

HOUSEKEEPING_S = 1.0


class Service:
    def __init__(
        self,
        settings: StreamerSettings,
        artifact: Artifact,
        watcher: ModelWatcher | None,
        device: torch.device,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.settings = settings
        self.device = device
        self.version = artifact.metadata.version
        model = artifact.model
        self.store = StateStore.for_model(
            model, settings.capacity, settings.window, device, settings.key_ttl_s
        )
        self.engine = Engine(model, self.store)
        self.watcher = watcher
        self.metrics = Metrics(registry)
        self.health = HealthState()
        self.http = MetricsServer(
            self.metrics.registry, self.health, settings.metrics_host, settings.metrics_port
        )
        self.metrics.set_model_version(self.version)
        self.edge: KafkaEdge | None = None
        self._assigned: set[int] = set()
        self._next_housekeeping = 0.0
        self._next_lag = 0.0

    @classmethod
    def from_settings(
        cls, settings: StreamerSettings, registry: CollectorRegistry | None = None
    ) -> Service:
        device = resolve_device(settings.device)
        artifact, watcher = open_model_source(
            settings.model, settings.model_name, device, settings.registry_poll_s
        )
        log.info("serving model %s from %s on %s", artifact.metadata.version, artifact.path,
                 device)
        return cls(settings, artifact, watcher, device, registry)

    # --- partition ownership (called from inside poll, between batches) -------------------

    def _on_assign(self, partitions: set[int]) -> None:
        self._assigned = partitions
        self.metrics.set_assigned_partitions(len(partitions))
        self._update_ready()
        log.info("assigned partitions %s", sorted(partitions))

    def _on_revoke(self, partitions: set[int]) -> None:
        released = self.store.release_partitions(partitions)
        self.metrics.set_keys_resident(len(self.store))
        log.info("revoked partitions %s: released %d keys", sorted(partitions), released)

    def _on_gap(self, partition: int, skipped: int) -> None:
        self.metrics.offsets_skipped(self.settings.input_topic, partition, skipped)

    def _update_ready(self) -> None:
        ready = bool(self._assigned)
        self.health.set_ready(ready, "" if ready else "no partitions assigned")
        self.metrics.set_ready(ready)

    # --- the loop ----------------------------------------------------------------------

    def run(self, stop: threading.Event, edge: KafkaEdge | None = None) -> None:
        """Consume until ``stop`` is set; then finish the batch, flush, commit and leave."""
        self.http.start()
        self.edge = edge or KafkaEdge(
            self.settings, self._on_assign, self._on_revoke, self._on_gap
        )
        if self.watcher is not None:
            self.watcher.start()
        try:
            while not stop.is_set():
                self.health.beat()
                self._between_batches()
                batch = self.edge.poll()
                if batch:
                    self.process(batch)
        finally:
            # Close in this order: stop swaps, drain and commit, then stop answering probes.
            self.health.set_ready(False, "shutting down")
            self.metrics.set_ready(False)
            if self.watcher is not None:
                self.watcher.stop()
            try:
                self.edge.close()
            finally:
                self.http.stop()
            log.info("stopped cleanly")

    def process(self, batch: Sequence[Message]) -> None:
        assert self.edge is not None
        polled = time.time()
        decoded = decode_batch(batch, self.engine.spec, polled, self.settings.max_future_s)
        self._dead_letter(batch, decoded)
        step_s = 0.0
        if decoded.keys:
            parts = [batch[i].partition for i in decoded.index]
            t0 = time.perf_counter()
            preds, evicted = self.engine.process(
                decoded.keys, parts, decoded.raw, decoded.ts, polled
            )
            step_s = time.perf_counter() - t0
            if evicted:
                self.metrics.evicted("capacity", evicted)
            self._emit(batch, decoded, preds)
        self.edge.flush_and_commit(batch)
        acked = time.time()
        self.metrics.committed()
        self.metrics.observe_batch(len(batch), step_s)
        self.metrics.set_keys_resident(len(self.store))
        self.metrics.observe_latencies(acked - decoded.ts, acked - polled, len(decoded.keys))

    def _emit(self, batch: Sequence[Message], decoded: DecodedBatch, preds: np.ndarray) -> None:
        assert self.edge is not None
        topic, version, emitted_at = self.settings.output_topic, self.version, time.time()
        send, dumps = self.edge.send, json.dumps
        col = self.engine.spec.target_raw_column  # predicted change = prediction - last value
        changes = preds[:, 0] - decoded.raw[:, col] if col is not None and (
            self.engine.model.config.task == "regression") else None
        for j, (i, key) in enumerate(zip(decoded.index, decoded.keys, strict=True)):
            msg = batch[i]
            record = {
                "key": key, "ts": decoded.ts_raw[j], "partition": msg.partition,
                "offset": msg.offset, "prediction": preds[j].tolist(),
                "model_version": version, "emitted_at": emitted_at,
            }
            if changes is not None:
                record["change"] = [float(changes[j])]
            value = dumps(record, separators=(",", ":"))
            send(topic, key.encode(), value.encode())

    def _dead_letter(self, batch: Sequence[Message], decoded: DecodedBatch) -> None:
        assert self.edge is not None
        topic = self.settings.dead_letter_topic
        for i, err in decoded.bad:
            msg = batch[i]
            headers = [
                ("dlq.reason", err.reason.encode()),
                ("dlq.detail", err.detail.encode("utf-8", "replace")[:1024]),
                ("dlq.source.topic", self.settings.input_topic.encode()),
                ("dlq.source.partition", str(msg.partition).encode()),
                ("dlq.source.offset", str(msg.offset).encode()),
            ]
            self.edge.send(topic, msg.key, msg.value, headers)
            self.metrics.dead_lettered(err.reason)
            log.debug("dead-lettered %s[%d]@%d: %s", self.settings.input_topic, msg.partition,
                      msg.offset, err)

    def _between_batches(self) -> None:
        now = time.time()
        if self.watcher is not None:
            self._maybe_swap()
        if now >= self._next_housekeeping:
            self._next_housekeeping = now + HOUSEKEEPING_S
            evicted = self.store.evict_idle(now)
            if evicted:  # process() keeps the gauge current otherwise
                self.metrics.evicted("ttl", evicted)
                self.metrics.set_keys_resident(len(self.store))
        if now >= self._next_lag and self.edge is not None:
            self._next_lag = now + self.settings.lag_interval_s
            self.metrics.set_lag(self.edge.lag())

    def _maybe_swap(self) -> None:
        assert self.watcher is not None
        for refused in self.watcher.take_refusals():
            self.metrics.swap("refused")
            log.error("model version refused, still serving %s: %s", self.version, refused)
        candidate = self.watcher.take()
        if candidate is None:
            return
        t0 = time.perf_counter()
        try:
            rewarm_s = self._swap(candidate)
        except ValueError as exc:
            self.metrics.swap("refused")
            log.error("cannot swap to %s, still serving %s: %s",
                      candidate.metadata.version, self.version, exc)
            return
        total = time.perf_counter() - t0
        self.metrics.swap("success", total, rewarm_s)
        log.info("now serving %s (swap %.1f ms, re-warm %.1f ms, %d keys)", self.version,
                 total * 1e3, rewarm_s * 1e3, len(self.store))

    def _swap(self, candidate: Artifact) -> float:
        t0 = time.perf_counter()
        self.engine.swap_model(candidate.model, self.settings.swap_policy)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        rewarm_s = time.perf_counter() - t0
        self.version = candidate.metadata.version
        self.metrics.set_model_version(self.version)
        return rewarm_s
