"""Training history: events from JSONL/CSV files or from the input Kafka topic, per key, in time.

Why it reuses the streamer's code: every record goes through ``streamer.events.decode`` and
``streamer.features.sequence_features``, exactly what serving runs, so a model never trains on
features the streamer would compute differently (or on events the streamer would dead-letter).

Usage::

    records = read_files([Path("ticks.jsonl")])     # or trainer.topic.read_topic(...).records
    spec = resolve_spec(records, kind=None)                    # inferred from the first event
    history = decode_history(records, spec)
    history.series["SYM0001"].ts, history.features("SYM0001")  # [T], [T, F]
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from streamer.errors import BadEvent, ConfigError
from streamer.events import MILLIS_THRESHOLD, Message, decode
from streamer.features import (
    EventKind,
    FeatureSpec,
    TargetKind,
    default_spec,
    sequence_features,
)

log = logging.getLogger(__name__)

_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h|d|w)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_KEY_COLUMNS: dict[str, EventKind] = {"symbol": "tick", "sensor_id": "sensor", "key": "generic"}


# --- time and offset arguments ----------------------------------------------------------


def parse_duration(text: str) -> float:
    """Seconds from ``90``, ``45s``, ``30m``, ``6h``, ``7d``, ``1w`` (a bare number is seconds)."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"not a duration: {text!r} (examples: 30s, 15m, 6h, 7d)")
    return float(match.group(1)) * _UNIT_S[match.group(2) or "s"]


def parse_time(text: str, now: float | None = None) -> float:
    """Epoch seconds from ISO-8601, epoch seconds/milliseconds, or a duration meaning "ago".

    ``7d`` is seven days before ``now``, which lets a scheduled run say "the last week".
    """
    text = text.strip()
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        return value / 1000.0 if abs(value) >= MILLIS_THRESHOLD else value
    if _DURATION.match(text):
        return (time.time() if now is None else now) - parse_duration(text)
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"not a time: {text!r} (ISO-8601, epoch seconds or e.g. 7d)") from None
    return (dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).timestamp()


def parse_offsets(text: str) -> dict[int, int] | int:
    """``1200`` (every partition) or ``0:1200,1:900`` (per partition) start offsets."""
    text = text.strip()
    if ":" not in text:
        return int(text)
    out: dict[int, int] = {}
    for part in text.split(","):
        partition, _, offset = part.partition(":")
        out[int(partition)] = int(offset)
    return out


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat().replace("+00:00", "Z")


# --- reading records --------------------------------------------------------------------


def read_files(paths: Sequence[Path]) -> list[Message]:
    """Records from JSONL files (one event object per line) or CSV files (one event per row).

    CSV columns: ``ts`` plus the key column, which also says the kind: ``symbol`` (tick:
    price, size, bid, ask), ``sensor_id`` (sensor: every other column is a reading) or
    ``key`` (generic: every other column is a value, in column order).
    """
    records: list[Message] = []
    for path in paths:
        path = Path(path)
        try:
            if path.suffix.lower() == ".csv":
                records.extend(_csv_records(path))
            else:
                with path.open("rb") as f:
                    records.extend(Message(None, line.strip()) for line in f if line.strip())
        except OSError as exc:
            raise ConfigError("input", f"cannot read {path}: {exc.strerror or exc}") from exc
    return records


def _csv_records(path: Path) -> Iterator[Message]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        key_col = next((c for c in _KEY_COLUMNS if c in columns), None)
        if key_col is None or "ts" not in columns:
            raise ConfigError(
                "input", f"{path}: a CSV needs a 'ts' column and one of {list(_KEY_COLUMNS)}"
            )
        kind = _KEY_COLUMNS[key_col]
        rest = [c for c in columns if c not in (key_col, "ts")]
        for row in reader:
            event = _csv_event(kind, key_col, rest, row)
            yield Message(None, json.dumps(event, separators=(",", ":")).encode())


def _csv_event(kind: EventKind, key_col: str, rest: list[str], row: dict[str, str]) -> Any:
    def num(text: str | None) -> Any:
        if text is None or text.strip() == "":
            return None
        try:
            return float(text)
        except ValueError:
            return text  # decode() reports it as a schema error, like the streamer would

    event: dict[str, Any] = {key_col: row[key_col], "ts": num(row["ts"])}
    if kind == "tick":
        event.update({c: num(row.get(c)) for c in ("price", "size", "bid", "ask")})
        return {k: v for k, v in event.items() if v is not None or k in ("price", "size")}
    if kind == "sensor":
        event["readings"] = {c: num(row[c]) for c in rest}
    else:
        event["values"] = [num(row[c]) for c in rest]
    return event


# --- decoding and features ----------------------------------------------------------------


