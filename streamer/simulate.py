"""Synthetic event streams: ticks, sensor readings and generic vectors, plus a paced producer.

Why: the demo, the benchmarks and the trainer tests need realistic input with a signal a
model can learn (so "beats persistence" means something), reproducible from a seed, and a
producer that holds a target rate without sleeping per event.

Usage::

    sim = make_simulator("tick", n_keys=100, seed=7)
    key, value = sim.encode(sim.events(1000)[0])
    run_simulator("127.0.0.1:9092", "events", "tick", n_keys=100, rate=5000, duration_s=10)
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np

from streamer.errors import ConfigError, KafkaEdgeError

SimKind = Literal["tick", "sensor", "generic"]
Event = dict[str, Any]

log = logging.getLogger(__name__)

DEFAULT_START_TS = 1_735_689_600.0  # 2025-01-01T00:00:00Z: fixed so a seed fixes the stream
_MIN_GAP_S = 1e-6  # keeps ts strictly increasing (float spacing near 1.7e9 is ~2.4e-7)
_DAY_S = 86_400.0


class Simulator:
    """Shared clock and key interleaving; subclasses only say how one key's state evolves.

    Each key emits at exponential inter-arrival times (mean ``dt_mean``). The merge of
    ``n_keys`` such Poisson streams is one Poisson stream with mean gap ``dt_mean / n_keys``
    whose key is uniform, which is the same law, drawn vectorised and already time-ordered.
    Every random quantity has its own stream (:meth:`_stream`), so ``events(a)`` then
    ``events(b)`` equals ``events(a + b)``: a seed fixes the stream whatever the chunking.
    """

    key_field: ClassVar[str]
    key_format: ClassVar[str]

    def __init__(self, n_keys: int, seed: int, start_ts: float, dt_mean: float) -> None:
        if n_keys < 1:
            raise ConfigError("n_keys", f"must be >= 1, got {n_keys}")
        if not dt_mean > 0:
            raise ConfigError("dt_mean", f"must be > 0, got {dt_mean}")
        self.n_keys = n_keys
        self.keys = [self.key_format.format(i) for i in range(n_keys)]
        self._seeds = np.random.SeedSequence(seed)
        self._rng = self._stream()  # one-off draws at construction (per-key parameters)
        self._gap_rng, self._key_rng = self._stream(), self._stream()
        self._dt_mean = float(dt_mean)
        self._start_ts, self._since = float(start_ts), 0.0

    def events(self, n: int) -> list[Event]:
        """The next ``n`` events across all keys, in increasing ``ts`` order."""
        gaps = _MIN_GAP_S + self._gap_rng.exponential(self._dt_mean / self.n_keys, size=n)
        # continue one sequential running sum so the floats do not depend on chunking
        since = np.cumsum(np.concatenate(([self._since], gaps)))[1:]
        ts = self._start_ts + since
        # floor(u * n), not integers(): integers() buffers bits per call, breaking chunking
        idx = np.minimum(self._key_rng.random(n) * self.n_keys, self.n_keys - 1).astype(int)
        self._since = float(since[-1]) if n else self._since
        return self._emit(idx.tolist(), ts.tolist())

    def encode(self, event: Event) -> tuple[bytes, bytes]:
        """(Kafka key, compact JSON value); the key is the event's own key field."""
        key = str(event[self.key_field]).encode()
        return key, json.dumps(event, separators=(",", ":")).encode()

    def _stream(self) -> np.random.Generator:
        """A fresh independent generator; call order in __init__ fixes which is which."""
        return np.random.default_rng(self._seeds.spawn(1)[0])

    def _emit(self, idx: list[int], ts: list[float]) -> list[Event]:
        raise NotImplementedError


