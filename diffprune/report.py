"""Paper-style tables and plots from the per-run metrics JSON files.

Rows are methods, columns are pruning ratios (fraction removed); the full-data baseline is its own
column. With several seeds a cell reads `mean ± std (n)`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

from diffprune import io
from diffprune.paths import FULL

SUMMARY_COLUMNS = [
    "run",
    "method",
    "ratio",
    "seed",
    "n_kept",
    "n_total",
    "kept_fraction",
    "selection_seconds",
    "train_seconds",
    "num_samples",
    "num_reference",
]


def collect(metric_files: Iterable[str | os.PathLike]) -> pd.DataFrame:
    """One row per (run, seed) with every flat metric."""
    rows = []
    for path in metric_files:
        record = io.load_json(path)
        extractors = record.pop("feature_extractors", {})
        record.update({f"extractor_{k}": v for k, v in extractors.items()})
        rows.append(record)
    frame = pd.DataFrame(rows)
    return frame.sort_values(["method", "ratio", "seed"], na_position="first").reset_index(
        drop=True
    )


def table(frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Rows = method, columns = ratio (plus `full`), cells = mean ± std over seeds (n seeds)."""
    if metric not in frame:
        raise KeyError(f"metric {metric!r} not in the runs' metrics; have: {sorted(frame.columns)}")
    cells = {}
    for (method, ratio), group in frame.groupby(["method", "ratio"], dropna=False):
        column = FULL if method == FULL else f"{ratio:g}"
        cells.setdefault("full-data" if method == FULL else method, {})[column] = _cell(
            group[metric]
        )
    result = pd.DataFrame.from_dict(cells, orient="index")
    ratio_columns = sorted((c for c in result.columns if c != FULL), key=float)
    result = result[[c for c in (FULL, *ratio_columns) if c in result.columns]]
    result.index.name = "method"
    return result.fillna("")


def markdown(frame: pd.DataFrame, metric: str, *, caption: str) -> str:
    tab = table(frame, metric)
    header = (
        "| method | "
        + " | ".join("full data" if c == FULL else f"removed {c}" for c in tab.columns)
        + " |"
    )
    lines = [caption, "", header, "|" + "---|" * (len(tab.columns) + 1)]
    lines += [f"| {idx} | " + " | ".join(row) + " |" for idx, row in tab.iterrows()]
    return "\n".join(lines) + "\n"


def caption(frame: pd.DataFrame, metric: str) -> str:
    """Name what the numbers are: metric, extractor, sample counts, seeds."""
    feature = metric.split("_", 1)[1] if "_" in metric else metric
    extractor = frame.get(f"extractor_{feature}", pd.Series(["?"])).dropna()
    seeds = sorted(frame["seed"].unique().tolist())
    return (
        f"**{metric}** (lower is better) in the feature space of {extractor.iloc[0]}; "
        f"{int(frame['num_samples'].iloc[0])} generated samples against "
        f"{int(frame['num_reference'].iloc[0])} held-out real images; "
        f"seeds {seeds}; every run trained for {int(frame['train_steps'].iloc[0])} steps."
    )


def plot(frame: pd.DataFrame, metric: str, path: str | os.PathLike) -> None:
    """Metric against pruning ratio, one line per method; the full-data baseline dashed."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    runs = frame[frame["method"] != FULL]
    for method, group in runs.groupby("method"):
        stats = group.groupby("ratio")[metric].agg(["mean", "std"]).reset_index()
        ax.errorbar(
            stats["ratio"],
            stats["mean"],
            yerr=stats["std"].fillna(0),
            marker="o",
            capsize=3,
            label=method,
        )
    baseline = frame.loc[frame["method"] == FULL, metric]
    if len(baseline):
        ax.axhline(baseline.mean(), color="black", linestyle="--", label="full data")
    ax.set_xlabel("pruning ratio (fraction removed)")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def write_report(
    metric_files: Sequence[str | os.PathLike],
    *,
    metric: str,
    table_csv: str | os.PathLike,
    table_md: str | os.PathLike,
    plot_png: str | os.PathLike,
    summary_csv: str | os.PathLike,
) -> pd.DataFrame:
    frame = collect(metric_files)
    with io.atomic_path(table_csv) as tmp:
        table(frame, metric).to_csv(tmp)
    with io.atomic_path(table_md) as tmp:
        Path(tmp).write_text(markdown(frame, metric, caption=caption(frame, metric)))
    plot(frame, metric, plot_png)
    columns = SUMMARY_COLUMNS + sorted(
        c for c in frame.columns if c not in SUMMARY_COLUMNS and not c.startswith("extractor_")
    )
    with io.atomic_path(summary_csv) as tmp:
        frame[[c for c in columns if c in frame]].to_csv(tmp, index=False, float_format="%.6g")
    return frame


def _cell(values: pd.Series) -> str:
    values = values.dropna()
    if len(values) == 0:
        return ""
    if len(values) == 1:
        return f"{values.iloc[0]:.3f}"
    return f"{values.mean():.3f} ± {values.std():.3f} ({len(values)})"
