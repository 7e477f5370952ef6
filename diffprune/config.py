"""Load params.yaml and check it against the JSON schema before any job starts.

Errors name the key, the bad value and what is allowed, one line per problem, e.g.
`params.yaml: train.steps = 0: must be >= 1`.

The schema checks each value on its own (integers must be written as integers: 300, not 300.0);
`_semantic_problems` then checks what crosses keys or needs knowledge of the stages: metric names,
sizes against the data, resolutions against the models, devices against the machine.
"""

from __future__ import annotations

import difflib
import functools
import math
import os
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import jsonschema

from diffprune import params_yaml
from diffprune.config_data import (
    FASHION_MNIST,
    folder_problems,
    label_problems,
    source_problems,
    train_images,
)
from diffprune.config_devices import check_gpu_requests as check_gpu_requests
from diffprune.config_devices import device_problems
from diffprune.config_devices import gpu_request_problems as gpu_request_problems
from diffprune.defaults import DIT_SIZES, fill, schema
from diffprune.defaults import SCHEMA as SCHEMA  # tests and tools read the schema's path here
from diffprune.errors import ConfigError
from diffprune.names import FULL, Run, feature_key, scores_for

# Metric names that evaluate writes: `<base>_<space>` per feature space (evaluate_samples,
# metrics.novelty and metrics.coverage), plus the classifier's class balance (class_balance).
# tests/test_bad_params.py checks them against a real evaluation.
METRIC_BASES = (
    "fd", "kid", "precision", "recall", "vendi", "novelty_mean", "novelty_median",
    "novelty_kept_mean", "novelty_kept_median", "near_copy_share", "near_copy_threshold",
    "novelty_kept_near_copy_share", "novelty_kept_near_copy_threshold", "mode_coverage",
    "occupancy_kl",
)  # fmt: skip
CLASS_METRICS = ("class_kl", "class_share_min", "class_share_ratio_min")


def load_params(
    path: str | os.PathLike = "params.yaml", *, check_cuda: bool = True
) -> dict[str, Any]:
    """Read and validate a params file; raise ConfigError listing every problem. Returns it with
    every optional key filled from the schema's defaults (defaults.fill)."""
    params = params_yaml.read(path)
    validate_params(params, source=str(path), check_cuda=check_cuda)
    return fill(params)


def validate_params(params: Any, *, source: str = "params.yaml", check_cuda: bool = False) -> None:
    """Raise ConfigError listing every problem of `params`, one line each.

    `check_cuda`: also refuse a `device: cuda` that no visible GPU serves. Off by default, as
    Snakemake validates at every parse of the Snakefile, dry runs and cluster submission included,
    where the GPUs are on the machines that run the jobs.
    """
    errors = sorted(
        _validator().iter_errors(params), key=lambda e: [str(p) for p in e.absolute_path]
    )
    problems = [_describe(error) for error in errors]
    if not problems:
        problems = _semantic_problems(params) + (device_problems(params) if check_cuda else [])
    if problems:
        raise ConfigError("\n".join(f"{source}: {problem}" for problem in problems))


def value_problems(section: str, cfg: dict[str, Any]) -> list[str]:
    """The schema's problems with each value that `cfg` (a possibly partial params[`section`])
    gives, worded as validate_params words them: library entry points called without a validated
    params file check their arguments by the same rules. Keys the schema does not know pass."""
    known = schema()["properties"][section]["properties"]
    given = {key: value for key, value in cfg.items() if key in known}
    part = {"properties": {section: {"properties": {key: known[key] for key in given}}}}
    validator = _validator().evolve(schema={**part, "$defs": schema()["$defs"]})
    errors = validator.iter_errors({section: given})
    return [_describe(error) for error in sorted(errors, key=lambda e: list(e.absolute_path))]


