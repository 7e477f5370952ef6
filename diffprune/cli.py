"""The `diffprune` command line. Each subcommand is a thin wrapper over library functions.

Bad input ends with exit status 2 and one line on stderr: `diffprune: error: <what is wrong>`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap
import time
from pathlib import Path
from typing import NoReturn

import numpy as np
import pandas as pd

import diffprune
from diffprune import advise, dvc_yaml
from diffprune.cluster import INITS, clusters_frame, kmeans, validate_embeddings
from diffprune.config import load_params
from diffprune.errors import DataError, DiffpruneError
from diffprune.io import load_json, provenance, save_json, save_parquet
from diffprune.names import BALANCED_ORDERS, SCORES, SEMDEDUP, Run, needs, validate_method
from diffprune.report import describe
from diffprune.select import KEEPS, rule, select, semdedup_record, sidecar


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line like every other error."""

    def error(self, message: str) -> NoReturn:
        _fail(message)


def _fail(message: str) -> NoReturn:
    print(f"diffprune: error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(2)


_KEEPS_HELP = "\n".join(
    textwrap.fill(text, width=88, initial_indent=f"  {name:<17} ", subsequent_indent=" " * 20)
    for name, text in KEEPS.items()
)
SELECT_EPILOG = f"""\
The pruning ratio p (--ratio) is the fraction of samples REMOVED, 0 <= p < 1; 1-p is kept.
Counts are floors: cluster rules keep floor(n_c(1-p)) of each cluster's n_c samples, the
others floor(N(1-p)) of all N samples; a selection that keeps no sample at all is an error.
Ties are broken by sample_id (cluster rules) or in a seeded random order (score rules).

What each --method KEEPS (<score> is one of {", ".join(SCORES)}):
{_KEEPS_HELP}

Cluster rules need --embeddings and --k (k-means is run) or --clusters (a clusters.parquet
with sample_id, cluster, distance); semdedup needs --embeddings and --k (it also reads the
cosine similarities; --semdedup-eps sets the threshold, else --ratio does); score rules
need --scores (a 1-D .npy with one score per sample, in sample_id order); random needs any
one of them to count the samples.

Output (--out): Parquet, one row per sample, sorted by sample_id, with columns
  sample_id (int64)
  keep      (bool: True = KEPT for training, False = removed)
  score     (float64, NaN without scores)
  cluster   (int64, -1 without clusters)
  distance  (float64, Euclidean distance to the own centroid, NaN without clusters)
and a JSON sidecar next to it (same name, .json; the workflow's format) with the run id,
method, ratio, direction, seed, k, counts, kept per cluster, the compute the selection cost
(compute.total_seconds), input hashes and code version.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="diffprune", description=diffprune.__doc__)
    parser.add_argument("--version", action="version", version=f"diffprune {diffprune.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = _Parser(add_help=False)  # options every subcommand takes
    common.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO level)")

    sel = sub.add_parser(
        "select",
        parents=[common],
        help="choose the training samples to keep and write a prune manifest",
        description="Choose the training samples to keep and write a prune manifest.",
        epilog=SELECT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sel.add_argument("--method", required=True, help="selection rule (see below)")
    sel.add_argument(
        "--ratio", required=True, type=float, help="fraction of samples REMOVED, in [0, 1)"
    )
    sel.add_argument("--out", required=True, type=Path, help="manifest Parquet to write")
    source = sel.add_mutually_exclusive_group()
    source.add_argument(
        "--embeddings", type=Path, help="float (N, D) .npy, rows in sample_id order"
    )
    source.add_argument("--clusters", type=Path, help="precomputed clusters.parquet")
    sel.add_argument("--scores", type=Path, help="1-D .npy of N scores in sample_id order")
    sel.add_argument("--k", type=int, help="number of k-means clusters (with --embeddings)")
    sel.add_argument("--iterations", type=int, default=50, help="k-means iterations (50)")
    sel.add_argument("--init", choices=INITS, default="k-means++", help="k-means initialisation")
    sel.add_argument("--seed", type=int, default=0, help="seed for k-means and random rules (0)")
    sel.add_argument(
        "--balanced-order",
        choices=BALANCED_ORDERS,
        default="furthest",
        help="which samples cluster-balanced takes in each cluster (furthest)",
    )
    sel.add_argument("--device", default="auto", help="k-means device: auto, cpu, cuda (auto)")
    sel.add_argument(
        "--semdedup-eps",
        type=float,
        help="semdedup: remove above cosine similarity 1 - eps (default: set by --ratio)",
    )
    sel.set_defaults(func=cmd_select)
    adv = sub.add_parser(
        "advise",
        parents=[common],
        help="how much data can be dropped, and with which method (from a study's results)",
        description=advise.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    adv.add_argument("results_dir", type=Path, help="a study's report dir (has summary.csv)")
    adv.add_argument("--metric", help="headline metric (default: params' report.metric)")
    adv.add_argument("--margin", type=float, help="default: params' report.claims.margin")
    adv.add_argument("--params", type=Path, default=Path("params.yaml"), help="(params.yaml)")
    adv.set_defaults(func=cmd_advise)
    dvc_yaml.add_parser(sub, [common])
    return parser


def cmd_select(args: argparse.Namespace) -> None:
    method = validate_method(args.method)
    inputs, n, clusters, scores, clustering, embeddings = _select_inputs(args, method)
    start = time.perf_counter()
    manifest = select(
        method,
        args.ratio,
        n=n,
        clusters=clusters,
        scores=scores,
        seed=args.seed,
        balanced_order=args.balanced_order,
        embeddings=embeddings,
        semdedup_eps=args.semdedup_eps,
    )
    seconds = time.perf_counter() - start
    params = {
        "method": method,
        "ratio": args.ratio,
        "seed": args.seed,
        "k": None if clusters is None else int(clusters["cluster"].nunique()),
        "iterations": args.iterations if clustering else None,
        "init": args.init if clustering else None,
        "balanced_order": args.balanced_order,
        "semdedup_eps": args.semdedup_eps,
    }
    compute = {"select_seconds": seconds}
    dedup = method == SEMDEDUP
    if clustering:
        compute["clusters_seconds"] = clustering.seconds
    meta = sidecar(
        manifest,
        run=Run(method, args.ratio),
        seed=args.seed,
        **rule(method, balanced_order=args.balanced_order),
        compute=compute,
        k=params["k"],
        embedder=_embedder(args.embeddings),
        iterations=params["iterations"],
        init=params["init"],
        balanced_order=args.balanced_order,
        **(semdedup_record(manifest, args.ratio, args.semdedup_eps) if dedup else {}),
        provenance=provenance(params=params, inputs=inputs),
    )
    save_parquet(args.out, manifest)
    save_json(args.out.with_suffix(".json"), meta)
    print(
        f"{args.out}: kept {meta['n_kept']} of {meta['n_total']} samples ({method}, p={args.ratio})"
    )


def cmd_advise(args: argparse.Namespace) -> None:
    metric, margin = args.metric, args.margin
    if metric is None or margin is None:
        report = load_params(args.params, check_cuda=False)["report"]
        metric = metric or report["metric"]
        margin = report["claims"]["margin"] if margin is None else margin
    if not 0 <= margin < 1:
        raise DataError(f"--margin must be a fraction in [0, 1), got {margin}")
    frame = advise.read_summary(args.results_dir)
    better = describe(metric)[2].startswith("higher")
    print(advise.advice(frame, metric=metric, higher_is_better=better, margin=margin), end="")


def _select_inputs(args: argparse.Namespace, method: str):
    """Read the inputs `method` needs, running k-means when it needs clusters of the embeddings.

    Returns (input paths by name, n, clusters table, scores, clustering, embeddings when the
    method reads them); absent ones are None.
    """
    needs_clusters = "clusters" in needs(method)
    if needs_clusters and args.embeddings is None and args.clusters is None:
        raise DataError(f"method {method!r} needs --embeddings (with --k) or --clusters")
    if needs_clusters and args.embeddings is not None and args.k is None:
        raise DataError(f"method {method!r} clusters the embeddings: pass --k")
    if "embeddings" in needs(method) and args.embeddings is None:
        raise DataError(f"method {method!r} needs --embeddings (cosine similarities)")
    if needs(method) - {"clusters", "embeddings"} and args.scores is None:
        raise DataError(f"method {method!r} needs --scores")
    if args.embeddings is None and args.clusters is None and args.scores is None:
        raise DataError(f"method {method!r} needs --embeddings, --clusters or --scores")
    inputs, n, clusters, scores, clustering, embeddings = {}, None, None, None, None, None
    if args.clusters is not None:
        inputs["clusters"] = args.clusters
        clusters = _read(args.clusters, pd.read_parquet)
    if args.embeddings is not None:
        inputs["embeddings"] = args.embeddings
        embeddings = validate_embeddings(_read(args.embeddings, np.load))
        n = len(embeddings)
        if needs_clusters:
            clustering = kmeans(
                embeddings,
                k=args.k,
                iterations=args.iterations,
                seed=args.seed,
                device=args.device,
                init=args.init,
                key="--k",
            )
            clusters = clusters_frame(clustering)
    if args.scores is not None:
        inputs["scores"] = args.scores
        scores = _read(args.scores, np.load)
    if "embeddings" not in needs(method):
        embeddings = None
    return inputs, n, clusters, scores, clustering, embeddings


def _read(path: Path, reader):
    """Load an input file; a missing or unreadable file is a DataError naming it."""
    try:
        return reader(path)
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read {path}: {err}") from err


def _embedder(embeddings: Path | None) -> str | None:
    """Model name from the embeddings' JSON sidecar (embeddings.json), when there is one."""
    if embeddings is None or not embeddings.with_suffix(".json").is_file():
        return None
    return load_json(embeddings.with_suffix(".json")).get("model")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s"
    )
    try:
        args.func(args)
    except (DiffpruneError, OSError) as err:  # bad input or unwritable output: one line
        _fail(str(err))
    return 0
