import functools
import logging
import os
import signal
import tracemalloc

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from diffusers import DDPMPipeline
from torch.utils.flop_counter import FlopCounterMode

from diffprune import io, train_data
from diffprune import train as train_module
from diffprune.checkpoints import array_sha256
from diffprune.config import load_params, validate_params
from diffprune.data import load_store, to_model_input
from diffprune.diffusion import build_model, build_scheduler, draw, null_label, per_sample_loss
from diffprune.ema import ema_decay, update_ema
from diffprune.errors import ConfigError, DataError, TrainingDiverged
from diffprune.launch import accelerate_command, is_main
from diffprune.model_folder import load_model, save_model
from diffprune.status import write_failed_model
from diffprune.train import CHECKPOINT, train
from diffprune.train_data import batch_labels
from tests.conftest import TINY_UNET
from tests.test_faults import REPO, WEIGHTS, finish, training_pid
from tests.test_faults import TINY as FAULT_TINY
from tests.test_faults import project as project  # a fixture
from tests.test_faults import snakemake as fault_snakemake

TINY = {**TINY_UNET, "batch_size": 8, "lr": 2e-3, "checkpoint_every": 3, "log_every": 1}


# A conditional two-block DiT with flow matching; label dropout 0.5 so that a few steps drop some.
DIT = {
    **{k: v for k, v in TINY.items() if k not in ("block_channels", "layers_per_block")},
    "model": "dit",
    "objective": "flow",
    "dit_size": "custom",
    "dit": {"depth": 2, "width": 32, "heads": 2, "patch": 2},
    "conditional": True,
    "label_dropout": 0.5,
}
LATENT = {"autoencoder": "data/autoencoder", "scale_factor": 0.5}


def tiny(**overrides):
    return {**TINY, **overrides}


def latents(n=12, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 4, 8, 8)).astype(np.float32)


def labels(n=12, seed=0):
    return np.random.default_rng(seed).integers(0, 3, n)


def run_dit(tmp_path, name, **kwargs):
    """`run` for the conditional DiT on latents (3 classes)."""
    kwargs = {
        "images": None,
        "latents": latents(),
        "latent": LATENT,
        "labels": labels(),
        "num_classes": 3,
        "cfg": DIT,
        **kwargs,
    }
    return run(tmp_path, name, **kwargs)


def images(n=12, seed=0, size=8):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 1), dtype=np.uint8)


def run(tmp_path, name, **kwargs):
    kwargs = {"images": images(), "cfg": TINY, "seed": 0, "progress": False, **kwargs}
    return train(
        out_dir=tmp_path / name / "model", checkpoint_dir=tmp_path / name / "ckpt", **kwargs
    )


def state_of(model_dir):
    return load_model(model_dir)[0].state_dict()


def same_weights(dir_a, dir_b):
    a, b = state_of(dir_a), state_of(dir_b)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Crash(RuntimeError):
    pass


def crash_at(crash_step):
    def on_snapshot(step, model, ema):
        assert model.training and not ema.training
        if step == crash_step:
            raise Crash(f"simulated crash at step {step}")

    return on_snapshot


def poison_at(poison_step):
    """on_snapshot that sets the training weights to NaN at one step: a simulated divergence."""

    def on_snapshot(step, model, ema):
        if step == poison_step:
            with torch.no_grad():
                for param in model.parameters():
                    param.fill_(float("nan"))

    return on_snapshot


def assert_good_checkpoint(path, step):
    state = torch.load(path, weights_only=True)
    assert state["step"] == step
    assert all(torch.isfinite(w).all() for w in [*state["model"].values(), *state["ema"].values()])