def grid(params: dict[str, Any]) -> list[tuple[Run, int]]:
    """Every (run, seed) of the study: the baseline, the extra runs, then methods x ratios."""
    study = params["study"]
    runs = [Run(FULL)] if study["baseline"] else []
    runs += [Run.parse(name) for name in study["extra_runs"]]
    runs += [Run(m, float(r)) for m in study["methods"] for r in study["ratios"]]
    runs = list(dict.fromkeys(runs))  # an extra run may also be a grid point
    return [(run, seed) for run in runs for seed in study["seeds"]]


def metric_names(features: list[str]) -> list[str]:
    """Every metric that evaluate writes for the feature spaces `features` (evaluate.features)."""
    names = [f"{base}_{feature_key(feature)}" for feature in features for base in METRIC_BASES]
    if "classifier" in features:
        names += CLASS_METRICS
    return names


# --------------------------------------------------------------------------- schema
def _strict_integer(checker: Any, instance: Any) -> bool:
    """JSON Schema counts 300.0 as an integer; the stages need a Python int (bool is not one)."""
    return isinstance(instance, int) and not isinstance(instance, bool)


@functools.cache
def _validator() -> jsonschema.protocols.Validator:
    base = jsonschema.Draft202012Validator
    strict = jsonschema.validators.extend(
        base, type_checker=base.TYPE_CHECKER.redefine("integer", _strict_integer)
    )
    return strict(schema())


# --------------------------------------------------------------------------- cross-key rules
def _semantic_problems(params: dict[str, Any]) -> list[str]:
    """Rules that cross keys, which the schema cannot say (on params with the defaults filled)."""
    params = fill(params)
    return [problem for check in CHECKS for problem in check(params)]


def _study_problems(params: dict[str, Any]) -> list[str]:
    study, problems = params["study"], []
    if not study["baseline"] and not (study["methods"] and study["ratios"]):
        problems.append("study: the grid is empty; set baseline: true or give methods and ratios")
    for i, ratio in enumerate(study["ratios"]):
        if float(repr(float(ratio))) != ratio or "e" in repr(float(ratio)):
            problems.append(f"study.ratios: {ratio!r} cannot be written as a plain decimal run id")
        elif ratio == 0:
            problems.append(
                f"study.ratios.{i} = {ratio!r}: ratio 0 gets run ids that DVC and Snakemake spell "
                "differently (random_r0, random_r0.0); allowed: 0 < ratio < 1; for full data use "
                "study.baseline: true, for the paper's balanced rule "
                "study.extra_runs: [cluster-balanced_r0.0]"
            )
    return problems + _kept_problems(study["ratios"], train_images(params["data"]))


def _kept_problems(ratios: list[float], images: tuple[int, str] | None) -> list[str]:
    """Random and score rules keep floor(N * (1 - ratio)) images (select.select): at least 1."""
    if images is None:
        return []
    n, origin = images
    return [
        f"study.ratios.{i} = {ratio!r}: keeps floor({n} * (1 - {ratio})) = 0 of the N = {n} "
        f"training images ({origin}); allowed: ratio <= 1 - 1/N = {1 - 1 / n:.6g}"
        for i, ratio in enumerate(ratios)
        if ratio and math.floor(n * (1 - Fraction(str(ratio)))) == 0
    ]


def _cluster_problems(params: dict[str, Any]) -> list[str]:
    k, images = params["cluster"]["k"], train_images(params["data"])
    fit_size = params["cluster"].get("fit_size")
    problems = []
    if images is not None and k > images[0]:
        problems.append(
            f"cluster.k = {k}: must be <= the number of training images clustered, "
            f"{images[0]} ({images[1]})"
        )
    if fit_size is not None and (fit_size < k or (images is not None and fit_size > images[0])):
        upper = "the number of training images" if images is None else f"{images[0]} ({images[1]})"
        problems.append(
            f"cluster.fit_size = {fit_size}: must be null (fit on all points) or in "
            f"[cluster.k, N] = [{k}, {upper}]"
        )
    return problems


