"""An artifact is what a running streamer hot-swaps to, so loading must either rebuild exactly
the saved model or refuse with ArtifactError. Each refusal below is provoked on a real directory
with the one defect under test (checksums regenerated where the checksum would otherwise be what
catches it), so that each check is proved to exist on its own."""

from __future__ import annotations

import hashlib
import json
import pickle
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch.testing import assert_close

import streamer
from streamer.artifact import (
    CHECKSUMS,
    FORMAT_VERSION,
    METADATA,
    WEIGHTS,
    ArtifactMetadata,
    load_artifact,
    save_artifact,
)
from streamer.engine import Engine
from streamer.errors import ArtifactError, StreamerError
from streamer.features import FeatureSpec, default_spec
from streamer.model import LSTMModel
from streamer.state import StateStore

from .conftest import make_model


def _rewrite_checksums(directory: Path) -> None:
    """What a careless (or hostile) publisher would do after editing a file."""
    sums = "".join(
        f"{hashlib.sha256((directory / n).read_bytes()).hexdigest()}  {n}\n"
        for n in (WEIGHTS, METADATA)
    )
    (directory / CHECKSUMS).write_text(sums)


def _weights(model: LSTMModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _edit_metadata(directory: Path, edit: dict[str, Any]) -> None:
    meta = json.loads((directory / METADATA).read_text())
    for dotted, value in edit.items():
        *parents, leaf = dotted.split(".")
        node = meta
        for p in parents:
            node = node[p]
        node[leaf] = value
    (directory / METADATA).write_text(json.dumps(meta))


def _refusal(directory: Path, *fragments: str) -> ArtifactError:
    with pytest.raises(ArtifactError) as info:
        load_artifact(directory)
    message = str(info.value)
    assert str(directory) in message  # the operator learns which artifact
    for fragment in fragments:
        assert fragment in message
    return info.value


def _engine_predictions(model: LSTMModel) -> np.ndarray:
    cfg = model.config
    store = StateStore(cfg.num_layers, cfg.hidden_size, model.spec.raw_width,
                       model.spec.n_features, capacity=32, window=4)
    engine = Engine(model, store)
    rng = np.random.default_rng(0)
    keys = [f"k{i % 5}" for i in range(40)]
    raw = rng.normal(size=(40, model.spec.raw_width))
    if model.spec.kind == "tick":
        raw = np.abs(raw) + 1.0  # prices and sizes must be positive
    ts = 1.7e9 + np.arange(40.0)
    out = [engine.process(keys[lo:lo + 8], [0] * 8, raw[lo:lo + 8], ts[lo:lo + 8], 0.0)[0]
           for lo in range(0, 40, 8)]
    return np.concatenate(out)


# --- round trip --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, task",
    [("generic", "regression"), ("tick", "regression"), ("sensor", "classification")],
)
def test_save_then_load_round_trips_predictions_and_metadata(
    tmp_path: Path, kind: str, task: str
) -> None:
    names = default_spec(kind, n_features=4).names
    n = len(names)
    spec = FeatureSpec(kind=kind, names=names, mean=tuple(0.5 * i for i in range(n)),
                       std=tuple(1.0 + i for i in range(n)), target=names[-1])
    model = make_model(spec=spec, hidden=16, layers=2, seed=11, task=task)
    before = time.time()
    saved = save_artifact(tmp_path / "a", model, "v7", metrics={"val_mae": 0.25},
                          data_range={"start": 1.0, "end": 2.0}, seed=3)
    after = time.time()

    art = load_artifact(tmp_path / "a")
    meta = art.metadata
    assert meta == saved
    assert art.path == tmp_path / "a"
    assert meta.format_version == FORMAT_VERSION == 2
    assert meta.version == "v7"
    assert (meta.model.input_size, meta.model.hidden_size, meta.model.num_layers) == (n, 16, 2)
    assert meta.task == task and meta.model.task == task
    assert meta.features == spec
    assert meta.features.mean == spec.mean and meta.features.std == spec.std
    assert meta.target == spec.names[-1]
    assert before <= meta.created_at <= after
    assert meta.code_version == streamer.__version__
    assert meta.metrics == {"val_mae": 0.25} and meta.data_range == {"start": 1.0, "end": 2.0}
    assert meta.seed == 3

    loaded = art.model
    assert not loaded.training
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert_close(loaded.x_mean, torch.tensor(spec.mean, dtype=torch.float32))
    assert_close(loaded.x_std, torch.tensor(spec.std, dtype=torch.float32))

    x = torch.randn(5, n)
    h, c = model.zero_state(5)
    with torch.no_grad():
        y0, h0, c0 = model.step(x, h, c)
        y1, h1, c1 = loaded.step(x, h, c)
    assert_close(y1, y0, rtol=0, atol=0)
    assert_close(h1, h0, rtol=0, atol=0)
    assert_close(c1, c0, rtol=0, atol=0)
    assert_close(_engine_predictions(loaded), _engine_predictions(model), rtol=0, atol=0)


