"""A picture of the forecast: an offline HTML report with PNG figures beside it.

Why pictures: a table says *that* a model loses to persistence, a plot says *where* (a
seasonal bias, one drifting key, a bad stretch after a regime change). The report draws, from
plain arrays: actual vs predicted vs persistence per key (the worst and best few by MASE when
there are many keys), error distributions of the model and its rivals, error by hour of day
and day of week (UTC) when the evaluation window spans those cycles, the depth search and the
learning curves, and the metrics table (MAE, RMSE, direction accuracy, MASE).

Pure: it knows nothing of datasets, models or the registry; ``trainer.pipeline.report_input``
builds its :class:`ReportInput`. Figures are drawn on ``matplotlib.figure.Figure`` objects
(Agg renderer, no pyplot, no global backend state); the HTML has no script and no link outside
its directory, so it opens offline.

Usage::

    written = write_report(Path("report"), ReportInput(...))   # report/index.html + PNGs
    written.figures        # {"series_0.png": (1000, 450), ...} width, height in pixels
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from streamer.errors import ConfigError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 100
_WIDE = (10.0, 4.5)  # inches; at DPI: 1000 x 450 pixels
_HALF = (10.0, 3.6)
_COLUMNS = (("mae", "MAE"), ("rmse", "RMSE"), ("direction_accuracy", "Dir. acc"),
            ("mase", "MASE"), ("accuracy", "Accuracy"), ("macro_f1", "Macro-F1"), ("n", "n"))
_WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


@dataclass
class SeriesInput:
    """One key over the evaluation window; all arrays [N], in event order."""

    ts: np.ndarray  # epoch seconds (UTC) of the predicted events
    actual: np.ndarray  # the target value that happened
    predicted: np.ndarray  # the model's prediction of it
    baselines: dict[str, np.ndarray]  # rival name -> prediction; "persistence" at least


@dataclass
class ReportInput:
    """Everything the report shows. Metrics tables map predictor -> metric -> value, where
    a predictor is the model (``model_name``) or a rival (baseline, production model)."""

    title: str
    model_version: str
    command: str
    data_range: Mapping[str, Any]
    target: str
    series: dict[str, SeriesInput]  # key -> its window (empty for a classification model)
    overall: dict[str, dict[str, Any]]
    per_key: dict[str, dict[str, dict[str, Any]]]  # key -> predictor -> metric -> value
    model_name: str = "candidate"
    candidates: list[dict[str, Any]] = field(default_factory=list)  # the depth search
    candidate_score: str = "val_loss"  # the candidates' key that ranked them (lower wins)
    learning_curves: dict[str, list[float | None]] | None = None  # "train"/"validation"
    notes: list[str] = field(default_factory=list)
    max_keys: int = 6  # keys drawn one by one: all if no more, else worst and best halves


@dataclass
class WrittenReport:
    index: Path
    figures: dict[str, tuple[int, int]]  # file name -> (width, height) pixels


def write_report(directory: Path, inp: ReportInput) -> WrittenReport:
    """Write ``directory/index.html`` and its PNGs (the directory is created if needed).

    Raises ConfigError("report") when the directory cannot be written."""
    try:
        return _write(directory, inp)
    except OSError as exc:
        raise ConfigError("report", f"cannot write the report to {directory}: {exc}") from exc


def _write(directory: Path, inp: ReportInput) -> WrittenReport:
    directory.mkdir(parents=True, exist_ok=True)
    sections: list[str] = []
    figures: dict[str, tuple[int, int]] = {}

    def save(fig: Figure, name: str, caption: str) -> None:
        fig.savefig(directory / name, dpi=DPI, format="png")
        width, height = (int(round(v * DPI)) for v in fig.get_size_inches())
        figures[name] = (width, height)
        sections.append(f'<figure><img src="{name}" width="{width}" height="{height}" '
                        f'alt="{html.escape(caption)}"><figcaption>{html.escape(caption)}'
                        "</figcaption></figure>")

    for i, (key, why) in enumerate(select_keys(inp)):
        save(_series_figure(key, inp.series[key], inp), f"series_{i}.png",
             f"{key}: actual, {inp.model_name} and persistence over the evaluation window{why}")
    if not inp.series:
        sections.append("<p class='note'>no per-event values to draw (classification model, "
                        "or no evaluation pair): metrics only</p>")
    if inp.series:
        save(_errors_figure(inp), "errors.png", "error distribution, model vs rivals")
        for cycle in ("hour", "weekday"):
            if _spans(inp, cycle):
                title = "hour of day" if cycle == "hour" else "day of week"
                save(_cycle_figure(inp, cycle), f"error_by_{cycle}.png",
                     f"error by {title} (UTC): mean absolute error and mean error (bias)")
    if inp.candidates:
        save(_candidates_figure(inp), "depth_search.png",
             f"depth search: every candidate's {inp.candidate_score} (lower is better)")
    if inp.learning_curves:
        save(_curves_figure(inp.learning_curves), "learning_curves.png",
             "learning curves of the chosen model (loss per epoch)")
    (directory / "index.html").write_text(_page(inp, sections), encoding="utf-8")
    return WrittenReport(directory / "index.html", figures)


# --- choosing keys --------------------------------------------------------------------------


def mase_of(inp: ReportInput, key: str) -> float | None:
    """The model's MASE on ``key``; without one, its MAE relative to persistence's."""
    rows = inp.per_key.get(key, {})
    model = rows.get(inp.model_name, {})
    if model.get("mase") is not None:
        return float(model["mase"])
    ours, theirs = model.get("mae"), rows.get("persistence", {}).get("mae")
    return None if ours is None or not theirs else float(ours) / float(theirs)


def select_keys(inp: ReportInput) -> list[tuple[str, str]]:
    """(key, why) to draw: every key if at most ``max_keys``, else the worst and the best
    halves by MASE (keys without a score come last)."""
    keys = sorted(inp.series)
    if len(keys) <= inp.max_keys:
        return [(k, "") for k in keys]
    ranked = sorted(keys, key=lambda k: (mase_of(inp, k) is None, -(mase_of(inp, k) or 0.0)))
    scored = [k for k in ranked if mase_of(inp, k) is not None] or ranked
    worst = scored[: (inp.max_keys + 1) // 2]
    best = [k for k in scored[::-1] if k not in worst][: inp.max_keys // 2]
    return ([(k, f" (among the worst by MASE: {mase_of(inp, k):.3g})") for k in worst]
            + [(k, f" (among the best by MASE: {mase_of(inp, k):.3g})") for k in best])


# --- figures --------------------------------------------------------------------------------


def _figure(size: tuple[float, float]) -> Figure:
    # Imported here: matplotlib takes ~0.5 s to import and only a report needs it (the demo's
    # and the scheduler's retraining runs import this module through the pipeline).
    from matplotlib.figure import Figure

    return Figure(figsize=size, layout="constrained")


def _times(ts: np.ndarray) -> np.ndarray:
    return (np.asarray(ts, dtype=np.float64) * 1000.0).astype("int64").astype("datetime64[ms]")


def _series_figure(key: str, s: SeriesInput, inp: ReportInput) -> Figure:
    fig = _figure(_WIDE)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    t = _times(s.ts)
    top.plot(t, s.actual, color="black", lw=1.2, label="actual")
    if "persistence" in s.baselines:
        top.plot(t, s.baselines["persistence"], color="tab:gray", lw=0.9, ls="--",
                 label="persistence")
    top.plot(t, s.predicted, color="tab:blue", lw=1.0, label=inp.model_name)
    top.set_ylabel(inp.target)
    top.set_title(f"{key}: {inp.target}, one step ahead")
    top.legend(loc="upper left", fontsize="small", ncols=3)
    bottom.axhline(0.0, color="black", lw=0.5)
    if "persistence" in s.baselines:
        bottom.plot(t, s.baselines["persistence"] - s.actual, color="tab:gray", lw=0.7)
    bottom.plot(t, s.predicted - s.actual, color="tab:blue", lw=0.8)
    bottom.set_ylabel("error")
    from matplotlib.dates import ConciseDateFormatter

    bottom.xaxis.set_major_formatter(ConciseDateFormatter(bottom.xaxis.get_major_locator()))
    return fig


def _errors(inp: ReportInput) -> dict[str, np.ndarray]:
    """Predictor -> [N] errors (prediction - actual) pooled over every key."""
    keys = sorted(inp.series)
    out = {inp.model_name: np.concatenate([inp.series[k].predicted - inp.series[k].actual
                                           for k in keys])}
    names = [n for n in inp.series[keys[0]].baselines if all(n in inp.series[k].baselines
                                                             for k in keys)]
    for name in names:
        out[name] = np.concatenate([inp.series[k].baselines[name] - inp.series[k].actual
                                    for k in keys])
    return out


def _errors_figure(inp: ReportInput) -> Figure:
    errors = _errors(inp)
    fig = _figure(_WIDE)
    hist, box = fig.subplots(1, 2, width_ratios=(3, 2))
    pooled = np.concatenate(list(errors.values()))
    pooled = pooled[np.isfinite(pooled)]
    lo, hi = np.percentile(pooled, [0.5, 99.5]) if pooled.size else (-1.0, 1.0)
    bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 50)
    for name, err in errors.items():
        hist.hist(np.clip(err, bins[0], bins[-1]), bins=bins, histtype="step",
                  lw=2.0 if name == inp.model_name else 1.0, label=name)
    hist.set_xlabel(f"error in {inp.target} (prediction - actual)")
    hist.set_ylabel("events")
    hist.legend(fontsize="small")
    box.boxplot([np.abs(e[np.isfinite(e)]) for e in errors.values()], showfliers=False)
    box.set_xticks(range(1, len(errors) + 1), list(errors), rotation=20, fontsize="small")
    box.set_ylabel("absolute error")
    return fig


def _cycle_of(ts: np.ndarray, cycle: str) -> np.ndarray:
    if cycle == "hour":
        return (np.floor(ts / 3600.0) % 24).astype(int)
    return ((np.floor(ts / 86400.0) + 3) % 7).astype(int)  # 1970-01-01 was a Thursday


def _spans(inp: ReportInput, cycle: str) -> bool:
    """Hour of day needs two days and 12 distinct hours; day of week two weeks and all 7."""
    ts = np.concatenate([s.ts for s in inp.series.values()])
    if ts.size == 0:
        return False
    span = float(ts.max() - ts.min())
    seen = np.unique(_cycle_of(ts, cycle)).size
    return span >= 2 * 86400 and seen >= 12 if cycle == "hour" else (
        span >= 14 * 86400 and seen == 7)


def _cycle_figure(inp: ReportInput, cycle: str) -> Figure:
    buckets = 24 if cycle == "hour" else 7
    ts = np.concatenate([inp.series[k].ts for k in sorted(inp.series)])
    where = _cycle_of(ts, cycle)
    fig = _figure(_HALF)
    mae_ax, bias_ax = fig.subplots(1, 2)
    for name, err in _errors(inp).items():
        count = np.bincount(where, minlength=buckets)
        with np.errstate(invalid="ignore", divide="ignore"):
            mae = np.bincount(where, np.abs(err), buckets) / count
            bias = np.bincount(where, err, buckets) / count
        lw = 2.0 if name == inp.model_name else 1.0
        mae_ax.plot(range(buckets), mae, marker=".", lw=lw, label=name)
        bias_ax.plot(range(buckets), bias, marker=".", lw=lw, label=name)
    for ax, ylabel in ((mae_ax, "MAE"), (bias_ax, "mean error (bias)")):
        ax.set_ylabel(ylabel)
        if cycle == "hour":
            ax.set_xticks(range(0, 24, 3))
            ax.set_xlabel("hour of day (UTC)")
        else:
            ax.set_xticks(range(7), _WEEKDAYS)
    bias_ax.axhline(0.0, color="black", lw=0.5)
    mae_ax.legend(fontsize="x-small")
    return fig


def candidate_label(c: Mapping[str, Any]) -> str:
    """``2x64`` (layers x hidden), with dropout and weight decay when the search varied them."""
    label = f"{c.get('layers', '?')}x{c.get('hidden', '?')}"
    for key, short in (("dropout", "do"), ("weight_decay", "wd")):
        if key in c:
            label += f" {short}={c[key]:g}"
    return label


def _candidates_figure(inp: ReportInput) -> Figure:
    cands = inp.candidates
    fig = _figure((10.0, max(2.0, 0.5 + 0.35 * len(cands))))
    ax = fig.subplots()
    scores = [float(c[inp.candidate_score]) if _finite(c.get(inp.candidate_score)) else math.nan
              for c in cands]
    colors = ["tab:green" if c.get("chosen") else "tab:gray" for c in cands]
    ax.barh(range(len(cands)), scores, color=colors)
    ax.set_yticks(range(len(cands)), [candidate_label(c) for c in cands], fontsize="small")
    ax.invert_yaxis()
    ax.set_xlabel(f"{inp.candidate_score} (green: chosen)")
    return fig


def _curves_figure(curves: Mapping[str, Sequence[float | None]]) -> Figure:
    fig = _figure(_HALF)
    ax = fig.subplots()
    for name, values in curves.items():
        y = np.array([v if _finite(v) else np.nan for v in values], dtype=np.float64)
        ax.plot(range(1, len(y) + 1), y, marker=".", label=name)
        if name == "validation" and np.isfinite(y).any():
            best = int(np.nanargmin(y))
            ax.axvline(best + 1, color="tab:green", lw=0.8, ls=":", label=f"best epoch {best + 1}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (normalized)")
    ax.legend(fontsize="small")
    return fig


# --- the page -------------------------------------------------------------------------------


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def fmt(value: Any) -> str:
    """A cell as shown: 4 significant digits, ``-`` for none (as ``trainer evaluate`` prints)."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _cell(value: Any) -> str:
    return f'<td data-value="{html.escape(json.dumps(value))}">{html.escape(fmt(value))}</td>'