def _score_problems(params: dict[str, Any]) -> list[str]:
    study, scores, train, problems = params["study"], params["scores"], params["train"], []
    needed = scores_for(study["methods"])
    space = train["space"]
    if needed and (train["model"], space) != ("unet2d", "pixel"):
        problems.append(
            f"study.methods has score methods ({', '.join(sorted(needed))}) but train.model = "
            f"{train['model']!r}, train.space = {space!r}: their surrogates "
            "are pixel-space UNets for now; allowed: model unet2d with space pixel"
        )
    problems += _snapshot_problems(scores)
    timesteps = train["num_train_timesteps"]
    if scores["timestep"] is not None and scores["timestep"] >= timesteps:
        problems.append(
            f"scores.timestep = {scores['timestep']}: must be < train.num_train_timesteps "
            f"({timesteps}), or null for a random timestep per sample"
        )
    return problems


def _snapshot_problems(scores: dict[str, Any]) -> list[str]:
    """Snapshots are taken every steps // snapshots steps, so there can be at most one per step."""
    return [
        f"scores.{snapshots} = {scores[snapshots]}: must be <= scores.{steps} ({scores[steps]})"
        for snapshots, steps in (("num_snapshots", "steps"), ("moso_snapshots", "moso_steps"))
        if scores[snapshots] > scores[steps]
    ]


def pretrained_problem(autoencoder: dict[str, Any]) -> str | None:
    """The rule that source pretrained names its weights (autoencoder.resolve_config raises it)."""
    if autoencoder["source"] == "pretrained" and not autoencoder["pretrained"]:
        return (
            "autoencoder.pretrained = null: source pretrained needs a local folder written by "
            "save_pretrained or a hub id (e.g. stabilityai/sd-vae-ft-ema); or use source train"
        )
    return None


def conditional_problem(train: dict[str, Any]) -> str | None:
    """The rule that only DiT takes class labels (diffusion.resolve_config raises it)."""
    if train["conditional"] and train["model"] != "dit":
        return (
            f"train.conditional = true: needs train.model dit (the {train['model']} is "
            "unconditional)"
        )
    return None


def _autoencoder_problems(params: dict[str, Any]) -> list[str]:
    problem = pretrained_problem(params["autoencoder"])
    return [problem] if problem else []


def _skew_problems(params: dict[str, Any]) -> list[str]:
    skew, data = params["skew"], params["data"]
    if not skew["arms"]:
        return []
    problems = []
    if skew["keep"] > skew["size"]:
        problems.append(f"skew.keep = {skew['keep']}: must be <= skew.size ({skew['size']})")
    images = train_images(data)
    if images is not None and skew["size"] > images[0]:
        problems.append(
            f"skew.size = {skew['size']}: must be <= the number of training images, "
            f"{images[0]} ({images[1]})"
        )
    if "cluster-balanced" in skew["arms"]:
        problems += _skew_cluster_problems(skew)
    if data["source"] == "fashion-mnist":
        problems += _fashion_skew_problems(skew)
    return problems


def _skew_cluster_problems(skew: dict[str, Any]) -> list[str]:
    """The cluster-balanced arm clusters the skewed set into skew.k and keeps keep // k of each."""
    if skew["k"] > skew["size"]:
        return [f"skew.k = {skew['k']}: must be <= skew.size ({skew['size']})"]
    if skew["keep"] < skew["k"]:
        return [
            f"skew.keep = {skew['keep']}: the cluster-balanced arm keeps skew.keep // skew.k = 0 "
            f"images per cluster; must be >= skew.k ({skew['k']})"
        ]
    return []


def _fashion_skew_problems(skew: dict[str, Any]) -> list[str]:
    classes = FASHION_MNIST["classes"]
    problems = [
        f"skew.minority_classes.{i} = {label}: fashion-mnist's labels are 0..{classes - 1}"
        for i, label in enumerate(skew["minority_classes"])
        if label >= classes
    ]
    if "label-balanced" in skew["arms"] and skew["keep"] < classes:
        problems.append(
            f"skew.keep = {skew['keep']}: the label-balanced arm keeps skew.keep // {classes} = 0 "
            f"images per class; must be >= {classes} (fashion-mnist's classes)"
        )
    return problems


