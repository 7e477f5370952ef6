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
import numpy as np
import pandas as pd
from PIL import Image

from diffprune import advise, io
from diffprune.claims import Floor, check_floor, claims_markdown, judge_claims
from diffprune.names import FEATURES, FULL, feature_key
from diffprune.stats import mean_ci, paired_difference

SUMMARY_COLUMNS = [
    "run", "method", "ratio", "seed", "status", "failure", "n_kept", "n_total", "kept_fraction",
    "selection_seconds", "train_seconds", "num_samples", "num_reference",
]  # fmt: skip
# Whether a larger value is better, by metric prefix (for captions).
HIGHER_IS_BETTER = (
    "precision", "recall", "vendi", "novelty", "mode_coverage", "class_share_min",
    "class_share_ratio_min",
)  # fmt: skip
DESCRIPTIONS = {
    "fd": "Fréchet distance to held-out real images",
    "kid": "kernel inception distance (KID) to held-out real images",
    "precision": "precision (k-NN manifold, k=3): share of samples that look real",
    "recall": "recall (k-NN manifold, k=3): share of real images the samples cover",
    "vendi": "Vendi score: effective number of distinct samples",
    "novelty_mean": "mean nearest-neighbour distance of a sample to the full training set",
    "novelty_kept_mean": "mean nearest-neighbour distance of a sample to its kept training subset",
    "near_copy_share": "share of samples closer to a training image than 99% of training images "
    "are to each other",
    "mode_coverage": "share of the training data's k-means modes that the samples populate",
    "occupancy_kl": "KL(training mode occupancy || sample mode occupancy)",
    "class_kl": "KL(training class shares || classifier-judged class shares of the samples)",
    "class_share_min": "smallest class share among the samples (classifier-judged)",
    "class_share_ratio_min": "smallest ratio of a class's generated share to its training share",
}


def collect(metric_files: Iterable[str | os.PathLike]) -> pd.DataFrame:
    """One row per (run, seed) with every flat metric; a failed run has a `failure`, no numbers."""
    rows = []
    for path in metric_files:
        record = io.load_json(path)
        extractors = record.pop("feature_extractors", {})
        record.pop("class_shares", None)
        record.pop("class_shares_train", None)
        record.setdefault("status", "ok")
        record.update({f"extractor_{k}": v for k, v in extractors.items()})
        rows.append(record)
    frame = pd.DataFrame(rows)
    return frame.sort_values(["method", "ratio", "seed"], na_position="first").reset_index(
        drop=True
    )


