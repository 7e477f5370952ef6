"""semdedup (SemDeDup) on planted near-duplicates: known answers."""

import numpy as np
import pandas as pd
import pytest

from diffprune.errors import ConfigError
from diffprune.select import select, semdedup_record

D, UNIQUE, GROUPS, COPIES = 16, 19, 3, 2  # per cluster: 19 unique + 3 groups x 2 extra copies


def planted(seed=0):
    """Two clusters of 25 samples: 19 distinct directions, and for 3 of them 2 extra copies with
    1e-4 noise (near-duplicates). 12 of 50 samples are extra copies: a share of 0.24.
    Returns embeddings, the clusters table and the groups (original, copies) as sample ids."""
    rng = np.random.default_rng(seed)
    rows, cluster, groups = [], [], []
    for c in range(2):
        base = 4 * np.eye(D)[c] + rng.normal(0, 1, size=(UNIQUE, D))
        start = len(rows)
        rows.extend(base)
        for g in range(GROUPS):
            ids = [start + g]
            for _ in range(COPIES):
                ids.append(len(rows))
                rows.append(base[g] + rng.normal(0, 1e-4, size=D))
            groups.append(np.asarray(ids))
        cluster += [c] * (len(rows) - start)
    x = np.asarray(rows, dtype=np.float32)
    clusters = pd.DataFrame({
        "sample_id": np.arange(len(x)), "cluster": np.asarray(cluster),
        "distance": np.zeros(len(x)),
    })  # fmt: skip
    return x, clusters, groups


def least_prototypical(x, clusters, group):
    """SemDeDup's survivor, computed directly: lowest cosine similarity to the cluster mean."""
    members = x[clusters["cluster"] == clusters["cluster"][group[0]]].astype(np.float64)
    centroid = members.mean(axis=0)
    unit = x[group] / np.linalg.norm(x[group], axis=1, keepdims=True)
    return group[np.argmin(unit @ (centroid / np.linalg.norm(centroid)))]


@pytest.mark.parametrize("eps", [None, 1e-3])
def test_semdedup_removes_exactly_the_extra_copies_keeping_the_least_prototypical(eps):
    x, clusters, groups = planted()
    manifest = select("semdedup", 0.24, clusters=clusters, embeddings=x, semdedup_eps=eps)
    removed = set(manifest.loc[~manifest["keep"], "sample_id"])
    assert len(removed) == len(groups) * COPIES
    for group in groups:
        survivor = least_prototypical(x, clusters, group)
        assert manifest["keep"][survivor] and set(group) - {survivor} <= removed
    assert manifest["score"].isna().sum() == 2  # each cluster's first member compares to none
    assert semdedup_record(manifest, 0.24, eps)["semdedup_eps"] == eps


def test_semdedup_ratio_sets_the_threshold_and_eps_overrides_it():
    x, clusters, _ = planted()
    assert select("semdedup", 0.0, clusters=clusters, embeddings=x)["keep"].all()
    assert (~select("semdedup", 0.5, clusters=clusters, embeddings=x)["keep"]).sum() == 25
    kept = select("semdedup", 0.5, clusters=clusters, embeddings=x, semdedup_eps=1e-3)["keep"]
    assert (~kept).sum() == 12  # eps decides; the ratio only names the run
    threshold = semdedup_record(select("semdedup", 0.5, clusters=clusters, embeddings=x), 0.5, None)
    assert threshold["semdedup_threshold"] < 1 - 1e-3


def test_semdedup_bad_inputs_name_the_problem():
    x, clusters, _ = planted()
    with pytest.raises(ConfigError, match="needs the embeddings"):
        select("semdedup", 0.2, clusters=clusters)
    with pytest.raises(ConfigError, match="semdedup_eps must be null or a number in"):
        select("semdedup", 0.2, clusters=clusters, embeddings=x, semdedup_eps=-1)
    with pytest.raises(ValueError, match=r"shape \(N=50, D\)"):
        select("semdedup", 0.2, clusters=clusters, embeddings=x[:10])


def test_cli_semdedup_writes_eps_threshold_and_kept_fraction(tmp_path, capsys):
    from diffprune.cli import main
    from diffprune.io import load_json

    x, _, groups = planted()
    np.save(tmp_path / "emb.npy", x)
    out = tmp_path / "m.parquet"
    args = [
        "select",
        "--method",
        "semdedup",
        "--ratio",
        "0.24",
        "--embeddings",
        tmp_path / "emb.npy",
    ]
    assert main([str(a) for a in [*args, "--k", "2", "--semdedup-eps", "1e-3", "--out", out]]) == 0
    meta = load_json(out.with_suffix(".json"))
    assert meta["semdedup_eps"] == 1e-3 and meta["semdedup_threshold"] == pytest.approx(1 - 1e-3)
    assert meta["n_kept"] == 50 - len(groups) * COPIES and meta["kept_fraction"] == 0.76