def _model_problems(params: dict[str, Any]) -> list[str]:
    """DiT's keys and class conditioning."""
    train, sample = params["train"], params["sample"]
    conditional = train["conditional"]
    problems = [problem] if (problem := conditional_problem(train)) else []
    if train["model"] == "dit" and train["dit_size"] == "custom":
        dit = train.get("dit")
        if dit is None:
            problems.append(
                "train.dit = null: train.dit_size custom needs {depth, width, heads, patch}"
            )
        elif dit["width"] % dit["heads"]:
            problems.append(
                f"train.dit.width = {dit['width']}: must be divisible by train.dit.heads "
                f"({dit['heads']})"
            )
    if sample["guidance_scale"] != 1 and not conditional:
        problems.append(
            f"sample.guidance_scale = {sample['guidance_scale']}: guidance needs a conditional "
            "model (train.conditional: true); 1 is off"
        )
    return problems


def _resolution_problems(params: dict[str, Any]) -> list[str]:
    """train.resolution against the autoencoder's down-sampling and the network's (unet, DiT)."""
    train, autoencoder = params["train"], params["autoencoder"]
    resolution, subject = train["resolution"], "must"
    size = resolution
    if train["space"] == "latent":
        if autoencoder["source"] != "train":
            return []  # a pretrained autoencoder's factor is known once it is loaded
        factor = 2 ** (len(autoencoder["block_channels"]) - 1)
        if resolution % factor:
            return [
                f"train.resolution = {resolution}: must be divisible by the autoencoder's "
                f"down-sampling factor 2**(len(autoencoder.block_channels)-1) = {factor}"
            ]
        size = resolution // factor
        subject = f"its latents' size {size} (train.resolution // {factor}) must"
    factor, rule = _network_factor(train)
    if factor is None or size % factor == 0:
        return []
    return [f"train.resolution = {resolution}: {subject} be divisible by {rule}"]


def _network_factor(train: dict[str, Any]) -> tuple[int | None, str]:
    """What the network's input size must be a multiple of, and why."""
    if train["model"] == "unet2d":
        factor = 2 ** (len(train["block_channels"]) - 1)
        return factor, f"2**(len(train.block_channels)-1) = {factor}"
    size = train["dit_size"]
    if size != "custom":
        patch = DIT_SIZES[size]["patch"]
        return patch, f"the patch size of DiT-{size} ({patch})"
    dit = train.get("dit")
    return (dit["patch"], f"train.dit.patch ({dit['patch']})") if dit else (None, "")


def _sampling_problems(params: dict[str, Any]) -> list[str]:
    train, steps = params["train"], params["sample"]["steps"]
    timesteps = train["num_train_timesteps"]
    if train["objective"] == "ddpm" and steps > timesteps:
        return [
            f"sample.steps = {steps}: must be <= train.num_train_timesteps ({timesteps}) with "
            "train.objective ddpm (DDIM steps are a subset of the training timesteps)"
        ]
    return []


def _precision_problems(params: dict[str, Any]) -> list[str]:
    """accelerate silently trains fp16 in fp32 on the CPU (bf16 autocast works there)."""
    train = params["train"]
    if train.get("mixed_precision") == "fp16" and train.get("device") == "cpu":
        return [
            "train.mixed_precision = 'fp16' with train.device = 'cpu': fp16 mixed precision needs "
            "CUDA (on the CPU it would silently train in fp32); allowed with cpu: auto, no, bf16"
        ]
    return []


def _process_problems(params: dict[str, Any]) -> list[str]:
    """train.batch_size is the global batch: each of train.num_processes trains on an equal part."""
    train = params["train"]
    processes = train.get("num_processes", 1)
    if train["batch_size"] % processes:
        return [
            f"train.batch_size = {train['batch_size']}: must be divisible by "
            f"train.num_processes ({processes}), the processes that share each batch"
        ]
    return []


