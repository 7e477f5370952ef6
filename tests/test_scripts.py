"""Contract tests of the workflow scripts: each script file runs as Snakemake would run it (a
`snakemake` global, see script_helpers) on tiny real artifacts, and the test checks what it wrote
against the library's own answer or a property of the content, not only that files appeared.

Scripts not covered here (each needs a trained or downloaded model beyond a few seconds):
autoencoder.py, encode.py (latent space), surrogate.py, score.py (score methods),
skew_report.py and download.py (tested through the end-to-end workflow tests).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from script_helpers import NamedList, fake_snakemake, files, run_script
from workflow_helpers import REPO, tiny_params

from diffprune import io
from diffprune.checkpoints import array_sha256
from diffprune.cluster import clusters_frame, kmeans
from diffprune.data import load_store
from diffprune.embed import embed_images, load_embedder
from diffprune.errors import DataError
from diffprune.evaluate import class_balance, evaluate_samples
from diffprune.features import load_feature_extractor
from diffprune.model_folder import load_model
from diffprune.sample import generate
from diffprune.select import select
from diffprune.skew import arm_ids, skewed_ids

CLASSES = ["zero", "one", "two", "three"]
PARAMS = tiny_params(
    embed={"image_size": 32, "batch_size": 64, "device": "cpu"},
    cluster={"k": 3, "iterations": 10, "device": "cpu"},
    train={
        "resolution": 8, "block_channels": [8, 16], "steps": 4, "batch_size": 8,
        "checkpoint_every": 2, "log_every": 1, "device": "cpu", "mixed_precision": "no",
    },
    sample={"num_samples": 8, "steps": 2, "batch_size": 8, "grid_size": 2},
    classifier={"epochs": 1, "batch_size": 16, "device": "cpu"},
    evaluate={
        "features": ["classifier", "efficientnet-lite0"], "image_size": 32, "batch_size": 64,
        "device": "cpu",
    },
    skew={"minority_classes": [3], "minority_share": 0.1, "size": 40, "keep": 12, "k": 3},
)  # fmt: skip


def synthetic_images(labels: np.ndarray, seed: int) -> np.ndarray:
    """8x8 gray images: a bright square in the corner that is the class, plus noise."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 60, (len(labels), 8, 8, 1))
    for i, label in enumerate(labels):
        r, c = divmod(int(label), 2)
        images[i, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4] += 180
    return images.astype(np.uint8)


def write_store(folder: Path, labels: np.ndarray, seed: int) -> list[Path]:
    """A store as diffprune.data.build_store writes it: images.npy, index.parquet, store.json."""
    images = synthetic_images(labels, seed)
    io.save_npy(folder / "images.npy", images)
    index = pd.DataFrame(
        {
            "sample_id": np.arange(len(labels), dtype=np.int64),
            "label": labels.astype(np.int64),
            "source": [f"synthetic:{i}" for i in range(len(labels))],
        }
    )
    io.save_parquet(folder / "index.parquet", index)
    io.save_json(
        folder / "store.json",
        {
            "dataset": "synthetic", "source": "imagefolder", "split": folder.name,
            "shape": list(images.shape), "num_samples": len(images), "image_size": 8,
            "channels": 1, "class_names": CLASSES, "holdout": False, "bad_images": [],
        },
    )  # fmt: skip
    assert len(load_store(folder).images) == len(labels)
    return [folder / "images.npy", folder / "index.parquet", folder / "store.json"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("project")


@pytest.fixture(scope="module")
def stores(root):
    """48 training images (12 per class, shuffled) and 24 test images."""
    train = np.random.default_rng(0).permutation(np.repeat(np.arange(4), 12))
    test = np.repeat(np.arange(4), 6)
    return {
        "train": write_store(root / "store" / "train", train, seed=1),
        "test": write_store(root / "store" / "test", test, seed=2),
    }


def blobs(n_per_group: list[int], *, dim: int = 16, seed: int = 0) -> np.ndarray:
    """Well separated groups (group g at 10 * e_g), rows shuffled."""
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(len(n_per_group)), n_per_group)
    points = np.eye(dim)[groups] * 10 + 0.5 * rng.standard_normal((len(groups), dim))
    return points[rng.permutation(len(groups))].astype(np.float32)


