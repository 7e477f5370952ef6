"""The fairness study's report: how balanced each arm's training data and generated samples are.

One row per arm (diffprune.skew) and seed in `results/skew/skew.{csv,md}`, and a plot of the class
shares; the claims (diffprune.claims, C4) read the table.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from diffprune import io
from diffprune.metrics import class_shares, kl_divergence
from diffprune.names import Run
from diffprune.report import save_figure


def balance(
    labels: np.ndarray, *, num_classes: int, minority_classes: Sequence[int]
) -> dict[str, float | list[float]]:
    """How balanced a set of labels is: its class shares, KL to uniform, minority share."""
    shares = class_shares(np.asarray(labels), num_classes)
    return {
        "shares": shares.round(6).tolist(),
        "kl_to_uniform": kl_divergence(np.full(num_classes, 1 / num_classes), shares),
        "minority_share": float(shares[list(minority_classes)].sum()),
    }


def skew_frame(
    metric_files: Sequence[str | os.PathLike],
    manifest_files: Sequence[str | os.PathLike],
    *,
    labels: np.ndarray,
    minority_classes: Sequence[int],
) -> pd.DataFrame:
    """One row per arm and seed: balance of its training data and of its generated samples."""
    num_classes = int(labels.max()) + 1
    rows = []
    for metric_file, manifest_file in zip(metric_files, manifest_files, strict=True):
        metrics = io.load_json(metric_file)
        manifest = pd.read_parquet(manifest_file, columns=["sample_id", "keep"])
        kept = balance(
            labels[manifest.loc[manifest["keep"], "sample_id"].to_numpy()],
            num_classes=num_classes,
            minority_classes=minority_classes,
        )
        failed = metrics.get("status", "ok") != "ok"  # no samples: shown as failed, not as 0
        generated = np.full(num_classes, np.nan) if failed else np.asarray(metrics["class_shares"])
        uniform = np.full(num_classes, 1 / num_classes)
        rows.append({
            "arm": Run.parse(metrics["run"]).arm,
            "seed": metrics["seed"],
            "n_train": metrics["n_kept"],
            "train_minority_share": kept["minority_share"],
            "train_kl_to_uniform": kept["kl_to_uniform"],
            "generated_minority_share": float(generated[list(minority_classes)].sum()),
            "generated_kl_to_uniform": np.nan if failed else kl_divergence(uniform, generated),
            "fd_classifier": metrics.get("fd_classifier", np.nan),
            "num_samples": metrics.get("num_samples", np.nan),
            "train_shares": kept["shares"],
            "generated_shares": generated.tolist(),
        })  # fmt: skip
    return pd.DataFrame(rows)


def write_skew_report(
    metric_files: Sequence[str | os.PathLike],
    manifest_files: Sequence[str | os.PathLike],
    *,
    index: str | os.PathLike,
    class_names: Sequence[str] | None,
    minority_classes: Sequence[int],
    table_csv: str | os.PathLike,
    table_md: str | os.PathLike,
    plot_png: str | os.PathLike,
) -> pd.DataFrame:
    """The table (CSV and Markdown) and the class-share plot; with no runs (`skew.arms: []`),
    outputs that say the study is off."""
    labels = pd.read_parquet(index, columns=["label"])["label"].to_numpy()
    if not metric_files:
        return _write_skew_off(table_csv=table_csv, table_md=table_md, plot_png=plot_png)
    frame = skew_frame(
        metric_files, manifest_files, labels=labels, minority_classes=minority_classes
    )
    scalar = [c for c in frame.columns if not c.endswith("_shares")]
    with io.atomic_path(table_csv) as tmp:
        frame[scalar].to_csv(tmp, index=False, float_format="%.6g")
    target = 1 / (int(labels.max()) + 1) * len(minority_classes)
    lines = [
        f"Minority classes {list(minority_classes)} (balanced target share {target:.3f}); "
        "generated shares judged by the evaluation classifier on "
        f"{int(frame['num_samples'].max()) if frame['num_samples'].notna().any() else 0} "
        "samples per run; KL is KL(uniform || shares); every arm trained for the same steps.",
        "",
        "| arm | seed | training images | minority share (train) | KL (train) "
        "| minority share (generated) | KL (generated) | FD (classifier) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r.arm} | {r.seed} | {r.n_train} | {r.train_minority_share:.3f} "
        f"| {r.train_kl_to_uniform:.3f} | {_or_failed(r.generated_minority_share)} "
        f"| {_or_failed(r.generated_kl_to_uniform)} | {_or_failed(r.fd_classifier)} |"
        for r in frame.itertuples()
    ]
    with io.atomic_path(table_md) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    _plot_shares(frame, class_names, plot_png)
    return frame


def _or_failed(value: float) -> str:
    return "failed" if pd.isna(value) else f"{value:.3f}"


COLUMNS = [
    "arm", "seed", "n_train", "train_minority_share", "train_kl_to_uniform",
    "generated_minority_share", "generated_kl_to_uniform", "fd_classifier", "num_samples",
]  # fmt: skip


def _write_skew_off(*, table_csv, table_md, plot_png) -> pd.DataFrame:
    """With `skew.arms: []` the study is off: say so in every output instead of failing."""
    frame = pd.DataFrame(columns=COLUMNS)
    with io.atomic_path(table_csv) as tmp:
        frame.to_csv(tmp, index=False)
    with io.atomic_path(table_md) as tmp:
        tmp.write_text("The fairness study is off in this profile (`skew.arms: []`).\n")
    fig, ax = plt.subplots(figsize=(4, 1.5), dpi=100)
    ax.axis("off")
    ax.text(0.5, 0.5, "fairness study off (skew.arms: [])", ha="center", va="center")
    save_figure(fig, plot_png)
    return frame


def _plot_shares(frame: pd.DataFrame, class_names, path: str | os.PathLike) -> None:
    first = frame.groupby("arm", sort=False).first().reset_index()
    num_classes = len(first["generated_shares"].iloc[0])
    names = class_names or [str(c) for c in range(num_classes)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), dpi=120, sharey=True)
    width = 0.8 / len(first)
    for ax, column, title in zip(
        axes, ("train_shares", "generated_shares"), ("training data", "generated samples"),
        strict=True,
    ):  # fmt: skip
        for i, row in first.iterrows():
            ax.bar(np.arange(num_classes) + i * width, row[column], width, label=row["arm"])
        ax.axhline(1 / num_classes, color="black", linestyle="--", linewidth=0.8)
        ax.set_xticks(np.arange(num_classes) + 0.4 - width / 2, names, rotation=45, ha="right",
                      fontsize=7)  # fmt: skip
        ax.set_title(f"class shares of the {title}", fontsize=9)
    axes[0].set_ylabel("share")
    axes[1].legend(fontsize=7)
    save_figure(fig, path)
