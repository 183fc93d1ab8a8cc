"""The `trainer` command line end to end, on real files and a real registry directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from streamer.artifact import load_artifact
from streamer.registry import Registry
from trainer.cli import main

FAST = ["--hidden", "16", "--layers", "1", "--epochs", "3", "--seq-len", "32",
        "--device", "cpu", "--no-progress"]

ROOT = Path(__file__).resolve().parents[2]


def _registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "models", "default")


def _init_tick(root: str, hidden: int, layers: int) -> None:
    """An untrained tick model of this shape as the registry's current version."""
    assert main(["init", "--kind", "tick", "--hidden", str(hidden), "--layers", str(layers),
                 "--registry", root]) == 0


def test_init_writes_a_seeded_untrained_artifact(tmp_path: Path) -> None:
    args = ["init", "--kind", "sensor", "--readings", "temp,vibration,pressure",
            "--hidden", "24", "--layers", "3", "--seed", "5"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    a, b = load_artifact(tmp_path / "a"), load_artifact(tmp_path / "b")
    assert a.metadata.features.names == ("temp", "vibration", "pressure")
    assert (a.metadata.model.hidden_size, a.metadata.model.num_layers) == (24, 3)
    assert a.metadata.seed == 5 and a.metadata.metrics == {"untrained": True}
    assert all((a.model.state_dict()[k] == v).all() for k, v in b.model.state_dict().items())

    assert main(["init", "--features", "6", "--hidden", "8", "--layers", "1",
                 "--registry", str(tmp_path / "models")]) == 0
    art = _registry(tmp_path).load()
    assert art.metadata.features.kind == "generic" and art.metadata.features.n_features == 6

    # Idempotent on a registry that already serves a version (deployments run it every start).
    again = ["init", "--features", "6", "--hidden", "8", "--layers", "1",
             "--registry", str(tmp_path / "models")]
    assert main(again) == 0
    assert _registry(tmp_path).versions() == [art.metadata.version]
    assert main([*again, "--force"]) == 0
    assert len(_registry(tmp_path).versions()) == 2
    assert _registry(tmp_path).current() != art.metadata.version


def test_bad_settings_exit_2_naming_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["init", "--layers", "auto", "--out", str(tmp_path / "x")]) == 2
    assert "layers" in capsys.readouterr().err
    assert main(["train", "--hidden", "big", "--input", "x.jsonl"]) == 2
    assert "hidden" in capsys.readouterr().err
    monkeypatch.setenv("TRAINER_VAL_FRACTION", "1.5")
    assert main(["train", "--input", "x.jsonl"]) == 2
    assert "TRAINER_VAL_FRACTION" in capsys.readouterr().err
    monkeypatch.delenv("TRAINER_VAL_FRACTION")
    assert main(["train", "--input", str(tmp_path / "missing.jsonl"),
                 "--registry", str(tmp_path / "models"), *FAST]) == 2
    assert "missing.jsonl" in capsys.readouterr().err