class TickSimulator(Simulator):
    """Trades per symbol: log-price random walk whose returns carry AR(1) momentum.

    r_t = phi * r_{t-1} + sigma_regime * eps, with a per-symbol two-state Markov switch
    between low and high volatility. ``phi`` is the learnable part: an AR/LSTM model can
    beat persistence by about phi**2 of the return variance. The spread widens in high vol.
    """

    key_field = "symbol"
    key_format = "SYM{:04d}"
    SIGMA = (0.0005, 0.002)  # per-event log-return scale, (low, high) regime
    HALF_SPREAD = (0.0001, 0.0004)  # fraction of price, (low, high) regime
    SWITCH_P = (0.01, 0.05)  # per-event probability of leaving (low, high)

    def __init__(
        self,
        n_keys: int,
        seed: int = 0,
        start_ts: float = DEFAULT_START_TS,
        dt_mean: float = 1.0,
        phi: float = 0.3,
    ) -> None:
        super().__init__(n_keys, seed, start_ts, dt_mean)
        self._phi = phi
        start = np.clip(self._rng.lognormal(math.log(100.0), 0.8, n_keys), 5.0, 2000.0)
        self._logp = np.log(start).tolist()
        self._ret = [0.0] * n_keys
        self._high = [False] * n_keys
        self._eps_rng, self._u_rng, self._size_rng = self._stream(), self._stream(), self._stream()

    def _emit(self, idx: list[int], ts: list[float]) -> list[Event]:
        n = len(idx)
        eps = self._eps_rng.standard_normal(n).tolist()
        u = self._u_rng.random((n, 2)).tolist()
        sizes = np.maximum(1, np.rint(self._size_rng.lognormal(4.0, 1.0, n)))
        sizes = sizes.astype(int).tolist()
        out: list[Event] = []
        for k, t, e, (u_switch, u_spread), size in zip(idx, ts, eps, u, sizes, strict=True):
            high = self._high[k]
            if u_switch < self.SWITCH_P[high]:
                high = self._high[k] = not high
            r = self._ret[k] = self._phi * self._ret[k] + self.SIGMA[high] * e
            self._logp[k] += r
            price = math.exp(self._logp[k])
            half = price * self.HALF_SPREAD[high] * (0.75 + 0.5 * u_spread)
            out.append({
                "symbol": self.keys[k], "ts": t, "price": round(price, 4), "size": size,
                "bid": round(price - half, 4), "ask": round(price + half, 4),
            })
        return out


class SensorSimulator(Simulator):
    """Pump sensors: daily seasonality, noise, slow mean-reverting drift, rare spikes.

    The seasonal term is ``sin(2*pi*time_of_day/86400)`` (UTC) on simulated time, so it is
    learnable from ``ts``; drift is an Ornstein-Uhlenbeck process over days; anomalies jump
    temp, vibration and pressure together.
    """

    key_field = "sensor_id"
    key_format = "pump-{:03d}"
    DRIFT_SD = 1.0  # stationary sd of temp drift, degrees
    DRIFT_TAU_S = 3 * _DAY_S

    def __init__(
        self,
        n_keys: int,
        seed: int = 0,
        start_ts: float = DEFAULT_START_TS,
        dt_mean: float = 10.0,
        anomaly_p: float = 0.002,
    ) -> None:
        super().__init__(n_keys, seed, start_ts, dt_mean)
        rng = self._rng
        self._anomaly_p = anomaly_p
        self._base_temp = rng.uniform(66.0, 74.0, n_keys).tolist()
        self._amp = rng.uniform(3.0, 5.0, n_keys).tolist()
        self._base_vib = rng.uniform(0.02, 0.05, n_keys).tolist()
        self._base_press = rng.uniform(2.5, 4.0, n_keys).tolist()
        self._drift = (self.DRIFT_SD * rng.standard_normal(n_keys)).tolist()
        self._last_ts = [float(start_ts)] * n_keys
        self._z_rng, self._u_rng = self._stream(), self._stream()

    def _emit(self, idx: list[int], ts: list[float]) -> list[Event]:
        z = self._z_rng.standard_normal((len(idx), 4)).tolist()
        u = self._u_rng.random((len(idx), 2)).tolist()
        out: list[Event] = []
        for k, t, (zd, z1, z2, z3), (u_anom, u_mag) in zip(idx, ts, z, u, strict=True):
            season = math.sin(2.0 * math.pi * (t % _DAY_S) / _DAY_S)
            decay = math.exp(-(t - self._last_ts[k]) / self.DRIFT_TAU_S)
            self._last_ts[k] = t
            drift = self._drift[k] * decay + self.DRIFT_SD * math.sqrt(1 - decay**2) * zd
            self._drift[k] = drift
            temp = self._base_temp[k] + self._amp[k] * season + drift + 0.4 * z1
            vib = self._base_vib[k] * (1.0 + 0.15 * season) * math.exp(0.1 * z2)
            press = self._base_press[k] + 0.1 * season + 0.05 * drift + 0.02 * z3
            if u_anom < self._anomaly_p:
                temp, vib, press = temp + 6 + 9 * u_mag, vib * (3 + 5 * u_mag), press + 0.5
            readings = {"temp": round(temp, 3), "vibration": round(vib, 5),
                        "pressure": round(press, 4)}
            out.append({"sensor_id": self.keys[k], "ts": t, "readings": readings})
        return out


