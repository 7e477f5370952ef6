"""Score-based rules: batched per-sample gradients against the batch-size-1 loop, MoSo against its
formula on explicit gradients, forgetting counts, EL2N determinism, the fixed timestep and the EMA
weights against hand computations, and surrogate training."""

import numpy as np
import pytest
import torch

from diffprune import checkpoints
from diffprune import surrogate as surrogate_module
from diffprune.data import to_model_input
from diffprune.diffusion import build_scheduler, per_sample_loss
from diffprune.draws import batches, fixed_draws, sample_losses
from diffprune.errors import DataError
from diffprune.model_folder import load_model
from diffprune.scores import (
    compute_scores,
    el2n,
    forgetting,
    grand,
    grand_loop,
    moso,
)
from diffprune.select import select
from diffprune.surrogate import (
    load_snapshot,
    snapshot_steps,
    train_moso_surrogates,
    train_surrogate,
)
from tests.script_helpers import locked_elsewhere

# compute_scores' params for the last raw snapshot with one random draw per sample (the defaults
# are the EMA weights at timestep 15): its EL2N is then the last loss record.
RAW_RANDOM = {"weights": "raw", "timestep": None}


@pytest.mark.parametrize(
    ("objective", "attention", "channels"),
    [("ddpm", False, 1), ("flow", False, 3), ("ddpm", True, 1)],
)
def test_batched_grand_equals_batch_size_one_loop(
    objective, attention, channels, tiny_unet_cfg, tiny_unet, random_images
):
    cfg = tiny_unet_cfg(objective=objective, attention=attention)
    model, images = tiny_unet(cfg, channels), random_images(7, channels=channels)
    batched = grand(model, images, cfg=cfg, seed=3, batch_size=4, progress=False)
    loop = grand_loop(model, images, cfg=cfg, seed=3, progress=False)
    assert batched.dtype == np.float64 and batched.shape == (7,)
    np.testing.assert_allclose(batched, loop, rtol=1e-5)
    assert np.all(batched > 0) and np.unique(batched).size == 7


def explicit_gradients(model, images, cfg, seed):
    """(N, P) float64 matrix of per-sample gradients over all parameters, one backward each."""
    scheduler = build_scheduler(cfg)
    params = list(model.parameters())
    rows = []
    for _, x0, noise, t in batches(
        images, resolution=8, scheduler=scheduler, sample_ids=np.arange(len(images)), seed=seed,
        batch_size=1,
    ):  # fmt: skip
        loss = per_sample_loss(model, scheduler, x0, noise=noise, timesteps=t)[0]
        grads = torch.autograd.grad(loss, params)
        rows.append(torch.cat([g.flatten() for g in grads]).double())
    return torch.stack(rows).numpy()


def test_moso_equals_formula_on_explicit_gradients(tiny_unet_cfg, tiny_unet, random_images):
    cfg = tiny_unet_cfg()
    model, images = tiny_unet(cfg), random_images(6)
    G = explicit_gradients(model, images, cfg, seed=1)
    n, g = len(G), G.mean(0)
    direct = np.array(
        [
            (2 * n - 3) / (n - 1) ** 2 * g @ g
            - 1 / (n - 1) ** 2 * gi @ gi
            + (2 * n - 4) / (n - 1) ** 2 * (g - gi / n) @ gi
            for gi in G
        ]
    )
    streamed = moso(model, images, cfg=cfg, seed=1, batch_size=4, progress=False)
    np.testing.assert_allclose(streamed, direct, rtol=1e-4)
    # The per-sample terms matter: scores differ from sample to sample.
    assert np.ptp(direct) > 1e-3 * np.abs(direct).max()


def test_moso_needs_two_samples(tiny_unet_cfg, tiny_unet, random_images):
    cfg = tiny_unet_cfg()
    with pytest.raises(ValueError, match="n=1"):
        moso(tiny_unet(cfg), random_images(1), cfg=cfg, progress=False)


