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

import gc
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any, cast

import numpy as np
import torch
from prometheus_client import CollectorRegistry

from streamer.artifact import Artifact
from streamer.batch_decode import decode_batch_fast
from streamer.edge import Edge, Record, make_edge
from streamer.encode import encode_predictions
from streamer.engine import Engine
from streamer.errors import ConfigError, KafkaEdgeError, KafkaUnavailable
from streamer.events import DecodedBatch, Message
from streamer.graphs import GraphStep
from streamer.hotswap import ModelWatcher, open_model_source
from streamer.metrics import HealthState, Metrics, MetricsServer
from streamer.model import resolve_device
from streamer.recovery import StateEdge, StateRecovery
from streamer.settings import StreamerSettings
from streamer.stages import StageTimer
from streamer.state import StateStore

log = logging.getLogger(__name__)

HOUSEKEEPING_S = 1.0
NON_FINITE_OUTPUT = "non_finite_output"  # dead-letter reason: the model step overflowed
REFUSED_BY_BROKER = "refused_by_broker"  # dead-letter reason: the output record was refused
DLQ_OVERHEAD = 1024  # bytes kept free under max_request_size for record and batch framing
REFUSED_VALUE_BYTES = 16 * 1024  # value kept in the dead letter that replaces a refused record


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
        if settings.cuda_graphs and device.type != "cuda":
            log.info("cuda_graphs is ignored on %s: CUDA graphs need a CUDA device", device)
        elif settings.cuda_graphs:
            self.engine.bucketed = GraphStep(settings.max_batch_events)
            self.engine.bucketed.warm(self.engine)  # capture now, not on the first batches
        self.watcher = watcher
        self.metrics = Metrics(registry)
        self.health = HealthState()
        self.http = MetricsServer(
            self.metrics.registry, self.health, settings.metrics_host, settings.metrics_port
        )
        self.metrics.set_model_version(self.version)
        if watcher is not None and watcher.start_refusals:
            self.metrics.model_fallback()
        self.edge: Edge | None = None
        self._assigned: set[int] = set()
        self._fault = ""  # why Kafka cannot be used right now; "" when it can
        self._commit_problem = ""  # why the last offset commit failed; "" after a success
        self._next_housekeeping = 0.0
        self._next_lag = 0.0
        self.stages = StageTimer()
        self.recovery: StateRecovery | None = None
        if settings.changelog:
            self.recovery = StateRecovery(
                self.engine, settings.state_topic, settings.checkpoint_interval_s,
                settings.checkpoint_interval_events, settings.swap_policy)
        self._restoring = ""  # why state is not restored yet; "" when it is
        self._restore_needed: set[int] = set()  # partitions whose resident state is unusable
        self._restore_backoff = 0.0  # seconds before retrying a failed restore (doubling)
        self._restore_retry_at = 0.0  # time.monotonic() of the next retry between batches

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
        previous, self._assigned = self._assigned, partitions
        if self.recovery is not None:
            self._restore_assigned(partitions, previous)
        self.metrics.set_assigned_partitions(len(partitions))
        self._update_ready()
        log.info("assigned partitions %s", sorted(partitions))

    def _on_revoke(self, partitions: set[int]) -> None:
        self._assigned = self._assigned - partitions
        self.metrics.set_assigned_partitions(len(self._assigned))
        self._update_ready()  # holding no partition (e.g. during a rejoin) is not ready
        released = self.store.release_partitions(partitions)
        if self.recovery is not None:
            self.recovery.forget(partitions)
            self._restore_needed -= partitions  # restored if assigned again
        self.metrics.set_keys_resident(len(self.store))
        log.info("revoked partitions %s: released %d keys", sorted(partitions), released)

    @property
    def _state_edge(self) -> StateEdge:
        """The edge as durable state uses it (both clients' edges implement StateEdge)."""
        assert self.edge is not None
        return cast("StateEdge", self.edge)

    def _restore_assigned(self, partitions: set[int], previous: set[int]) -> None:
        """Inside the assignment: keep a retained partition whose state is exactly its last
        checkpoint (and read it from the marker on), restore every other one."""
        assert self.recovery is not None and self.edge is not None
        keep = {p for p in partitions & previous if self.recovery.clean(p)}
        for p in keep:
            self._state_edge.seek(p, self.recovery.position[p])
        self._restore(partitions - keep)

    def _restore(self, partitions: set[int]) -> None:
        assert self.recovery is not None and self.edge is not None
        self._restore_needed |= partitions
        if not self._restore_needed:
            return
        self._restoring = "restoring state from the changelog"
        self._update_ready()
        try:
            stats = self.recovery.restore(self._state_edge, self._restore_needed & self._assigned,
                                          self.version)
        except KafkaUnavailable as exc:
            self._restoring = f"state restore failed, retrying: {exc}"
            self._update_ready()
            self.metrics.kafka_retry()
            self._restore_backoff = min(max(2 * self._restore_backoff, 0.1),
                                        self.settings.retry_backoff_max_s)
            self._restore_retry_at = time.monotonic() + self._restore_backoff
            log.warning("state restore failed, retried in %.1f s: %s", self._restore_backoff, exc)
            return
        self._restore_backoff = 0.0
        self._restore_needed.clear()
        self._restoring = ""
        self.metrics.restored(stats.seconds, stats.records_per_s, stats.keys, stats.skipped)
        self.metrics.set_keys_resident(len(self.store))
        self._update_ready()

    def _on_revoking(self, partitions: set[int]) -> None:
        """Before partitions go (rebalance or shutdown): checkpoint them; the caller commits
        and the release follows, whatever happened here."""
        if self.recovery is None or self.edge is None or self._restore_needed:
            return
        try:
            self._checkpoint(partitions)
        except (KafkaEdgeError, KafkaUnavailable) as exc:
            log.error("checkpoint of revoked partitions %s failed: %s; their next owner "
                      "replays from the previous checkpoint", sorted(partitions), exc)
            if self.settings.processing_guarantee == "exactly_once":
                # The transaction was aborted: partitions this member keeps go back to theirs
                # (those released next are dropped from the set by _on_revoke).
                self._restore_needed |= self._assigned

    def _checkpoint(self, partitions: set[int]) -> None:
        assert self.recovery is not None and self.edge is not None
        stats = self.recovery.checkpoint(self._state_edge, partitions, self.version)
        if stats.partitions:
            self.metrics.checkpointed(stats.seconds, stats.bytes)
            if stats.committed:
                self._committed()

    def _on_gap(self, partition: int, skipped: int) -> None:
        self.metrics.offsets_skipped(self.settings.input_topic, partition, skipped)

    def _update_ready(self) -> None:
        reason = (self._fault or self._commit_problem or self._restoring
                  or ("" if self._assigned else "no partitions assigned"))
        self.health.set_ready(not reason, reason)
        self.metrics.set_ready(not reason)

    def _set_fault(self, reason: str) -> None:
        if reason != self._fault:
            self._fault = reason
            self._update_ready()

    def _on_dropped(self, n: int) -> None:
        self.metrics.rebalance_dropped(n)

    def _on_commit_failed(self, reason: str) -> None:
        self.metrics.commit_failed(reason)
        if reason == "timeout":  # a rejection by a rebalance is followed by a rejoin
            self._commit_problem = "offset commits are timing out"
            self._update_ready()

    def _committed(self) -> None:
        self.metrics.committed()
        if self._commit_problem:
            self._commit_problem = ""
            self._update_ready()

    # --- the loop ----------------------------------------------------------------------

    def run(self, stop: threading.Event, edge: Edge | None = None) -> None:
        """Consume until ``stop`` is set; then finish the batch, flush, commit and leave.

        Transient Kafka faults (KafkaUnavailable) are retried with exponential backoff up to
        ``retry_backoff_max_s`` while /readyz says why; anything else ends the loop. Returns
        only when everything sent was acknowledged and committed; raises KafkaEdgeError when
        the drain did not finish within ``drain_timeout_s`` (those offsets are re-delivered).
        """
        self.http.start()
        try:
            connected = edge or self._connect(stop)
        except BaseException:
            self.http.stop()
            raise
        if connected is None:  # stopped before Kafka could be reached: nothing to drain
            self.http.stop()
            log.info("stopped before Kafka was reachable")
            return
        self.edge = connected
        # Everything built so far (model, modules, clients) lives as long as the service: move
        # it out of the cyclic collector's reach, so the full collections that the per-batch
        # parse objects trigger do not walk it (Python docs, gc.freeze; ~1.5 us/event here).
        gc.freeze()
        if self.watcher is not None:
            self.watcher.start()
        failure: BaseException | None = None
        try:
            self._check_changelog_topic()
            self._loop(stop)
        except BaseException as exc:
            failure = exc
            raise
        finally:
            clean = self._shutdown(failure)
        if not clean:
            raise KafkaEdgeError(
                "drain did not finish cleanly: some outputs were not acknowledged or offsets "
                "not committed (the log above says which and why); they will be re-delivered"
            )

    def _connect(self, stop: threading.Event) -> Edge | None:
        """The edge, once Kafka answers: a service started before its brokers (compose,
        Kubernetes) waits for them with backoff, not ready and saying why, instead of exiting.
        None when ``stop`` is set first."""
        backoff = 0.0
        while True:
            try:
                return make_edge(
                    self.settings, self._on_assign, self._on_revoke, self._on_gap,
                    on_dropped=self._on_dropped, on_commit_failed=self._on_commit_failed,
                    stop=stop, beat=self.health.beat,
                    on_stall=lambda reason: self._set_fault(f"Kafka unavailable: {reason}"),
                    on_refused=self._on_refused, on_committed=self._committed,
                    **self._changelog_kwargs(),
                )
            except KafkaUnavailable as exc:
                backoff = min(max(2 * backoff, 0.1), self.settings.retry_backoff_max_s)
                self.metrics.kafka_retry()
                self._set_fault(f"Kafka unavailable: {exc}")
                log.warning("cannot reach Kafka yet, retrying in %.1f s: %s", backoff, exc)
                self.health.beat()
                if stop.wait(backoff):
                    return None

    def _check_changelog_topic(self) -> None:
        """With ``changelog``: the changelog topic must exist with at least as many partitions
        as the input (partition N holds input partition N's keys). Raises ConfigError naming
        both topics; a restore could otherwise never succeed."""
        if self.recovery is None:
            return
        edge, st = self._state_edge, self.settings
        n_in, n_cl = edge.topic_partitions(st.input_topic), edge.topic_partitions(st.state_topic)
        if n_cl == 0:
            raise ConfigError(
                "changelog_topic", f"the changelog topic {st.state_topic!r} does not exist; create "
                f"it with {n_in or 'as many'} partitions (as the input topic {st.input_topic!r}) "
                "and cleanup.policy=compact, or name another with changelog_topic")
        if n_cl < n_in:
            raise ConfigError(
                "changelog_topic", f"the changelog topic {st.state_topic!r} has {n_cl} partitions, "
                f"the input topic {st.input_topic!r} has {n_in}; changelog partition N holds "
                f"input partition N's keys, so it needs at least {n_in}")

    def _changelog_kwargs(self) -> dict[str, Any]:
        """What an edge needs for durable state (only when the changelog is on)."""
        if self.recovery is None:
            return {}
        return {"on_revoking": self._on_revoking, "changelog_topic": self.settings.state_topic}

    def _loop(self, stop: threading.Event) -> None:
        assert self.edge is not None
        backoff = 0.0
        while not stop.is_set():
            self.health.beat()
            self._between_batches()
            try:
                t = self.stages.start()
                batch = self.edge.poll()
                self.stages.lap("consume", t)
                if batch and self._restore_needed:  # restore first, then read from there
                    self.edge.rewind(batch)
                elif batch:
                    self.process(batch)
            except KafkaUnavailable as exc:
                backoff = min(max(2 * backoff, 0.1), self.settings.retry_backoff_max_s)
                self.metrics.kafka_retry()
                self._set_fault(f"Kafka unavailable: {exc}")
                log.warning("Kafka unavailable, retrying in %.1f s: %s", backoff, exc)
                stop.wait(backoff)
                continue
            backoff = 0.0
            if self._fault:
                log.info("Kafka reachable again")
                self._set_fault("")

    def _shutdown(self, failure: BaseException | None) -> bool:
        """Close in this order: stop swaps, drain and commit, then stop answering probes."""
        assert self.edge is not None
        self.health.set_ready(False, "shutting down")
        self.metrics.set_ready(False)
        clean = False
        try:
            if self.watcher is not None:
                self.watcher.stop()
            if failure is None:
                self._on_revoking(self._assigned)  # SIGTERM: the state survives a restart
            clean = self.edge.close()
        finally:
            self.http.stop()
            if failure is not None:
                log.error("stopped after an error: %s: %s", type(failure).__name__, failure)
            elif clean:
                log.info("stopped cleanly")
            else:
                log.error("stopped with outputs not acknowledged or offsets not committed "
                          "(see above); they will be re-delivered")
        return clean

    def process(self, batch: Sequence[Message]) -> None:
        assert self.edge is not None
        polled, stages = time.time(), self.stages
        st = self.settings
        t = stages.start()
        decoded = decode_batch_fast(
            batch, self.engine.spec, polled, st.max_future_s, max_past_s=st.max_past_s,
            min_event_time=st.min_event_time, max_key_bytes=st.max_key_bytes,
        )
        t = stages.lap("decode", t)
        self._dead_letter(batch, decoded)
        stages.lap("produce", t)
        step_s = 0.0
        emitted = 0
        if decoded.keys:
            parts = [batch[i].partition for i in decoded.index]
            t0 = time.perf_counter()
            preds, evicted = self.engine.process(
                decoded.keys, parts, decoded.raw, decoded.ts, polled
            )
            step_s = time.perf_counter() - t0
            stages.add("engine", step_s)
            if evicted:
                self.metrics.evicted("capacity", evicted)
            emitted = self._emit(batch, decoded, preds, parts)
        t = stages.start()
        if self.recovery is not None:
            self._flush_and_checkpoint(batch)
        elif self.edge.flush_and_commit(batch):
            self._committed()
        stages.lap("commit", t)
        acked = time.time()
        self.metrics.observe_batch(len(batch), step_s)
        self.metrics.set_keys_resident(len(self.store))
        self.metrics.observe_latencies(acked - decoded.ts, acked - polled, emitted)

    def _flush_and_checkpoint(self, batch: Sequence[Message]) -> None:
        """With a changelog, offsets are committed only with a checkpoint's markers. A batch
        whose outputs were not acknowledged has already advanced its keys' state: those
        partitions are restored from the changelog (and replayed) before going on."""
        assert self.recovery is not None and self.edge is not None
        try:
            self._state_edge.flush()
        except (KafkaUnavailable, KafkaEdgeError):
            self._restore_needed |= {m.partition for m in batch}
            self._restoring = "state of an unacknowledged batch must be restored"
            self._update_ready()
            raise
        self.recovery.processed(batch)
        if self.recovery.due():
            try:
                self._checkpoint(self._assigned)
            except (KafkaUnavailable, KafkaEdgeError):
                self._restore_needed |= set(self._assigned)  # back to the last checkpoint
                self._restoring = "a checkpoint failed: state must be restored"
                self._update_ready()
                raise

    def _emit(self, batch: Sequence[Message], decoded: DecodedBatch, preds: np.ndarray,
              parts: list[int]) -> int:
        """Produce one prediction per good event (RFC 8259 JSON: no NaN/Infinity tokens); an
        event whose prediction is not finite (the engine kept its key's state) becomes a dead
        letter. Returns the number of predictions produced."""
        assert self.edge is not None
        topic, version, emitted_at = self.settings.output_topic, self.version, time.time()
        col = self.engine.spec.target_raw_column  # predicted change = prediction - last value
        changes = preds[:, 0] - decoded.raw[:, col] if col is not None and (
            self.engine.model.config.task == "regression") else None
        finite = np.isfinite(preds).all(axis=1)
        if changes is not None:
            finite &= np.isfinite(changes)
        for j in np.flatnonzero(~finite).tolist():
            msg, key = batch[decoded.index[j]], decoded.keys[j]
            self._send_dead_letter(msg, NON_FINITE_OUTPUT, (
                f"model {version} gave a non-finite step or prediction for key {key!r} in "
                f"the batch of offset {msg.offset} (this event or another of the key's in "
                "that batch); the key keeps its state from before the batch"),
                [("dlq.key", key.encode()), ("dlq.model.version", version.encode())])
        good = list(range(len(decoded.keys))) if finite.all() else np.flatnonzero(finite).tolist()
        msgs = [batch[decoded.index[j]] for j in good]
        everything = len(good) == len(decoded.keys)
        keys = decoded.keys if everything else [decoded.keys[j] for j in good]
        t = self.stages.start()
        values = encode_predictions(
            keys, [decoded.ts_raw[j] for j in good], parts if everything else
            [parts[j] for j in good], [m.offset for m in msgs], preds[good], version, emitted_at,
            None if changes is None else changes[good])
        t = self.stages.lap("encode", t)
        send = self.edge.send
        for key, value, msg in zip(keys, values, msgs, strict=True):
            send(topic, key.encode(), value, None, msg)
        self.stages.lap("produce", t)
        return len(good)

    def _dead_letter(self, batch: Sequence[Message], decoded: DecodedBatch) -> None:
        for i, err in decoded.bad:
            self._send_dead_letter(batch[i], err.reason, err.detail)

    def _send_dead_letter(
        self, msg: Message, reason: str, detail: str,
        extra: Sequence[tuple[str, bytes]] = (),
    ) -> None:
        assert self.edge is not None
        self.edge.send(*self._dead_letter_record(msg, reason, detail, extra), msg)
        self.metrics.dead_lettered(reason)
        log.debug("dead-lettered %s[%d]@%d: %s: %s", self.settings.input_topic, msg.partition,
                  msg.offset, reason, detail)

    def _dead_letter_record(
        self, msg: Message, reason: str, detail: str,
        extra: Sequence[tuple[str, bytes]] = (), max_value: int | None = None,
    ) -> Record:
        """A dead letter that can always be produced: a keyless tombstone gets an empty value
        (header ``dlq.tombstone``); a key longer than ``max_key_bytes`` and a value that would
        not fit ``max_request_size`` (or ``max_value``) are cut, with the original length in
        ``dlq.key.truncated`` / ``dlq.value.truncated``."""
        headers = [
            ("dlq.reason", reason.encode()),
            ("dlq.detail", detail.encode("utf-8", "replace")[:1024]),
            ("dlq.source.topic", self.settings.input_topic.encode()),
            ("dlq.source.partition", str(msg.partition).encode()),
            ("dlq.source.offset", str(msg.offset).encode()),
            *((name, value[:1024]) for name, value in extra),
        ]
        budget = self.settings.max_request_size - DLQ_OVERHEAD - sum(
            len(name) + len(value) + 64 for name, value in headers)
        key, value = msg.key, msg.value
        key_limit = min(self.settings.max_key_bytes, budget // 2)
        if key is not None and len(key) > key_limit:
            headers.append(("dlq.key.truncated", str(len(key)).encode()))
            key = key[:key_limit]
        value_limit = budget - 64 - len(key or b"")
        if max_value is not None:
            value_limit = min(value_limit, max_value)
        if value is not None and len(value) > value_limit:
            headers.append(("dlq.value.truncated", str(len(value)).encode()))
            value = value[:max(value_limit, 0)]
        if key is None and value is None:  # a producer needs one of them
            headers.append(("dlq.tombstone", b"1"))
            value = b""
        return self.settings.dead_letter_topic, key, value, headers

    def _on_refused(
        self, record: Record, origin: object, exc: Exception, final: bool
    ) -> Record | None:
        """The producer or broker refused ``record`` for what it is (size, format): replace it
        with a small dead letter of its input message, so the partition moves on. A dead
        letter refused as well is dropped, counted and logged with its coordinates."""
        topic = record[0]
        if final or not isinstance(origin, Message):
            self.metrics.records_refused("dropped")
            log.error("dropped a record the broker refused for %s (source %r): %s", topic,
                      origin if not isinstance(origin, Message) else
                      (origin.partition, origin.offset), exc)
            return None
        self.metrics.records_refused("replaced")
        reason = REFUSED_BY_BROKER
        if topic == self.settings.dead_letter_topic:  # keep the reason it was dead-lettered for
            reason = dict(record[3] or []).get("dlq.reason", reason.encode()).decode()
        else:
            self.metrics.dead_lettered(reason)
        log.warning("%s refused a record for %s[%d]@%d: %s; dead-lettering it instead",
                    topic, self.settings.input_topic, origin.partition, origin.offset, exc)
        return self._dead_letter_record(
            origin, reason, f"{topic} refused the record: {type(exc).__name__}: {exc}",
            [("dlq.refused.topic", topic.encode())], max_value=REFUSED_VALUE_BYTES,
        )

    def _between_batches(self) -> None:
        now = time.time()
        if (self._restore_needed and self.edge is not None
                and time.monotonic() >= self._restore_retry_at):
            self._restore(set())
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
            lags = self.edge.lag()
            self.metrics.set_lag_stale(lags is None)
            if lags is not None:
                self.metrics.set_lag(lags)
            else:  # keep the last values of partitions still assigned, marked stale
                assigned = self.edge.assigned_partitions()
                self.metrics.keep_lag(lambda _topic, p: p in assigned)

    def _maybe_swap(self) -> None:
        assert self.watcher is not None
        for refused in self.watcher.take_refusals():
            self.metrics.swap("refused")
            log.error("model version refused, still serving %s: %s", self.version, refused)
        for _ in range(self.watcher.take_retries()):
            self.metrics.swap("retried")
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
        if self.recovery is not None:  # every key's h and c changed
            self.recovery.mark_all_dirty()
        return rewarm_s
