"""The trainer's one typed, frozen settings object (env prefix ``TRAINER_``).

Same loading rules as the streamer (defaults < config file < env < flags, errors name the
field), through the shared helpers in ``streamer.settings``. Per-invocation inputs (files,
``--force``, ``--every``) are plain flags of their subcommand; everything a deployment pins
(registry, Kafka, hyperparameters, metrics) lives here so a CronJob can set it by env.

    parser = argparse.ArgumentParser()
    add_settings_arguments(parser, TrainerSettings)
    settings = settings_from_args(TrainerSettings, parser.parse_args())
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from streamer.features import EXTRAS
from streamer.settings import KafkaClientSettings, split_host_port
from trainer.data import parse_offsets, parse_time

# Fields that only `train`, `evaluate` and `schedule` read; `list`/`promote`/`rollback` hide them.
REGISTRY_FIELDS = ("registry", "model_name", "log_level")


class TrainerSettings(KafkaClientSettings):
    """Everything `trainer` can be told; see ``trainer train --help``."""

    model_config = SettingsConfigDict(env_prefix="TRAINER_", frozen=True, extra="forbid")

    registry: Path = Field(Path("models"), description="model registry root directory")
    model_name: str = Field("default", min_length=1, description="model name in the registry")
    bootstrap_servers: str = Field(
        "localhost:9092", min_length=1, description="Kafka bootstrap servers (history source)"
    )
    topic: str = Field("events", min_length=1, description="input topic to read history from")
    since: str | None = Field(
        None, description="history start: ISO-8601, epoch, or a duration ago such as 7d"
    )
    until: str | None = Field(None, description="history end (exclusive), same forms as since")
    from_offsets: str | None = Field(
        None, description="start offsets instead of a time: N, or P:N,P:N per partition"
    )
    kind: Literal["generic", "tick", "sensor"] | None = Field(
        None, description="event kind; unset: the current model's, else inferred from the data"
    )
    features: int | None = Field(None, gt=0, description="generic events: values per event")
    readings: str | None = Field(None, description="sensor events: reading names, comma-separated")
    target: str | None = Field(
        None, description="value whose next observation is predicted: its name (v0, temp), "
        "values[i] or i (generic values are named v0, v1, ... in event order)"
    )
    target_kind: Literal["level", "change", "log_return"] | None = Field(
        None, description="what the model predicts of the target: level, change (default for "
        "generic and sensor: an output of 0 means no change) or log_return (positive series)"
    )
    extras: str = Field(
        "diff,dt,hour,dow", description="extra generic/sensor features, comma-separated from "
        "diff, dt, hour, dow (empty: none)"
    )
    half_life: float | None = Field(
        24.0, gt=0, description="per-key normalization half-life in events (unset: off)"
    )
    season: int | None = Field(
        None, ge=0, description="seasonal naive baseline period in events (unset: detected, 0: off)"
    )
    folds: int = Field(
        1, ge=1, le=10, description="rolling-origin backtest: choose on the mean val loss of K "
        "time-ordered folds (1: the validation window alone)"
    )
    test_fraction: float = Field(
        0.2, ge=0, lt=1, description="share of the newest events held out for the gate's test"
    )
    task: Literal["regression", "classification"] = Field(
        "regression", description="predict the next value, or its move down/flat/up"
    )
    flat_band: float = Field(0.0, ge=0, description="classification: |move| <= band is flat")
    epochs: int = Field(60, ge=0, description="most training epochs (early stopping may end)")
    hidden: str = Field("64", description="hidden size, or a comma list to try, e.g. 32,64")
    layers: str = Field("2", description="stacked LSTM layers, or auto to try 1, 2 and 3")
    tolerance: float = Field(
        0.01, ge=0, description="auto: keep the smallest model within this relative val loss"
    )
    seq_len: int = Field(200, gt=0, description="truncated BPTT chunk length in events")
    batch_keys: int = Field(64, gt=0, description="keys per training batch")
    lr: float = Field(3e-3, gt=0, description="Adam learning rate")
    weight_decay: str = Field(
        "1e-4", description="AdamW weight decay, or a comma list chosen on validation"
    )
    dropout: str = Field(
        "0.1", description="dropout between stacked layers, or a comma list chosen on validation"
    )
    patience: int = Field(8, gt=0, description="early stopping: epochs without improvement")
    clip: float = Field(1.0, gt=0, description="gradient norm clipping")
    seed: int = Field(0, description="random seed (weights init and batch order)")
    val_fraction: float = Field(
        0.2, gt=0, lt=1, description="share of the newest events held out for validation"
    )
    ar_order: int = Field(5, gt=0, description="order p of the per-key AR(p) baseline")
    ma_window: int = Field(8, gt=0, description="window of the moving-average baseline")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where to train; auto picks cuda when present"
    )
    metrics_address: str = Field(
        "0.0.0.0:9109", description="schedule: host:port serving /metrics and /healthz"
    )
    pushgateway: str | None = Field(
        None, description="schedule: push metrics to this Pushgateway instead of serving them"
    )
    @field_validator("hidden")
    @classmethod
    def _check_hidden(cls, value: str) -> str:
        sizes = _int_list(value)
        if not sizes or min(sizes) < 1:
            raise ValueError("expected positive sizes such as 64 or 32,64")
        return ",".join(map(str, sizes))

    @field_validator("weight_decay", "dropout")
    @classmethod
    def _check_floats(cls, value: str, info: Any) -> str:
        try:
            values = [float(p) for p in value.split(",") if p.strip()]
        except ValueError:
            raise ValueError("expected numbers such as 0.1 or 0,0.2") from None
        top = 1.0 if info.field_name == "dropout" else float("inf")
        if not values or min(values) < 0 or max(values) >= top:
            raise ValueError(f"expected values in [0, {top}) such as 0 or 0,0.2")
        return ",".join(map(str, values))

    @field_validator("extras")
    @classmethod
    def _check_extras(cls, value: str) -> str:
        names = [p.strip() for p in value.split(",") if p.strip()]
        unknown = sorted(set(names) - set(EXTRAS))
        if unknown:
            raise ValueError(f"unknown extras {unknown}; choose from {list(EXTRAS)}")
        return ",".join(names)

    @field_validator("layers")
    @classmethod
    def _check_layers(cls, value: str) -> str:
        value = value.strip().lower()
        if value != "auto" and not (value.isdigit() and 1 <= int(value) <= 8):
            raise ValueError("expected auto or a depth from 1 to 8")
        return value

    @field_validator("since", "until")
    @classmethod
    def _check_time(cls, value: str | None) -> str | None:
        if value is not None:
            parse_time(value)
        return value

    @field_validator("from_offsets")
    @classmethod
    def _check_offsets(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                parse_offsets(value)
            except ValueError:
                raise ValueError("expected N or P:N,P:N such as 0:1200,1:900") from None
        return value

    @field_validator("metrics_address")
    @classmethod
    def _check_address(cls, value: str) -> str:
        split_host_port(value)
        return value

    @property
    def hidden_sizes(self) -> tuple[int, ...]:
        return tuple(_int_list(self.hidden))

    @property
    def dropouts(self) -> tuple[float, ...]:
        return tuple(float(p) for p in self.dropout.split(","))

    @property
    def weight_decays(self) -> tuple[float, ...]:
        return tuple(float(p) for p in self.weight_decay.split(","))

    @property
    def extra_names(self) -> tuple[str, ...]:
        return tuple(p for p in self.extras.split(",") if p)

    @property
    def depth(self) -> int | None:
        """None means auto."""
        return None if self.layers == "auto" else int(self.layers)

    @property
    def reading_names(self) -> tuple[str, ...] | None:
        if not self.readings:
            return None
        return tuple(r.strip() for r in self.readings.split(",") if r.strip())



def _int_list(text: str) -> list[int]:
    try:
        return [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise ValueError(f"expected integers separated by commas, got {text!r}") from None
