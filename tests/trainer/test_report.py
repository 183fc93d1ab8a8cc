"""`trainer evaluate --report` and `trainer train --report` on a small real series (hourly
temperatures of Seattle and San Francisco, 2010, bundled with vega_datasets): the HTML names
every PNG, each PNG decodes at the size the HTML states, and its metrics are the printed ones."""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from streamer.errors import ConfigError
from streamer.registry import Registry
from trainer.cli import main
from trainer.report import ReportInput, SeriesInput, select_keys, write_report

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--hidden", "8", "--layers", "1", "--epochs", "3", "--seq-len", "48", "--device", "cpu",
         "--no-progress", "--val-fraction", "0.2", "--test-fraction", "0.4"]


@pytest.fixture(scope="module")
def temps(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six weeks of hourly readings from two cities, written by the README's script."""
    path = tmp_path_factory.mktemp("temps") / "temps.jsonl"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "vega_temps.py"), str(path),
                    "--start", "2010-03-01", "--days", "42"], check=True, timeout=60)
    return path


class _Page(HTMLParser):
    """Images (src, width, height) and tables (id -> rows of (text, data-value) cells)."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[dict[str, str]] = []
        self.tables: dict[str, list[list[tuple[str, str | None]]]] = {}
        self._table: str | None = None
        self._cell: tuple[str, str | None] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "img":
            self.images.append({k: v or "" for k, v in a.items()})
        elif tag == "table":
            self._table = a.get("id") or ""
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = ("", a.get("data-value"))

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell = (self._cell[0] + data, self._cell[1])

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._table is not None:
            self.tables[self._table][-1].append(self._cell)
            self._cell = None
        elif tag == "table":
            self._table = None


def _read_page(directory: Path) -> _Page:
    page = _Page()
    page.feed((directory / "index.html").read_text(encoding="utf-8"))
    return page


def _check_figures(directory: Path, page: _Page) -> set[str]:
    """Every PNG is referenced, every reference exists; each decodes at its stated size."""
    referenced = {img["src"] for img in page.images}
    assert referenced == {p.name for p in directory.glob("*.png")}
    for img in page.images:
        raw = (directory / img["src"]).read_bytes()
        assert raw[:8] == b"\x89PNG\r\n\x1a\n" and raw[12:16] == b"IHDR"
        width, height = struct.unpack(">II", raw[16:24])
        assert (width, height) == (int(img["width"]), int(img["height"]))
        pixels = matplotlib.image.imread(directory / img["src"])
        assert pixels.shape[:2] == (height, width) and np.ptp(pixels) > 0  # not blank
    return referenced


def _printed_rows(stdout: str, n: int) -> list[list[str]]:
    rows = [[c.strip() for c in line.strip().strip("│").split("│")]
            for line in stdout.splitlines() if line.startswith("│")]
    return rows[:n]  # the first table printed is the overall one


def _mase_reference(events_file: Path, cut: float) -> dict[str, float]:
    """Persistence's MAE per key on the scored pairs (the predicted event at or after the test
    cut), computed from the raw events: MASE's scale."""
    series: dict[str, list[tuple[float, float]]] = {}
    for line in events_file.read_text().splitlines():
        e = json.loads(line)
        ts = np.datetime64(e["ts"].rstrip("Z"), "s").astype("int64").item()
        series.setdefault(e["sensor_id"], []).append((float(ts), e["readings"]["temp"]))
    diffs: dict[str, list[float]] = {}
    for key, rows in series.items():
        rows.sort()
        diffs[key] = [abs(b[1] - a[1]) for a, b in zip(rows, rows[1:], strict=False)
                      if b[0] >= cut]
    scale = {k: float(np.mean(d)) for k, d in diffs.items()}
    scale["*"] = float(np.mean([x for d in diffs.values() for x in d]))
    return scale


