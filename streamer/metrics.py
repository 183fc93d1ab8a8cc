"""Prometheus metrics for the streamer, plus the HTTP server for /metrics, /healthz, /readyz.

Metrics live on an injectable CollectorRegistry so tests (and two services in one process)
never collide on the global one. The service loop calls small verbs with plain numbers;
label children are bound once and cached, because ``.labels()`` costs a dict lookup and a
lock on every call.

    metrics = Metrics()
    health = HealthState()
    with MetricsServer(metrics.registry, health, "0.0.0.0", 9108):
        ...  # loop: health.beat(); metrics.observe_batch(len(batch), step_s)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socket import AF_INET6
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from streamer.collectors import BatchHistogram

# Sub-millisecond resolution: the defaults (5 ms .. 10 s) are for web requests and would put
# every model step into the first bucket.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)
BATCH_BUCKETS = tuple(float(2**i) for i in range(14))  # 1, 2, 4, .. 8192
SWAP_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    """Every ``streamer_*`` metric, with verbs the service loop calls."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        reg = self.registry
        self.end_to_end_latency = BatchHistogram(
            "streamer_end_to_end_latency_seconds", "Emit time minus event time.",
            buckets=LATENCY_BUCKETS, registry=reg,
        )
        self.processing_latency = Histogram(
            "streamer_processing_latency_seconds", "Poll return to produce acknowledged.",
            buckets=LATENCY_BUCKETS, registry=reg,
        )
        self.model_step = Histogram(
            "streamer_model_step_seconds", "Engine step per batch.",
            buckets=LATENCY_BUCKETS, registry=reg,
        )
        self.batch_events = Histogram(
            "streamer_batch_events", "Events per batch.", buckets=BATCH_BUCKETS, registry=reg
        )
        self.model_swap = Histogram(
            "streamer_model_swap_seconds", "Whole hot-swap duration.",
            buckets=SWAP_BUCKETS, registry=reg,
        )
        self.rewarm = Histogram(
            "streamer_rewarm_seconds", "Re-warm part of a hot swap.",
            buckets=SWAP_BUCKETS, registry=reg,
        )
        self.events_in = Counter(
            "streamer_events_in_total", "Messages taken from Kafka.", registry=reg
        )
        self.predictions_out = Counter(
            "streamer_predictions_out_total", "Predictions produced.", registry=reg
        )
        self.dead_letter = Counter(
            "streamer_dead_letter_total", "Messages sent to the dead-letter topic.",
            ["reason"], registry=reg,
        )
        self.commits = Counter("streamer_commits_total", "Offset commits.", registry=reg)
        self.negative_latency = Counter(
            "streamer_negative_latency_total",
            "Events stamped after they were emitted (clock skew); observed as latency 0.",
            registry=reg,
        )
        self.refused = Counter(
            "streamer_records_refused_total",
            "Output records the producer or broker refused (size, format): replaced by a "
            "dead letter that fits, or dropped when that was refused too.",
            ["outcome"], registry=reg,
        )
        self.offsets_skipped_total = Counter(
            "streamer_offsets_skipped_total", "Offsets skipped by out-of-range resets.",
            ["topic", "partition"], registry=reg,
        )
        self.key_evictions = Counter(
            "streamer_key_evictions_total", "Keys evicted from state.", ["reason"], registry=reg
        )
        self.model_swaps = Counter(
            "streamer_model_swaps_total", "Hot-swap attempts.", ["outcome"], registry=reg
        )
        self.consumer_lag = Gauge(
            "streamer_consumer_lag_messages", "Messages behind the log end.",
            ["topic", "partition"], registry=reg,
        )
        self.keys_resident = Gauge(
            "streamer_keys_resident", "Keys holding a state slot.", registry=reg
        )
        self.model_info = Gauge(
            "streamer_model_info", "1 for the serving model version.", ["version"], registry=reg
        )
        self.ready = Gauge(
            "streamer_ready", "1 when partitions are assigned and a model is loaded.",
            registry=reg,
        )
        self.assigned_partitions = Gauge(
            "streamer_assigned_partitions", "Partitions assigned to this consumer.", registry=reg
        )
        self.rebalance_dropped_total = Counter(
            "streamer_rebalance_dropped_records_total",
            "Records dropped from a batch because a rebalance revoked their partition.",
            registry=reg,
        )
        self.commit_failures = Counter(
            "streamer_commit_failures_total",
            "Offset commits rejected (rebalance) or timed out; re-delivered or retried.",
            ["reason"], registry=reg,
        )
        self.kafka_retries = Counter(
            "streamer_kafka_retries_total",
            "Loop iterations that found Kafka unavailable and backed off.", registry=reg,
        )
        self.consumer_lag_stale = Gauge(
            "streamer_consumer_lag_stale",
            "1 when the last lag measurement failed (lag values are the last known).",
            registry=reg,
        )
        self.restore_seconds = Histogram(
            "streamer_state_restore_seconds", "Changelog restore of an assignment.",
            buckets=SWAP_BUCKETS, registry=reg,
        )
        self.restore_rate = Gauge(
            "streamer_state_restore_records_per_second",
            "Changelog records read per second by the last restore.", registry=reg,
        )
        self.restored_keys = Counter(
            "streamer_state_restored_keys_total", "Keys restored from the changelog.",
            registry=reg,
        )
        self.state_skipped = Counter(
            "streamer_state_records_skipped_total",
            "Changelog records not restored (the key starts cold), by reason.",
            ["reason"], registry=reg,
        )
        self.state_skipped.labels("corrupt")
        self.checkpoint_seconds = Histogram(
            "streamer_checkpoint_seconds", "Checkpoint: records, markers, acks and commit.",
            buckets=LATENCY_BUCKETS, registry=reg,
        )
        self.changelog_bytes = Counter(
            "streamer_changelog_bytes_total", "Bytes of state records and markers written.",
            registry=reg,
        )
        self.model_fallbacks = Counter(
            "streamer_model_fallbacks_total",
            "Starts that refused the CURRENT version and served an older one.", registry=reg,
        )
        self._commit_failed = {
            r: self.commit_failures.labels(r) for r in ("rebalance", "timeout")
        }
        # Known label values start at 0 so rate() works from the first scrape.
        self._evicted = {r: self.key_evictions.labels(r) for r in ("capacity", "ttl")}
        self._swaps = {
            o: self.model_swaps.labels(o) for o in ("success", "refused", "retried")
        }
        self._refused = {o: self.refused.labels(o) for o in ("replaced", "dropped")}
        self._dead: dict[str, Any] = {}
        self._skipped: dict[tuple[str, int], Any] = {}
        self._lag: dict[tuple[str, int], Any] = {}
        self._version: str | None = None
        # set_lag / set_model_version may run on other threads than the loop.
        self._lock = threading.Lock()

    def observe_batch(self, n_events: int, step_seconds: float) -> None:
        """One batch: ``n_events`` messages taken from Kafka, engine step time."""
        self.events_in.inc(n_events)
        self.batch_events.observe(n_events)
        self.model_step.observe(step_seconds)

    def observe_latencies(
        self,
        end_to_end: Sequence[float] | np.ndarray,
        processing_seconds: float,
        n_predictions: int,
    ) -> None:
        """Per-event end-to-end latencies (non-finite ones dropped, negative ones counted and
        observed as 0) and one batch's processing."""
        values = np.asarray(end_to_end, dtype=np.float64).ravel()
        # NaN would poison _sum forever; a clock that cannot be read is not a latency.
        values = values[np.isfinite(values)]
        # A negative observation makes _sum fall, which rate() reads as a counter reset.
        negative = int(np.count_nonzero(values < 0))
        if negative:
            self.negative_latency.inc(negative)
            values = np.maximum(values, 0.0)
        self.end_to_end_latency.observe_many(values)
        self.processing_latency.observe(processing_seconds)
        self.predictions_out.inc(n_predictions)

    def dead_lettered(self, reason: str, n: int = 1) -> None:
        child = self._dead.get(reason)
        if child is None:
            child = self._dead.setdefault(reason, self.dead_letter.labels(reason))
        child.inc(n)

    def records_refused(self, outcome: str) -> None:
        """``outcome``: replaced (by a dead letter) or dropped."""
        self._refused[outcome].inc()

    def committed(self) -> None:
        self.commits.inc()

    def offsets_skipped(self, topic: str, partition: int, n: int) -> None:
        key = (topic, partition)
        child = self._skipped.get(key)
        if child is None:
            child = self._skipped.setdefault(
                key, self.offsets_skipped_total.labels(topic, str(partition))
            )
        child.inc(n)

    def set_lag(self, lags: Mapping[tuple[str, int], float]) -> None:
        """Replace all lag series; partitions no longer assigned disappear instead of freezing."""
        with self._lock:
            for gone in set(self._lag) - set(lags):
                del self._lag[gone]
                self.consumer_lag.remove(gone[0], str(gone[1]))
            for (topic, partition), lag in lags.items():
                child = self._lag.get((topic, partition))
                if child is None:
                    child = self.consumer_lag.labels(topic, str(partition))
                    self._lag[(topic, partition)] = child
                child.set(lag)

    def keep_lag(self, keep: Callable[[str, int], bool]) -> None:
        """Remove lag series for which ``keep(topic, partition)`` is false."""
        with self._lock:
            for gone in [k for k in self._lag if not keep(*k)]:
                del self._lag[gone]
                self.consumer_lag.remove(gone[0], str(gone[1]))

    def set_lag_stale(self, stale: bool) -> None:
        self.consumer_lag_stale.set(1 if stale else 0)

    def rebalance_dropped(self, n: int) -> None:
        self.rebalance_dropped_total.inc(n)

    def commit_failed(self, reason: str) -> None:
        child = self._commit_failed.get(reason)
        if child is None:
            child = self._commit_failed.setdefault(reason, self.commit_failures.labels(reason))
        child.inc()

    def kafka_retry(self) -> None:
        self.kafka_retries.inc()

    def model_fallback(self) -> None:
        self.model_fallbacks.inc()

    def restored(self, seconds: float, records_per_s: float, keys: int,
                 skipped: Mapping[str, int]) -> None:
        self.restore_seconds.observe(seconds)
        self.restore_rate.set(records_per_s)
        self.restored_keys.inc(keys)
        for reason, n in skipped.items():
            self.state_skipped.labels(reason).inc(n)

    def checkpointed(self, seconds: float, n_bytes: int) -> None:
        self.checkpoint_seconds.observe(seconds)
        self.changelog_bytes.inc(n_bytes)

    def set_keys_resident(self, n: int) -> None:
        self.keys_resident.set(n)

    def evicted(self, reason: str, n: int) -> None:
        child = self._evicted.get(reason)
        if child is None:
            child = self._evicted.setdefault(reason, self.key_evictions.labels(reason))
        child.inc(n)

    def set_model_version(self, version: str) -> None:
        """Exactly one ``streamer_model_info`` series, so dashboards can join on it."""
        with self._lock:
            if self._version is not None and self._version != version:
                self.model_info.remove(self._version)
            self.model_info.labels(version).set(1)
            self._version = version

    def swap(
        self, outcome: str, seconds: float | None = None, rewarm_seconds: float | None = None
    ) -> None:
        child = self._swaps.get(outcome)
        if child is None:
            child = self._swaps.setdefault(outcome, self.model_swaps.labels(outcome))
        child.inc()
        if seconds is not None:
            self.model_swap.observe(seconds)
        if rewarm_seconds is not None:
            self.rewarm.observe(rewarm_seconds)

    def set_ready(self, ready: bool) -> None:
        self.ready.set(1 if ready else 0)

    def set_assigned_partitions(self, n: int) -> None:
        self.assigned_partitions.set(n)