@pytest.fixture(scope="module")
def evidence(root):
    """Embeddings of the 48 training images (three unequal groups) and their clusters."""
    embeddings = root / "embed" / "embeddings.npy"
    io.save_npy(embeddings, blobs([20, 16, 12]))
    io.save_json(root / "embed" / "embeddings.json", {"model": "blobs", "seconds": 1.5})
    out = root / "evidence"
    smk = fake_snakemake(
        input=files(embeddings=embeddings, embeddings_meta=root / "embed" / "embeddings.json"),
        output=files(
            clusters=out / "clusters.parquet",
            centroids=out / "centroids.npy",
            meta=out / "clusters.json",
        ),
        params={"cluster": PARAMS["cluster"]},
        log=root / "logs" / "cluster.log",
    )
    run_script("cluster", smk)
    return {
        "embeddings": embeddings,
        "embeddings_meta": root / "embed" / "embeddings.json",
        "clusters": out / "clusters.parquet",
        "centroids": out / "centroids.npy",
        "clusters_meta": out / "clusters.json",
    }


# ------------------------------------------------------------------------------- the fake itself
def test_named_list_reads_like_snakemakes_namedlist():
    iocontainers = pytest.importorskip("snakemake.iocontainers")
    ours = files("first", store=["a/images.npy", "a/index.parquet"], manifest="m.parquet")
    theirs = iocontainers.InputFiles(["first", "a/images.npy", "a/index.parquet", "m.parquet"])
    theirs._set_name("store", 1, end=3)
    theirs._set_name("manifest", 3)
    assert list(ours) == list(theirs)
    for get in (
        lambda x: x[0],
        lambda x: list(x.store),
        lambda x: x.store[0],
        lambda x: x["manifest"],
        lambda x: x.manifest,
        lambda x: x.get("manifest"),
        lambda x: x.get("classifier"),
        lambda x: x.get("classifier", "default"),
        lambda x: [(k, v if isinstance(v, str) else list(v)) for k, v in x.items()],
    ):
        assert get(ours) == get(theirs)
    assert isinstance(NamedList(a=1).get("a"), int)


# ----------------------------------------------------------------------------- embed and cluster
def test_embed_script_writes_the_embedders_features_of_every_training_image(root, stores):
    out = root / "embed-effnet"
    smk = fake_snakemake(
        input=files(*stores["train"]),
        output=files(embeddings=out / "embeddings.npy", meta=out / "embeddings.json"),
        params={"embed": PARAMS["embed"]},
        log=root / "logs" / "embed.log",
    )
    run_script("embed", smk)
    embeddings = np.load(out / "embeddings.npy")
    embedder = load_embedder("efficientnet-lite0", image_size=32, device="cpu")
    expected = embed_images(load_store(stores["train"][0].parent).images, embedder, progress=False)
    assert embeddings.shape == (48, 1280) and embeddings.dtype == np.float32
    np.testing.assert_allclose(embeddings, expected, rtol=1e-5, atol=1e-6)
    meta = io.load_json(out / "embeddings.json")
    assert meta["n"] == 48 and meta["model"] == "efficientnet-lite0"
    assert (root / "logs" / "embed.log").stat().st_size > 0


def test_cluster_script_writes_the_kmeans_assignments_distances_and_sizes(evidence):
    clusters = pd.read_parquet(evidence["clusters"])
    embeddings = np.load(evidence["embeddings"])
    cfg = PARAMS["cluster"]
    expected = kmeans(embeddings, k=3, iterations=cfg["iterations"], seed=cfg["seed"], device="cpu")
    pd.testing.assert_frame_equal(clusters, clusters_frame(expected))
    # the three groups of blobs() are recovered, each sample's distance is to its own centroid
    assert sorted(np.bincount(clusters["cluster"]).tolist()) == [12, 16, 20]
    centroids = np.load(evidence["centroids"])
    own = centroids[clusters["cluster"].to_numpy()]
    distance = np.linalg.norm(embeddings - own, axis=1)
    np.testing.assert_allclose(clusters["distance"], distance, rtol=1e-3, atol=1e-3)
    meta = io.load_json(evidence["clusters_meta"])
    assert meta["cluster_sizes"] == np.bincount(clusters["cluster"], minlength=3).tolist()
    assert meta["k"] == 3 and meta["embedder"] == "blobs"