def mean_loss(model, cfg, x0, seed=123):
    scheduler = build_scheduler(cfg)
    noise, t = draw(x0, scheduler, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return per_sample_loss(
            model, scheduler, x0, noise=noise, timesteps=t, objective=cfg["objective"]
        ).mean()


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_training_reduces_loss_on_constant_images(tmp_path, objective):
    cfg = tiny(objective=objective, steps=60, batch_size=16, log_every=10, checkpoint_every=30)
    flat = np.full((10, 8, 8, 1), 200, dtype=np.uint8)
    summary = train(
        images=flat,
        cfg=cfg,
        seed=0,
        out_dir=tmp_path / "model",
        checkpoint_dir=tmp_path / "ckpt",
        log_dir=tmp_path / "live",
        progress=False,
    )
    torch.manual_seed(0)  # the same initial weights as the run (train seeds before building)
    initial = build_model(cfg, in_channels=1).eval()
    trained, _, saved_cfg = load_model(tmp_path / "model")
    x0 = torch.full((256, 1, 8, 8), 200 / 127.5 - 1)
    before, after = mean_loss(initial, cfg, x0), mean_loss(trained, cfg, x0)
    assert after < 0.5 * before, (before, after)

    assert saved_cfg["objective"] == objective and saved_cfg["num_train_timesteps"] == 1000
    record = io.load_json(tmp_path / "model" / "train.json")
    assert record == {**summary, "cfg": saved_cfg}
    assert record["n_images"] == 10 and record["steps"] == 60 and record["seed"] == 0
    assert record["status"] == "ok"
    assert record["device"] == "cpu" and record["mixed_precision"] == "no"
    assert record["wall_seconds"] > 0 and record["resumed_from_step"] == 0
    assert record["machine"]["cpu"] and record["machine"]["torch"] == torch.__version__
    curve = pd.read_csv(tmp_path / "live" / "plots" / "metrics" / "loss.tsv", sep="\t")
    assert curve["step"].tolist() == [10, 20, 30, 40, 50, 60]
    assert record["final_loss"] == pytest.approx(curve["loss"].iloc[-1])
    assert curve["loss"].iloc[-1] < 0.5 * curve["loss"].iloc[0]
    assert not (tmp_path / "ckpt" / CHECKPOINT).exists()  # removed after success


def test_resume_after_crash_matches_uninterrupted_run(tmp_path):
    clean = run(tmp_path, "clean", keep_checkpoint=True)

    with pytest.raises(Crash):
        run(
            tmp_path, "crashed", snapshot_every=1, on_snapshot=crash_at(4), log_dir=tmp_path / "log"
        )
    checkpoint = tmp_path / "crashed" / "ckpt" / CHECKPOINT
    assert torch.load(checkpoint, weights_only=True)["step"] == 3
    assert not (tmp_path / "crashed" / "model").exists()

    snapshots = []
    resumed = run(
        tmp_path,
        "crashed",
        snapshot_every=2,
        on_snapshot=lambda step, model, ema: snapshots.append(step),
        log_dir=tmp_path / "log",
        keep_checkpoint=True,
    )
    assert resumed["resumed_from_step"] == 3 and clean["resumed_from_step"] == 0
    assert snapshots == [4, 6]
    assert resumed["final_loss"] == clean["final_loss"]
    assert same_weights(tmp_path / "clean" / "model", tmp_path / "crashed" / "model")
    # the training weights and optimizer state too, not only the EMA
    a = torch.load(tmp_path / "clean" / "ckpt" / CHECKPOINT, weights_only=True)
    b = torch.load(checkpoint, weights_only=True)
    for name, expected in a["model"].items():
        assert torch.equal(b["model"][name], expected), name
    assert a["optimizer"]["state"][0]["exp_avg_sq"].equal(b["optimizer"]["state"][0]["exp_avg_sq"])
    # the loss curve holds each step once: the resumed run replays the checkpoint's history
    curve = pd.read_csv(tmp_path / "log" / "plots" / "metrics" / "loss.tsv", sep="\t")
    assert curve["step"].tolist() == [1, 2, 3, 4, 5, 6]
    assert curve["loss"].iloc[-1] == pytest.approx(clean["final_loss"])


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"seed": 1}, "seed"),
        ({"images": images(seed=5)}, "images_sha256"),
        ({"cfg": tiny(lr=1e-3)}, "cfg_sha256"),
    ],
)
def test_checkpoint_of_another_run_is_ignored(tmp_path, caplog, change, reason):
    with pytest.raises(Crash):
        run(tmp_path, "a", snapshot_every=1, on_snapshot=crash_at(4))
    with caplog.at_level(logging.WARNING, logger="diffprune.train"):
        summary = run(tmp_path, "a", **change)
    assert summary["resumed_from_step"] == 0
    assert "ignoring checkpoint" in caplog.text and reason in caplog.text
    run(tmp_path, "b", **change)
    assert same_weights(tmp_path / "a" / "model", tmp_path / "b" / "model")


def test_log_and_checkpoint_cadence_do_not_invalidate_a_checkpoint(tmp_path):
    with pytest.raises(Crash):
        run(tmp_path, "a", snapshot_every=1, on_snapshot=crash_at(4))
    summary = run(tmp_path, "a", cfg=tiny(log_every=2, checkpoint_every=5))
    assert summary["resumed_from_step"] == 3


