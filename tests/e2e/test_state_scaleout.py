"""Keys follow their partitions across ``streamer run`` processes through the changelog: one
joins mid-stream, one is SIGKILLed, one SIGTERMed, and every emitted prediction still equals
the uninterrupted run's (1e-5) for its (partition, offset); none is missing."""

from __future__ import annotations

from pathlib import Path

from streamer.broker import EmbeddedBroker

from .state_scenarios import exactly_once_sigkill, scale_out_with_crashes


def test_scale_out_sigkill_sigterm_keep_every_prediction_exact(
    broker: EmbeddedBroker, artifact_dir: Path
) -> None:
    result = scale_out_with_crashes(broker, artifact_dir, n=3000, n_keys=80)
    assert result["events"] == 3000
    assert result["missing"] == 0
    assert result["differing"] == 0
    assert result["restores"] >= 3  # B on joining, C on joining, C again when B left


def test_exactly_once_read_committed_sees_each_offset_once_across_sigkill(
    broker: EmbeddedBroker, artifact_dir: Path
) -> None:
    result = exactly_once_sigkill(broker, artifact_dir, n=2000, n_keys=60)
    assert result == {"events": 2000, "missing": 0, "duplicates": 0, "differing": 0}