def test_train_publish_gate_list_promote_rollback(
    tmp_path: Path, generic_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = str(tmp_path / "models")
    reg = _registry(tmp_path)
    assert main(["init", "--features", "4", "--hidden", "16", "--layers", "1",
                 "--registry", root]) == 0
    untrained = reg.current()

    # A trained model beats the untrained current one and the best baseline on the test
    # window: published.
    assert main(["train", "--input", str(generic_file), "--registry", root, *FAST]) == 0
    out = capsys.readouterr().out
    trained = reg.current()
    assert trained != untrained and "gate passes" in out and "persistence" in out
    meta = reg.load().metadata
    assert meta.metrics["compared_with"] == untrained
    assert {"candidate", "production", "persistence", "moving_average", "ar"} <= set(
        meta.metrics["evaluation"]["overall"])
    assert meta.data_range is not None and meta.data_range["events"] == 6000

    # A worse candidate (no training at all) is refused; the current version stays.
    worse = ["train", "--input", str(generic_file), "--registry", root, *FAST, "--epochs", "0"]
    assert main(worse) == 3  # a refusal exits 3 and says what to do next
    printed = capsys.readouterr().out
    assert "refused" in printed and "--force" in printed and "--out DIR" in printed
    assert reg.current() == trained
    assert len(reg.versions()) == 2
    # --force overrides the gate and records that it did.
    assert main([*worse, "--force"]) == 0
    forced = reg.current()
    assert forced not in (trained, untrained) and reg.load().metadata.metrics["gate"]["forced"]

    assert main(["list", "--registry", root]) == 0
    listing = capsys.readouterr().out
    assert all(v in listing for v in (untrained, trained, forced))
    assert main(["rollback", "--registry", root]) == 0 and reg.current() == trained
    assert main(["promote", untrained, "--registry", root]) == 0
    assert reg.current() == untrained
    capsys.readouterr()
    assert main(["promote", "v-nope", "--registry", root]) == 1
    assert "trainer promote failed: RegistryError" in capsys.readouterr().err


def test_a_candidate_of_another_depth_is_published(
    tmp_path: Path, generic_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A running streamer re-shapes its state store on a swap, so a new depth may go live."""
    root = str(tmp_path / "models")
    assert main(["init", "--features", "4", "--hidden", "32", "--layers", "2",
                 "--registry", root]) == 0
    before = _registry(tmp_path).current()
    assert main(["train", "--input", str(generic_file), "--registry", root, *FAST]) == 0
    assert "gate passes" in capsys.readouterr().out
    art = _registry(tmp_path).load()
    assert art.metadata.version != before
    assert (art.model.config.num_layers, art.model.config.hidden_size) == (1, 16)
    # Without shape flags a retrain keeps the current model's shape.
    assert main(["train", "--input", str(generic_file), "--registry", root,
                 "--epochs", "1", "--device", "cpu", "--no-progress", "--force"]) == 0
    art = _registry(tmp_path).load()
    assert (art.model.config.num_layers, art.model.config.hidden_size) == (1, 16)


def test_evaluate_prints_and_writes_the_report(
    tmp_path: Path, small_tick_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = str(tmp_path / "models")
    _init_tick(root, hidden=16, layers=1)
    first = _registry(tmp_path).current()
    assert main(["train", "--input", str(small_tick_file), "--registry", root, *FAST,
                 "--force"]) == 0
    capsys.readouterr()
    report_path = tmp_path / "report.json"
    assert main(["evaluate", "--input", str(small_tick_file), "--registry", root,
                 "--version", str(first), "--json", str(report_path)]) == 0
    out = capsys.readouterr().out
    assert "AR(5) on returns" in out and "persistence" in out
    report = json.loads(report_path.read_text())
    assert {"candidate", "production", "persistence"} <= set(report["overall"])
    assert report["per_key"] and report["primary"] == "mae"


def test_out_dir_and_layers_auto(tmp_path: Path, small_tick_file: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "artifact"
    assert main(["train", "--input", str(small_tick_file), "--out", str(out_dir),
                 "--registry", str(tmp_path / "models"), *FAST, "--layers", "auto",
                 "--hidden", "8", "--epochs", "1"]) == 0
    printed = capsys.readouterr().out
    meta = load_artifact(out_dir).metadata
    candidates = meta.metrics["candidates"]
    assert [c["layers"] for c in candidates] == [1, 2, 3]
    assert sum(c["chosen"] for c in candidates) == 1 and "chosen" in printed
    chosen = next(c for c in candidates if c["chosen"])
    assert meta.model.num_layers == chosen["layers"]
    assert _registry(tmp_path).versions() == []  # --out leaves the registry alone


def test_console_entry_point_runs() -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, "-m", "trainer", "train", "--help"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0
    assert "TRAINER_REGISTRY" in proc.stdout and "--layers" in proc.stdout


def test_since_until_select_by_event_time_and_an_empty_selection_is_an_error(
    tmp_path: Path, generic_file: Path, caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    events = [json.loads(line) for line in generic_file.read_text().splitlines()]
    ts = sorted(e["ts"] for e in events)
    since, until = ts[1000], ts[5000]
    out = tmp_path / "a"
    with caplog.at_level("INFO", logger="trainer.pipeline"):
        assert main(["train", "--input", str(generic_file), "--out", str(out), *FAST,
                     "--since", str(since), "--until", str(until),
                     "--registry", str(tmp_path / "models")]) == 0
    kept = sum(since <= t < until for t in ts)
    assert f"read {len(events)} records" in caplog.text and f"kept {kept} events" in caplog.text
    meta = load_artifact(out).metadata
    assert meta.data_range is not None and meta.data_range["events"] == kept
    assert meta.data_range["first_ts"] >= since and meta.data_range["last_ts"] < until

    assert main(["train", "--input", str(generic_file), "--out", str(tmp_path / "b"), *FAST,
                 "--since", "2000-01-01", "--until", "2000-01-02"]) == 2
    assert "none of the 6000 events" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["train", "--input", str(empty), *FAST]) == 2
    assert "no records read" in capsys.readouterr().err


def test_evaluate_scores_exactly_the_range_with_earlier_events_as_warm_up(
    tmp_path: Path, generic_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "a"
    assert main(["train", "--input", str(generic_file), "--out", str(out), *FAST,
                 "--registry", str(tmp_path / "models")]) == 0
    events = [json.loads(line) for line in generic_file.read_text().splitlines()]
    ts = sorted(e["ts"] for e in events)
    start, end = ts[3000], ts[4000]
    first_of_key: dict[str, float] = {}
    for e in sorted(events, key=lambda e: e["ts"]):
        first_of_key.setdefault(e["key"], e["ts"])
    expected = sum(start <= e["ts"] < end and e["ts"] != first_of_key[e["key"]] for e in events)
    report_path = tmp_path / "r.json"
    capsys.readouterr()
    assert main(["evaluate", "--input", str(generic_file), "--model", str(out),
                 "--registry", str(tmp_path / "models"), "--from", str(start),
                 "--until", str(end), "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["overall"]["candidate"]["n"] == expected == 1000
    assert report["split"]["from_ts"] == start and report["split"]["until_ts"] == end
    assert "--epochs" not in subprocess.run(
        [sys.executable, "-m", "trainer", "evaluate", "--help"], capture_output=True, text=True,
        check=True).stdout
    assert main(["evaluate", "--input", str(generic_file), "--model", str(out),
                 "--registry", str(tmp_path / "models"), "--from", "2000-01-01",
                 "--until", "2000-01-02"]) == 2
    assert "no event to score" in capsys.readouterr().err


def test_a_very_short_history_is_scored_not_crashed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ten hourly temperatures a key (vega_datasets) leave the AR baseline nothing to fit: it
    falls back to "no change" instead of a singular-matrix traceback, in train and evaluate."""
    temps = tmp_path / "temps.jsonl"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "vega_temps.py"), str(temps),
                    "--start", "2010-03-01", "--days", "1"], check=True, capture_output=True)
    tiny = tmp_path / "tiny.jsonl"
    tiny.write_text("\n".join(temps.read_text().splitlines()[:20]) + "\n")
    root = str(tmp_path / "models")
    assert main(["train", "--input", str(tiny), "--registry", root, "--hidden", "8",
                 "--layers", "1", "--epochs", "1", "--device", "cpu", "--no-progress",
                 "--force"]) == 0
    assert main(["evaluate", "--input", str(tiny), "--registry", root]) == 0
    assert "AR(5)" in capsys.readouterr().out