class GenericSimulator(Simulator):
    """Vectors from a stable VAR(1) shared by all keys (plus a per-key offset).

    x_t = A x_{t-1} + noise with ||A||_2 <= 0.9, so every component (values[0] included)
    is predictable from the previous event of the same key, by one model for all keys.
    """

    key_field = "key"
    key_format = "k{:04d}"

    def __init__(
        self,
        n_keys: int,
        n_values: int = 8,
        seed: int = 0,
        start_ts: float = DEFAULT_START_TS,
        dt_mean: float = 1.0,
    ) -> None:
        if n_values < 1:
            raise ConfigError("n_values", f"must be >= 1, got {n_values}")
        super().__init__(n_keys, seed, start_ts, dt_mean)
        rng = self._rng
        mix = rng.standard_normal((n_values, n_values))
        self._a = 0.6 * np.eye(n_values) + 0.3 * mix / np.linalg.norm(mix, 2)
        self._offset = 0.5 * rng.standard_normal((n_keys, n_values))
        self._x = rng.standard_normal((n_keys, n_values))
        self._noise_rng = self._stream()

    def _emit(self, idx: list[int], ts: list[float]) -> list[Event]:
        noise = 0.5 * self._noise_rng.standard_normal((len(idx), self._a.shape[0]))
        out: list[Event] = []
        for i, (k, t) in enumerate(zip(idx, ts, strict=True)):
            x = self._x[k] = self._a @ self._x[k] + noise[i]
            values = np.round(self._offset[k] + x, 5).tolist()
            out.append({"key": self.keys[k], "ts": t, "values": values})
        return out


_KINDS: dict[str, type[Simulator]] = {
    "tick": TickSimulator, "sensor": SensorSimulator, "generic": GenericSimulator,
}


def make_simulator(kind: SimKind, n_keys: int, seed: int = 0, **kw: Any) -> Simulator:
    """Build a simulator by kind name; ``kw`` goes to its constructor (dt_mean, n_values...)."""
    if kind not in _KINDS:
        raise ConfigError("kind", f"must be one of {sorted(_KINDS)}, got {kind!r}")
    return _KINDS[kind](n_keys, seed=seed, **kw)


