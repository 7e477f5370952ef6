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
- fit_size (`bench_fit_size`): k-means beyond memory (`cluster.fit_size`) on memory-mapped
  clustered data written to a scratch file in chunks (1.28M x 384 and 10M x 384, k = 1000):
  wall time and peak numpy memory of the fit on a k * 256-point sample and of the chunked
  assignment of every point, against fitting on all points in memory where that fits in RAM.

`bench_kmeans` and `bench_fit_size` return rows for `make bench`'s table (benchmarks/rows.py's
keys; ratio = baseline_value / value); `python benchmarks/kmeans.py [--fit-size] [--quick]`
prints them.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from diffprune.cluster import INITS, kmeans, machine

POINTS_PER_CENTROID = 256  # faiss's rule of thumb for a k-means sample (max_points_per_centroid)
SCRATCH_RESERVE = 2 * 2**30  # bytes left free on the scratch disk


def clustered(n: int, dim: int, k: int, seed: int = 0) -> np.ndarray:
    """n float32 points around k Gaussian centres (spread 1/4 of the centres'), in row chunks."""
    x = np.empty((n, dim), dtype=np.float32)
    for lo, rows in _clustered_chunks(n, dim, k, seed):
        x[lo : lo + len(rows)] = rows
    return x


def _clustered_chunks(n: int, dim: int, k: int, seed: int) -> Iterator[tuple[int, np.ndarray]]:
    """`clustered`'s rows, 100,000 at a time (the same draws in the same order)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, dim), dtype=np.float32)
    for lo in range(0, n, 100_000):
        rows = centres[rng.integers(0, k, min(100_000, n - lo))]
        rows += 0.25 * rng.standard_normal(rows.shape, dtype=np.float32)
        yield lo, rows


def write_clustered(path: Path, n: int, dim: int, k: int, seed: int = 0) -> np.memmap:
    """`clustered(n, dim, k, seed)` written to a .npy file in chunks; returned memory-mapped."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
    for lo, rows in _clustered_chunks(n, dim, k, seed):
        out[lo : lo + len(rows)] = rows
    out.flush()
    del out
    return np.load(path, mmap_mode="r")


