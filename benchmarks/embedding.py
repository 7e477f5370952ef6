"""The embed stage's speed settings: channels_last and the job's allocator setting.

Each variant runs in a fresh process (the allocator setting lasts a process): EfficientNet-Lite0
at the default 64 px, batches of 256, gray 28x28 images, after one warm-up batch.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from rows import row

RUN = """
import sys, time
import numpy as np
from diffprune.allocator import keep_freed_memory
from diffprune.embed import embed_images, load_embedder
channels_last, keep, n, out = sys.argv[1] == "1", sys.argv[2] == "1", int(sys.argv[3]), sys.argv[4]
if keep:
    assert keep_freed_memory()
embedder = load_embedder("efficientnet-lite0", image_size=64, device="cpu",
                         channels_last=channels_last)
images = np.random.default_rng(0).integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)
embed_images(images[:256], embedder, progress=False)
start = time.perf_counter()
embeddings = embed_images(images, embedder, batch_size=256, progress=False)
print(time.perf_counter() - start)
np.save(out, embeddings)
"""

VARIANTS = {
    "default": (False, False),
    "channels_last": (True, False),
    "allocator": (False, True),
    "channels_last + allocator": (True, True),
}


def bench_embedding(n: int = 1024) -> list[dict]:
    seconds, embeddings = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (channels_last, keep) in VARIANTS.items():
            out = Path(tmp) / f"{len(seconds)}.npy"
            args = [str(int(channels_last)), str(int(keep)), str(n), str(out)]
            result = subprocess.run(
                [sys.executable, "-c", RUN, *args],
                capture_output=True, text=True, check=True, env=dict(os.environ),
            )  # fmt: skip
            seconds[name] = float(result.stdout.split()[-1])
            embeddings[name] = np.load(out)
    base = embeddings["default"]
    rows = []
    for name in list(VARIANTS)[1:]:
        diff = float(np.abs(embeddings[name] - base).max() / np.abs(base).max())
        same = "bit-identical embeddings" if diff == 0 else f"max difference {diff:.1e} of max |x|"
        rows.append(
            row(
                f"embed ({name})",
                baseline="embed (NCHW, default malloc)",
                value=n / seconds[name],
                baseline_value=n / seconds["default"],
                unit="images/s",
                notes=f"EfficientNet-Lite0, 64 px, batch 256, {n} images; {same}",
            )
        )
    return rows
