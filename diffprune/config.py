"""Load params.yaml and check it against the JSON schema before any job starts.

Errors name the key, the bad value and what is allowed, one line per problem, e.g.
`params.yaml: train.steps = 0: must be >= 1`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from diffprune.errors import ConfigError
from diffprune.paths import FULL, Run

SCHEMA = Path(__file__).resolve().parent.parent / "workflow" / "schemas" / "params.schema.yaml"


def load_params(path: str | os.PathLike = "params.yaml") -> dict[str, Any]:
    """Read and validate a params file; raise ConfigError listing every problem."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such params file")
    try:
        params = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    validate_params(params, source=str(path))
    return params


def validate_params(params: Any, *, source: str = "params.yaml") -> None:
    schema = yaml.safe_load(SCHEMA.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(params), key=lambda e: [str(p) for p in e.absolute_path])
    problems = [_describe(error) for error in errors]
    if not problems:
        problems = _semantic_problems(params)
    if problems:
        raise ConfigError("\n".join(f"{source}: {problem}" for problem in problems))


def grid(params: dict[str, Any]) -> list[tuple[Run, int]]:
    """Every (run, seed) of the study: the baseline, the extra runs, then methods x ratios."""
    study = params["study"]
    runs = [Run(FULL)] if study["baseline"] else []
    runs += [Run.parse(name) for name in study.get("extra_runs", [])]
    runs += [Run(m, float(r)) for m in study["methods"] for r in study["ratios"]]
    runs = list(dict.fromkeys(runs))  # an extra run may also be a grid point
    return [(run, seed) for run in runs for seed in study["seeds"]]


def _semantic_problems(params: dict[str, Any]) -> list[str]:
    """Rules that cross keys, which the schema cannot say."""
    problems = []
    data, study = params["data"], params["study"]
    if data["source"] in ("imagefolder",) and not data["path"]:
        problems.append("data.path = null: the imagefolder source needs the folder of images")
    if data["source"] == "huggingface" and not data.get("hf_name"):
        problems.append("data.hf_name = null: the huggingface source needs a dataset id")
    if not study["baseline"] and not (study["methods"] and study["ratios"]):
        problems.append("study: the grid is empty; set baseline: true or give methods and ratios")
    for ratio in study["ratios"]:
        if float(repr(float(ratio))) != ratio or "e" in repr(float(ratio)):
            problems.append(f"study.ratios: {ratio!r} cannot be written as a plain decimal run id")
    scores = params["scores"]
    needed = {m.removesuffix("-inverse").removesuffix("-mid") for m in study["methods"]}
    needed &= {"el2n", "grand", "forgetting", "moso"}
    train = params["train"]
    if needed and (train["model"], train.get("space", "pixel")) != ("unet2d", "pixel"):
        problems.append(
            f"study.methods has score methods ({', '.join(sorted(needed))}) but train.model = "
            f"{train['model']!r}, train.space = {train.get('space', 'pixel')!r}: their surrogates "
            "are pixel-space UNets for now; allowed: model unet2d with space pixel"
        )
    if missing := sorted(needed - set(scores["names"])):
        problems.append(
            f"scores.names = {scores['names']!r} lacks {', '.join(missing)}, which study.methods "
            f"needs; add it so that DVC computes it too"
        )
    problems += _snapshot_problems(scores)
    problems += _model_problems(params["train"], params["sample"])
    # 1000: diffusion.DEFAULTS, not imported so that loading the config does not load torch.
    timesteps = params["train"].get("num_train_timesteps", 1000)
    if scores.get("timestep") is not None and scores["timestep"] >= timesteps:
        problems.append(
            f"scores.timestep = {scores['timestep']}: must be < train.num_train_timesteps "
            f"({timesteps}), or null for a random timestep per sample"
        )
    surrogates = {"moso" if name == "moso" else "full" for name in scores["names"]}
    if surrogates != set(scores["surrogates"]):
        problems.append(
            f"scores.surrogates = {scores['surrogates']!r} does not match scores.names "
            f"{scores['names']!r}; it must be {sorted(surrogates)!r} (full for el2n, grand, "
            f"forgetting; moso for moso)"
        )
    autoencoder = params["autoencoder"]
    if autoencoder["source"] == "pretrained" and not autoencoder.get("pretrained"):
        problems.append(
            "autoencoder.pretrained = null: source pretrained needs a local folder written by "
            "save_pretrained or a hub id (e.g. stabilityai/sd-vae-ft-ema); or use source train"
        )
    skew = params["skew"]
    if skew["arms"] and skew["keep"] > skew["size"]:
        problems.append(f"skew.keep = {skew['keep']}: must be <= skew.size ({skew['size']})")
    if skew["arms"] and data["train_size"] is not None and skew["size"] > data["train_size"]:
        problems.append(
            f"skew.size = {skew['size']}: must be <= data.train_size ({data['train_size']})"
        )
    if "inception" in params["evaluate"]["features"] and not params["evaluate"].get(
        "inception_weights"
    ):
        problems.append(
            "evaluate.features includes 'inception' but evaluate.inception_weights = null: "
            "give the path of clean-fid's inception-2015-12-05.pt (no downloads here)"
        )
    return problems


def _model_problems(train: dict[str, Any], sample: dict[str, Any]) -> list[str]:
    """DiT's keys and class conditioning (defaults as in diffusion.DEFAULTS)."""
    problems = []
    conditional = train.get("conditional", False)
    if conditional and train["model"] != "dit":
        problems.append(
            f"train.conditional = true: needs train.model dit (the {train['model']} is "
            "unconditional)"
        )
    if train["model"] == "dit" and train.get("dit_size", "S/2") == "custom":
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
    if sample.get("guidance_scale", 1.0) != 1 and not conditional:
        problems.append(
            f"sample.guidance_scale = {sample['guidance_scale']}: guidance needs a conditional "
            "model (train.conditional: true); 1 is off"
        )
    return problems


def _snapshot_problems(scores: dict[str, Any]) -> list[str]:
    """Snapshots are taken every steps // snapshots steps, so there can be at most one per step."""
    return [
        f"scores.{snapshots} = {scores[snapshots]}: must be <= scores.{steps} ({scores[steps]})"
        for snapshots, steps in (("num_snapshots", "steps"), ("moso_snapshots", "moso_steps"))
        if scores[snapshots] > scores[steps]
    ]


def _describe(error: jsonschema.ValidationError) -> str:
    key = ".".join(str(p) for p in error.absolute_path) or "(top level)"
    value = error.instance
    kind, arg = error.validator, error.validator_value
    if kind == "enum":
        return f"{key} = {value!r} is not allowed; allowed: {', '.join(map(str, arg))}"
    if kind == "type":
        expected = " or ".join(arg) if isinstance(arg, list) else arg
        return f"{key} = {value!r} has the wrong type; expected {expected}"
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
        return f"{key} = {value!r}: must be null or an integer >= {bounds['minimum']}{upper}"
    return f"{key} = {value!r}: {error.message}"