def test_forgetting_counts_rises_per_sample_and_selection_follows_score():
    losses = np.array(
        [
            [1.0, 1.0, 1.0, 1.0],
            [0.9, 1.2, 1.1, 0.5],
            [0.8, 1.0, 1.3, 0.6],
            [0.7, 1.1, 1.4, 0.7],
        ]
    )
    scores = forgetting(losses)
    np.testing.assert_array_equal(scores, [0.0, 2 / 3, 1.0, 2 / 3])
    # Highest score first, whatever the sample index (the reference sorted by index: a bug).
    manifest = select("forgetting", 0.5, scores=np.array([0.0, 1.0, 0.5, 2 / 3]))
    assert manifest.loc[manifest["keep"], "sample_id"].tolist() == [1, 3]
    with pytest.raises(ValueError, match="num_records >= 2"):
        forgetting(losses[:1])


def test_el2n_is_deterministic_per_seed_and_independent_of_batch_size(
    tiny_unet_cfg, tiny_unet, random_images
):
    cfg = tiny_unet_cfg()
    model, images = tiny_unet(cfg), random_images(7)
    a = el2n(model, images, cfg=cfg, seed=5, batch_size=2, progress=False)
    b = el2n(model, images, cfg=cfg, seed=5, batch_size=7, progress=False)
    c = el2n(model, images, cfg=cfg, seed=6, batch_size=7, progress=False)
    # batches of 2 against 7: float32 means of 64 squared errors after convolutions that may be
    # blocked by batch size (1.1e-7 relative apart here); the other seed is far outside 1e-5
    np.testing.assert_allclose(a, b, rtol=1e-5)
    assert not np.allclose(a, c)
    three = el2n(model, images, cfg=cfg, seed=5, draws=3, progress=False)
    per_draw = [
        sample_losses(model, images, cfg=cfg, seed=5, draw_index=d, progress=False)
        for d in range(3)
    ]
    # float64 sums of the same three float32 losses in the same order, as el2n adds them
    np.testing.assert_allclose(three, np.mean(per_draw, axis=0, dtype=np.float64))
    np.testing.assert_allclose(per_draw[0], a, rtol=1e-5)  # batch 64 against 2, as above
    # A sample's draw depends on its sample_id, not on its position in the batch.
    shifted = sample_losses(
        model, images[1:], cfg=cfg, seed=5, sample_ids=np.arange(1, 7), progress=False
    )
    np.testing.assert_allclose(shifted, a[1:], rtol=1e-5)


def test_fixed_timestep_keeps_the_per_sample_noise(tiny_unet_cfg, tiny_unet, random_images):
    cfg, images = tiny_unet_cfg(), random_images(3)
    x0 = to_model_input(images, 8)
    scheduler = build_scheduler(cfg)
    noise, t = fixed_draws(x0, np.arange(3), scheduler, seed=0)
    fixed_noise, fixed_t = fixed_draws(x0, np.arange(3), scheduler, seed=0, timestep=500)
    assert fixed_t.tolist() == [500, 500, 500] and t.unique().numel() == 3
    torch.testing.assert_close(fixed_noise, noise)
    model = tiny_unet(cfg)
    expected = per_sample_loss(model, scheduler, x0, noise=noise, timesteps=fixed_t)
    scores = el2n(model, images, cfg=cfg, timestep=500, progress=False)
    np.testing.assert_allclose(scores, expected.detach().numpy(), rtol=1e-6)


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_fixed_timestep_scores_ignore_batch_size_and_order(
    objective, tiny_unet_cfg, tiny_unet, random_images
):
    cfg = tiny_unet_cfg(objective=objective)
    model, images = tiny_unet(cfg), random_images(7)
    ids = np.arange(100, 107)  # sample ids, not positions, seed the noise
    order = np.random.default_rng(1).permutation(7)
    for score in (el2n, grand):
        kwargs = {"cfg": cfg, "seed": 2, "timestep": 15, "progress": False}
        whole = score(model, images, sample_ids=ids, batch_size=7, **kwargs)
        shuffled = score(model, images[order], sample_ids=ids[order], batch_size=3, **kwargs)
        np.testing.assert_allclose(shuffled, whole[order], rtol=1e-5)
        assert np.unique(whole).size == 7