def table(frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Rows = method, columns = ratio (plus `full`), cells = mean ± 95% CI half-width over seeds.

    Each cell names its seed count and, where it is not the nominal 1 - ratio, the kept fraction
    (cluster-balanced keeps what its smallest cluster allows); failed runs are counted, never
    averaged.
    """
    if metric not in frame:
        raise KeyError(f"metric {metric!r} not in the runs' metrics; have: {sorted(frame.columns)}")
    cells: dict[str, dict[str, str]] = {}
    for (method, ratio), group in frame.groupby(["method", "ratio"], dropna=False):
        column = FULL if method == FULL else f"{ratio:g}"
        cells.setdefault("full-data" if method == FULL else method, {})[column] = _cell(
            group, metric, nominal_kept=1.0 if method == FULL else 1 - ratio
        )
    result = pd.DataFrame.from_dict(cells, orient="index")
    ratio_columns = sorted((c for c in result.columns if c != FULL), key=float)
    result = result[[c for c in (FULL, *ratio_columns) if c in result.columns]]
    result.index.name = "method"
    return result.fillna("")


def describe(metric: str) -> tuple[str, str | None, str]:
    """What a metric is, which feature space it lives in and which direction is better."""
    base, space = metric, None
    for feature in map(feature_key, FEATURES):
        if metric.endswith("_" + feature):
            base, space = metric.removesuffix("_" + feature), feature
    text = DESCRIPTIONS.get(base, base)
    better = "higher" if base.startswith(HIGHER_IS_BETTER) else "lower"
    if base.startswith(("novelty", "near_copy")):
        better = "higher = more novel" if base.startswith("novelty") else "lower = fewer copies"
    else:
        better = f"{better} is better"
    return text, space, better


def caption(frame: pd.DataFrame, metric: str) -> str:
    """Name what the numbers are: metric, extractor, sample counts, seeds, training steps."""
    text, space, better = describe(metric)
    where = ""
    if space is not None:
        extractor = frame.get(f"extractor_{space}", pd.Series(["?"])).dropna()
        where = f" in the feature space of {extractor.iloc[0]}"
    seeds = sorted(int(s) for s in frame["seed"].unique())
    ok = frame[frame["status"] == "ok"] if "status" in frame else frame
    first = ok.iloc[0] if len(ok) else frame.iloc[0]
    return (
        f"**{metric}**: {text}{where} ({better}). Cells: mean ± half-width of the 95% t-interval "
        f"over seeds (n = seeds). {_count(first, 'num_samples')} generated samples per run against "
        f"{_count(first, 'num_reference')} held-out real images; seeds {seeds}; every run trained "
        f"for {_count(first, 'train_steps')} steps."
    )


def _count(row: pd.Series, key: str) -> str:
    value = row.get(key)
    return "?" if value is None or pd.isna(value) else str(int(value))


def markdown(frame: pd.DataFrame, metric: str) -> str:
    tab = table(frame, metric)
    names = ["full data" if c == FULL else f"removed {c}" for c in tab.columns]
    lines = [caption(frame, metric), "", "| method | " + " | ".join(names) + " |"]
    lines.append("|---" * (len(names) + 1) + "|")
    lines += [f"| {idx} | " + " | ".join(row) + " |" for idx, row in tab.iterrows()]
    return "\n".join(lines) + "\n"


def plot_metric(frame: pd.DataFrame, metric: str, path: str | os.PathLike) -> None:
    """Metric against pruning ratio, one line per method; the full-data baseline dashed."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for method, group in frame[frame["method"] != FULL].groupby("method"):
        stats = group.groupby("ratio")[metric].agg(["mean", "std"]).reset_index()
        ax.errorbar(
            stats["ratio"], stats["mean"], yerr=stats["std"].fillna(0), marker="o", capsize=3,
            label=method,
        )  # fmt: skip
    baseline = frame.loc[frame["method"] == FULL, metric]
    if len(baseline):
        ax.axhline(baseline.mean(), color="black", linestyle="--", label="full data")
    ax.set_xlabel("pruning ratio (fraction removed)")
    ax.set_ylabel(metric)
    ax.set_title(describe(metric)[0][:70], fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, path)


def plot_cost(frame: pd.DataFrame, metric: str, path: str | os.PathLike) -> None:
    """Metric against the compute a selection cost (embedding, clustering, scoring, surrogates)."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    runs = frame[frame["method"] != FULL]
    for method, group in runs.groupby("method"):
        ax.scatter(group["selection_seconds"].clip(lower=1e-3), group[metric], label=method)
    baseline = frame.loc[frame["method"] == FULL, metric]
    if len(baseline):
        ax.axhline(baseline.mean(), color="black", linestyle="--", label="full data")
    ax.set_xscale("log")
    ax.set_xlabel("selection compute (wall seconds, incl. embedding / surrogates)")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, path)


def sample_mosaic(grids: Sequence[tuple[str, str | os.PathLike]], path: str | os.PathLike) -> None:
    """One figure with every run's sample grid, titled by run id."""
    columns = min(len(grids), 5)
    rows = int(np.ceil(len(grids) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.4 * rows), dpi=120)
    for ax in np.atleast_1d(axes).ravel():
        ax.axis("off")
    for ax, (name, grid) in zip(np.atleast_1d(axes).ravel(), grids, strict=False):
        ax.imshow(np.asarray(Image.open(grid)), cmap="gray", vmin=0, vmax=255)
        ax.set_title(name, fontsize=7)
    save_figure(fig, path)


def paired_table(frame: pd.DataFrame, metric: str, *, reference: str = "random") -> pd.DataFrame:
    """Rows = method, columns = ratio: mean of (method - `reference`) over shared seeds, 95% CI."""
    ok = frame[frame["status"] == "ok"] if "status" in frame else frame
    cells: dict[str, dict[str, str]] = {}
    for (method, ratio), group in ok[ok["method"] != FULL].groupby(["method", "ratio"]):
        rival = ok[(ok["method"] == reference) & np.isclose(ok["ratio"].astype(float), ratio)]
        if method == reference or rival.empty:
            continue
        diff = paired_difference(group.set_index("seed")[metric], rival.set_index("seed")[metric])
        cells.setdefault(method, {})[f"{ratio:g}"] = diff.format()
    result = pd.DataFrame.from_dict(cells, orient="index")
    result = result[sorted(result.columns, key=float)] if len(result) else result
    result.index.name = "method"
    return result.fillna("")


def paired_markdown(frame: pd.DataFrame, metric: str, *, reference: str = "random") -> str:
    tab = paired_table(frame, metric, reference=reference)
    if tab.empty:
        return f"No paired comparison with {reference}: the study has no {reference} runs.\n"
    _, _, better = describe(metric)
    lines = [
        f"**{metric}, paired against {reference}**: mean over seeds of (method - {reference}) at "
        f"the same ratio and seed, ± half-width of its 95% t-interval ({better}; an interval "
        "that excludes 0 is a difference beyond the seed-to-seed noise).",
        "",
        "| method | " + " | ".join(f"removed {c}" for c in tab.columns) + " |",
        "|---" * (len(tab.columns) + 1) + "|",
    ]
    lines += [f"| {idx} | " + " | ".join(row) + " |" for idx, row in tab.iterrows()]
    return "\n".join(lines) + "\n"


def claims_caption(frame: pd.DataFrame, metric: str, floor: Floor) -> str:
    """Scale, seeds and feature space behind the claims table, and the baseline floor."""
    _, space, _ = describe(metric)
    extractor = ""
    if space is not None and f"extractor_{space}" in frame:
        extractor = f", feature space {frame[f'extractor_{space}'].dropna().iloc[0]}"
    ok = frame[frame["status"] == "ok"] if "status" in frame else frame
    first = ok.iloc[0] if len(ok) else frame.iloc[0]
    seeds = sorted(int(s) for s in frame["seed"].unique())
    return (
        f"Claims of the paper, judged at this study's scale: {_count(first, 'n_total')} training "
        f"images, every model trained {_count(first, 'train_steps')} steps, "
        f"{_count(first, 'num_samples')} samples per run, seeds {seeds}{extractor}. Effect = "
        "mean paired difference over seeds [95% t-interval]; a verdict needs the whole interval "
        "on one side of the claim's threshold, so one seed is always inconclusive. Baseline "
        f"quality floor: {floor.status} (the top of report.md has each seed's check)."
    )


def write_report(
    metric_files: Sequence[str | os.PathLike],
    *,
    metrics: Sequence[str],
    headline: str,
    floor: dict,
    claims: dict,
    skew_csv: str | os.PathLike | None,
    clusters_meta: str | os.PathLike | None = None,
    sample_grids: Sequence[tuple[str, str | os.PathLike]],
    tables_dir: str | os.PathLike,
    plots_dir: str | os.PathLike,
    report_md: str | os.PathLike,
    claims_md: str | os.PathLike,
    claims_csv: str | os.PathLike,
    summary_csv: str | os.PathLike,
    mosaic_png: str | os.PathLike,
) -> pd.DataFrame:
    """Every table, plot and the claims; `floor` and `claims` are params report.floor/.claims.
    `clusters_meta` (clusters.json): its degenerate-cluster warning goes at the top."""
    frame = collect(metric_files)
    failures = frame[frame["status"] != "ok"]
    metrics = [m for m in dict.fromkeys([headline, *metrics]) if m in frame]
    quality = check_floor(frame, **floor)
    skew = pd.read_csv(skew_csv) if skew_csv is not None else None
    verdicts = judge_claims(
        frame,
        metric=headline,
        higher_is_better=describe(headline)[2].startswith("higher"),
        skew=skew,
        **claims,
    )
    claims_text = claims_markdown(verdicts, caption=claims_caption(frame, headline, quality))
    with io.atomic_path(claims_csv) as tmp:
        verdicts.to_csv(tmp, index=False, float_format="%.6g")
    with io.atomic_path(claims_md) as tmp:
        tmp.write_text(claims_text)
    warning = (
        ""
        if quality.passed is not False
        else (
            "> **Warning:** the full-data baseline is below the quality floor (see the top of the "
            "report): this table does not compare data quality.\n\n"
        )
    )
    sections = [quality.text + "\n", claims_text, advice_section(frame, headline, claims)]
    degenerate = io.load_json(clusters_meta).get("degenerate") if clusters_meta else None
    if degenerate and degenerate["warning"]:
        sections.insert(0, f"> **Warning:** {degenerate['warning']}\n")
    if len(failures):
        listed = "; ".join(f"{r.run} seed {r.seed}: {r.failure}" for r in failures.itertuples())
        sections.append(f"Failed runs (shown as failed, never as numbers): {listed}\n")
    sections.append(machines_text(frame))
    if headline in frame:
        sections.append(warning + paired_markdown(frame, headline))
    for metric in metrics:
        with io.atomic_path(Path(tables_dir) / f"{metric}.csv") as tmp:
            table(frame, metric).to_csv(tmp)
        text = warning + markdown(frame, metric)
        with io.atomic_path(Path(tables_dir) / f"{metric}.md") as tmp:
            tmp.write_text(text)
        plot_metric(frame, metric, Path(plots_dir) / f"{metric}.png")
        sections.append(text)
    plot_cost(frame, headline, Path(plots_dir) / "cost.png")
    sample_mosaic(sample_grids, mosaic_png)
    with io.atomic_path(report_md) as tmp:
        tmp.write_text("\n".join(sections))
    columns = SUMMARY_COLUMNS + sorted(
        c for c in frame.columns if c not in SUMMARY_COLUMNS and not c.startswith("extractor_")
    )
    with io.atomic_path(summary_csv) as tmp:
        frame[[c for c in columns if c in frame]].to_csv(tmp, index=False, float_format="%.6g")
    return frame


def advice_section(frame: pd.DataFrame, headline: str, claims: dict) -> str:
    """`diffprune advise` on this study: each method's largest non-inferior ratio, and the
    recommendation (diffprune.advise)."""
    if headline not in frame:
        return f"Recommendation: none ({headline} is in no run's metrics).\n"
    text = advise.advice(
        frame,
        metric=headline,
        higher_is_better=describe(headline)[2].startswith("higher"),
        margin=claims["margin"],
    )
    return "Which data to drop (`diffprune advise`):\n\n```\n" + text + "```\n"


def machines_text(frame: pd.DataFrame) -> str:
    """Which machines trained the runs: float32 training is not bitwise reproducible across CPU
    (or GPU) types, so a rerun elsewhere moves each number by less than the spread over seeds."""
    found = sorted(frame["train_machine"].dropna().unique()) if "train_machine" in frame else []
    if not found:
        return "Training machine: not recorded in these metrics.\n"
    return (
        f"Trained on: {'; '.join(found)}. Selection is bitwise reproducible on any machine; "
        "float32 training is not across CPU or GPU types (each train.json records its machine), "
        "so a rerun on another type gives numbers within the spread over seeds, not the same "
        "digits.\n"
    )


def save_figure(fig: plt.Figure, path: str | os.PathLike) -> None:
    fig.tight_layout()
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _cell(group: pd.DataFrame, metric: str, *, nominal_kept: float) -> str:
    ok = group[group["status"] == "ok"] if "status" in group else group
    failed = len(group) - len(ok)
    if ok.empty:
        return f"failed ({failed} of {len(group)})" if failed else ""
    text = mean_ci(ok[metric]).format()
    kept = ok["kept_fraction"].mean() if "kept_fraction" in ok else nominal_kept
    if abs(kept - nominal_kept) > 0.005:
        text += f", kept {kept:.2f}"
    if failed:
        text += f", {failed} failed"
    return text