def test_same_seed_same_weights_other_seed_differs(tmp_path):
    run(tmp_path, "a")
    run(tmp_path, "b")
    run(tmp_path, "c", seed=1)
    assert same_weights(tmp_path / "a" / "model", tmp_path / "b" / "model")
    assert not same_weights(tmp_path / "a" / "model", tmp_path / "c" / "model")


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_save_load_round_trip_gives_identical_outputs(tmp_path, objective):
    cfg = tiny(objective=objective, attention=True)
    torch.manual_seed(0)
    model = build_model(cfg, in_channels=3).eval()
    save_model(model, build_scheduler(cfg), tmp_path / "m", cfg=cfg, summary={"note": "random"})
    loaded, scheduler, loaded_cfg = load_model(tmp_path / "m")
    assert not loaded.training and loaded_cfg["objective"] == objective
    assert type(scheduler) is type(build_scheduler(cfg))
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(scheduler.config) == public(build_scheduler(cfg).config)
    assert io.load_json(tmp_path / "m" / "train.json")["note"] == "random"
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 900])
    with torch.no_grad():
        assert torch.equal(loaded(x, t).sample, model(x, t).sample)
    if objective == "ddpm":  # a standard diffusers pipeline folder
        pipeline = DDPMPipeline.from_pretrained(tmp_path / "m")
        assert torch.equal(pipeline.unet.conv_in.weight, model.conv_in.weight)