def hand_loss(model, x0, noise, cfg):
    """One sample's loss at the reference's timestep 15 of 1000, written out from the formulas."""
    objective = cfg["objective"]
    scheduler = build_scheduler(cfg)
    if objective == "ddpm":
        alpha_bar = scheduler.alphas_cumprod[15]
        x_t = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise
        net_t, target = torch.tensor([15]), noise
    else:  # t = 1 - 15/1000: as close to the data as DDPM's step 15; the network sees t * 1000
        x_t = 0.985 * x0 + 0.015 * noise
        net_t, target = torch.tensor([985.0]), x0 - noise
    return (model(x_t, net_t).sample - target).square().mean()


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_fixed_timestep_scores_equal_the_hand_computed_loss_and_gradient(
    objective, tiny_unet_cfg, tiny_unet, random_images
):
    cfg = tiny_unet_cfg(objective=objective)
    model, images, sample = tiny_unet(cfg).eval(), random_images(3), 2
    x0 = to_model_input(images[sample : sample + 1], 8)
    noise, _ = fixed_draws(x0, [sample], build_scheduler(cfg), seed=4)
    loss = hand_loss(model, x0, noise, cfg)
    grad_norm = torch.cat([g.flatten() for g in torch.autograd.grad(loss, model.parameters())])
    kwargs = {"cfg": cfg, "seed": 4, "progress": False}
    assert el2n(model, images, timestep=15, **kwargs)[sample] == pytest.approx(loss.item(), 1e-5)
    assert grand(model, images, timestep=15, **kwargs)[sample] == pytest.approx(
        grad_norm.norm().item(), 1e-4
    )
    assert el2n(model, images, **kwargs)[sample] != pytest.approx(loss.item(), 1e-3)  # random t
    with pytest.raises(ValueError, match=r"timestep 1000 must be an integer in \[0, num_train"):
        el2n(model, images, timestep=1000, **kwargs)


def test_snapshot_steps_are_evenly_spaced():
    assert snapshot_steps(6, 3) == [2, 4, 6]
    assert snapshot_steps(7, 3) == [2, 4, 6]
    with pytest.raises(ValueError, match="num_snapshots"):
        snapshot_steps(3, 4)


