"""The paper's setup through the real Snakefile: a tiny latent study end to end on CPU, and the
CelebA-HQ and ImageNet profiles resolved against fake local datasets."""

import json
import re

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from diffprune import paths
from tests.workflow_helpers import (
    REPO,
    make_project,
    planned_jobs,
    snakemake,
    tiny_params,
    write_params,
)

pytestmark = pytest.mark.slow


def latent_params(**study) -> dict:
    """The tiny study in latent space: trained autoencoder (f2), conditional DiT, guidance."""
    params = tiny_params(
        study={**tiny_params()["study"], "methods": ["random"], "seeds": [0], "extra_runs": []}
        | study,
        skew={**tiny_params()["skew"], "arms": []},
    )
    params["autoencoder"] |= {
        "block_channels": [8, 16], "latent_channels": 4, "steps": 4, "batch_size": 8,
        "encode_batch_size": 64,
    }  # fmt: skip
    params["train"] |= {
        "model": "dit", "space": "latent", "dit_size": "custom",
        "dit": {"depth": 1, "width": 16, "heads": 2, "patch": 2},
        "conditional": True, "label_dropout": 0.5, "objective": "flow",
    }  # fmt: skip
    params["sample"] |= {"guidance_scale": 2.0}
    return params


@pytest.fixture(scope="module")
def latent_study(tmp_path_factory):
    root = make_project(tmp_path_factory.mktemp("latent"), latent_params())
    snakemake(root)
    return root


def test_tiny_latent_study_runs_end_to_end(latent_study):
    info = json.loads((latent_study / paths.autoencoder() / "autoencoder.json").read_text())
    assert info["source"] == "train" and info["latent_shape"] == [4, 4, 4]
    assert info["scale_factor"] > 0 and np.isfinite(info["reconstruction"]["psnr"])
    latents = np.load(latent_study / paths.latents(), mmap_mode="r")
    assert latents.shape == (120, 4, 4, 4) and latents.dtype == np.float16
    trained = json.loads((latent_study / paths.model("full", 0) / "train.json").read_text())
    assert trained["cfg"]["model"] == "dit" and trained["num_classes"] == 10
    assert trained["latent"]["scale_factor"] == pytest.approx(info["scale_factor"])
    samples = np.load(latent_study / paths.samples("random_r0.5", 0))
    assert samples.shape == (16, 8, 8, 1) and samples.dtype == np.uint8  # decoded, grey
    metrics = json.loads((latent_study / paths.metrics("random_r0.5", 0)).read_text())
    assert metrics["status"] == "ok" and np.isfinite(metrics["fd_classifier"])
    summary = pd.read_csv(latent_study / paths.summary())
    assert set(summary["run"]) == {"full", "random_r0.5"}


def test_changing_a_ratio_does_not_rerun_the_autoencoder_or_encoding(latent_study):
    write_params(latent_study, latent_params(ratios=[0.5, 0.75]))
    try:
        rules = {job["rule"] for job in planned_jobs(latent_study)}
    finally:
        write_params(latent_study, latent_params())
    assert "train" in rules and not rules & {"autoencoder", "encode", "download", "embed"}
    params = latent_params()
    params["autoencoder"]["steps"] = 5
    write_params(latent_study, params)
    try:
        rules = {job["rule"] for job in planned_jobs(latent_study)}
    finally:
        write_params(latent_study, latent_params())
    assert {"autoencoder", "encode", "train", "sample", "evaluate", "report"} <= rules


def fake_imagefolder(root, classes=3, per_class=2):
    for c in range(classes):
        (root / f"n{c:08d}").mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (20, 16), (40 * c, 10 * i, 90)).save(root / f"n{c:08d}" / f"{i}.JPEG")
    return root


def fake_huggingface(root):
    datasets = pytest.importorskip("datasets")
    split = datasets.Dataset.from_dict(
        {"image": [Image.new("RGB", (12, 12), (i, 0, 0)) for i in range(4)]},
        features=datasets.Features({"image": datasets.Image()}),
    )
    datasets.DatasetDict({"train": split, "validation": split}).save_to_disk(root)
    return root


@pytest.mark.parametrize("profile", ["celebahq", "imagenet"])
def test_paper_profiles_resolve_against_a_local_stand_in(profile, tmp_path):
    root = make_project(tmp_path / "project", tiny_params())
    if profile == "celebahq":
        local = {"data": {"hf_name": str(fake_huggingface(tmp_path / "celeba-hq"))}}
    else:
        local = {
            "data": {
                "path": str(fake_imagefolder(tmp_path / "imagenet" / "train")),
                "test_path": str(fake_imagefolder(tmp_path / "imagenet" / "val")),
            }
        }
    (root / "local.yaml").write_text(yaml.safe_dump(local))
    profile_file = f"workflow/studies/{profile}.yaml"
    out = snakemake(root, "--dry-run", "--configfile", profile_file, "local.yaml")
    text = out.stdout + out.stderr
    planned = set(re.findall(r"^\s*rule (\w+):$", text, flags=re.M))
    assert {"download", "embed", "cluster", "autoencoder", "encode", "train", "sample"} <= planned
    assert {"evaluate", "reference", "report"} <= planned
    assert "classifier" not in planned  # Inception features only: no labels needed
    settings = yaml.safe_load((REPO / profile_file).read_text())
    assert settings["train"]["dit_size"] == "XL/2" and settings["train"]["space"] == "latent"
    assert "runs/full/s0/model" in text
