"""`diffprune advise` on synthetic summaries with known answers."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from diffprune.advise import advice, points, recommend
from diffprune.cli import main
from diffprune.report import advice_section

ROOT = Path(__file__).resolve().parent.parent
COST = {"full": 0.0, "random": 0.01, "cluster-furthest": 15.0, "cluster-nearest": 15.0}


def summary(effects: dict[tuple[str, float | None], float], *, seeds=5, noise=0.2):
    """fd_x per run and seed: 100 + a shared per-seed offset + the planted effect + small noise.

    The margin of 5% of the full data's mean allows about 5; effects of 1 are safe, 20 are not.
    """
    rng = np.random.default_rng(0)
    offsets = rng.normal(0, 3, size=seeds)
    rows = []
    for (method, ratio), effect in effects.items():
        for seed in range(seeds):
            rows.append({
                "run": method if ratio is None else f"{method}_r{ratio!r}",
                "method": method,
                "ratio": np.nan if ratio is None else ratio,
                "seed": seed,
                "status": "ok",
                "selection_seconds": COST[method],
                "fd_x": 100 + offsets[seed] + effect + rng.normal(0, noise),
            })  # fmt: skip
    return pd.DataFrame(rows)


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def test_a_planted_safe_ratio_is_found_and_recommended():
    frame = summary({
        ("full", None): 0, ("cluster-furthest", 0.5): 1, ("cluster-furthest", 0.8): 20,
        ("random", 0.5): 20, ("random", 0.8): 30,
    })  # fmt: skip
    text = advice(frame, metric="fd_x", higher_is_better=False, margin=0.05)
    lines = {line.split(":")[0]: line for line in text.splitlines()}
    assert "largest non-inferior ratio 0.5 " in lines["cluster-furthest"]
    assert "largest non-inferior ratio none " in lines["random"]
    assert last_line(text) == "recommendation: cluster-furthest at ratio 0.5"


def test_direction_follows_the_metric():
    """A higher-is-better metric: the same +20 is an improvement, so 0.8 becomes safe."""
    frame = summary(
        {("full", None): 0, ("cluster-furthest", 0.5): 1, ("cluster-furthest", 0.8): 20}
    )
    text = advice(frame, metric="fd_x", higher_is_better=True, margin=0.05)
    assert last_line(text) == "recommendation: cluster-furthest at ratio 0.8"


def test_nothing_safe_says_why_and_the_seeds_the_spread_needs():
    """full = 100 on 3 seeds; diffs [-1, 1, 3]: mean 1, sd 2, allowed 5 so slack 4. n=3: the
    half-width t(0.975, 2) 2 / sqrt(3) = 4.97 > 4 (not safe); n=4: 3.182 * 2 / 2 = 3.18 < 4."""
    rows = [("full", np.nan, s, 100.0) for s in range(3)]
    rows += [("random", 0.5, s, 100.0 + d) for s, d in enumerate([-1, 1, 3])]
    rows += [("cluster-furthest", 0.5, s, 120.0 + d) for s, d in enumerate([-1, 1, 3])]
    frame = pd.DataFrame(rows, columns=["method", "ratio", "seed", "fd_x"])
    frame["status"], frame["selection_seconds"] = "ok", frame["method"].map(COST)
    text = advice(frame, metric="fd_x", higher_is_better=False, margin=0.05)
    assert "random: largest non-inferior ratio none" in text
    assert "seeds needed: 4 seeds" in text
    assert "seeds needed: cannot (the observed mean difference is itself outside" in text
    assert last_line(text) == (
        "recommendation: none (no ratio is non-inferior at this evidence; the closest, random "
        "at ratio 0.5, would need 4 seeds)"
    )


def test_failed_runs_are_excluded_and_counted():
    """A failed run's numbers (here a wild one) never count: the verdict stays the planted one."""
    frame = summary({("full", None): 0, ("cluster-furthest", 0.5): 1})
    failed = frame.iloc[[-1]].assign(seed=9, status="failed", fd_x=1e6)
    text = advice(pd.concat([frame, failed]), metric="fd_x", higher_is_better=False, margin=0.05)
    assert "excluded 1 failed run(s): cluster-furthest r0.5 s9" in text
    assert last_line(text) == "recommendation: cluster-furthest at ratio 0.5"


@pytest.mark.parametrize("cheaper", ["random", "cluster-furthest"])
def test_ties_go_to_the_cheaper_selection(cheaper):
    frame = summary({("full", None): 0, ("cluster-furthest", 0.5): 1, ("random", 0.5): 1})
    frame.loc[frame["method"] == cheaper, "selection_seconds"] = 0.001
    found = points(frame, metric="fd_x", higher_is_better=False, margin=0.05)
    assert [p.safe for p in found] == [True, True]
    assert recommend(found).method == cheaper


def test_cli_prints_the_recommendation_and_report_has_the_section(tmp_path, capsys):
    frame = summary({("full", None): 0, ("cluster-furthest", 0.5): 1, ("random", 0.5): 20})
    frame.to_csv(tmp_path / "summary.csv", index=False)
    code = main(
        ["advise", str(tmp_path), "--metric", "fd_x", "--params", str(ROOT / "params.yaml")]
    )
    out = capsys.readouterr().out
    assert code == 0 and last_line(out) == "recommendation: cluster-furthest at ratio 0.5"
    section = advice_section(frame, "fd_x", {"margin": 0.05})
    assert "recommendation: cluster-furthest at ratio 0.5" in section


def test_cli_without_a_summary_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["advise", str(tmp_path), "--metric", "fd_x", "--margin", "0.05"])
    err = capsys.readouterr().err
    assert (
        stop.value.code == 2 and "summary.csv: no such file" in err and len(err.splitlines()) == 1
    )