def test_save_model_replaces_folder_atomically(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "stale.txt").write_text("old")
    torch.manual_seed(0)
    save_model(build_model(TINY, in_channels=1), build_scheduler(TINY), tmp_path / "m", cfg=TINY)
    assert not (tmp_path / "m" / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary left behind


def test_mixed_precision_settings_can_change_within_one_process(tmp_path):
    """bf16 autocast (CPU here, CUDA in the study) trains; a later call may use other settings."""
    bf16 = run(tmp_path, "bf16", cfg=tiny(mixed_precision="bf16", steps=2))
    full = run(tmp_path, "fp32", cfg=tiny(mixed_precision="no", steps=2))
    assert bf16["mixed_precision"] == "bf16" and full["mixed_precision"] == "no"
    assert np.isfinite(bf16["final_loss"]) and bf16["final_loss"] != full["final_loss"]


def test_bad_images_and_missing_model_raise(tmp_path):
    with pytest.raises(DataError, match="uint8 images"):
        run(tmp_path, "x", images=images().astype(np.float32))
    with pytest.raises(DataError, match="N >= 1"):
        run(tmp_path, "x", images=images()[:0])
    with pytest.raises(DataError, match=r"no train\.json"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match="snapshot_every must be >= 1"):
        run(tmp_path, "x", snapshot_every=0)
    with pytest.raises(
        DataError, match=r"kept rows as >= 1 integer ids in \[0, 12\), got int64\(0,\)"
    ):
        run(tmp_path, "x", rows=np.arange(0))
    with pytest.raises(DataError, match=r"integer ids in \[0, 12\)"):
        run(tmp_path, "x", rows=np.array([0, 12]))


def test_huge_learning_rate_raises_and_writes_no_model(tmp_path):
    with pytest.raises(
        TrainingDiverged, match=r"training diverged at step \d+: mean loss nan"
    ) as err:
        run(tmp_path, "x", cfg=tiny(lr=1000))
    assert err.value.step <= 3 and not (tmp_path / "x" / "model").exists()


def test_nan_loss_raises_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(TrainingDiverged) as err:
        run(tmp_path, "x", snapshot_every=1, on_snapshot=poison_at(4), log_dir=tmp_path / "log")
    checkpoint = tmp_path / "x" / "ckpt" / CHECKPOINT
    assert str(err.value) == (
        "training diverged at step 5: mean loss nan since step 4; "
        f"the last good checkpoint (step 3) is kept at {checkpoint}"
    )
    assert (err.value.step, err.value.last_good_step) == (5, 3)
    assert_good_checkpoint(checkpoint, 3)
    assert not (tmp_path / "x" / "model").exists()
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == [
        CHECKPOINT,
        "lock",
    ]  # no temporary


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    """Weights that turn NaN after the step's loss was logged are caught before the checkpoint."""
    cfg = tiny(checkpoint_every=2)
    with pytest.raises(TrainingDiverged, match="at step 4: non-finite model or EMA weights") as err:
        run(tmp_path, "x", cfg=cfg, snapshot_every=1, on_snapshot=poison_at(4))
    assert err.value.last_good_step == 2
    assert_good_checkpoint(tmp_path / "x" / "ckpt" / CHECKPOINT, 2)
    assert not (tmp_path / "x" / "model").exists()


def test_divergence_before_any_checkpoint_says_so(tmp_path):
    with pytest.raises(TrainingDiverged, match="no checkpoint was written") as err:
        run(tmp_path, "x", snapshot_every=1, on_snapshot=poison_at(1))
    assert (err.value.step, err.value.last_good_step) == (2, None)
    assert not (tmp_path / "x" / "ckpt" / CHECKPOINT).exists()


def test_failed_model_folder_records_the_failure_and_does_not_load(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "stale.txt").write_text("old")
    write_failed_model(
        tmp_path / "m", reason="training diverged at step 5", cfg=TINY, seed=2, step=5
    )
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["train.json"]
    record = io.load_json(tmp_path / "m" / "train.json")
    assert record.keys() == {
        "status", "failure", "cfg", "seed", "steps", "failed_at_step", "code_version"
    }  # fmt: skip
    assert record["status"] == "failed" and record["failure"] == "training diverged at step 5"
    assert (record["seed"], record["steps"], record["failed_at_step"]) == (2, 6, 5)
    assert record["cfg"]["lr"] == TINY["lr"] and record["cfg"]["attention"] is False
    with pytest.raises(DataError, match="failed: training diverged at step 5"):
        load_model(tmp_path / "m")


def test_conditional_dit_trains_on_latents_and_loads(tmp_path):
    summary = run_dit(tmp_path, "a")
    model, scheduler, cfg = load_model(tmp_path / "a" / "model")
    assert (tmp_path / "a" / "model" / "transformer" / "config.json").is_file()
    assert type(model).__name__ == "DiTTransformer2DModel" and not model.training
    assert type(scheduler).__name__ == "FlowMatchingScheduler"
    assert model.config.in_channels == 4 and model.config.sample_size == 8  # the latents' size
    assert null_label(model) == 3 and cfg["conditional"] and cfg["label_dropout"] == 0.5
    tables = [b.norm1.emb.class_embedder for b in model.transformer_blocks]
    assert all(t.dropout_prob == 0 and t.embedding_table.num_embeddings == 4 for t in tables)
    assert model.proj_out_2.weight.abs().sum() > 0  # trained away from the zero initialisation
    record = io.load_json(tmp_path / "a" / "model" / "train.json")
    assert record == {**summary, "cfg": cfg}
    assert record["latent"] == LATENT and record["num_classes"] == 3
    assert record["latents_sha256"] and record["labels_sha256"] and "images_sha256" not in record
    assert np.isfinite(record["final_loss"])


def test_unconditional_dit_trains_on_images_with_the_null_label(tmp_path):
    cfg = {**DIT, "conditional": False}
    summary = run(tmp_path, "a", cfg=cfg, labels=labels(), num_classes=3)  # labels are ignored
    model, _, _ = load_model(tmp_path / "a" / "model")
    assert null_label(model) == 0 and model.config.in_channels == 1
    assert summary["num_classes"] is None and summary["labels_sha256"] is None
    assert summary["latent"] is None and summary["images_sha256"]


def test_label_dropout_is_seeded_and_replaces_labels_by_the_null_label():
    rows = torch.arange(2000) % 10
    table = torch.arange(10) % 3

    def dropped(p, seed=0):
        generator = torch.Generator().manual_seed(seed)
        return batch_labels(table, rows, null=3, dropout=p, generator=generator)

    assert torch.equal(dropped(0.1), dropped(0.1)) and not torch.equal(
        dropped(0.1), dropped(0.1, 1)
    )
    assert torch.equal(dropped(0.0), table[rows])
    kept = dropped(0.1) != 3
    assert torch.equal(dropped(0.1)[kept], table[rows][kept])
    assert 0.07 < (~kept).float().mean() < 0.13
    unconditional = batch_labels(None, rows, null=0, dropout=0.1, generator=torch.Generator())
    assert torch.equal(unconditional, torch.zeros(2000, dtype=torch.int64))


def test_dit_same_seed_same_weights_and_label_dropout_matters(tmp_path):
    run_dit(tmp_path, "a")
    run_dit(tmp_path, "b")
    run_dit(tmp_path, "c", cfg={**DIT, "label_dropout": 0.0})
    assert same_weights(tmp_path / "a" / "model", tmp_path / "b" / "model")
    assert not same_weights(tmp_path / "a" / "model", tmp_path / "c" / "model")


def test_a_resumed_run_logs_the_losses_of_an_uninterrupted_one(tmp_path):
    """A checkpoint (every 3 steps) between two log steps (every 4) carries the loss summed since
    the last log step: the resumed run's step-4 and step-8 losses are the uninterrupted run's
    (they averaged only the steps after the checkpoint before)."""
    cfg = tiny(steps=8, log_every=4, checkpoint_every=3)
    run(tmp_path, "clean", cfg=cfg, keep_checkpoint=True)
    with pytest.raises(Crash):
        run(tmp_path, "crashed", cfg=cfg, snapshot_every=1, on_snapshot=crash_at(4))
    resumed = run(tmp_path, "crashed", cfg=cfg, keep_checkpoint=True)
    assert resumed["resumed_from_step"] == 3
    history = [
        torch.load(tmp_path / name / "ckpt" / CHECKPOINT, weights_only=True)["history"]
        for name in ("clean", "crashed")
    ]
    assert [step for step, _ in history[0]] == [4, 8]
    assert history[1] == history[0]


def test_dit_resume_after_crash_matches_uninterrupted_run(tmp_path):
    clean = run_dit(tmp_path, "clean", keep_checkpoint=True)
    with pytest.raises(Crash):
        run_dit(tmp_path, "crashed", snapshot_every=1, on_snapshot=crash_at(4))
    resumed = run_dit(tmp_path, "crashed", keep_checkpoint=True)
    assert resumed["resumed_from_step"] == 3 and resumed["final_loss"] == clean["final_loss"]
    assert same_weights(tmp_path / "clean" / "model", tmp_path / "crashed" / "model")
    a = torch.load(tmp_path / "clean" / "ckpt" / CHECKPOINT, weights_only=True)
    b = torch.load(tmp_path / "crashed" / "ckpt" / CHECKPOINT, weights_only=True)
    for name, expected in a["model"].items():
        assert torch.equal(b["model"][name], expected), name


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"labels": labels(seed=5)}, "labels_sha256"),
        ({"latents": latents(seed=5)}, "latents_sha256"),
        ({"num_classes": 4}, "num_classes"),
    ],
)
def test_dit_checkpoint_of_other_labels_or_latents_is_ignored(tmp_path, caplog, change, reason):
    with pytest.raises(Crash):
        run_dit(tmp_path, "a", snapshot_every=1, on_snapshot=crash_at(4))
    with caplog.at_level(logging.WARNING, logger="diffprune.train"):
        assert run_dit(tmp_path, "a", **change)["resumed_from_step"] == 0
    assert "ignoring checkpoint" in caplog.text and reason in caplog.text