def test_metadata_file_is_plain_json_with_the_rebuild_fields(artifact_dir: Path) -> None:
    meta = json.loads((artifact_dir / METADATA).read_text())
    assert meta["format_version"] == 2 and meta["version"] == "v-test-1"
    assert meta["model"]["hidden_size"] == 16 and meta["model"]["num_layers"] == 2
    assert meta["features"]["kind"] == "generic" and len(meta["features"]["mean"]) == 4
    assert {"created_at", "code_version", "metrics", "seed", "data_range"} <= set(meta)
    assert ArtifactMetadata.model_validate(meta).version == "v-test-1"


def test_checksums_file_lists_both_files(artifact_dir: Path) -> None:
    lines = (artifact_dir / CHECKSUMS).read_text().splitlines()
    entries = dict(reversed(line.split(maxsplit=1)) for line in lines)
    assert set(entries) == {WEIGHTS, METADATA}
    for name, digest in entries.items():
        assert digest == hashlib.sha256((artifact_dir / name).read_bytes()).hexdigest()


def test_loaded_model_moves_to_the_requested_device(artifact_dir: Path) -> None:
    art = load_artifact(artifact_dir, device=torch.device("cpu"))
    assert art.model.x_mean.device.type == "cpu"
    assert load_artifact(str(artifact_dir)).metadata.version == "v-test-1"  # a str path works


# --- weights-only ------------------------------------------------------------------------------


def test_weights_file_is_safetensors_not_a_pickle(artifact_dir: Path) -> None:
    data = (artifact_dir / WEIGHTS).read_bytes()
    assert not data.startswith(b"\x80") and not data.startswith(b"PK")  # pickle / torch zip
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + header_len])
    assert "lstm.weight_ih_l0" in header and "head.weight" in header
    assert header["head.weight"]["dtype"] == "F32"


