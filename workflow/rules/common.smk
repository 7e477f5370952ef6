# Shared by all rules: config validation, the study grid and input functions.
from diffprune import names, paths
from diffprune.config import check_gpu_requests, grid, validate_params
from diffprune.defaults import with_defaults
from diffprune.manifest import check_footer
from diffprune.names import FULL, SKEW, Run, needs
from snakemake_interface_executor_plugins.settings import ExecMode

validate_params(config, source="params.yaml (with --config overrides)")
# The GPUs one node has, where declared (`--resources gpu=N`, or a profile's `resources:`): a job
# asking for more would wait in the queue forever; named here, before any submission.
check_gpu_requests(
    config,
    workflow.global_resources.get("gpu").value,
    source="params.yaml (with --config overrides)",
)


onstart:
    # A `*.device: cuda` without CUDA here: one line naming the key before any job runs, where
    # the jobs run on this machine; a cluster's nodes may have the GPUs this one lacks, so there
    # the job checks (diffprune.device names the key). torch loads only if a key asks for cuda.
    if workflow.local_exec and workflow.exec_mode == ExecMode.DEFAULT:
        validate_params(config, source="params.yaml (with --config overrides)", check_cuda=True)

GRID = grid(config)
REPORT = config["report"]["dir"]
SKEW_RUNS = [(Run.skew(arm).name, seed) for arm in config["skew"]["arms"] for seed in config["study"]["seeds"]]
SPLITS = names.SPLITS
# clusters.json when a run of the grid selects by clusters: the report warns of degenerate ones
CLUSTERS_META = [
    paths.clusters_meta()
    for run, _ in GRID
    if run.method != FULL and "clusters" in needs(run.method)
][:1]


wildcard_constraints:
    **names.wildcard_constraints(),


def store_files(split):
    return [paths.store_images(split), paths.store_index(split), paths.store_meta(split)]


def selection_inputs(wildcards):
    """What a run's selection reads: clusters for cluster rules (and the embeddings for
    semdedup), a score file for score rules."""
    inputs = {"index": paths.store_index("train")}
    method = Run.parse(wildcards.run).method
    for need in () if method == FULL else needs(method):
        if need == "clusters":
            inputs["clusters"] = paths.clusters()
            inputs["clusters_meta"] = paths.clusters_meta()
            inputs["embeddings_meta"] = paths.embeddings_meta()
        elif need == "embeddings":
            inputs["embeddings"] = paths.embeddings()
        else:
            score = need.removeprefix("scores:")
            inputs["scores"] = paths.scores(score)
            inputs["scores_meta"] = paths.scores_meta(score)
    return inputs


LATENT = config["train"].get("space", "pixel") == "latent"


def train_inputs(wildcards):
    """The train store and the run's manifest; in latent space also the cached latents.

    A damaged manifest is moved aside here, while planning, so that its select job runs before
    this train job deletes the model (diffprune.manifest).
    """
    check_footer(paths.manifest(wildcards.run, wildcards.seed))
    inputs = {
        "store": store_files("train"),
        "manifest": paths.manifest(wildcards.run, wildcards.seed),
    }
    if LATENT:
        inputs |= {"latents": paths.latents(), "latents_meta": paths.latents_meta()}
    return inputs


def sample_inputs(wildcards):
    """The model; a latent model also decodes through the autoencoder folder."""
    inputs = {"model": paths.model(wildcards.run, wildcards.seed)}
    if LATENT:
        inputs["autoencoder"] = paths.autoencoder()
    return inputs


def surrogate_for(wildcards):
    return paths.surrogate(names.SURROGATE_OF[wildcards.score])


def reference_inputs(wildcards):
    inputs = {"store": store_files(wildcards.split)}
    if wildcards.feature == "classifier":
        inputs["classifier"] = paths.classifier()
    return inputs


def evaluate_inputs(wildcards):
    features = config["evaluate"]["features"]
    inputs = {
        "samples": paths.samples(wildcards.run, wildcards.seed),
        "manifest": paths.manifest(wildcards.run, wildcards.seed),
        "manifest_meta": paths.manifest_meta(wildcards.run, wildcards.seed),
        "model": paths.model(wildcards.run, wildcards.seed),
        "train_index": paths.store_index("train"),
        "test_references": [paths.reference("test", f) for f in features],
        "train_references": [paths.reference("train", f) for f in features],
        "modes": [paths.modes(f) for f in features],
    }
    if "classifier" in features:
        inputs["classifier"] = paths.classifier()
    return inputs


def report_metrics():
    """The headline metric first, then the others the report tabulates."""
    return list(dict.fromkeys([config["report"]["metric"], *config["report"]["metrics"]]))


# --- Run by DVC (dvc.yaml's commands set DIFFPRUNE_DVC): DVC runs one stage at a time, so a stage
# of one job may use all cores; a stage of several seeds keeps 1 thread per small job and runs
# them side by side, as Snakemake itself does. A dvc.yaml generated for another grid is refused
# before anything runs.
import os
from pathlib import Path

from diffprune.code_deps import library_modules
from diffprune.dvc_yaml import ONE_JOB, RUN_ENV, SEEDS, check_fresh, check_params_unchanged

BY_DVC = os.environ.get(RUN_ENV) in (ONE_JOB, SEEDS)
SMALL_JOB_THREADS = workflow.cores if os.environ.get(RUN_ENV) == ONE_JOB else 1
if BY_DVC:
    check_fresh(config, "dvc.yaml")


onsuccess:
    # DVC records params.yaml's values after this command: refuse when the job's were edited
    # while it ran, so that the lock never claims outputs made with other values.
    if BY_DVC:
        check_params_unchanged(workflow.dag.finished_jobs, config, "params.yaml")



# The checkout this workflow's files live in (the Snakefile may be run with another --directory).
CHECKOUT = Path(workflow.current_basedir.get_path_or_uri(secret_free=True)).parent.parent


def library_code(rule):
    """The library modules a rule's script (workflow/scripts/<rule>.py) imports: inputs of its
    jobs, so Snakemake reruns a job when one changes, as DVC does (dvc.yaml lists them as deps).
    Relative to the working directory when inside it (as in dvc.yaml), else absolute."""
    files = [CHECKOUT / f for f in library_modules(f"workflow/scripts/{rule}.py", root=CHECKOUT)]
    here = Path.cwd()
    return [str(f.relative_to(here)) if f.is_relative_to(here) else str(f) for f in files]