def test_bad_dit_inputs_raise(tmp_path):
    with pytest.raises(ConfigError, match="needs the rows' labels and num_classes"):
        run_dit(tmp_path, "x", labels=None)
    with pytest.raises(DataError, match=r"labels must be in \[0, num_classes=3\)"):
        run_dit(tmp_path, "x", labels=labels() + 1)
    with pytest.raises(ValueError, match="latents need their latent record"):
        run_dit(tmp_path, "x", latent=None)
    with pytest.raises(ValueError, match="exactly one of images and latents"):
        run_dit(tmp_path, "x", images=images())
    with pytest.raises(DataError, match="float latents"):
        run_dit(tmp_path, "x", latents=latents()[:, :, :, :6])


# ------------------------------------------------------------------------------------------- EMA
class OneWeight(torch.nn.Module):
    def __init__(self, value):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([value]))


def test_ema_update_moves_the_average_a_share_of_one_minus_decay_towards_the_weights():
    ema, model = OneWeight(2.0), OneWeight(4.0)
    update_ema(ema, model, decay=0.75)
    assert ema.w.item() == 2.5  # 0.75 * 2 + 0.25 * 4 (the other way round would give 3.5)
    assert model.w.item() == 4.0  # the trained weights are left alone
    update_ema(ema, model, decay=0.5)
    assert ema.w.item() == 3.25


@pytest.mark.parametrize(
    ("step", "decay"),
    [(0, 1 / 10), (1, 2 / 11), (10, 11 / 20), (1000, 1001 / 1010), (1990, 0.995), (10**6, 0.995)],
)
def test_ema_decay_warms_up_as_diffusers_then_stays_at_the_configured_decay(step, decay):
    assert ema_decay({"ema_decay": 0.995}, step) == pytest.approx(decay, rel=1e-12)


def test_trained_model_is_the_ema_of_the_raw_weights_of_every_step(tmp_path):
    """Replay the EMA by hand from the raw weights after each step (seen through on_snapshot);
    ema_decay 0.3 makes steps 1-2 warm-up steps ((1 + s) / (10 + s) < 0.3) and 3-6 capped ones."""
    cfg = tiny(ema_decay=0.3)
    raw, emas = [], []

    def record(step, model, ema):
        raw.append({k: v.detach().double().clone() for k, v in model.state_dict().items()})
        emas.append({k: v.detach().double().clone() for k, v in ema.state_dict().items()})

    run(tmp_path, "a", cfg=cfg, snapshot_every=1, on_snapshot=record)
    assert len(raw) == cfg["steps"]
    torch.manual_seed(0)  # the run's initial weights: train seeds with `seed` before building
    expected = {k: v.double() for k, v in build_model(cfg, in_channels=1).state_dict().items()}
    for step, weights in enumerate(raw, start=1):
        decay = min(0.3, (1 + step) / (10 + step))
        expected = {k: decay * expected[k] + (1 - decay) * weights[k] for k in expected}
        for name, value in expected.items():
            torch.testing.assert_close(emas[step - 1][name], value, rtol=1e-5, atol=1e-6)
    saved = state_of(tmp_path / "a" / "model")
    assert saved.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(saved[name].double(), value, rtol=1e-5, atol=1e-6)
    # the EMA is not simply the last raw weights (the replay above would then prove little)
    assert any(not torch.allclose(raw[-1][k], expected[k]) for k in expected)