def _report_problems(params: dict[str, Any]) -> list[str]:
    """report.metric, report.metrics and report.claims.novelty_metric against evaluate's names."""
    names = metric_names(params["evaluate"]["features"])
    novelty = [name for name in names if name.startswith("novelty_")]
    report = params["report"]
    wanted = [("report.metric", report["metric"], names)]
    wanted += [(f"report.metrics.{i}", name, names) for i, name in enumerate(report["metrics"])]
    wanted.append(("report.claims.novelty_metric", report["claims"]["novelty_metric"], novelty))
    problems, listed = [], set()
    for key, name, allowed in wanted:
        if name not in allowed:
            problems.append(_unknown_metric(key, name, allowed, again=tuple(allowed) in listed))
            listed.add(tuple(allowed))
    return problems


def _unknown_metric(key: str, name: str, allowed: list[str], *, again: bool = False) -> str:
    """One line per unknown metric; `again`: the same allowed list was spelled out above (after
    a change of evaluate.features every report key can fail at once)."""
    close = difflib.get_close_matches(name, allowed, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    names = "the same as above" if again else ", ".join(allowed)
    return f"{key} = {name!r} is not a metric of evaluate.features{hint}; allowed: {names}"


def _evaluate_problems(params: dict[str, Any]) -> list[str]:
    evaluate = params["evaluate"]
    if "inception" in evaluate["features"] and not evaluate.get("inception_weights"):
        return [
            "evaluate.features includes 'inception' but evaluate.inception_weights = null: "
            "give the path of clean-fid's inception-2015-12-05.pt (no downloads here)"
        ]
    return []


CHECKS: tuple[Callable[[dict[str, Any]], list[str]], ...] = (
    source_problems,
    folder_problems,
    label_problems,
    _study_problems,
    _cluster_problems,
    _score_problems,
    _autoencoder_problems,
    _skew_problems,
    _model_problems,
    _resolution_problems,
    _sampling_problems,
    _precision_problems,
    _process_problems,
    _evaluate_problems,
    _report_problems,
)


def _describe(error: jsonschema.ValidationError) -> str:
    key = ".".join(str(p) for p in error.absolute_path) or "(top level)"
    value = error.instance
    kind, arg = error.validator, error.validator_value
    if kind == "enum":
        return f"{key} = {value!r} is not allowed; allowed: {', '.join(map(_yaml_text, arg))}"
    if kind == "type":
        expected = " or ".join(arg) if isinstance(arg, list) else arg
        return f"{key} = {value!r} has the wrong type; expected {expected}{_float_hint(value)}"
    if kind in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
        op = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<"}
        return f"{key} = {value!r}: must be {op[kind]} {arg}"
    if kind == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(value) - set(allowed))
        return f"{key}: unknown key(s) {', '.join(extra)}; allowed: {', '.join(allowed)}"
    if kind == "required":
        return f"{key}: {error.message}"
    if kind == "uniqueItems":
        return f"{key} = {value!r}: items must be unique"
    if kind == "minItems":
        return f"{key} = {value!r}: needs at least {arg} item(s)"
    if kind == "pattern":
        allowed = error.schema.get("description", f"matching {arg}")
        return f"{key} = {value!r} is not allowed; allowed: {allowed}"
    if kind == "anyOf":
        bounds = next(s for s in arg if s.get("type") == "integer")
        upper = f" and <= {bounds['maximum']}" if "maximum" in bounds else ""
        return (
            f"{key} = {value!r}: must be null or an integer >= {bounds['minimum']}{upper}"
            f"{_float_hint(value)}"
        )
    return f"{key} = {value!r}: {error.message}"


def _yaml_text(value: Any) -> str:
    """An allowed value as params.yaml spells it (true, not True)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def _float_hint(value: Any) -> str:
    """300.0 where an integer belongs: say how to write it."""
    if isinstance(value, float) and value.is_integer():
        return f" (write {int(value)}, not {value!r})"
    return ""
