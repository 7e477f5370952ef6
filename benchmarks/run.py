"""Benchmarks behind the README's speed claims; each compares against a baseline in the same run.

- kmeans: faiss k-means (diffprune.cluster) against the reference code's approach, a hand-written
  numpy Lloyd loop with random initialisation, same data, k and iterations.
- grand: batched per-sample gradient norms (torch.func, diffprune.scores.grand) against the
  reference's batch-size-1 backward loop (diffprune.scores.grand_loop), same model and samples.

Writes results/bench/<name>.json and results/bench/README.md. `make bench` runs it.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from diffprune import io
from diffprune.cluster import kmeans
from diffprune.config import load_params
from diffprune.diffusion import build_model
from diffprune.scores import grand, grand_loop

OUT = Path("results/bench")


def lloyd_numpy(x: np.ndarray, *, k: int, iterations: int, seed: int) -> np.ndarray:
    """The reference code's k-means: random initial centroids, plain Lloyd updates on the CPU."""
    rng = np.random.default_rng(seed)
    centroids = x[rng.choice(len(x), k, replace=False)].copy()
    for _ in range(iterations):
        d = (x**2).sum(1)[:, None] - 2 * x @ centroids.T + (centroids**2).sum(1)[None]
        assign = d.argmin(1)
        for c in range(k):
            members = x[assign == c]
            if len(members):
                centroids[c] = members.mean(0)
    return centroids


def timed(fn, repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def bench_kmeans(n: int, dim: int, k: int, iterations: int, repeats: int) -> dict:
    x = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)
    faiss_s, _ = timed(lambda: kmeans(x, k=k, iterations=iterations, seed=0, device="cpu"), repeats)
    numpy_s, _ = timed(lambda: lloyd_numpy(x, k=k, iterations=iterations, seed=0), repeats)
    return {
        "what": "k-means on random embeddings",
        "n": n, "dim": dim, "k": k, "iterations": iterations, "repeats (best of)": repeats,
        "faiss_seconds": faiss_s, "numpy_lloyd_seconds": numpy_s, "speedup": numpy_s / faiss_s,
    }  # fmt: skip


def bench_grand(n: int, resolution: int, batch_size: int, repeats: int) -> dict:
    """Per-sample gradient norms of the default study's UNet at `resolution`."""
    cfg = {**load_params()["train"], "resolution": resolution}  # the default study's model
    torch.manual_seed(0)
    model = build_model(cfg, in_channels=1)
    images = np.random.default_rng(0).integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)
    kwargs = {"cfg": cfg, "seed": 0, "progress": False}
    batched_s, batched = timed(
        lambda: grand(model, images, batch_size=batch_size, **kwargs), repeats
    )
    loop_s, loop = timed(lambda: grand_loop(model, images, **kwargs), repeats)
    return {
        "what": "GraNd per-sample gradient norms, default study UNet",
        "n": n, "resolution": resolution, "parameters": sum(p.numel() for p in model.parameters()),
        "batch_size": batch_size, "repeats (best of)": repeats,
        "batched_seconds": batched_s, "loop_seconds": loop_s, "speedup": loop_s / batched_s,
        "max_relative_difference": float(np.max(np.abs(batched - loop) / np.abs(loop))),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    args = parser.parse_args()
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "code_version": io.code_version(),
    }
    small = args.quick
    results = {
        "kmeans": bench_kmeans(
            n=5_000 if small else 50_000, dim=128 if small else 512, k=20 if small else 100,
            iterations=10 if small else 20, repeats=1 if small else 2,
        ),
        "grand": bench_grand(
            n=32 if small else 128, resolution=16, batch_size=32, repeats=1
        ),
    }  # fmt: skip
    lines = ["# Benchmarks", "", f"Machine: {json.dumps(machine)}", ""]
    for name, result in results.items():
        io.save_json(OUT / f"{name}.json", {**result, "machine": machine})
        lines += [f"## {name}: {result['what']}", "", "| key | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
                  for k, v in result.items() if k != "what"]  # fmt: skip
        lines.append("")
        print(f"{name}: {result['speedup']:.1f}x faster than the baseline")
    with io.atomic_path(OUT / "README.md") as tmp:
        tmp.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
