"""Fréchet distance and KID: diffprune.metrics against clean-fid's own functions, same inputs.

The sizes are the default study's EfficientNet-Lite0 space: 2,000 reference rows, 512 generated
samples, 1,280 dimensions (random features with a random covariance). One thread, as in the
evaluate rule (`threads: 1`).
"""

from __future__ import annotations

import numpy as np
from cleanfid import fid as cleanfid_fid
from rows import one_thread, row, timed

from diffprune.metrics import frechet_distance, kid, reference_stats


def features(n_ref: int, n_gen: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    return rng.normal(size=(n_ref, dim)) @ mixing, rng.normal(0.1, 1.0, (n_gen, dim)) @ mixing


def bench_fd(n_ref: int = 2000, n_gen: int = 512, dim: int = 1280, repeats: int = 2) -> list[dict]:
    ref, gen = features(n_ref, n_gen, dim)
    a, b = reference_stats(gen), reference_stats(ref)
    sizes = f"{n_gen} generated vs {n_ref} reference rows, {dim}-d"

    def cleanfid_fd():
        return cleanfid_fid.frechet_distance(a["mu"], a["sigma"], b["mu"], b["sigma"])

    with one_thread():
        old_s, old = timed(cleanfid_fd, repeats)
        new_s, new = timed(lambda: frechet_distance(a, b), repeats)
        np.random.seed(0)
        old_kid_s, old_kid = timed(lambda: cleanfid_fid.kernel_distance(gen, ref), 1)
        new_kid_s, new_kid = timed(lambda: kid(gen, ref, seed=0), repeats)
    return [
        row(
            "FD: eigenvalues of sqrt(S1) S2 sqrt(S1)",
            baseline="clean-fid frechet_distance (scipy sqrtm)",
            value=new_s, baseline_value=old_s, unit="s",
            notes=f"{sizes}, one thread, best of {repeats}; "
            f"relative difference {abs(new / old - 1):.1e}",
        ),
        row(
            "KID: subsets read from Gram matrices",
            baseline="clean-fid kernel_distance (3 products per subset)",
            value=new_kid_s, baseline_value=old_kid_s, unit="s",
            notes=f"{sizes}, one thread; 100 subsets of {min(n_gen, n_ref)}; relative difference"
            f" {abs(new_kid - old_kid) / abs(old_kid):.1e}",
        ),
    ]  # fmt: skip