def write_jsonl(path: str | Path, events: Iterable[Event]) -> int:
    """Write events one compact JSON object per line (training history); returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w", encoding="utf-8") as fh:
        for event in events:
            fh.write(json.dumps(event, separators=(",", ":")) + "\n")
            n += 1
    return n


# ---------------------------------------------------------------- producer side

_MAX_BURST = 2000  # most events sent between two stop/deadline checks
_MIN_SLEEP_S = 0.001  # below this, waking costs more than sending a small burst
_MAX_SLEEP_S = 0.1  # bounds reaction time to stop_event
_GRACE_S = 0.01  # past duration_s, still send what was due inside it (the last sleep overshoots)


class _Pacer:
    """Sleep-to-schedule: event i is due at start + i / rate; each wake-up sends all due.

    Sending whole due bursts costs a few hundred wake-ups per second at any rate, and the
    schedule (not the sleep lengths) sets the rate, so oversleeping never accumulates drift.
    """

    def __init__(self, rate: float | None, duration_s: float | None, max_events: int | None,
                 stop_event: threading.Event | None) -> None:
        self._rate, self._duration, self._max = rate, duration_s, max_events
        self._stop = stop_event or threading.Event()
        # events scheduled inside the window
        self._cap = math.inf if rate is None or duration_s is None else math.ceil(duration_s * rate)
        self.start = time.monotonic()

    def next_burst(self, sent: int) -> int:
        """How many events to send now (blocking until some are due); 0 means stop."""
        while not self._stop.is_set():
            elapsed = time.monotonic() - self.start
            grace = 0.0 if self._rate is None else _GRACE_S
            if self._duration is not None and elapsed >= self._duration + grace:
                return 0
            limit = _MAX_BURST if self._max is None else min(_MAX_BURST, self._max - sent)
            if limit <= 0 or sent >= self._cap:
                return 0
            if self._rate is None:
                return limit
            due = min(math.floor(elapsed * self._rate) + 1, self._cap) - sent
            if due > 0:
                return int(min(due, limit))
            wait = sent / self._rate - elapsed
            self._stop.wait(min(max(wait, _MIN_SLEEP_S), _MAX_SLEEP_S))
        return 0


class _WallClock:
    """time.time(), nudged to be strictly increasing so live ts stay ordered per key."""

    _last = 0.0

    def now(self) -> float:
        self._last = max(time.time(), self._last + _MIN_GAP_S)
        return self._last


class _ProgressView:
    """One live line on stderr, redrawn at most 4 times a second so it never costs rate."""

    def __init__(self, kind: str, topic: str, rate: float | None) -> None:
        from rich.console import Console
        from rich.live import Live

        self._label = f"simulate {kind} -> {topic}" + (f" (target {rate:,.0f}/s)" if rate else "")
        self._live = Live(console=Console(stderr=True), auto_refresh=False)
        self._live.start()
        self._t0 = self._t = time.monotonic()
        self._n = 0

    def update(self, sent: int, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._t < 0.25:
            return
        recent = (sent - self._n) / max(now - self._t, 1e-9)
        mean = sent / max(now - self._t0, 1e-9)
        self._live.update(f"{self._label}: {sent:,} sent, {recent:,.0f}/s now, "
                          f"{mean:,.0f}/s mean", refresh=True)
        self._t, self._n = now, sent

    def close(self, sent: int) -> None:
        self.update(sent, force=True)
        self._live.stop()


def _make_producer(bootstrap_servers: str, acks: int | str, extra: Mapping[str, Any]) -> Any:
    from kafka import KafkaProducer
    from kafka.errors import KafkaError

    config: dict[str, Any] = {"linger_ms": 5, "acks": acks, "batch_size": 128 * 1024,
                              "client_id": "streamer-simulate", **extra}
    try:
        return KafkaProducer(bootstrap_servers=bootstrap_servers, **config)
    except KafkaError as exc:
        raise KafkaEdgeError(f"cannot connect producer to {bootstrap_servers}: {exc}") from exc


def run_simulator(
    bootstrap_servers: str,
    topic: str,
    kind: SimKind = "tick",
    n_keys: int = 100,
    rate: float | None = None,
    duration_s: float | None = None,
    max_events: int | None = None,
    seed: int = 0,
    progress: bool = False,
    stop_event: threading.Event | None = None,
    live_ts: bool = True,
    *,
    acks: int | str = 1,
    simulator_kw: Mapping[str, Any] | None = None,
    producer_config: Mapping[str, Any] | None = None,
) -> int:
    """Produce simulated events to ``topic`` until stop_event, duration_s or max_events.

    ``rate`` is events/s (None: as fast as possible). With ``live_ts`` each event's ts is
    the wall time at send, so end-to-end latency measured downstream is real; the values
    still follow the simulated dynamics. ``producer_config`` adds KafkaProducer options
    (security, SASL). Returns the number of events acknowledged (sent minus failed).
    """
    if rate is not None and not rate > 0:
        raise ConfigError("rate", f"must be > 0 or None, got {rate}")
    sim = make_simulator(kind, n_keys, seed, **(simulator_kw or {}))
    producer = _make_producer(bootstrap_servers, acks, producer_config or {})
    pacer = _Pacer(rate, duration_s, max_events, stop_event)
    failures: list[BaseException] = []  # appended from kafka-python's sender thread
    view = _ProgressView(kind, topic, rate) if progress else None
    clock, sent = _WallClock(), 0
    try:
        while (n := pacer.next_burst(sent)) > 0:
            for event in sim.events(n):
                if live_ts:
                    event = {**event, "ts": clock.now()}
                key, value = sim.encode(event)
                producer.send(topic, key=key, value=value).add_errback(failures.append)
            sent += n
            if view is not None:
                view.update(sent)
        # flush before close: acks (and so failures) are only known once the queue drains
        producer.flush()
    finally:
        producer.close(timeout=5)
        if view is not None:
            view.close(sent)
    if failures:
        log.error("%d of %d sends failed, first: %r", len(failures), sent, failures[0])
    elapsed = max(time.monotonic() - pacer.start, 1e-9)
    log.info("sent %d %s events to %s at %.0f/s", sent, kind, topic, sent / elapsed)
    return sent - len(failures)