# ------------------------------------------------------------------------------------- selection
def run_select(root, stores, evidence, run: str, seed: int = 0) -> tuple[pd.DataFrame, dict]:
    inputs = {"index": stores["train"][1]}
    if "cluster" in run:
        inputs |= {
            "clusters": evidence["clusters"],
            "clusters_meta": evidence["clusters_meta"],
            "embeddings_meta": evidence["embeddings_meta"],
        }
    out = root / "manifests" / run
    smk = fake_snakemake(
        input=files(**inputs),
        output=files(manifest=out / f"s{seed}.parquet", meta=out / f"s{seed}.json"),
        params={"select": PARAMS["select"], "cluster": PARAMS["cluster"]},
        wildcards={"run": run, "seed": seed},
        log=root / "logs" / f"select_{run}_s{seed}.log",
    )
    run_script("select", smk)
    return pd.read_parquet(out / f"s{seed}.parquet"), io.load_json(out / f"s{seed}.json")


def assert_sidecar_counts(manifest: pd.DataFrame, meta: dict) -> None:
    assert meta["n_total"] == len(manifest) == 48
    assert meta["n_kept"] == int(manifest["keep"].sum())
    assert meta["kept_fraction"] == pytest.approx(meta["n_kept"] / 48)


def test_select_script_random_keeps_floor_half_and_matches_the_library(root, stores, evidence):
    manifest, meta = run_select(root, stores, evidence, "random_r0.5", seed=1)
    assert manifest["keep"].sum() == math.floor(48 * 0.5)
    pd.testing.assert_frame_equal(manifest, select("random", 0.5, n=48, seed=1))
    assert_sidecar_counts(manifest, meta)
    assert meta["method"] == "random" and meta["ratio"] == 0.5 and meta["seed"] == 1
    assert meta["compute"]["total_seconds"] == meta["compute"]["select_seconds"]