@pytest.mark.slow  # three Snakemake jobs of two processes each (accelerate launch, gloo on CPU)
def test_two_processes_train_as_one_and_resume_to_the_same_bytes(project):
    """train.num_processes: 2 through the real rule's script: killed (kill -9 of the main
    process) and rerun, it writes the bytes of an uninterrupted two-process run; it trains on the
    batches of a one-process run, so its first loss is that run's.

    Later steps are not compared weight by weight: AdamW's update is close to lr * sign(gradient)
    where a gradient is near its eps, so the summation order of the averaged gradients moves
    such weights by up to lr per step (measured: 5e-4 after one step at lr 2e-3, whether the
    halves are averaged by gloo or by hand)."""
    cfg = {**FAULT_TINY, "steps": 30, "log_every": 1, "num_processes": 2}
    (project / "config.yaml").write_text(yaml.safe_dump({"train": cfg}))
    engine = fault_snakemake(project, "runs/killed/s0/model")
    os.kill(training_pid(project, "killed"), signal.SIGKILL)
    assert engine.wait(timeout=120) != 0
    finish(fault_snakemake(project, "runs/killed/s0/model", "--rerun-incomplete"), project)
    finish(fault_snakemake(project, "runs/clean/s0/model"), project)
    killed, clean = (project / "runs" / run / "s0" / "model" for run in ("killed", "clean"))
    record = io.load_json(killed / "train.json")
    assert record["num_processes"] == 2 and 0 < record["resumed_from_step"] < cfg["steps"]
    assert (killed / WEIGHTS).read_bytes() == (clean / WEIGHTS).read_bytes()
    assert record["final_loss"] == io.load_json(clean / "train.json")["final_loss"]

    one = train(
        images=np.asarray(load_store(project / "store" / "train").images),
        cfg={**cfg, "num_processes": 1},
        seed=0,
        out_dir=project / "one",
        checkpoint_dir=project / "one-checkpoints",
        log_dir=project / "one-live",
        progress=False,
    )
    assert one["num_processes"] == 1
    curves = [
        pd.read_csv(folder / "plots" / "metrics" / "loss.tsv", sep="\t")
        for folder in (project / "runs" / "killed" / "s0" / "live", project / "one-live")
    ]
    assert curves[0]["step"].tolist() == curves[1]["step"].tolist() == list(range(1, 31))
    # two halves' float32 mean losses averaged against one mean over the whole batch (another
    # summation order over batch x pixels, and convolutions blocked by another batch size)
    assert curves[0]["loss"].iloc[0] == pytest.approx(curves[1]["loss"].iloc[0], rel=1e-5)
    assert record["final_loss"] == pytest.approx(one["final_loss"], rel=0.2)


def test_accelerate_command_runs_the_file_on_n_processes_of_this_machine(tmp_path, monkeypatch):
    command = accelerate_command(tmp_path / "job.py", num_processes=4)
    assert command[1:3] == ["-m", "accelerate.commands.launch"] and "--multi_gpu" in command
    assert command[command.index("--num_processes") + 1] == "4"
    assert command[command.index("--main_process_port") + 1] == "0"  # a free port
    assert command[-1] == str((tmp_path / "job.py").resolve())
    monkeypatch.setenv("RANK", "1")
    assert not is_main()
    monkeypatch.setenv("RANK", "0")
    assert is_main()


def test_batch_size_must_split_evenly_over_the_processes():
    params = load_params(REPO / "params.yaml", check_cuda=False)
    params["train"]["num_processes"] = 3
    with pytest.raises(ConfigError, match=r"must be divisible by train.num_processes \(3\)"):
        validate_params(params)


# ------------------------------------------------------------- throughput, GPU switches, data
def weight_bytes(model_dir):
    return [p.read_bytes() for p in sorted(model_dir.rglob("*.safetensors"))]


def test_train_json_records_throughput_and_flops_of_the_network(tmp_path, tiny_unet):
    cfg = tiny(steps=4)
    summary = run(tmp_path, "a", cfg=cfg)
    record = io.load_json(tmp_path / "a" / "model" / "train.json")
    assert record == {**summary, "cfg": record["cfg"]}
    assert record["images_per_second"] == pytest.approx(
        record["steps_per_second"] * cfg["batch_size"]
    )
    assert 0 < record["checkpoint_seconds"] < record["wall_seconds"]  # the last step writes one
    # FLOPs of the tiny UNet counted here on a batch of 4: the run's batch-1 count, times 3
    model, x = tiny_unet(cfg), torch.randn(4, 1, 8, 8)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x, torch.tensor([1, 10, 100, 999]))
    assert record["flops_per_image"] == pytest.approx(3 * counter.get_total_flops() / 4, rel=0.03)
    assert record["mfu"] is None and record["mfu_note"] == "no known bf16 peak for cpu"
    assert record["tf32"] is False and record["fused_adamw"] is False  # CPU: auto is unfused
    assert record["compile"] is False and record["data_on_device"] is True
    assert record["data_bytes"] == 12 * 8 * 8 * 4 and record["data_free_bytes"] > 0


