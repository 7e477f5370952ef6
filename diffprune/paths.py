"""The one place that knows where every artifact lives.

Large artifacts go under `data/` (git-ignored, versioned by DVC); small results that the README
shows go under `results/` (committed). Every function accepts Snakemake wildcard strings as well as
values, so `manifest("{run}", "{seed}")` is the rule's output pattern and
`manifest("random_r0.5", 0)` the concrete file.
"""

from __future__ import annotations

from pathlib import Path

DATA = Path("data")
RESULTS = Path("results")
LOGS = Path("logs")


# download
def store(split: str) -> Path:
    return DATA / "store" / split


def store_images(split: str) -> Path:
    return store(split) / "images.npy"


def store_index(split: str) -> Path:
    return store(split) / "index.parquet"


def store_meta(split: str) -> Path:
    return store(split) / "store.json"


# embed
def embeddings() -> Path:
    return DATA / "embed" / "embeddings.npy"


def embeddings_meta() -> Path:
    return DATA / "embed" / "embeddings.json"


def embeddings_shard(shard: int | str, shards: int | str) -> Path:
    """Rows of one shard job (embed.shards > 1), gathered into embeddings(); N in the name, so
    shards made for another N are never mixed in."""
    return DATA / "embed" / "shards" / f"{shard}-of-{shards}.npy"


def embeddings_shard_meta(shard: int | str, shards: int | str) -> Path:
    return DATA / "embed" / "shards" / f"{shard}-of-{shards}.json"


# autoencoder and encode: the latent space of the DiT (diffprune.autoencoder)
def autoencoder() -> Path:
    """Folder: diffusers' save_pretrained files plus autoencoder.json (scale factor, quality)."""
    return DATA / "autoencoder"


def autoencoder_checkpoints() -> Path:
    """Resumable autoencoder training state; not a declared output, so a failed job keeps it."""
    return DATA / "checkpoints" / "autoencoder"


def latents() -> Path:
    """float16 (N, C, h, w) posterior means of the train store, UNSCALED, in store order."""
    return DATA / "latents" / "latents.npy"


def latents_meta() -> Path:
    return DATA / "latents" / "latents.json"


def latents_shard(shard: int | str, shards: int | str) -> Path:
    """Rows of one encode shard job (autoencoder.encode_shards > 1), gathered into latents()."""
    return DATA / "latents" / "shards" / f"{shard}-of-{shards}.npy"


def latents_shard_meta(shard: int | str, shards: int | str) -> Path:
    return DATA / "latents" / "shards" / f"{shard}-of-{shards}.json"


# The evidence selection rules rank by (clusters, scores) shares one folder, so that a DVC stage can
# depend on it whatever the grid holds.
EVIDENCE = DATA / "evidence"


# cluster
def clusters() -> Path:
    return EVIDENCE / "clusters.parquet"


def centroids() -> Path:
    return EVIDENCE / "centroids.npy"


def clusters_meta() -> Path:
    return EVIDENCE / "clusters.json"


# score-based selection: surrogates trained once, scores computed once, every ratio reuses them
def surrogate(kind: str) -> Path:
    """`full`: one surrogate on all training data; `moso`: MoSo's disjoint-subset surrogates."""
    return DATA / "surrogates" / kind


def surrogate_checkpoints(kind: str) -> Path:
    return DATA / "checkpoints" / "surrogates" / kind


def scores(name: str) -> Path:
    return EVIDENCE / f"{name}.npy"


def scores_meta(name: str) -> Path:
    return EVIDENCE / f"{name}.json"


# Outside EVIDENCE: a DVC stage depends on that whole folder, which must not hold partial rows.
SCORE_SHARDS = DATA / "score_shards"


def scores_shard(name: str, shard: int | str, shards: int | str) -> Path:
    """Rows of one score shard job (scores.shards > 1, el2n and grand), gathered into scores()."""
    return SCORE_SHARDS / name / f"{shard}-of-{shards}.npy"