def _metrics_table(rows: Sequence[tuple[Sequence[str], Mapping[str, Any]]], heads: Sequence[str],
                   table_id: str) -> str:
    present = [(k, t) for k, t in _COLUMNS if any(k in m for _, m in rows)]
    out = [f'<table id="{table_id}"><tr>'
           + "".join(f"<th>{html.escape(h)}</th>" for h in heads)
           + "".join(f"<th>{t}</th>" for _, t in present) + "</tr>"]
    for names, metrics in rows:
        out.append("<tr>" + "".join(f"<td>{html.escape(n)}</td>" for n in names)
                   + "".join(_cell(metrics.get(k)) for k, _ in present) + "</tr>")
    return "\n".join(out) + "</table>"


def _page(inp: ReportInput, sections: list[str], max_rows: int = 200) -> str:
    esc = html.escape
    facts = [("model version", inp.model_version), ("target", inp.target),
             ("command", inp.command)]
    facts += [(f"data {k}", json.dumps(v) if isinstance(v, dict | list) else str(v))
              for k, v in inp.data_range.items() if v is not None]
    keys = sorted(inp.per_key)
    per_key = [((k, name), m) for k in keys[:max_rows] for name, m in inp.per_key[k].items()]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{esc(inp.title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{esc(inp.title)}</h1><table id='facts'>",
        *(f"<tr><th>{esc(k)}</th><td><code>{esc(v)}</code></td></tr>" for k, v in facts),
        "</table>",
        *(f"<p class='note'>{esc(n)}</p>" for n in inp.notes),
        "<h2>Metrics on the evaluation window</h2>",
        _metrics_table([((n,), m) for n, m in inp.overall.items()], ["predictor"], "overall"),
        "<h2>Figures</h2>", *sections,
    ]
    if inp.candidates:
        cols = [k for k in inp.candidates[0] if not isinstance(inp.candidates[0][k], dict | list)]
        parts += ["<h2>Depth search</h2><table id='candidates'><tr>",
                  *(f"<th>{esc(c)}</th>" for c in cols), "</tr>",
                  *("<tr>" + "".join(_cell(c.get(k)) for k in cols) + "</tr>"
                    for c in inp.candidates), "</table>"]
    parts += ["<h2>Metrics per key</h2>",
              _metrics_table(per_key, ["key", "predictor"], "per_key")]
    if len(keys) > max_rows:
        parts.append(f"<p class='note'>first {max_rows} of {len(keys)} keys</p>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


_CSS = (
    "body{font-family:sans-serif;max-width:1040px;margin:1em auto;color:#222}"
    "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 8px}"
    "td[data-value]{text-align:right}figure{margin:1em 0}img{max-width:100%;height:auto}"
    "figcaption{color:#555;font-size:90%}.note{color:#8a5a00}code{white-space:pre-wrap}"
)