def test_surrogate_records_losses_at_snapshots_and_scores_read_them(
    tmp_path, tiny_unet_cfg, random_images
):
    cfg, images = tiny_unet_cfg(steps=6), random_images(10)
    meta = train_surrogate(
        images, cfg=cfg, seed=0, out_dir=tmp_path / "sur", checkpoint_dir=tmp_path / "ckpt",
        num_snapshots=3, record_losses=True, progress=False,
    )  # fmt: skip
    assert meta["snapshot_steps"] == [2, 4, 6]
    assert sorted(p.name for p in (tmp_path / "sur" / "snapshots").iterdir()) == [
        "ema_step_0000002.pt",
        "ema_step_0000004.pt",
        "ema_step_0000006.pt",
        "step_0000002.pt",
        "step_0000004.pt",
        "step_0000006.pt",
    ]
    losses = np.load(tmp_path / "sur" / "losses.npy")
    assert losses.shape == (3, 10) and losses.dtype == np.float32
    # Each record is the loss of that snapshot's weights under the fixed per-sample draws.
    for k, step in enumerate(meta["snapshot_steps"]):
        model = load_snapshot(tmp_path / "sur", step)
        np.testing.assert_allclose(
            losses[k], sample_losses(model, images, cfg=cfg, seed=0, progress=False), rtol=1e-5
        )
    assert not np.allclose(losses[0], losses[-1])  # weights changed between snapshots

    common = {"surrogate_dir": tmp_path / "sur", "images": images, "device": "cpu"}
    scores, info = compute_scores("forgetting", **common, progress=False)
    np.testing.assert_array_equal(scores, forgetting(losses))
    scores, info = compute_scores("el2n", **common, cfg=RAW_RANDOM, seed=0, progress=False)
    np.testing.assert_allclose(scores, losses[-1], rtol=1e-5)
    assert info["seconds"] == pytest.approx(info["surrogate_seconds"] + info["scoring_seconds"])
    assert info["gpu_seconds"] == 0.0
    scores, _ = compute_scores("grand", **common, cfg=RAW_RANDOM, batch_size=4, progress=False)
    final = load_snapshot(tmp_path / "sur")
    np.testing.assert_allclose(scores, grand_loop(final, images, cfg=cfg, progress=False), 1e-5)

    # Defaults: EMA weights at timestep 15. The last EMA snapshot (step 6 = the last step) is the
    # EMA model that train() wrote, so score that one by hand.
    ema, _, _ = load_model(tmp_path / "sur" / "model")
    assert not all(
        torch.equal(p, q) for p, q in zip(ema.parameters(), final.parameters(), strict=True)
    )
    scores, info = compute_scores("el2n", **common, progress=False)
    assert (info["params"]["weights"], info["params"]["timestep"]) == ("ema", 15)
    at_15 = {"cfg": cfg, "timestep": 15, "progress": False}
    np.testing.assert_allclose(scores, el2n(ema, images, **at_15), rtol=1e-6)
    assert not np.allclose(scores, el2n(final, images, **at_15), rtol=1e-3)
    raw, _ = compute_scores("el2n", **common, cfg={"weights": "raw"}, progress=False)
    np.testing.assert_allclose(raw, el2n(final, images, **at_15), rtol=1e-6)
    scores, _ = compute_scores("grand", **common, batch_size=4, progress=False)
    np.testing.assert_allclose(scores, grand_loop(ema, images, **at_15), rtol=1e-5)

    # the store memory-mapped and read by two loader workers: the same scores, bit for bit
    np.save(tmp_path / "images.npy", images)
    mapped = {**common, "images": np.load(tmp_path / "images.npy", mmap_mode="r")}
    for name in ("el2n", "grand"):
        alone, info = compute_scores(name, **common, batch_size=4, progress=False)
        assert info["num_workers"] == 0  # auto on the CPU
        workers, info = compute_scores(
            name, **mapped, cfg={"num_workers": 2}, batch_size=4, progress=False
        )
        assert workers.tobytes() == alone.tobytes() and info["num_workers"] == 2

    with pytest.raises(DataError, match="not the ones the surrogate"):
        compute_scores("el2n", **{**common, "images": images[:-1]}, progress=False)
    with pytest.raises(ValueError, match="unknown score 'loss'"):
        compute_scores("loss", **common)
    with pytest.raises(ValueError, match=r"scores\.weights = 'swa'"):
        compute_scores("el2n", **common, cfg={"weights": "swa"})


