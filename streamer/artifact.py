"""Model artifacts: a directory with weights (safetensors, never a pickle), JSON metadata that
rebuilds the model, and a checksum file. Loading refuses anything inconsistent, so a bad file
can never replace a serving model.

Layout::

    <dir>/model.safetensors   weights (state_dict tensors only)
    <dir>/metadata.json       ArtifactMetadata
    <dir>/SHA256SUMS          sha256 of the two files above

Usage::

    save_artifact(path, model, version="v1")
    art = load_artifact(path, device=torch.device("cpu"))
    art.model, art.metadata.version
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import streamer
from streamer.errors import ArtifactError, IncompleteArtifact
from streamer.features import FeatureSpec
from streamer.model import LSTMModel, ModelConfig

FORMAT_VERSION = 2  # 2: feature spec with target_kind, extras, half_life, target_stats
READABLE_FORMATS = (1, 2)  # a version 1 spec reads as level target, no extras, no per-key stats
WEIGHTS = "model.safetensors"
METADATA = "metadata.json"
CHECKSUMS = "SHA256SUMS"


class ArtifactMetadata(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    format_version: int = FORMAT_VERSION
    version: str
    model: ModelConfig
    features: FeatureSpec
    created_at: float = Field(default_factory=time.time)
    code_version: str = streamer.__version__
    data_range: dict[str, Any] | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    seed: int | None = None

    @property
    def task(self) -> str:
        return self.model.task

    @property
    def target(self) -> str:
        return self.features.target


@dataclass(frozen=True)
class Artifact:
    model: LSTMModel
    metadata: ArtifactMetadata
    path: Path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_artifact(
    directory: Path,
    model: LSTMModel,
    version: str,
    *,
    metrics: dict[str, Any] | None = None,
    data_range: dict[str, Any] | None = None,
    seed: int | None = None,
) -> ArtifactMetadata:
    """Write weights, metadata and checksums into ``directory`` (created; must be empty)."""
    directory.mkdir(parents=True, exist_ok=True)
    meta = ArtifactMetadata(
        version=version,
        model=model.config,
        features=model.spec,
        metrics=metrics or {},
        data_range=data_range,
        seed=seed,
    )
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ArtifactError(f"{directory}: refusing to save {name}: non-finite values")
    save_file(state, str(directory / WEIGHTS))
    (directory / METADATA).write_text(meta.model_dump_json(indent=2))
    sums = "".join(f"{_sha256(directory / n)}  {n}\n" for n in (WEIGHTS, METADATA))
    (directory / CHECKSUMS).write_text(sums)
    return meta


def read_metadata(directory: Path) -> ArtifactMetadata:
    """The metadata of an artifact of format version 1 or 2; a newer format is refused with a
    message naming both versions (before its unknown fields could confuse validation)."""
    try:
        blob = (directory / METADATA).read_bytes()
        version = json.loads(blob).get("format_version")
    except (OSError, ValueError, AttributeError) as exc:
        raise ArtifactError(f"{directory}: unreadable metadata: {exc}") from exc
    if version not in READABLE_FORMATS:
        raise ArtifactError(
            f"{directory}: artifact format version {version}, this code reads format versions "
            f"{', '.join(map(str, READABLE_FORMATS))}; upgrade the streamer or retrain"
        )
    try:
        return ArtifactMetadata.model_validate_json(blob)
    except ValidationError as exc:
        raise ArtifactError(f"{directory}: unreadable metadata: {exc}") from exc


def verify_checksums(directory: Path) -> None:
    try:
        lines = (directory / CHECKSUMS).read_text().splitlines()
        expected: dict[str, str] = {}
        for line in lines:
            if line.strip():
                digest, name = line.split(maxsplit=1)
                expected[name] = digest
    except OSError as exc:
        raise IncompleteArtifact(f"{directory}: unreadable {CHECKSUMS}: {exc}") from exc
    except ValueError as exc:
        raise ArtifactError(f"{directory}: unreadable {CHECKSUMS}: {exc}") from exc
    for name in (WEIGHTS, METADATA):
        if name not in expected:
            raise ArtifactError(f"{directory}: {CHECKSUMS} has no entry for {name}")
        try:
            actual = _sha256(directory / name)
        except OSError as exc:
            raise IncompleteArtifact(f"{directory}: cannot read {name}: {exc}") from exc
        if actual != expected[name]:  # corrupt, or still being written
            raise IncompleteArtifact(f"{directory}: checksum mismatch for {name}")


def load_artifact(directory: Path, device: torch.device | str = "cpu") -> Artifact:
    """Verify and load an artifact; raises ArtifactError with the reason on any inconsistency."""
    directory = Path(directory)
    verify_checksums(directory)
    meta = read_metadata(directory)
    try:
        weights = load_file(str(directory / WEIGHTS), device="cpu")
    except (OSError, SafetensorError) as exc:
        raise ArtifactError(f"{directory}: unreadable weights: {exc}") from exc
    try:
        model = LSTMModel(meta.model, meta.features)
    except ValueError as exc:
        raise ArtifactError(f"{directory}: metadata does not build a model: {exc}") from exc
    _check_weights(directory, model, weights)
    model.load_state_dict(weights)
    # After the cast to the model's dtype: 1e39 is finite in a float64 file, inf in float32.
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ArtifactError(
                f"{directory}: {name} is not finite as {tensor.dtype} (stored as "
                f"{weights[name].dtype}); values beyond the serving precision are refused"
            )
    model.eval()
    return Artifact(model.to(device), meta, directory)


def _check_weights(directory: Path, model: LSTMModel, weights: dict[str, torch.Tensor]) -> None:
    expected = model.state_dict()
    if set(weights) != set(expected):
        missing, extra = set(expected) - set(weights), set(weights) - set(expected)
        raise ArtifactError(f"{directory}: weights do not match metadata: missing "
                            f"{sorted(missing)}, unexpected {sorted(extra)}")
    for name, tensor in weights.items():
        if tensor.shape != expected[name].shape:
            raise ArtifactError(
                f"{directory}: {name} has shape {tuple(tensor.shape)}, metadata implies "
                f"{tuple(expected[name].shape)}"
            )
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ArtifactError(f"{directory}: {name} has non-finite values")
