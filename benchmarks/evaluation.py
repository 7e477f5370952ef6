"""One evaluation job with and without the reference rule's neighbour statistics.

Without them (the old reference files) every job recomputes, per feature space, the test set's
precision/recall radii and the training set's near-copy thresholds (full and kept subset);
with them it reads the radii and finds the thresholds through each row's stored neighbours.
Both give the same metrics (checked here and in tests/test_evaluate.py). Sizes are the default
study's: 10,000 training and 2,000 test images, 512 samples, half of the training set kept,
feature spaces of the classifier's 128 and EfficientNet-Lite0's 1,280 dimensions. The features
are fixed random projections of random 28x28 images: the cost depends on the sizes only.
Like the evaluate rule (`threads: 1`), the jobs run on one thread; best of `repeats`.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
from rows import one_thread, row, timed

from diffprune.evaluate import evaluate_samples
from diffprune.features import FeatureExtractor
from diffprune.metrics import reference_neighbours, reference_stats, save_reference

SPACES = {"classifier": 128, "efficientnet-lite0": 1280}


def projection(dim: int, seed: int) -> FeatureExtractor:
    weights = np.random.default_rng(seed).normal(size=(28 * 28, dim)) / 28

    def fn(batch: np.ndarray) -> np.ndarray:
        return batch.reshape(len(batch), -1).astype(np.float64) / 255 @ weights

    return fn


def bench_evaluate(
    n_train: int = 10_000, n_test: int = 2_000, n_samples: int = 512, repeats: int = 2
) -> list[dict]:
    rng = np.random.default_rng(0)
    images = {
        split: rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)
        for split, n in (("train", n_train), ("test", n_test), ("samples", n_samples))
    }
    extractors = {
        name: FeatureExtractor(name, dim, projection(dim, seed))
        for seed, (name, dim) in enumerate(SPACES.items())
    }
    kept_ids = np.sort(rng.choice(n_train, n_train // 2, replace=False))
    precompute_s = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        refs: dict[str, dict[str, dict[str, Path]]] = {"plain": {}, "neighbours": {}}
        for name, extractor in extractors.items():
            for split in ("train", "test"):
                feats = extractor(images[split])
                stats = reference_stats(feats)
                start = time.perf_counter()
                neighbours = reference_neighbours(feats)
                precompute_s += time.perf_counter() - start
                for kind, content in (("plain", stats), ("neighbours", stats | neighbours)):
                    path = Path(tmp) / f"{kind}_{split}_{name}.npz"
                    save_reference(path, content)
                    refs[kind].setdefault(split, {})[name] = path
            np.save(Path(tmp) / f"modes_{name}.npy", extractor(images["train"][:10]))

        def job(kind: str) -> dict:
            return evaluate_samples(
                images["samples"],
                extractors=extractors,
                test_references=refs[kind]["test"],
                train_references=refs[kind]["train"],
                modes={name: Path(tmp) / f"modes_{name}.npy" for name in extractors},
                kept_ids=kept_ids,
            )

        with one_thread():
            old_s, old = timed(lambda: job("plain"), repeats)
            new_s, new = timed(lambda: job("neighbours"), repeats)
    same = "identical metrics" if old == new else "METRICS DIFFER"
    return [
        row(
            "evaluate job: reference neighbour statistics reused",
            baseline="evaluate job recomputing them",
            value=new_s, baseline_value=old_s, unit="s",
            notes=f"one thread, best of {repeats}; {n_samples} samples, {n_train} train / {n_test} "
            f"test rows, 128-d and 1280-d spaces; {same}; computed once per space by the "
            f"reference rule: {precompute_s:.1f} s",
        )
    ]  # fmt: skip
