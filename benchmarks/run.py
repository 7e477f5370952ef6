"""`make bench`: every benchmark against its baseline, measured in the same run, as one table.

Each benchmark module has a `bench_*()` function that returns rows (benchmarks/rows.py):
benchmark, baseline, value, baseline_value, unit, ratio (how many times better than the
baseline), notes; this script adds the machine and writes results/bench/bench.csv and bench.md.

- fd.py: Fréchet distance and KID, diffprune.metrics against clean-fid's functions;
- evaluation.py: an evaluation job with and without the reference rule's neighbour statistics;
- imports.py: the evaluate job's start-up, lazy against eager imports;
- embedding.py: the embed stage with channels_last and the allocator setting, against neither;
- grand.py: batched GraNd against the reference's batch-size-1 loop;
- kmeans.py: the afk-mc2 and k-means++ starts and a Lloyd iteration at ImageNet scale, and the
  float64 path against faiss at the default study's size.
- kmeans.py (bench_fit_size): k-means beyond memory, cluster.fit_size's sampled fit and chunked
  assignment on memory-mapped 1.28M x 384 and 10M x 384 sets, against fitting on all points.

`--quick` runs small sizes (a smoke run, minutes); it writes nothing unless `--out` says
where. The GPU check is separate: benchmarks/gpu_check.py.
"""

from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path

from embedding import bench_embedding
from evaluation import bench_evaluate
from fd import bench_fd
from grand import bench_grand
from imports import bench_imports
from kmeans import bench_fit_size, bench_kmeans
from rows import ROW_KEYS, machine, machine_label

from diffprune.io import atomic_path, code_version

OUT = Path("results/bench")


def benchmarks(quick: bool) -> list:
    """(name, zero-argument callable returning rows), in table order."""
    jobs = [
        ("fd", lambda: bench_fd(n_ref=500, n_gen=128, dim=256) if quick else bench_fd()),
        ("evaluate", lambda: bench_evaluate(2000, 400, 128) if quick else bench_evaluate()),
        ("imports", lambda: bench_imports(repeats=1 if quick else 3)),
        ("embedding", lambda: bench_embedding(n=256 if quick else 1024)),
        ("grand", lambda: bench_grand(n=16 if quick else 128)),
        (
            "kmeans",
            lambda: (
                bench_kmeans(n=100_000, k=100, objective_size=(20_000, 50))
                if quick
                else bench_kmeans()
            ),
        ),
        (
            "kmeans-fit-size",
            lambda: (
                bench_fit_size(sizes=(20_000, 100_000), dim=64, k=50) if quick else bench_fit_size()
            ),
        ),
    ]
    return jobs


def markdown(rows: list[dict], machine_text: str, version: str) -> str:
    lines = [
        "# Benchmarks",
        "",
        f"`make bench` (benchmarks/run.py), code version {version}, on: {machine_text}.",
        "Ratio: how many times faster than the baseline, both measured in the same run.",
        "",
        "| benchmark | value | baseline | baseline value | ratio | notes |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        notes = r["notes"].replace("|", "\\|")  # a bare | would end the table cell
        lines.append(
            f"| {r['benchmark']} | {r['value']:.3g} {r['unit']} | {r['baseline']} | "
            f"{r['baseline_value']:.3g} {r['unit']} | **{r['ratio']:.2f}x** | {notes} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    parser.add_argument("--out", type=Path, help=f"output folder (default {OUT}, not with --quick)")
    args = parser.parse_args()
    out = args.out or (None if args.quick else OUT)
    info = machine()
    label = machine_label(info)
    rows = []
    for name, job in benchmarks(args.quick):
        for r in job():
            rows.append({**r, "machine": r.get("machine", label)})
            print(f"{name}: {r['benchmark']}: {r['ratio']:.2f}x ({r['notes']})", flush=True)
    if out is None:
        return
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=ROW_KEYS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({key: r[key] for key in ROW_KEYS} for r in rows)
    with atomic_path(out / "bench.csv") as tmp:
        tmp.write_text(text.getvalue())
    with atomic_path(out / "bench.md") as tmp:
        tmp.write_text(markdown(rows, label, code_version()))


if __name__ == "__main__":
    main()