def test_mfu_is_achieved_flops_over_the_devices_peak(tmp_path, monkeypatch):
    """A device with a known peak (faked here: 2 GFLOP/s) gets its MFU by the hand formula."""
    monkeypatch.setattr(train_module, "device_peak", lambda device: (2e9, "fake peak"))
    summary = run(tmp_path, "a", cfg=tiny(steps=2))
    expected = summary["flops_per_image"] * summary["images_per_second"] / 2e9
    assert summary["mfu"] == pytest.approx(expected) and summary["mfu_note"] == "fake peak"


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("fused_adamw", "yes", "auto, true, false"),
        ("data_on_device", 1, "auto, true, false"),
        ("tf32", "auto", "expected boolean"),
        ("compile", None, "expected boolean"),
    ],
)
def test_bad_loop_switches_raise_naming_key_value_and_allowed(tmp_path, key, value, allowed):
    # the schema's rule and wording, as for params.yaml (tests/test_bad_params.py)
    with pytest.raises(ConfigError, match=f"train.{key} = {value!r} "):
        run(tmp_path, "x", cfg=tiny(**{key: value}))
    with pytest.raises(ConfigError, match=allowed):
        run(tmp_path, "x", cfg=tiny(**{key: value}))


def test_fused_adamw_trains_on_the_cpu(tmp_path):
    """torch 2.14 has a fused AdamW for the CPU, so `true` is honoured there (auto: CUDA only)."""
    fused = run(tmp_path, "fused", cfg=tiny(fused_adamw=True, steps=3))
    plain = run(tmp_path, "plain", cfg=tiny(fused_adamw=False, steps=3))
    assert fused["fused_adamw"] is True and plain["fused_adamw"] is False
    assert fused["final_loss"] == pytest.approx(plain["final_loss"], rel=1e-3)