def scores_shard_meta(name: str, shard: int | str, shards: int | str) -> Path:
    return SCORE_SHARDS / name / f"{shard}-of-{shards}.json"


# per run: select, train, sample, evaluate
def run_dir(run: str, seed: int | str) -> Path:
    return DATA / "runs" / str(run) / f"s{seed}"


def manifest(run: str, seed: int | str) -> Path:
    return run_dir(run, seed) / "manifest.parquet"


def manifest_meta(run: str, seed: int | str) -> Path:
    return run_dir(run, seed) / "manifest.json"


def model(run: str, seed: int | str) -> Path:
    """Final EMA weights in diffusers' save_pretrained layout (a folder)."""
    return run_dir(run, seed) / "model"


def checkpoints(run: str, seed: int | str) -> Path:
    """Resumable training state; not a declared output, so a failed job keeps it."""
    return DATA / "checkpoints" / str(run) / f"s{seed}"


def train_log(run: str, seed: int | str) -> Path:
    """dvclive folder with the training-loss curve."""
    return run_dir(run, seed) / "dvclive"


def samples(run: str, seed: int | str) -> Path:
    return run_dir(run, seed) / "samples.npy"


def sample_grid(run: str, seed: int | str) -> Path:
    return RESULTS / "samples" / f"{run}_s{seed}.png"


def metrics(run: str, seed: int | str) -> Path:
    return RESULTS / "metrics" / str(run) / f"s{seed}.json"


# evaluation references
def classifier() -> Path:
    return DATA / "classifier" / "model.pt"


def classifier_metrics() -> Path:
    return RESULTS / "classifier.json"


def reference(split: str, feature: str) -> Path:
    """Features and Gaussian statistics of one split's real images in one feature space."""
    return DATA / "reference" / split / f"{feature}.npz"


def modes(feature: str) -> Path:
    """k-means centroids of the training images in one feature space (for mode coverage)."""
    return DATA / "reference" / "modes" / f"{feature}.npy"


# fairness study
def skew_table(ext: str) -> Path:
    return RESULTS / "skew" / f"skew.{ext}"


def skew_plot() -> Path:
    return RESULTS / "skew" / "class_shares.png"


# report: `root` is params report.dir, so a second study (e.g. workflow/studies/scores.yaml) keeps
# its own tables while sharing every run it has in common with the default study.
def report_table(metric: str, ext: str, root: str | Path = RESULTS) -> Path:
    return Path(root) / "tables" / f"{metric}.{ext}"


def report_plot(name: str, root: str | Path = RESULTS) -> Path:
    return Path(root) / "plots" / f"{name}.png"


def report_markdown(root: str | Path = RESULTS) -> Path:
    """Every table with its caption, for the README."""
    return Path(root) / "report.md"


def claims(ext: str, root: str | Path = RESULTS) -> Path:
    """The paper's claims judged from the runs (`md` for the README, `csv` for tools)."""
    return Path(root) / f"claims.{ext}"


def summary(root: str | Path = RESULTS) -> Path:
    """One row per run and seed with every metric."""
    return Path(root) / "summary.csv"


def sample_mosaic(root: str | Path = RESULTS) -> Path:
    return Path(root) / "samples.png"


def log(rule: str, name: str = "") -> Path:
    return LOGS / rule / f"{name or rule}.log"


def written_folders() -> list[Path]:
    """Every folder the workflow writes into, besides report.dir (an image source must neither
    be inside one nor hold one; tests/test_faults.py checks every path above falls in one)."""
    data = [
        store("train").parent, embeddings().parent, autoencoder(), latents().parent, EVIDENCE,
        SCORE_SHARDS,
        surrogate("k").parent, autoencoder_checkpoints().parent, run_dir("r", 0).parent.parent,
        classifier().parent, reference("s", "f").parent.parent,
    ]  # fmt: skip
    return [*data, RESULTS, LOGS]