def test_select_script_cluster_furthest_keeps_the_furthest_half_of_every_cluster(
    root, stores, evidence
):
    manifest, meta = run_select(root, stores, evidence, "cluster-furthest_r0.5")
    clusters = pd.read_parquet(evidence["clusters"])
    pd.testing.assert_frame_equal(
        manifest, select("cluster-furthest", 0.5, clusters=clusters, seed=0)
    )
    for cluster, group in manifest.groupby("cluster"):
        kept, removed = group[group["keep"]], group[~group["keep"]]
        assert len(kept) == len(group) // 2, cluster
        assert kept["distance"].min() >= removed["distance"].max(), cluster
    assert_sidecar_counts(manifest, meta)
    assert meta["kept_per_cluster"] == {str(c): len(g) // 2 for c, g in manifest.groupby("cluster")}
    assert meta["direction"] == "furthest" and meta["k"] == 3 and meta["embedder"] == "blobs"
    # the clustering's own cost is part of the selection's
    assert meta["compute"]["embeddings_seconds"] == 1.5


def test_select_script_cluster_balanced_keeps_the_same_number_from_every_cluster(
    root, stores, evidence
):
    manifest, meta = run_select(root, stores, evidence, "cluster-balanced_r0.5")
    kept = manifest[manifest["keep"]].groupby("cluster").size()
    assert kept.tolist() == [8, 8, 8]  # m = min(12, floor(24 / 3))
    for _, group in manifest.groupby("cluster"):
        assert (
            group.loc[group["keep"], "distance"].min()
            >= group.loc[~group["keep"], "distance"].max()
        )
    assert_sidecar_counts(manifest, meta)


def test_select_script_full_keeps_every_sample(root, stores, evidence):
    manifest, meta = run_select(root, stores, evidence, "full")
    assert manifest["keep"].all() and manifest["sample_id"].tolist() == list(range(48))
    assert_sidecar_counts(manifest, meta)
    assert meta["direction"] == "all" and meta["k"] is None


@pytest.mark.parametrize("arm", ["cluster-balanced", "label-balanced", "random", "skewed"])
def test_skew_select_script_writes_each_arms_kept_set(root, stores, arm):
    labels = pd.read_parquet(stores["train"][1])["label"].to_numpy()
    embeddings = root / "skew-embed" / "embeddings.npy"
    io.save_npy(embeddings, blobs([12, 12, 12, 12], seed=3))
    io.save_json(root / "skew-embed" / "embeddings.json", {"model": "blobs", "seconds": 2.0})
    out = root / "manifests" / f"skew-{arm}"
    smk = fake_snakemake(
        input=files(
            index=stores["train"][1],
            embeddings=embeddings,
            embeddings_meta=root / "skew-embed" / "embeddings.json",
        ),
        output=files(manifest=out / "s0.parquet", meta=out / "s0.json"),
        params={"skew": PARAMS["skew"], "cluster": PARAMS["cluster"]},
        wildcards={"arm": arm, "seed": 0},
        log=root / "logs" / f"skew_select_{arm}.log",
    )
    run_script("skew_select", smk)
    manifest, meta = pd.read_parquet(out / "s0.parquet"), io.load_json(out / "s0.json")
    cfg = PARAMS["skew"]
    skewed = skewed_ids(
        labels, minority_classes=cfg["minority_classes"], minority_share=cfg["minority_share"],
        size=cfg["size"], seed=cfg["seed"],
    )  # fmt: skip
    expected, _ = arm_ids(
        arm, skewed=skewed, labels=labels, embeddings=np.load(embeddings), keep=cfg["keep"],
        k=cfg["k"], iterations=PARAMS["cluster"]["iterations"], seed=0,
    )  # fmt: skip
    kept = manifest.loc[manifest["keep"], "sample_id"].to_numpy()
    np.testing.assert_array_equal(kept, np.sort(expected))
    assert len(manifest) == 48 and set(kept) <= set(skewed)
    assert meta["n_kept"] == len(kept) and meta["skewed_size"] == len(skewed) == 40
    assert meta["run"] == meta["method"] == f"skew-{arm}" and meta["ratio"] is None
    if arm == "skewed":
        assert len(kept) == 40
    elif arm == "random":
        assert len(kept) == 12
    elif arm == "label-balanced":  # 12 // 4 classes = 3 each
        assert np.bincount(labels[kept], minlength=4).tolist() == [3, 3, 3, 3]
    else:  # keep 12 of 40 with k = 3: m = min(smallest cluster, 12 // 3) from every cluster
        clustered = manifest[manifest["cluster"] >= 0]
        assert len(clustered) == 40
        m = min(clustered.groupby("cluster").size().min(), 12 // 3)
        assert clustered[clustered["keep"]].groupby("cluster").size().tolist() == [m, m, m]
        assert len(kept) == 3 * m and m == 4  # not 9, as removing 0.3 instead of 0.7 would give
        assert meta["compute"]["embeddings_seconds"] == 2.0


# ------------------------------------------------------------------- train, sample, evaluate
@pytest.fixture(scope="module")
def manifest_path(root):
    """Keeps 12 of the 48 samples (every fourth), so that a flipped `keep` trains on 36."""
    path = root / "manifests" / "handmade" / "s0.parquet"
    keep = np.arange(48) % 4 == 1
    frame = select("random", 0.0, n=48).assign(keep=keep)
    io.save_parquet(path, frame)
    return path


@pytest.fixture(scope="module")
def model_dir(root, stores, manifest_path):
    out = root / "models" / "handmade" / "s0"
    smk = fake_snakemake(
        input=files(store=stores["train"], manifest=manifest_path),
        output=files(model=out, log_dir=root / "train-logs" / "handmade" / "s0"),
        params={"train": PARAMS["train"], "checkpoints": root / "checkpoints" / "handmade"},
        wildcards={"run": "handmade", "seed": 0},
        log=root / "logs" / "train.log",
    )
    run_script("train", smk)
    return out


def test_train_script_trains_on_the_kept_rows_only(root, stores, model_dir):
    record = io.load_json(model_dir / "train.json")
    assert record["status"] == "ok" and record["steps"] == 4 and record["seed"] == 0
    assert record["n_images"] == 12
    kept = np.arange(48)[np.arange(48) % 4 == 1]
    images = np.asarray(load_store(stores["train"][0].parent).images)
    assert record["images_sha256"] == array_sha256(images[kept])
    model, _, cfg = load_model(model_dir)
    assert cfg["resolution"] == 8 and model.config.in_channels == 1
    assert (root / "train-logs" / "handmade" / "s0").is_dir()
    assert not (root / "checkpoints" / "handmade" / "latest.pt").exists()


@pytest.fixture(scope="module")
def samples_path(root, model_dir):
    out = root / "samples" / "handmade"
    smk = fake_snakemake(
        input=files(model=model_dir),
        output=files(samples=out / "s3.npy", grid=out / "s3.png"),
        params={"sample": PARAMS["sample"], "device": "cpu"},
        wildcards={"run": "handmade", "seed": 3},
        log=root / "logs" / "sample.log",
    )
    run_script("sample", smk)
    return out / "s3.npy"


def test_sample_script_writes_seeded_uint8_samples_and_their_grid(model_dir, samples_path):
    samples = np.load(samples_path)
    assert samples.shape == (8, 8, 8, 1) and samples.dtype == np.uint8
    cfg = PARAMS["sample"]
    expected = generate(
        model_dir, num_samples=8, steps=cfg["steps"], batch_size=cfg["batch_size"], seed=3,
        device="cpu", progress=False,
    )  # fmt: skip
    np.testing.assert_array_equal(samples, expected)  # the wildcard seed is the sampling seed
    with Image.open(samples_path.with_suffix(".png")) as grid:
        assert grid.size[0] >= 2 * 8 and grid.size[1] >= 2 * 8


@pytest.fixture(scope="module")
def classifier_path(root, stores):
    out = root / "classifier"
    smk = fake_snakemake(
        input=files(train=stores["train"], test=stores["test"]),
        output=files(model=out / "classifier.pt", metrics=out / "classifier.json"),
        params={"classifier": PARAMS["classifier"], "resolution": 8},
        log=root / "logs" / "classifier.log",
    )
    run_script("classifier", smk)
    return out / "classifier.pt"


def test_classifier_script_refuses_a_single_class_naming_the_param(tmp_path):
    one = {split: write_store(tmp_path / split, np.zeros(8), seed=3) for split in ("train", "test")}
    smk = fake_snakemake(
        input=files(train=one["train"], test=one["test"]),
        output=files(model=tmp_path / "c.pt", metrics=tmp_path / "c.json"),
        params={"classifier": PARAMS["classifier"], "resolution": 8},
        log=tmp_path / "classifier.log",
    )
    with pytest.raises(DataError, match=r"at least 2 classes.* remove 'classifier' from evaluate"):
        run_script("classifier", smk)


def test_classifier_script_records_its_data_and_accuracy(classifier_path):
    meta = io.load_json(classifier_path.with_suffix(".json"))
    assert meta["num_classes"] == 4 and meta["class_names"] == CLASSES
    assert meta["n_train"] == 48 and meta["n_test"] == 24 and meta["resolution"] == 8
    assert 0.0 <= meta["test_accuracy"] <= 1.0


@pytest.fixture(scope="module")
def references(root, stores, classifier_path):
    """reference.py for both splits and features, modes.py for the training features."""
    paths = {"test": [], "train": [], "modes": []}
    for feature in PARAMS["evaluate"]["features"]:
        for split in ("train", "test"):
            out = root / "references" / f"{split}_{feature}.npz"
            inputs = {"store": stores[split]}
            if feature == "classifier":
                inputs["classifier"] = classifier_path
            smk = fake_snakemake(
                input=files(**inputs),
                output=files(out),
                params={"evaluate": PARAMS["evaluate"], "resolution": 8},
                wildcards={"split": split, "feature": feature},
                log=root / "logs" / f"reference_{split}_{feature}.log",
            )
            run_script("reference", smk)
            paths[split].append(out)
        modes = root / "modes" / f"{feature}.npy"
        smk = fake_snakemake(
            input=files(paths["train"][-1]),
            output=files(modes),
            params={"cluster": PARAMS["cluster"]},
            wildcards={"feature": feature},
            log=root / "logs" / f"modes_{feature}.log",
        )
        run_script("modes", smk)
        paths["modes"].append(modes)
    return paths


def test_reference_and_modes_scripts_describe_each_split_in_each_feature_space(references):
    from diffprune.metrics import load_reference

    for (split, n), feature in [(s, f) for s in (("train", 48), ("test", 24)) for f in (0, 1)]:
        stats = load_reference(references[split][feature])
        assert stats["features"].shape[0] == n
        np.testing.assert_allclose(stats["mu"], stats["features"].mean(axis=0), rtol=1e-6)
    for modes, dim in zip(references["modes"], (None, 1280), strict=True):
        centroids = np.load(modes)
        assert centroids.shape[0] == PARAMS["cluster"]["k"]
        assert dim is None or centroids.shape[1] == dim


def test_evaluate_script_writes_the_librarys_metrics_with_the_manifests_kept_rows(
    root, stores, manifest_path, model_dir, samples_path, classifier_path, references
):
    meta = manifest_path.with_suffix(".json")
    io.save_json(
        meta,
        {
            "run": "handmade", "method": "random", "ratio": 0.75, "seed": 0, "n_total": 48,
            "n_kept": 12, "kept_fraction": 0.25, "compute": {"total_seconds": 0.5},
        },
    )  # fmt: skip
    out = root / "metrics" / "handmade" / "s0.json"
    smk = fake_snakemake(
        input=files(
            samples=samples_path,
            manifest=manifest_path,
            manifest_meta=meta,
            model=model_dir,
            train_index=stores["train"][1],
            test_references=references["test"],
            train_references=references["train"],
            modes=references["modes"],
            classifier=classifier_path,
        ),
        output=files(out),
        params={"evaluate": PARAMS["evaluate"], "resolution": 8},
        wildcards={"run": "handmade", "seed": 0},
        log=root / "logs" / "evaluate.log",
    )
    run_script("evaluate", smk)
    record = io.load_json(out)
    assert record["status"] == "ok" and record["run"] == "handmade" and record["n_kept"] == 12
    for key in (
        "fd_classifier",
        "fd_efficientnet_lite0",
        "class_kl",
        "novelty_kept_mean_classifier",
    ):
        assert math.isfinite(record[key]), key
    assert record["fd_classifier"] >= 0 and record["num_samples"] == 8
    assert sum(record["class_shares_train"]) == pytest.approx(1.0)
    assert set(record["feature_extractors"]) == {"classifier", "efficientnet_lite0"}
    # every number is the library's, with the manifest's kept rows as the kept subset
    extractors = {
        feature: load_feature_extractor(
            feature, resolution=8, classifier_path=classifier_path, image_size=32, device="cpu"
        )
        for feature in PARAMS["evaluate"]["features"]
    }
    features = PARAMS["evaluate"]["features"]
    expected = evaluate_samples(
        np.load(samples_path),
        extractors=extractors,
        test_references=dict(zip(features, references["test"], strict=True)),
        train_references=dict(zip(features, references["train"], strict=True)),
        modes=dict(zip(features, references["modes"], strict=True)),
        kept_ids=np.flatnonzero(np.arange(48) % 4 == 1),
    )
    expected |= class_balance(
        np.load(samples_path),
        classifier_path=classifier_path,
        train_labels=pd.read_parquet(stores["train"][1])["label"].to_numpy(),
    )
    for key, value in expected.items():
        if isinstance(value, float):
            assert record[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
        else:
            assert record[key] == value, key


# ---------------------------------------------------------------------------------------- report
def test_report_script_reproduces_the_committed_claims_from_the_committed_metrics(tmp_path):
    """results/ holds the study's metrics and the claims the report drew from them."""
    results = REPO / "results"
    metrics = sorted((results / "metrics").glob("*/s*.json"))
    grids = sorted((results / "samples").glob("*.png"))
    assert len(metrics) == len(grids) > 0
    cfg = PARAMS["report"]
    report_metrics = list(dict.fromkeys([cfg["metric"], *cfg["metrics"]]))
    out = tmp_path / "results"
    smk = fake_snakemake(
        input=files(
            metrics=metrics, grids=grids, skew=results / "skew" / "skew.csv", clusters_meta=[]
        ),
        output=files(
            tables=[out / "tables" / f"{m}.{ext}" for ext in ("csv", "md") for m in report_metrics],
            plots=[out / "plots" / f"{m}.png" for m in report_metrics],
            cost=out / "plots" / "cost.png",
            mosaic=out / "samples.png",
            markdown=out / "report.md",
            claims_md=out / "claims.md",
            claims_csv=out / "claims.csv",
            summary=out / "summary.csv",
        ),
        params={"study": PARAMS["study"], "report": cfg},
        log=tmp_path / "logs" / "report.log",
    )
    run_script("report", smk)
    claims = pd.read_csv(out / "claims.csv")
    assert claims["claim"].tolist() == ["C1", "C2", "C3", "C4"]
    pd.testing.assert_frame_equal(claims, pd.read_csv(results / "claims.csv"))
    for path in smk.output:
        assert Path(path).is_file(), path
    summary = pd.read_csv(out / "summary.csv")
    assert len(summary) == len(metrics)
