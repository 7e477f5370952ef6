import logging
import re

import numpy as np
import pytest

from diffprune.evaluate import check_samples, evaluate_samples, metrics_record
from diffprune.features import FeatureExtractor
from diffprune.metrics import reference_neighbours, reference_stats, save_reference

SELECTION = {
    "run": "random-r0.5",
    "method": "random",
    "ratio": 0.5,
    "seed": 0,
    "n_total": 100,
    "n_kept": 50,
    "kept_fraction": 0.5,
    "compute": {"total_seconds": 1.5},
}
IDENTITY = {
    "run": "random-r0.5",
    "method": "random",
    "ratio": 0.5,
    "seed": 0,
    "n_total": 100,
    "n_kept": 50,
    "kept_fraction": 0.5,
    "selection_seconds": 1.5,
}
TRAINED = {
    "status": "ok",
    "steps": 400,
    "wall_seconds": 60.0,
    "cfg": {},
    "machine": {"cpu": "Some CPU", "gpus": []},
}
FAILED = {
    "status": "failed",
    "failure": "training diverged at step 120: mean loss nan since step 100",
    "steps": 400,
    "failed_at_step": 120,
    "cfg": {},
}


def normal_samples(n=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 1), dtype=np.uint8)


def record(training, samples):
    calls = []

    def compute_metrics():
        calls.append(1)
        return {"fd_classifier": 12.5, "num_samples": len(samples)}

    result = metrics_record(
        selection=SELECTION, training=training, samples=samples, compute_metrics=compute_metrics
    )
    return result, len(calls)


@pytest.mark.parametrize(
    ("samples", "reason"),
    [
        (np.zeros((0, 8, 8, 1), np.uint8), r"no samples: empty array of shape \(0, 8, 8, 1\)"),
        (np.full((4, 8, 8, 1), np.nan, np.float32), "256 of 256 sample values are not finite"),
        (np.where(np.eye(8)[None, :, :, None], np.inf, 0.5).repeat(2, 0), "16 of 128"),
        (np.zeros((16, 8, 8, 1), np.uint8), "every pixel of every sample is 0"),
        (np.full((3, 8, 8, 3), 0.25, np.float32), "every pixel of every sample is 0.25"),
        (np.repeat(normal_samples(1), 16, axis=0), "all samples are .nearly. identical"),
    ],
)
def test_check_samples_refuses_bad_samples(samples, reason):
    assert re.search(reason, check_samples(samples) or "")


def test_check_samples_refuses_nearly_identical_samples():
    samples = np.repeat(normal_samples(1).astype(np.int16), 16, axis=0)
    samples[1:, 0, 0, 0] += 1  # one grey level in one pixel: still one image
    assert "identical" in check_samples(samples.clip(0, 255).astype(np.uint8))


@pytest.mark.parametrize(
    "samples",
    [
        normal_samples(),
        normal_samples(1),  # one sample cannot be compared with others
        normal_samples().astype(np.float32) / 255,
        np.eye(8, dtype=np.uint8)[None, :, :, None]
        * np.arange(0, 240, 60, dtype=np.uint8)[:, None, None, None],
    ],
)
def test_check_samples_passes_normal_samples(samples):
    assert check_samples(samples) is None


def test_metrics_record_of_a_good_run_has_status_ok_and_metrics():
    result, calls = record(TRAINED, normal_samples())
    assert calls == 1
    assert result == {
        **IDENTITY,
        "train_seconds": 60.0,
        "train_steps": 400,
        "train_machine": "Some CPU",
        "status": "ok",
        "fd_classifier": 12.5,
        "num_samples": 16,
    }


def test_metrics_record_of_a_failed_training_has_no_metric_numbers(caplog):
    with caplog.at_level(logging.ERROR, logger="diffprune.evaluate"):
        result, calls = record(FAILED, np.zeros((0, 8, 8, 1), np.uint8))
    assert calls == 0  # FD is never computed on a failed run
    assert result == {
        **IDENTITY,
        "train_seconds": None,
        "train_steps": 400,
        "train_machine": None,  # a failed run's record has no machine
        "status": "failed",
        "failure": f"training failed: {FAILED['failure']}",
    }
    assert "random-r0.5" in caplog.text and "training diverged at step 120" in caplog.text


def test_metrics_record_of_bad_samples_from_a_trained_model_has_no_metric_numbers():
    result, calls = record(TRAINED, np.zeros((16, 8, 8, 1), np.uint8))
    assert calls == 0 and result["status"] == "failed"
    assert result["failure"].startswith("bad samples: every pixel of every sample is 0")
    assert not any(key.startswith("fd_") for key in result)


def pixel_features(batch: np.ndarray) -> np.ndarray:
    """Flattened pixels, a real (if plain) feature space of 64 dimensions for 8x8 gray images."""
    return batch.reshape(len(batch), -1).astype(np.float64)


def test_stored_neighbour_statistics_give_the_same_metrics(tmp_path):
    """References with the reference rule's neighbour statistics change no number, only the cost."""
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (300, 8, 8, 1), dtype=np.uint8)
    train[:20] = train[20:40]  # duplicates: near-copy thresholds of 0 must agree too
    test = rng.integers(0, 256, (120, 8, 8, 1), dtype=np.uint8)
    samples = np.concatenate([train[:10], normal_samples(30, seed=1)])
    np.save(tmp_path / "modes.npy", pixel_features(train[::30]))
    kept_ids = np.flatnonzero(rng.random(300) < 0.4)
    extractors = {"classifier": FeatureExtractor("classifier", 64, pixel_features)}
    metrics = {}
    for kind in ("plain", "with_neighbours"):
        paths = {}
        for split, images in (("train", train), ("test", test)):
            feats = pixel_features(images)
            stats = reference_stats(feats)
            if kind == "with_neighbours":
                stats |= reference_neighbours(feats, neighbours=4)  # few: some rows search all
            paths[split] = tmp_path / f"{kind}_{split}.npz"
            save_reference(paths[split], stats)
        metrics[kind] = evaluate_samples(
            samples,
            extractors=extractors,
            test_references={"classifier": paths["test"]},
            train_references={"classifier": paths["train"]},
            modes={"classifier": tmp_path / "modes.npy"},
            kept_ids=kept_ids,
        )
    assert metrics["with_neighbours"] == metrics["plain"]
    assert metrics["plain"]["near_copy_share_classifier"] > 0
