"""Transient faults through the embedded broker's injectors: a broker of three down, the group
coordinator down, offset commits rejected or timed out, members joining and leaving, request
errors on Produce, Fetch, JoinGroup, SyncGroup and Heartbeat, 500 ms broker RTT. In each
the service stays up, every input offset gets a prediction, and duplicates are bounded by the
batches that were re-delivered (at-least-once)."""

from __future__ import annotations

from pathlib import Path

import pytest

from .fault_scenarios import FAULTS, run_fault

pytestmark = pytest.mark.integration

# A rejected commit or a rebalance re-delivers what was not committed: at most a few batches.
MAX_DUPLICATES = 3 * 512


@pytest.mark.parametrize("name", sorted(FAULTS))
def test_service_survives_fault(name: str, artifact_dir: Path) -> None:
    report = run_fault(name, artifact_dir, before_s=1.0, after_s=1.0)
    assert report.alive, report
    assert report.events_in > 0
    assert report.missing == 0, report
    assert report.duplicates <= MAX_DUPLICATES, report
    assert report.predictions_out == report.events_in + report.duplicates
    assert report.recovery_s is not None, report
    assert report.ready, report
    if name == "coordinator_down":
        # While it cannot commit, /readyz says so and why. (With one broker of three down the
        # service may well keep making progress: the writer's records for that broker's
        # partitions wait with it, and every other partition flows, so readiness may stay.)
        assert any(r.startswith("Kafka unavailable") for r in report.not_ready_reasons), report
