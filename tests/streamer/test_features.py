"""Features are the one place where training and serving could silently skew, so they are checked
here against hand arithmetic on tiny examples, and the spec that carries them is checked to refuse
every inconsistency before a model is built on it."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError
from torch.testing import assert_close

from streamer.features import (
    TICK_FEATURES,
    TICK_RAW_WIDTH,
    FeatureSpec,
    compute_features,
    default_spec,
    sequence_features,
)

NAN = float("nan")
TICK = default_spec("tick")


def _f64(rows: list[list[float]] | list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# --- tick features by hand ---------------------------------------------------------------------


def test_tick_sequence_features_by_hand() -> None:
    raw = _f64([
        [100.0, 10.0, 99.0, 101.0],  # first event of the key
        [101.0, 0.0, NAN, NAN],  # no quotes
        [99.0, 4.0, 98.5, NAN],  # only a bid
        [99.0, 1.0, 98.0, 100.0],
    ])
    ts = _f64([1000.0, 1000.5, 1003.0, 1003.25])
    x = sequence_features(TICK, raw, ts)
    expected = torch.tensor([
        [0.0, math.log1p(10.0), 2.0 / 100.0, 0.0],
        [math.log(101.0 / 100.0), 0.0, 0.0, 0.5],
        [math.log(99.0 / 101.0), math.log1p(4.0), 0.0, 2.5],
        [0.0, math.log1p(1.0), 2.0 / 99.0, 0.25],
    ], dtype=torch.float32)
    assert x.dtype == torch.float32 and x.shape == (4, 4)
    assert_close(x, expected)


def test_tick_first_event_has_zero_return_and_dt_whatever_its_prev_slot_holds() -> None:
    raw = _f64([[50.0, 3.0, 49.0, 51.0]])
    garbage_prev = _f64([[7.0, 1.0, 1.0, 1.0]])
    x = compute_features(TICK, raw, _f64([500.0]), garbage_prev, _f64([1.0]),
                         torch.tensor([False]))
    assert x[0, 0] == 0.0 and x[0, 3] == 0.0
    assert_close(x[0, 1:3], torch.tensor([math.log1p(3.0), 2.0 / 50.0], dtype=torch.float32))


def test_tick_features_use_prev_arrays_per_row() -> None:
    raw = _f64([[110.0, 9.0, NAN, NAN], [90.0, 0.0, 89.0, 91.0]])
    prev = _f64([[100.0, 1.0, NAN, NAN], [100.0, 1.0, NAN, NAN]])
    x = compute_features(TICK, raw, _f64([20.0, 30.0]), prev, _f64([10.0, 25.0]),
                         torch.tensor([True, True]))
    expected = torch.tensor([
        [math.log(1.1), math.log1p(9.0), 0.0, 10.0],
        [math.log(0.9), 0.0, 2.0 / 90.0, 5.0],
    ], dtype=torch.float32)
    assert_close(x, expected)


@pytest.mark.parametrize(
    "bid, ask",
    [(NAN, 101.0), (99.0, NAN), (NAN, NAN), (-1.0, 0.5), (0.0, 0.0)],  # last two: mid <= 0
)
def test_tick_rel_spread_is_zero_without_a_usable_quote(bid: float, ask: float) -> None:
    x = sequence_features(TICK, _f64([[100.0, 1.0, bid, ask]]), _f64([0.0]))
    assert x[0, 2] == 0.0
    assert torch.isfinite(x).all()


def test_tick_features_are_finite_with_missing_quotes_in_a_long_sequence() -> None:
    gen = torch.Generator().manual_seed(0)
    n = 200
    price = 100 * torch.exp(torch.cumsum(torch.randn(n, generator=gen, dtype=torch.float64)
                                         * 1e-3, 0))
    bid = torch.where(torch.rand(n, generator=gen) < 0.5, price - 0.01,
                      torch.full_like(price, NAN))
    raw = torch.stack([price, torch.ones(n, dtype=torch.float64), bid, bid + 0.02], dim=1)
    x = sequence_features(TICK, raw, torch.arange(n, dtype=torch.float64))
    assert torch.isfinite(x).all()
    assert_close(x[1:, 0], torch.log(price[1:] / price[:-1]).float())


# --- generic / sensor pass through -------------------------------------------------------------


@pytest.mark.parametrize("kind", ["generic", "sensor"])
def test_generic_and_sensor_features_are_the_raw_values(kind: str) -> None:
    spec = default_spec(kind, n_features=3, readings=("a", "b", "c"))
    raw = _f64([[1.5, -2.0, 3.25], [4.0, 5.0, 6.0]])
    ts = _f64([1.0, 2.0])
    x = compute_features(spec, raw, ts, raw.flip(0), ts.flip(0), torch.tensor([True, False]))
    assert x.dtype == torch.float32
    assert_close(x, raw.float())
    assert_close(sequence_features(spec, raw, ts), raw.float())


# --- sequence_features == compute_features with explicit prev ---------------------------------


@pytest.mark.parametrize("kind", ["tick", "generic", "sensor"])
def test_sequence_features_equals_compute_features_with_explicit_prev(kind: str) -> None:
    gen = torch.Generator().manual_seed(3)
    spec = default_spec(kind, n_features=4)
    t = 17
    if kind == "tick":
        price = 50 + torch.rand(t, generator=gen, dtype=torch.float64)
        bid = torch.where(torch.rand(t, generator=gen) < 0.3, torch.full_like(price, NAN),
                          price - 0.05)
        raw = torch.stack([price, torch.rand(t, generator=gen, dtype=torch.float64) * 100, bid,
                           price + 0.05], dim=1)
    else:
        raw = torch.randn(t, spec.raw_width, generator=gen, dtype=torch.float64)
    ts = torch.cumsum(torch.rand(t, generator=gen, dtype=torch.float64), 0) + 1.7e9
    prev_raw = torch.zeros_like(raw)
    prev_raw[1:] = raw[:-1]
    prev_ts = torch.zeros_like(ts)
    prev_ts[1:] = ts[:-1]
    has_prev = torch.arange(t) > 0
    expected = compute_features(spec, raw, ts, prev_raw, prev_ts, has_prev)
    assert_close(sequence_features(spec, raw, ts), expected, rtol=0, atol=0)


def test_sequence_features_of_a_single_event() -> None:
    x = sequence_features(TICK, _f64([[10.0, 0.0, 9.0, 11.0]]), _f64([5.0]))
    assert_close(x, torch.tensor([[0.0, 0.0, 0.2, 0.0]]))


# --- FeatureSpec validation --------------------------------------------------------------------


def _spec(**overrides: object) -> FeatureSpec:
    fields: dict[str, object] = {"kind": "generic", "names": ("a", "b"), "mean": (0.0, 1.0),
                                 "std": (1.0, 2.0), "target": "b"}
    return FeatureSpec.model_validate(fields | overrides)


def test_valid_spec_properties() -> None:
    spec = _spec()
    assert spec.n_features == 2 and spec.raw_width == 2 and spec.target_index == 1


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"names": ("a", "a"), "target": "a"}, "duplicate feature names"),
        ({"names": (), "mean": (), "std": (), "target": "a"}, "at least one feature"),
        ({"mean": (0.0,)}, "mean/std need 2 entries"),
        ({"std": (1.0, 1.0, 1.0)}, "mean/std need 2 entries"),
        ({"std": (1.0, 0.0)}, "std must be > 0"),
        ({"std": (-1.0, 1.0)}, "std must be > 0"),
        ({"std": (1.0, float("nan"))}, "std must be > 0"),
        ({"target": "c"}, "target 'c' is not one of the features"),
        ({"kind": "tick", "names": ("a", "b")}, "tick features are fixed"),
        ({"kind": "tick", "names": TICK_FEATURES[::-1], "mean": (0.0,) * 4, "std": (1.0,) * 4,
          "target": "dt"}, "tick features are fixed"),
        ({"kind": "video"}, "kind"),
        ({"extra": 1}, "extra"),
    ],
)
def test_spec_validation_errors(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        _spec(**overrides)


def test_spec_is_frozen() -> None:
    spec = _spec()
    with pytest.raises(ValidationError):
        spec.target = "a"  # type: ignore[misc]


# --- default_spec and with_stats ---------------------------------------------------------------


def test_default_spec_tick() -> None:
    spec = default_spec("tick")
    assert spec.kind == "tick"
    assert spec.names == TICK_FEATURES == ("log_return", "log_size", "rel_spread", "dt")
    assert spec.raw_width == TICK_RAW_WIDTH == 4
    assert spec.mean == (0.0,) * 4 and spec.std == (1.0,) * 4
    assert spec.target == "log_return"


def test_default_spec_generic() -> None:
    spec = default_spec("generic", n_features=5)
    assert spec.names == ("v0", "v1", "v2", "v3", "v4")
    assert spec.raw_width == spec.n_features == 5
    assert spec.mean == (0.0,) * 5 and spec.std == (1.0,) * 5 and spec.target == "v0"
    assert default_spec("generic").n_features == 8


def test_default_spec_sensor() -> None:
    spec = default_spec("sensor")
    assert spec.names == ("temp", "vibration", "pressure") and spec.target == "temp"
    custom = default_spec("sensor", readings=("rpm", "temp"), target="temp")
    assert custom.names == ("rpm", "temp") and custom.raw_width == 2 and custom.target_index == 1


def test_default_spec_target_must_be_a_feature() -> None:
    with pytest.raises(ValidationError, match="target"):
        default_spec("generic", n_features=2, target="v9")


def test_with_stats_returns_a_copy_with_new_stats() -> None:
    spec = default_spec("generic", n_features=3, target="v1")
    fitted = spec.with_stats([1.0, 2.0, 3.0], [0.5, 0.25, 4.0])
    assert fitted.mean == (1.0, 2.0, 3.0) and fitted.std == (0.5, 0.25, 4.0)
    assert (fitted.kind, fitted.names, fitted.target) == (spec.kind, spec.names, spec.target)
    assert spec.mean == (0.0,) * 3 and spec.std == (1.0,) * 3  # the original is untouched
    assert isinstance(fitted.mean, tuple) and isinstance(fitted.std, tuple)
    assert FeatureSpec.model_validate_json(fitted.model_dump_json()) == fitted


@pytest.mark.parametrize(
    "mean, std",
    [([0.0, 0.0], [1.0, 0.0]), ([0.0, 0.0], [1.0, -2.0]), ([0.0], [1.0, 1.0]),
     ([0.0, 0.0], [1.0])],
)
def test_with_stats_validates_like_the_constructor(mean: list[float], std: list[float]) -> None:
    with pytest.raises(ValueError):
        default_spec("generic", n_features=2).with_stats(mean, std)