def test_evaluate_report_on_real_temperatures(tmp_path: Path, temps: Path) -> None:
    registry = tmp_path / "models"
    train_report = tmp_path / "train_report"
    assert main(["train", "--input", str(temps), "--registry", str(registry), *SMALL,
                 "--force", "--report", str(train_report)]) == 0
    version = Registry(registry, "default").current()
    assert version is not None
    shown = _check_figures(train_report, _read_page(train_report))
    assert {"learning_curves.png", "depth_search.png", "series_0.png"} <= shown

    out, report_json = tmp_path / "report", tmp_path / "report.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", "evaluate", "--input", str(temps), "--registry",
         str(registry), "--val-fraction", "0.2", "--test-fraction", "0.4", "--report", str(out),
         "--json", str(report_json)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    page = _read_page(out)
    assert _check_figures(out, page) == {
        "series_0.png", "series_1.png", "errors.png", "error_by_hour.png",
        "error_by_weekday.png", "depth_search.png", "learning_curves.png"}

    # The overall table: the printed cells, and the JSON report's exact values.
    evaluated = json.loads(report_json.read_text())
    names = list(evaluated["overall"])
    head, *rows = page.tables["overall"]
    columns = [text for text, _ in head]
    assert columns[:4] == ["predictor", "MAE", "RMSE", "Dir. acc"] and "MASE" in columns
    printed = _printed_rows(proc.stdout, len(names))
    assert [r[0] for r in rows] == [(n, None) for n in names]
    for name, row, line in zip(names, rows, printed, strict=True):
        assert [text for text, _ in row[1:4]] == line[1:4], name
        for (_, value), metric in zip(row[1:4], ("mae", "rmse", "direction_accuracy"),
                                      strict=True):
            assert json.loads(value or "") == evaluated["overall"][name][metric]

    # MASE against an independent reference: MAE over persistence's MAE on the same events
    # (close, not equal: the trainer reads the readings through float32 features).
    scale = _mase_reference(temps, evaluated["split"]["test_cut_ts"])
    i_mase = columns.index("MASE")
    for name, row in zip(names, rows, strict=True):
        mase = json.loads(row[i_mase][1] or "")
        assert math.isclose(mase, evaluated["overall"][name]["mae"] / scale["*"], rel_tol=1e-6)
    per_key = {(r[0][0], r[1][0]): r for r in page.tables["per_key"][1:]}
    assert {k for k, _ in per_key} == set(evaluated["per_key"]) == {"seattle", "sf"}
    for (key, name), row in per_key.items():
        mae = evaluated["per_key"][key][name]["mae"]
        assert json.loads(row[2][1] or "") == mae
        assert math.isclose(json.loads(row[i_mase + 1][1] or ""), mae / scale[key],
                            rel_tol=1e-6)

    facts = {r[0][0]: r[1][0] for r in page.tables["facts"]}
    assert facts["model version"] == version
    assert facts["command"].startswith("trainer evaluate --input")
    assert facts["data first"] == "2010-03-01T00:00:00Z" and facts["data keys"] == "2"
    assert "http" not in (out / "index.html").read_text()  # offline: nothing to fetch


def _series(n: int, bias: float, rng: np.random.Generator) -> SeriesInput:
    actual = rng.normal(size=n).cumsum()
    persistence = np.concatenate([[actual[0]], actual[:-1]])
    return SeriesInput(3600.0 * np.arange(n), actual, actual + bias, {"persistence": persistence})


def test_many_keys_draw_the_worst_and_the_best(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    series = {f"k{i:02d}": _series(50, 0.1 * i, rng) for i in range(12)}
    per_key = {k: {"candidate": {"mae": float(np.abs(s.predicted - s.actual).mean())},
                   "persistence": {"mae": 1.0}} for k, s in series.items()}
    inp = ReportInput(title="t", model_version="v", command="c", data_range={}, target="y",
                      series=series, overall={"candidate": {"mae": 1.0}}, per_key=per_key,
                      max_keys=4)
    drawn = select_keys(inp)
    assert [k for k, _ in drawn] == ["k11", "k10", "k00", "k01"]  # two worst, two best
    written = write_report(tmp_path, inp)
    page = _read_page(tmp_path)
    assert _check_figures(tmp_path, page) == set(written.figures)
    assert {f"series_{i}.png" for i in range(4)} <= set(written.figures)
    assert "error_by_hour.png" in written.figures  # 50 hours span two days
    assert "error_by_weekday.png" not in written.figures  # but not two weeks


def test_unwritable_report_dir_fails_before_training(
    tmp_path: Path, temps: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    assert main(["train", "--input", str(temps), "--registry", str(tmp_path / "models"),
                 *SMALL, "--report", str(blocker / "report")]) == 2
    assert "'report'" in capsys.readouterr().err
    assert not (tmp_path / "models").exists()  # nothing trained, nothing published
    with pytest.raises(ConfigError, match="report"):
        write_report(blocker / "r", ReportInput(
            title="t", model_version="v", command="c", data_range={}, target="y", series={},
            overall={}, per_key={}))