def test_compiled_network_trains_and_the_plain_one_is_saved(tmp_path, monkeypatch):
    """torch.compile with the aot_eager backend (dynamo's graph capture and AOTAutograd, without
    inductor's minute of C++ compilation on this CPU): the same training, a plain model saved."""
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model: real(model, backend="aot_eager"))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = run(tmp_path, "compiled", cfg=tiny(compile=True, steps=3))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    plain = run(tmp_path, "plain", cfg=tiny(steps=3))
    assert compiled["compile"] is True and plain["compile"] is False
    model = load_model(tmp_path / "compiled" / "model")[0]
    assert type(model).__name__ == "UNet2DModel"
    reference = state_of(tmp_path / "plain" / "model")
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, reference[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("space", ["pixel", "latent"])
def test_data_on_the_host_trains_to_the_bytes_of_data_on_the_device(tmp_path, space):
    """The kept rows (every other one) as model input on the device once, or gathered and
    converted on the host step by step: the same weights, byte for byte. Pixel images are
    resized (12 -> 8 px) on the way, latents scaled by their factor."""
    if space == "pixel":
        data = {"images": images(size=12), "rows": np.arange(0, 12, 2)}
        go = functools.partial(run, tmp_path)
    else:
        data = {"latents": latents(), "rows": np.arange(1, 12, 2), "labels": labels()[1::2]}
        go = functools.partial(run_dit, tmp_path)
    base = TINY if space == "pixel" else DIT
    host = go("host", cfg={**base, "data_on_device": False}, **data)
    device = go("device", cfg={**base, "data_on_device": True}, **data)
    assert (host["data_on_device"], device["data_on_device"]) == (False, True)
    assert host["data_free_bytes"] is None and host["n_images"] == 6
    assert weight_bytes(tmp_path / "host" / "model") == weight_bytes(tmp_path / "device" / "model")
    assert host["final_loss"] == device["final_loss"]


def test_latents_are_scaled_by_their_factor(tmp_path):
    """Unscaled latents with scale factor s train as pre-scaled latents with factor 1 would."""
    scaled = run_dit(tmp_path, "a", latents=latents() * 0.5, latent={**LATENT, "scale_factor": 1})
    unscaled = run_dit(tmp_path, "b", latents=latents(), latent={**LATENT, "scale_factor": 0.5})
    assert weight_bytes(tmp_path / "a" / "model") == weight_bytes(tmp_path / "b" / "model")
    assert scaled["final_loss"] == unscaled["final_loss"]


def test_a_checkpoint_resumes_with_the_data_elsewhere(tmp_path):
    """data_on_device does not change the numbers, so it does not invalidate a checkpoint."""
    clean = run(tmp_path, "clean", cfg=tiny(data_on_device=True))
    with pytest.raises(Crash):
        run(tmp_path, "x", cfg=tiny(data_on_device=True), snapshot_every=1, on_snapshot=crash_at(4))
    resumed = run(tmp_path, "x", cfg=tiny(data_on_device=False))
    assert resumed["resumed_from_step"] == 3 and resumed["data_on_device"] is False
    assert resumed["final_loss"] == clean["final_loss"]
    assert weight_bytes(tmp_path / "x" / "model") == weight_bytes(tmp_path / "clean" / "model")


def test_auto_puts_the_data_on_the_device_when_it_takes_a_quarter_of_the_free_memory(
    tmp_path, monkeypatch
):
    data_bytes = 12 * 8 * 8 * 4
    monkeypatch.setattr(train_data, "free_bytes", lambda device: 4 * data_bytes)
    fits = run(tmp_path, "fits", cfg=tiny(steps=2))
    monkeypatch.setattr(train_data, "free_bytes", lambda device: 4 * data_bytes - 1)
    spills = run(tmp_path, "spills", cfg=tiny(steps=2))
    assert (fits["data_on_device"], spills["data_on_device"]) == (True, False)
    assert (fits["data_bytes"], spills["data_free_bytes"]) == (data_bytes, 4 * data_bytes - 1)
    assert train_data.on_device(True, 10**18, torch.device("cpu")) == (True, None)
    assert train_data.on_device("auto", 10, torch.device("cpu"), copies=2)[0]


def test_the_default_study_keeps_its_data_on_the_device():
    """Fashion-MNIST, 10,000 kept images at 16 px: 10 MB of model input, which auto puts on the
    device (the study's numbers were made that way), on any machine with 40 MB free."""
    params = load_params(REPO / "params.yaml", check_cuda=False)
    assert params["train"]["data_on_device"] == "auto"
    n, size = params["data"]["train_size"], params["train"]["resolution"]
    data_bytes = n * size * size * 4
    assert data_bytes == 10_240_000
    assert train_data.on_device("auto", data_bytes, torch.device("cpu"))[0]


def test_data_on_the_host_reads_a_memory_map_a_batch_at_a_time(tmp_path, monkeypatch):
    """Training from a memory-mapped store (as the train script does) with data_on_device false
    never holds more than a chunk of it: the hash reads CHUNK_BYTES (1 MiB here) at a time, each
    step 8 rows; numpy's allocations peak far below the 12 MB of stored images."""
    n, size = 4000, 32
    path = tmp_path / "images.npy"
    stored = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
    stored[:] = np.random.default_rng(0).integers(0, 256, stored.shape, dtype=np.uint8)
    stored.flush()
    del stored
    kept = np.arange(1, n, 2)
    monkeypatch.setattr(train_data, "CHUNK_BYTES", 2**20)
    cfg = tiny(steps=3, data_on_device=False)
    tracemalloc.start()
    try:
        summary = run(tmp_path, "a", images=np.load(path, mmap_mode="r"), rows=kept, cfg=cfg)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    array_bytes = n * size * size * 3
    assert summary["data_on_device"] is False and summary["n_images"] == n // 2
    assert peak < array_bytes / 4, f"peak {peak} bytes for a {array_bytes}-byte store"
    assert summary["images_sha256"] == array_sha256(np.load(path)[kept])


def test_kept_rows_hash_chunk_by_chunk_as_the_whole_subset(monkeypatch):
    source = images(n=50)
    rows = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5, 35])
    monkeypatch.setattr(train_data, "CHUNK_BYTES", 3 * 8 * 8)  # three rows a chunk
    kept = train_data.KeptRows(source, rows, resolution=8)
    assert [(part.start, part.stop) for part in kept.chunks()] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert kept.sha256() == array_sha256(source[rows])
    assert torch.equal(kept.to_device(torch.device("cpu")), to_model_input(source[rows], 8))


def test_step_prefetch_makes_every_step_once_in_order_and_passes_errors_on():
    made = []

    def make(step):
        made.append(step)
        if step == 7:
            raise Crash("step 7")
        return {"x": torch.full((2,), step), "none": None}

    with train_data.StepPrefetch(make, range(3, 6), torch.device("cpu")) as steps:
        got = [(step, inputs["x"].tolist(), inputs["none"]) for step, inputs in steps]
    assert got == [(3, [3, 3], None), (4, [4, 4], None), (5, [5, 5], None)] and made == [3, 4, 5]
    with pytest.raises(Crash), train_data.StepPrefetch(make, range(6, 9), torch.device("cpu")) as s:
        list(s)
