"""Snakemake script for rule `classifier`: train the evaluation classifier on real images."""

from diffprune import io, machine
from diffprune.classifier import classifier_accuracy, save_classifier, train_classifier
from diffprune.data import load_store
from diffprune.errors import DataError
from diffprune.logs import setup, stopwatch

setup(snakemake.log[0], threads=snakemake.threads)
cfg, resolution = snakemake.params.classifier, snakemake.params.resolution
train_store = load_store(snakemake.input.train[0].rsplit("/", 1)[0])
test_store = load_store(snakemake.input.test[0].rsplit("/", 1)[0])
labels = train_store.index["label"].to_numpy()
if (labels < 0).any():
    raise DataError(
        "the classifier feature space needs labels, and this image store has none; "
        "remove 'classifier' from evaluate.features"
    )
num_classes = int(labels.max()) + 1
if num_classes < 2:
    raise DataError(
        f"the classifier feature space needs at least 2 classes, and this image store has "
        f"{num_classes} ({train_store.meta.get('class_names')}); remove 'classifier' from "
        "evaluate.features (and its metrics from report.*)"
    )
with stopwatch() as timing:
    model = train_classifier(
        train_store.images,
        labels,
        num_classes=num_classes,
        resolution=resolution,
        epochs=cfg["epochs"],
        batch_size=cfg["batch_size"],
        lr=cfg["lr"],
        seed=cfg["seed"],
        device=cfg.get("device", "auto"),
    )
accuracy = classifier_accuracy(
    model,
    test_store.images,
    test_store.index["label"].to_numpy(),
    resolution=resolution,
)
meta = {
    "test_accuracy": accuracy,
    "num_classes": num_classes,
    "class_names": train_store.meta.get("class_names"),
    "resolution": resolution,
    "n_train": len(labels),
    "n_test": len(test_store.index),
    "seconds": timing["seconds"],
    "machine": machine.describe(),
}
save_classifier(model, snakemake.output.model, meta=meta)
io.save_json(snakemake.output.metrics, meta)