def test_more_snapshots_break_forgetting_ties(tmp_path, tiny_unet_cfg, random_images):
    # A high learning rate, so that losses go up and down within a few steps as in a long run.
    cfg, images = tiny_unet_cfg(steps=40, lr=1e-2), random_images(24)
    train_surrogate(
        images, cfg=cfg, seed=0, out_dir=tmp_path / "sur", checkpoint_dir=tmp_path / "ckpt",
        num_snapshots=20, record_losses=True, progress=False,
    )  # fmt: skip
    losses = np.load(tmp_path / "sur" / "losses.npy")
    # The run is deterministic, so 5 snapshots of it would have recorded exactly these rows.
    five = losses[[step // 2 - 1 for step in snapshot_steps(40, 5)]]

    def distinct_and_largest_tie(records):
        _, counts = np.unique(forgetting(records), return_counts=True)
        return counts.size, counts.max()

    (distinct_20, tie_20), (distinct_5, tie_5) = map(distinct_and_largest_tie, (losses, five))
    assert distinct_5 <= 5 < distinct_20 and tie_20 < tie_5


def test_a_second_surrogate_training_of_the_run_is_refused_while_one_runs(
    tmp_path, tiny_unet_cfg, random_images
):
    with (
        locked_elsewhere(tmp_path / "ckpt"),
        pytest.raises(checkpoints.RunLocked, match="is training this run"),
    ):
        train_surrogate(
            random_images(6), cfg=tiny_unet_cfg(steps=2), seed=0, out_dir=tmp_path / "sur",
            checkpoint_dir=tmp_path / "ckpt", num_snapshots=2, progress=False,
        )  # fmt: skip
    assert not (tmp_path / "sur" / "model").exists()


def test_a_stopped_surrogate_resumes_to_the_same_snapshots_losses_and_model(
    tmp_path, monkeypatch, tiny_unet_cfg, random_images
):
    """Stopped inside the step-4 snapshot (checkpoints every 2 steps), the rerun resumes at
    step 2 and writes what an uninterrupted run writes."""
    cfg, images = tiny_unet_cfg(steps=6, checkpoint_every=2), random_images(6)
    kwargs = {"cfg": cfg, "seed": 0, "num_snapshots": 3, "progress": False}
    train_surrogate(images, out_dir=tmp_path / "a", checkpoint_dir=tmp_path / "ca", **kwargs)
    real, calls = surrogate_module.sample_losses, []

    def stop_at_second(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("stopped")
        return real(*args, **kw)

    with monkeypatch.context() as patch:
        patch.setattr(surrogate_module, "sample_losses", stop_at_second)
        with pytest.raises(RuntimeError, match="stopped"):
            train_surrogate(
                images, out_dir=tmp_path / "b", checkpoint_dir=tmp_path / "cb", **kwargs
            )
    meta = train_surrogate(images, out_dir=tmp_path / "b", checkpoint_dir=tmp_path / "cb", **kwargs)
    assert meta["train"]["resumed_from_step"] == 2
    weights = "model/unet/diffusion_pytorch_model.safetensors"
    for name in ("losses.npy", weights):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    for step in meta["snapshot_steps"]:
        for kind in ("raw", "ema"):
            a, b = (load_snapshot(tmp_path / r, step, weights=kind) for r in ("a", "b"))
            sa, sb = a.state_dict(), b.state_dict()
            assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_moso_surrogates_score_each_sample_in_its_own_subset(
    tmp_path, tiny_unet_cfg, random_images
):
    cfg, images = tiny_unet_cfg(steps=4), random_images(9)
    meta = train_moso_surrogates(
        images, num_subsets=2, cfg=cfg, seed=0, out_dir=tmp_path / "moso",
        checkpoint_dir=tmp_path / "ckpt", num_snapshots=2, progress=False,
    )  # fmt: skip
    subsets = np.load(tmp_path / "moso" / "subsets.npy")
    assert sorted(meta["subset_sizes"]) == [4, 5] and np.bincount(subsets).tolist() == [5, 4]
    scores, info = compute_scores(
        "moso", surrogate_dir=tmp_path / "moso", images=images, seed=2, device="cpu",
        batch_size=3, progress=False,
    )  # fmt: skip
    expected = np.zeros(9)
    for k in range(2):
        ids = np.flatnonzero(subsets == k)
        for step in (2, 4):
            model = load_snapshot(tmp_path / "moso" / f"subset_{k}", step)
            expected[ids] += moso(
                model, images[ids], cfg=cfg, seed=2, sample_ids=ids, progress=False
            )
    # batches of 3 against whole subsets: float32 gradient dot products summed in another order,
    # then a difference of three such terms (1.9e-6 relative apart on an AMD EPYC without
    # AVX-512, and here with ONEDNN_MAX_CPU_ISA=AVX2): 1e-4, as the formula test above
    np.testing.assert_allclose(scores, expected, rtol=1e-4)
    assert info["surrogate_seconds"] == meta["seconds"] > 0
    workers, _ = compute_scores(
        "moso", surrogate_dir=tmp_path / "moso", images=images, cfg={"num_workers": 2}, seed=2,
        device="cpu", batch_size=3, progress=False,
    )  # fmt: skip
    assert workers.tobytes() == scores.tobytes()