def resolve_spec(
    records: Sequence[Message],
    kind: EventKind | None = None,
    n_features: int | None = None,
    readings: Sequence[str] | None = None,
    target: str | None = None,
    base: FeatureSpec | None = None,
    target_kind: TargetKind | None = None,
    extras: Sequence[str] = (),
    half_life: float | None = None,
) -> FeatureSpec:
    """The feature layout to decode with: explicit arguments, else ``base`` (the production
    model's spec, so a retrained model stays swappable), else the first event's shape.

    ``target`` may be a name (``v0``, ``temp``), ``values[i]`` or ``i``. Generic and sensor
    specs get ``extras``, ``half_life`` and ``target_kind`` (default ``change``); ticks keep
    their fixed features."""
    explicit = n_features is not None or bool(readings)
    if base is not None and kind in (None, base.kind) and not explicit:
        spec = base
        target_kind = target_kind or base.target_kind
    else:
        need_sample = kind is None or (kind == "generic" and n_features is None) or (
            kind == "sensor" and not readings)
        sample = _first_object(records) if need_sample else {}
        kind = kind or _infer_kind(sample)
        if kind == "generic" and n_features is None:
            n_features = len(sample.get("values") or []) or None
        if kind == "sensor" and not readings:
            readings = tuple(sample.get("readings") or ()) or None
        if (kind == "generic" and not n_features) or (kind == "sensor" and not readings):
            raise ConfigError("kind", f"cannot tell the {kind} event layout from the data")
        if kind == "tick":
            spec = default_spec(kind)
        else:
            spec = default_spec(kind, n_features or 1, tuple(readings or ("x",)),
                                extras=tuple(extras),  # type: ignore[arg-type]
                                half_life=half_life)
    target = _target_name(target, spec)
    changes: dict[str, Any] = {}
    if target is not None and target != spec.target:
        changes["target"] = target
    if spec.kind != "tick" and (target_kind or "change") != spec.target_kind:
        changes["target_kind"] = target_kind or "change"
    if not changes:
        return spec
    try:
        return FeatureSpec.model_validate({**spec.model_dump(), **changes})
    except ValueError as exc:
        raise ConfigError("target", f"{target!r} is not one of {list(spec.names)}") from exc


def _target_name(target: str | None, spec: FeatureSpec) -> str | None:
    """``values[i]`` and ``i`` name the i-th value; a name is kept as given."""
    if target is None:
        return None
    match = re.fullmatch(r"\s*(?:values\[(\d+)\]|(\d+))\s*", target)
    if match is None or target in spec.names:
        return target
    i = int(match.group(1) or match.group(2))
    if i >= len(spec.names):
        raise ConfigError("target", f"{target!r}: there are {len(spec.names)} values "
                          f"({list(spec.names)})")
    return spec.names[i]


def _first_object(records: Iterable[Message]) -> dict[str, Any]:
    for rec in records:
        try:
            obj = json.loads(rec.value or b"")
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(obj, dict):
            return obj
    raise ConfigError("input", "no JSON event found in the history to infer its shape from")


def _infer_kind(sample: dict[str, Any]) -> EventKind:
    if "price" in sample:
        return "tick"
    if "readings" in sample:
        return "sensor"
    if "values" in sample:
        return "generic"
    raise ConfigError("kind", f"cannot tell the event kind from {sorted(sample)}; set --kind")


@dataclass
class KeySeries:
    ts: np.ndarray  # [T] float64 epoch seconds, in arrival order (late events stay late)
    raw: np.ndarray  # [T, R] float64 raw vectors (the spec's layout)


@dataclass
class History:
    """Decoded events per key, each key's in time order; bad records counted by reason."""

    spec: FeatureSpec
    series: dict[str, KeySeries]
    skipped: Counter[str] = field(default_factory=Counter)
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def n_events(self) -> int:
        return sum(len(s.ts) for s in self.series.values())

    def features(self, key: str) -> np.ndarray:
        """[T, F] float32: the streamer's feature code over this key's whole history."""
        s = self.series[key]
        x = sequence_features(self.spec, torch.from_numpy(s.raw), torch.from_numpy(s.ts))
        return x.numpy()

    def between(self, since: float | None, until: float | None) -> History:
        """The events with ``since <= ts < until`` (event time; None: unbounded)."""
        if since is None and until is None:
            return self
        series: dict[str, KeySeries] = {}
        for key, s in self.series.items():
            keep = np.ones(len(s.ts), dtype=bool)
            if since is not None:
                keep &= s.ts >= since
            if until is not None:
                keep &= s.ts < until
            if keep.any():
                series[key] = KeySeries(s.ts[keep], s.raw[keep])
        return History(self.spec, series, self.skipped, self.source)

    def data_range(self) -> dict[str, Any]:
        first = min((float(s.ts[0]) for s in self.series.values()), default=math.nan)
        last = max((float(s.ts[-1]) for s in self.series.values()), default=math.nan)
        out: dict[str, Any] = {
            **self.source, "events": self.n_events, "keys": len(self.series),
            "skipped": dict(self.skipped), "first_ts": first, "last_ts": last,
        }
        if self.series:
            out["first"], out["last"] = iso(first), iso(last)
        return out


def decode_history(
    records: Iterable[Message],
    spec: FeatureSpec,
    now: float | None = None,
    max_future_s: float = 300.0,
    source: dict[str, Any] | None = None,
) -> History:
    """Decode every record as the streamer would; bad ones are skipped and counted."""
    now = time.time() if now is None else now
    keys: dict[str, list[tuple[float, list[float]]]] = defaultdict(list)
    skipped: Counter[str] = Counter()
    for rec in records:
        try:
            ev = decode(rec.value, rec.key, spec, now, max_future_s)
        except BadEvent as exc:
            skipped[exc.reason] += 1
            continue
        keys[ev.key].append((ev.ts, ev.raw))
    if skipped:
        log.warning("skipped %d bad records: %s", sum(skipped.values()), dict(skipped))
    series: dict[str, KeySeries] = {}
    for key, events in keys.items():
        ts = np.fromiter((t for t, _ in events), dtype=np.float64, count=len(events))
        raw = np.asarray([r for _, r in events], dtype=np.float64).reshape(-1, spec.raw_width)
        # Record (offset) order per key, as the streamer serves them: a late event is not
        # moved back in time; its time delta is clamped to 0 (streamer.features).
        series[key] = KeySeries(ts, raw)
    return History(spec, series, skipped, dict(source or {}))