def rows_that_fit(n: int, dim: int, free_bytes: int, reserve: int = SCRATCH_RESERVE) -> int:
    """n, or the most float32 rows of `dim` that fit in free_bytes less the reserve."""
    return max(0, min(n, (free_bytes - reserve) // (dim * 4)))


def available_memory() -> int:
    """Bytes of memory available to a new allocation (MemAvailable: free plus reclaimable cache)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def measured(fn: Callable[[], Any]) -> tuple[float, int, Any]:
    """Wall seconds, peak bytes of numpy (and other Python) allocations, and fn's result.

    tracemalloc sees numpy's array data, not faiss's own buffers (about 12 bytes per point it
    fits) nor the pages of a memory-mapped file, which are the OS's cache and can be dropped.
    """
    tracemalloc.start()
    try:
        began = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - began
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return seconds, peak, result


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
        _row(name, baseline, value, base, unit, notes, on_gpu)
        for name, baseline, value, base, unit, on_gpu, notes in rows
    ]


def _timed_kmeans(path: Path, k: int, iterations: int, fit_size: int | None) -> dict:
    """kmeans of the .npy, measured: seconds (fit, then assignment), peak MB, mean squared
    distance. With fit_size, memory-mapped; without, loaded into memory first: every Lloyd
    iteration reads every point, so a memory map's working set would be the whole file too,
    only hidden from tracemalloc in the OS's page cache."""
    mode = "r" if fit_size else None
    seconds, peak, result = measured(
        lambda: kmeans(
            np.load(path, mmap_mode=mode), k=k, iterations=iterations, seed=0, fit_size=fit_size
        )
    )
    return {
        "s": seconds,
        "fit_s": result.fit_seconds,
        "mb": peak / 1e6,
        "msd": float(np.mean(result.distances.astype(np.float64) ** 2)),
        "backend": result.backend,
    }


def _fit_size_rows(
    size: str, run: dict, full: dict | None, small: tuple[int, dict] | None, bytes_: int
) -> list[tuple]:
    """One size's rows: time, memory and fit quality against fitting on all points where that
    ran; else time against the smaller size's run and memory against holding the embeddings."""
    notes = (
        f"fit on the sample ({run['backend']}) {run['fit_s']:.3g} s, chunked assignment "
        f"{run['s'] - run['fit_s']:.3g} s; memory: numpy allocations (tracemalloc)"
    )
    if full is not None:
        base = "fit on all points, in memory"
        return [
            (size, base, run["s"], full["s"], "s", notes + f"; baseline fit {full['fit_s']:.3g} s"),
            (f"{size}: peak memory", base, run["mb"], full["mb"], "MB", notes),
            (
                f"{size}: mean squared distance to the own centroid",
                base,
                run["msd"],
                full["msd"],
                "(mean squared distance)",
                "ratio < 1: the sample's centroids fit all points worse by that factor",
            ),
        ]
    rows = []
    if small is not None:
        smaller = f"the same at {small[0]:,} points"
        rows.append((size, smaller, run["s"], small[1]["s"], "s", "ratio: growth; " + notes))
    whole = "the embeddings held in memory (N x D float32)"
    skipped = "; fitting on all points not run: the embeddings exceed half the available memory"
    rows.append((f"{size}: peak memory", whole, run["mb"], bytes_ / 1e6, "MB", notes + skipped))
    return rows


def bench_fit_size(
    sizes: tuple[int, ...] = (1_281_167, 10_000_000),
    dim: int = 384,
    k: int = 1000,
    iterations: int = 20,
    scratch: Path | None = None,
) -> list[dict]:
    """Rows of the fit_size benchmark (see the module docstring): for each size, in increasing
    order, a clustered .npy written to `scratch` (default: the temp folder; the largest size that
    fits its free disk), the sampled run, and fitting on all points where that fits in RAM."""
    fit_size = min(k * POINTS_PER_CENTROID, min(sizes))
    kmeans(clustered(10, 2, 2), k=2, device="auto")  # imports torch (device), not in the timings
    rows, small = [], None
    with tempfile.TemporaryDirectory(dir=scratch, prefix="bench-kmeans-") as folder:
        for wanted in sorted(sizes):
            n = rows_that_fit(wanted, dim, shutil.disk_usage(folder).free)
            reduced = "" if n == wanted else f" (not {wanted:,}: the scratch disk is full)"
            path = Path(folder) / f"x{n}.npy"
            mapped = write_clustered(path, n, dim, k)
            run = _timed_kmeans(path, k, iterations, fit_size)
            fits = 2 * mapped.nbytes < available_memory()
            full = _timed_kmeans(path, k, iterations, None) if fits else None
            size = (
                f"k-means, fit_size = {fit_size:,} (k * {POINTS_PER_CENTROID}), {n:,} x {dim}, "
                f"k = {k}, memory-mapped{reduced}"
            )
            rows += _fit_size_rows(size, run, full, small, mapped.nbytes)
            small = (n, run)
            del mapped
            path.unlink()
    gpu = faiss.get_num_gpus() > 0
    return [_row(*r, on_gpu=gpu) for r in rows]


def _row(
    name: str, baseline: str, value: float, base: float, unit: str, notes: str, on_gpu: bool
) -> dict:
    return {
        "benchmark": name,
        "baseline": baseline,
        "value": value,
        "baseline_value": base,
        "unit": unit,
        "ratio": base / value,
        "machine": _machine(on_gpu),
        "notes": notes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    parser.add_argument("--fit-size", action="store_true", help="only the fit_size benchmark")
    parser.add_argument("--scratch", type=Path, help="folder for its data (default: temp folder)")
    args = parser.parse_args()
    if args.fit_size:
        quick = {"sizes": (20_000, 100_000), "dim": 64, "k": 50} if args.quick else {}
        rows = bench_fit_size(scratch=args.scratch, **quick)
    else:
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