def test_loader_never_unpickles(artifact_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the artifact loader must never unpickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    assert load_artifact(artifact_dir).metadata.version == "v-test-1"


def test_a_pickle_posing_as_weights_is_refused_without_unpickling(
    artifact_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.save(make_model(seed=7).state_dict(), artifact_dir / WEIGHTS)
    _rewrite_checksums(artifact_dir)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the artifact loader must never unpickle")

    monkeypatch.setattr(torch, "load", refuse)
    _refusal(artifact_dir, "unreadable weights")


# --- refusals ----------------------------------------------------------------------------------


def test_flipped_byte_in_weights_is_a_checksum_mismatch(artifact_dir: Path) -> None:
    data = bytearray((artifact_dir / WEIGHTS).read_bytes())
    data[-5] ^= 0x01  # inside the tensor data: still a well-formed safetensors file
    (artifact_dir / WEIGHTS).write_bytes(bytes(data))
    err = _refusal(artifact_dir, "checksum mismatch", WEIGHTS)
    assert isinstance(err, StreamerError)


def test_edited_metadata_is_a_checksum_mismatch(artifact_dir: Path) -> None:
    _edit_metadata(artifact_dir, {"version": "v-forged"})
    _refusal(artifact_dir, "checksum mismatch", METADATA)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused(artifact_dir: Path, bad: float) -> None:
    weights = _weights(make_model(seed=7))
    weights["lstm.weight_hh_l1"][3, 2] = bad
    save_file(weights, str(artifact_dir / WEIGHTS))
    _rewrite_checksums(artifact_dir)  # only the finiteness check is left to catch it
    _refusal(artifact_dir, "lstm.weight_hh_l1", "non-finite")


def test_non_finite_normalization_buffer_is_refused(artifact_dir: Path) -> None:
    weights = _weights(make_model(seed=7))
    weights["x_std"][0] = float("nan")
    save_file(weights, str(artifact_dir / WEIGHTS))
    _rewrite_checksums(artifact_dir)
    _refusal(artifact_dir, "x_std", "non-finite")


def test_weights_of_other_dims_than_metadata_are_refused(artifact_dir: Path) -> None:
    save_file(_weights(make_model(hidden=8, seed=7)), str(artifact_dir / WEIGHTS))
    _rewrite_checksums(artifact_dir)  # metadata still says hidden_size=16
    _refusal(artifact_dir, "shape", "metadata implies")


def test_weights_of_fewer_layers_than_metadata_are_refused(artifact_dir: Path) -> None:
    save_file(_weights(make_model(layers=1, seed=7)), str(artifact_dir / WEIGHTS))
    _rewrite_checksums(artifact_dir)
    _refusal(artifact_dir, "do not match metadata", "lstm.weight_ih_l1")


def test_unexpected_tensor_is_refused(artifact_dir: Path) -> None:
    weights = _weights(make_model(seed=7)) | {"backdoor": torch.zeros(2)}
    save_file(weights, str(artifact_dir / WEIGHTS))
    _rewrite_checksums(artifact_dir)
    _refusal(artifact_dir, "unexpected", "backdoor")


def test_missing_weights_file_is_refused(artifact_dir: Path) -> None:
    (artifact_dir / WEIGHTS).unlink()
    _refusal(artifact_dir, "cannot read", WEIGHTS)


@pytest.mark.parametrize("content", [b"", b"definitely not safetensors", "half"])
def test_unreadable_weights_file_is_refused(artifact_dir: Path, content: bytes | str) -> None:
    path = artifact_dir / WEIGHTS
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if content == "half" else content)
    _rewrite_checksums(artifact_dir)
    _refusal(artifact_dir, "unreadable weights")


def test_missing_checksums_file_is_refused(artifact_dir: Path) -> None:
    (artifact_dir / CHECKSUMS).unlink()
    _refusal(artifact_dir, "unreadable", CHECKSUMS)


def test_checksums_without_an_entry_is_refused(artifact_dir: Path) -> None:
    lines = (artifact_dir / CHECKSUMS).read_text().splitlines()
    (artifact_dir / CHECKSUMS).write_text("\n".join(x for x in lines if WEIGHTS not in x) + "\n")
    _refusal(artifact_dir, "no entry", WEIGHTS)


def test_malformed_checksums_file_is_refused(artifact_dir: Path) -> None:
    (artifact_dir / CHECKSUMS).write_text("justonetoken\n")
    _refusal(artifact_dir, "unreadable", CHECKSUMS)


def test_missing_directory_is_refused(tmp_path: Path) -> None:
    _refusal(tmp_path / "nowhere", "unreadable", CHECKSUMS)


@pytest.mark.parametrize("version", [0, 3, 99])
def test_unsupported_format_version_is_refused(artifact_dir: Path, version: int) -> None:
    _edit_metadata(artifact_dir, {"format_version": version, "features.new_thing": 1})
    _rewrite_checksums(artifact_dir)
    _refusal(artifact_dir, f"format version {version}", "reads format versions 1, 2")


def test_a_format_version_1_artifact_still_loads_and_predicts_the_same(
    artifact_dir: Path,
) -> None:
    """Version 1 had no target_kind, extras, half_life or target_stats: it reads as a level
    target without extras or per-key statistics, exactly the model it was."""
    before = load_artifact(artifact_dir)
    meta = json.loads((artifact_dir / METADATA).read_text())
    meta["format_version"] = 1
    for name in ("target_kind", "extras", "half_life", "target_stats"):
        del meta["features"][name]
    (artifact_dir / METADATA).write_text(json.dumps(meta))
    _rewrite_checksums(artifact_dir)
    old = load_artifact(artifact_dir)
    spec = old.metadata.features
    assert (spec.target_kind, spec.extras, spec.half_life) == ("level", (), None)
    assert_close(_engine_predictions(old.model), _engine_predictions(before.model), rtol=0,
                 atol=0)


@pytest.mark.parametrize(
    "edit",
    [{"model.hidden_size": "sixteen"}, {"features.std": [1.0, 1.0, 0.0, 1.0]},
     {"unknown_field": 1}, {"version": None}],
)
def test_invalid_metadata_is_refused(artifact_dir: Path, edit: dict[str, Any]) -> None:
    _edit_metadata(artifact_dir, edit)
    _rewrite_checksums(artifact_dir)
    _refusal(artifact_dir, "unreadable metadata")


def test_metadata_that_is_not_json_is_refused(artifact_dir: Path) -> None:
    (artifact_dir / METADATA).write_text("{not json")
    _rewrite_checksums(artifact_dir)
    _refusal(artifact_dir, "unreadable metadata")


def test_metadata_whose_model_and_features_disagree_is_refused(artifact_dir: Path) -> None:
    _edit_metadata(artifact_dir, {"model.input_size": 5})
    _rewrite_checksums(artifact_dir)
    _refusal(artifact_dir, "does not build a model")


@pytest.mark.parametrize("big", [1e39, -3.5e38, 1.7976931348623157e308])
def test_float64_weight_that_overflows_float32_is_refused(artifact_dir: Path, big: float) -> None:
    """Finite in the float64 file, infinite once cast to the model's float32: refused."""
    weights = {k: v.double() for k, v in _weights(make_model(seed=7)).items()}
    weights["lstm.weight_hh_l1"][3, 2] = big
    save_file(weights, str(artifact_dir / WEIGHTS))
    _rewrite_checksums(artifact_dir)
    _refusal(artifact_dir, "lstm.weight_hh_l1", "not finite as torch.float32")


def test_float64_weights_within_float32_range_still_load(artifact_dir: Path) -> None:
    weights = {k: v.double() for k, v in _weights(make_model(seed=7)).items()}
    save_file(weights, str(artifact_dir / WEIGHTS))
    _rewrite_checksums(artifact_dir)
    assert load_artifact(artifact_dir).model.lstm.weight_hh_l1.dtype == torch.float32


def test_promote_refuses_a_version_that_overflows_float32(tmp_path: Path) -> None:
    from streamer.registry import Registry

    registry = Registry(tmp_path / "models", "default")
    good = registry.publish(make_model(seed=7), version="v1", make_current=True)
    bad = registry.publish(make_model(seed=8), version="v2", make_current=False)
    weights = {k: v.double() for k, v in _weights(make_model(seed=8)).items()}
    weights["head.weight"][0, 0] = 1e39
    save_file(weights, str(registry.path(bad) / WEIGHTS))
    _rewrite_checksums(registry.path(bad))
    with pytest.raises(ArtifactError, match="not finite as torch.float32"):
        registry.promote(bad)
    assert registry.current() == good


def test_save_refuses_non_finite_weights(tmp_path: Path) -> None:
    model = make_model(seed=7)
    with torch.no_grad():
        model.lstm.weight_hh_l0[0, 0] = float("inf")
    with pytest.raises(ArtifactError, match="weight_hh_l0"):
        save_artifact(tmp_path / "m", model, version="v1")
