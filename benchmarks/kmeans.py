"""k-means benchmarks: the start and Lloyd iterations at ImageNet scale, and the float64 path.

- start: faiss's afk-mc2 against its k-means++ (`cluster.init`) on clustered random data of
  ImageNet's size (1.28M x 384, k = 1000 by default). Both starts run on the CPU, also when
  faiss runs the Lloyd iterations on a GPU, so a start that costs many iterations dominates there.
- lloyd: one faiss Lloyd iteration on all points (the GPU when faiss has one), against the
  k-means++ start: how many iterations the start costs.
- objective: whether the cheaper start costs quality: the mean squared distance of a point to
  its centroid after 10 Lloyd iterations from each start (200,000 x 384, k = 200, seeds 0 and 1).
- float64: diffprune's CPU-independent float64 k-means at the default study's size (10,000 x
  1280, k = 10, 50 iterations at most) against faiss's float32 k-means on the same data.

`bench_kmeans` returns rows for `make bench`'s table (benchmarks/rows.py's keys; ratio =
baseline_value / value); `python benchmarks/kmeans.py [--quick]` prints them.
"""

from __future__ import annotations

import argparse
import time

import faiss
import numpy as np

from diffprune.cluster import INITS, kmeans, machine


def clustered(n: int, dim: int, k: int, seed: int = 0) -> np.ndarray:
    """n float32 points around k Gaussian centres (spread 1/4 of the centres'), in row chunks."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, dim), dtype=np.float32)
    x = np.empty((n, dim), dtype=np.float32)
    for lo in range(0, n, 100_000):
        rows = min(100_000, n - lo)
        x[lo : lo + rows] = centres[rng.integers(0, k, rows)]
        x[lo : lo + rows] += 0.25 * rng.standard_normal((rows, dim), dtype=np.float32)
    return x


def start_seconds(x: np.ndarray, k: int, init: str, seed: int = 0) -> float:
    """Wall seconds of faiss's start alone (the same code faiss.Kmeans runs before iterating)."""
    start = faiss.ClusteringInitialization(x.shape[1], k)
    start.method, start.seed = INITS[init], seed
    centroids = np.empty((k, x.shape[1]), dtype=np.float32)
    began = time.perf_counter()
    start.init_centroids(len(x), faiss.swig_ptr(x), faiss.swig_ptr(centroids))
    return time.perf_counter() - began


def lloyd_seconds(x: np.ndarray, k: int, iterations: int, gpu: bool) -> float:
    """Wall seconds per faiss Lloyd iteration on all points (random start: negligible)."""
    km = faiss.Kmeans(
        x.shape[1],
        k,
        niter=iterations,
        seed=0,
        gpu=gpu,
        init_method=INITS["random"],
        max_points_per_centroid=-(-len(x) // k),
        min_points_per_centroid=1,
    )
    began = time.perf_counter()
    km.train(x)
    return (time.perf_counter() - began) / iterations


def objective(x: np.ndarray, k: int, init: str, seed: int, iterations: int = 10) -> float:
    """Mean squared distance of a point to its centroid after `iterations` faiss Lloyd
    iterations from the start `init` (faiss's objective at the last iteration, over n)."""
    km = faiss.Kmeans(
        x.shape[1],
        k,
        niter=iterations,
        seed=seed,
        init_method=INITS[init],
        max_points_per_centroid=-(-len(x) // k),
        min_points_per_centroid=1,
    )
    km.train(x)
    return float(km.obj[-1]) / len(x)


def _timed(fn) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def _machine(gpu: bool) -> str:
    info = machine()
    where = f"{faiss.get_num_gpus()} GPU(s) for Lloyd, " if gpu else ""
    return (
        f"{where}{info['cpu']}, {faiss.omp_get_max_threads()} threads, faiss {info['faiss_simd']}"
    )


def bench_kmeans(
    n: int = 1_281_167,
    dim: int = 384,
    k: int = 1000,
    iterations: int = 2,
    default_n: int = 10_000,
    default_dim: int = 1280,
    default_k: int = 10,
    objective_size: tuple[int, int] = (200_000, 200),
) -> list[dict]:
    """Rows of the k-means benchmarks (seconds; see the module docstring)."""
    gpu = faiss.get_num_gpus() > 0
    where = "GPU" if gpu else "CPU"
    x = clustered(n, dim, k)
    size = f"{n:,} x {dim}, k = {k}"
    afk = start_seconds(x, k, "afk-mc2")
    plus = start_seconds(x, k, "k-means++")
    lloyd = lloyd_seconds(x, k, iterations, gpu)
    del x
    obj_n, obj_k = objective_size
    medium = clustered(obj_n, dim, obj_k, seed=1)
    seeds = (0, 1)
    msd = {
        i: [objective(medium, obj_k, i, seed) for seed in seeds] for i in ("afk-mc2", "k-means++")
    }
    del medium
    small = clustered(default_n, default_dim, default_k)
    exact = min(_timed(lambda: kmeans(small, k=default_k, backend="float64")) for _ in range(2))
    fast = min(
        _timed(lambda: kmeans(small, k=default_k, backend="faiss", device="cpu")) for _ in range(2)
    )
    rows = [  # (benchmark, baseline, value, baseline value, unit, on the GPU, notes)
        (
            f"afk-mc2 start, {size}",
            "k-means++ start",
            afk,
            plus,
            "s",
            False,
            "cluster.init; both starts run on the CPU",
        ),
        (
            f"faiss Lloyd iteration on {where}, all points, {size}",
            "k-means++ start",
            lloyd,
            plus,
            "s",
            gpu,
            "ratio: how many iterations the k-means++ start costs",
        ),
        (
            f"afk-mc2 start: mean squared distance after 10 iterations, {obj_n:,} x {dim}, "
            f"k = {obj_k}",
            "k-means++ start, the same iterations",
            float(np.mean(msd["afk-mc2"])),
            float(np.mean(msd["k-means++"])),
            "(mean squared distance)",
            False,
            "ratio > 1: afk-mc2 ends closer; per seed "
            + ", ".join(
                f"{a:.3g} vs {b:.3g}" for a, b in zip(msd["afk-mc2"], msd["k-means++"], strict=True)
            ),
        ),
        (
            f"float64 k-means, {default_n:,} x {default_dim}, k = {default_k}",
            "faiss float32 k-means, 50 iterations",
            exact,
            fast,
            "s",
            False,
            "the path whose clusters do not depend on the CPU",
        ),
    ]
    return [
        {
            "benchmark": name,
            "baseline": baseline,
            "value": value,
            "baseline_value": base,
            "unit": unit,
            "ratio": base / value,
            "machine": _machine(on_gpu),
            "notes": notes,
        }
        for name, baseline, value, base, unit, on_gpu, notes in rows
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100,000 x 384, k = 100 (a smoke run)")
    args = parser.parse_args()
    rows = bench_kmeans(n=100_000, k=100) if args.quick else bench_kmeans()
    print("| benchmark | baseline | value | baseline value | ratio | machine |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['benchmark']} | {row['baseline']} | {row['value']:.3g} "
            f"| {row['baseline_value']:.3g} | {row['ratio']:.3g} | {row['machine']} |"
        )


if __name__ == "__main__":
    main()