class HealthState:
    """Liveness (a fresh loop heartbeat) and readiness, shared between loop and HTTP threads.

    The heartbeat starts at construction so start-up gets one timeout's grace.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_beat = time.monotonic()
        self._ready = False
        self._reason = "starting"

    def beat(self) -> None:
        with self._lock:
            self._last_beat = time.monotonic()

    def set_ready(self, ready: bool, reason: str = "not ready") -> None:
        with self._lock:
            self._ready = ready
            self._reason = "" if ready else reason

    def heartbeat_age(self) -> float:
        with self._lock:
            return time.monotonic() - self._last_beat

    def healthy(self, max_age_s: float) -> bool:
        return self.heartbeat_age() <= max_age_s

    def ready(self) -> bool:
        with self._lock:
            return self._ready

    def not_ready_reason(self) -> str:
        with self._lock:
            return self._reason


def _handler(
    registry: CollectorRegistry, health: HealthState, heartbeat_timeout_s: float
) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = urlsplit(self.path).path
            if path == "/metrics":
                self._reply(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                age = health.heartbeat_age()
                if age <= heartbeat_timeout_s:
                    self._reply(200, b"ok\n")
                else:
                    self._reply(503, f"loop heartbeat is {age:.1f}s old\n".encode())
            elif path == "/readyz":
                if health.ready():
                    self._reply(200, b"ready\n")
                else:
                    self._reply(503, f"not ready: {health.not_ready_reason()}\n".encode())
            else:
                self._reply(404, b"not found\n")

        def _reply(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            """Scrapes every few seconds would drown the service log."""

    return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = AF_INET6


class MetricsServer:
    """Serves /metrics, /healthz, /readyz on a daemon thread; ``port=0`` binds a free port."""

    def __init__(
        self,
        registry: CollectorRegistry,
        health: HealthState,
        host: str,
        port: int,
        heartbeat_timeout_s: float = 30.0,
    ) -> None:
        self._handler = _handler(registry, health, heartbeat_timeout_s)
        self._host = host
        self._port = port
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port once started (the real one when 0 was asked)."""
        return self._port

    def start(self) -> MetricsServer:
        if self._server is not None:
            return self
        server_cls = _Server6 if ":" in self._host else _Server
        self._server = server_cls((self._host, self._port), self._handler)
        self._port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
            name="metrics-http", daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server, self._thread = None, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> MetricsServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

