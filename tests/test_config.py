import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from diffprune.config import grid, load_params, validate_params
from diffprune.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent

DEFAULT = load_params("params.yaml")


def params(**changes):
    """The default params with dotted keys replaced (value DELETE removes the key)."""
    result = copy.deepcopy(DEFAULT)
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = result
        for key in parents:
            node = node[key]
        if value is DELETE:
            del node[last]
        else:
            node[last] = value
    return result


DELETE = object()


def error_of(p) -> str:
    with pytest.raises(ConfigError) as info:
        validate_params(p)
    return str(info.value)


def test_default_params_are_valid():
    validate_params(DEFAULT)
    assert DEFAULT["train"]["model"] == "unet2d" and not DEFAULT["train"]["conditional"]
    assert DEFAULT["sample"]["guidance_scale"] == 1.0
    dit = {"model": "dit", "dit_size": "custom", "dit": {"depth": 2, "width": 32, "heads": 2}}
    dit["dit"]["patch"] = 2
    conditional = {f"train__{k}": v for k, v in {**dit, "conditional": True}.items()}
    validate_params(params(**conditional, sample__guidance_scale=4.0))
    validate_params(params(train__model="dit", train__block_channels=DELETE))  # not needed
    validate_params(params(train__dit_size=DELETE, train__conditional=DELETE))  # code defaults
    validate_params(params(scores__timestep=None, scores__weights="raw"))
    validate_params(params(study__methods=["el2n-mid", "moso"]))  # scores follow from methods
    validate_params(params(embed__num_workers=4, scores__num_workers=0))
    validate_params(params(embed__num_workers=DELETE, autoencoder__encode_num_workers=DELETE))
    validate_params(
        params(
            autoencoder__source="pretrained", autoencoder__pretrained="stabilityai/sd-vae-ft-ema"
        )
    )


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"train__steps": 0}, "train.steps = 0: must be >= 1"),
        ({"train__lr": "fast"}, "train.lr = 'fast' has the wrong type; expected number"),
        ({"embed__model": "vgg16"}, "embed.model = 'vgg16' is not allowed; allowed: efficientnet"),
        ({"study__ratios": [0.5, 1.0]}, "study.ratios.1 = 1.0: must be < 1"),
        ({"study__ratios": [-0.1]}, "study.ratios.0 = -0.1: must be >= 0"),
        ({"study__methods": ["kmeans-magic"]}, "study.methods.0 = 'kmeans-magic' is not allowed"),
        ({"train__stepz": 5}, "train: unknown key(s) stepz; allowed:"),
        ({"cluster__k": DELETE}, "cluster: 'k' is a required property"),
        ({"data__train_size": -3}, "data.train_size = -3: must be null or an integer >= 1"),
        ({"embed__device": "tpu"}, "embed.device = 'tpu' is not allowed; allowed: auto | cpu"),
        ({"study__seeds": []}, "study.seeds = []: needs at least 1 item(s)"),
        ({"data__source": "imagefolder"}, "data.path = null: the imagefolder source needs"),
        ({"study__baseline": False, "study__methods": []}, "study: the grid is empty"),
        (
            {"evaluate__features": ["classifier", "efficientnet-lite0", "inception"]},
            "evaluate.inception_weights = null",
        ),
        ({"scores__timestep": DELETE}, "scores: 'timestep' is a required property"),
        ({"select__balanced_order": DELETE}, "select: 'balanced_order' is a required property"),
        ({"scores__names": ["el2n"]}, "scores: unknown key(s) names; allowed: batch_size"),
        (
            {"autoencoder__source": "pretrained"},
            "autoencoder.pretrained = null: source pretrained needs a local folder",
        ),
        ({"autoencoder__loss": "huber"}, "autoencoder.loss = 'huber' is not allowed; allowed: mse"),
        ({"autoencoder__latent_channels": 0}, "autoencoder.latent_channels = 0: must be >= 1"),
        ({"scores__timestep": 1000}, "scores.timestep = 1000: must be < train.num_train_timesteps"),
        (
            {"scores__timestep": 15, "train__num_train_timesteps": 10},
            "scores.timestep = 15: must be < train.num_train_timesteps (10), or null",
        ),
        ({"scores__timestep": -1}, "scores.timestep = -1: must be null or an integer >= 0"),
        ({"scores__weights": "swa"}, "scores.weights = 'swa' is not allowed; allowed: ema, raw"),
        (
            {"scores__num_snapshots": 301},
            "scores.num_snapshots = 301: must be <= scores.steps (300)",
        ),
        (
            {"scores__moso_snapshots": 151},
            "scores.moso_snapshots = 151: must be <= scores.moso_steps",
        ),
        ({"train__model": "vit"}, "train.model = 'vit' is not allowed; allowed: unet2d, dit"),
        ({"train__dit_size": "M/3"}, "train.dit_size = 'M/3' is not allowed; allowed: S/2"),
        ({"train__block_channels": DELETE}, "train: 'block_channels' is a required property"),
        ({"train__label_dropout": 1.0}, "train.label_dropout = 1.0: must be < 1"),
        ({"train__conditional": True}, "train.conditional = true: needs train.model dit"),
        (
            {"train__model": "dit", "train__dit_size": "custom"},
            "train.dit = null: train.dit_size custom needs {depth, width, heads, patch}",
        ),
        (
            {
                "train__model": "dit",
                "train__dit_size": "custom",
                "train__dit": {"depth": 2, "width": 32, "heads": 2},
            },
            "train.dit: 'patch' is a required property",
        ),
        (
            {
                "train__model": "dit",
                "train__dit_size": "custom",
                "train__dit": {"depth": 2, "width": 30, "heads": 4, "patch": 2},
            },
            "train.dit.width = 30: must be divisible by train.dit.heads (4)",
        ),
        ({"sample__guidance_scale": 4.0}, "sample.guidance_scale = 4.0: guidance needs a cond"),
    ],
)
def test_bad_params_get_one_clear_line(changes, expected):
    message = error_of(params(**changes))
    assert expected in message
    assert message.startswith("params.yaml: ")
    assert len(message.splitlines()) == 1


def test_every_problem_is_listed():
    message = error_of(params(train__steps=0, sample__num_samples="many"))
    assert len(message.splitlines()) == 2


def test_load_params_reports_bad_yaml(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(path)
    path.write_text(yaml.safe_dump(params(cluster__k=0)))
    with pytest.raises(ConfigError, match=r"params.yaml: cluster.k = 0: must be >= 1"):
        load_params(path)


def test_grid_is_baseline_then_methods_by_ratio_per_seed():
    p = params(
        study__methods=["random", "cluster-nearest"], study__ratios=[0.25, 0.5], study__seeds=[0, 1]
    )
    names = [(run.name, seed) for run, seed in grid(p)]
    assert names[:2] == [("full", 0), ("full", 1)]
    assert ("cluster-nearest_r0.25", 1) in names
    assert len(names) == 2 + 2 * 2 * 2


def test_score_methods_need_the_pixel_unet():
    params = copy.deepcopy(DEFAULT)
    params["study"]["methods"] = ["el2n"]
    params["train"] |= {"model": "dit", "space": "latent"}
    with pytest.raises(ConfigError, match=r"score methods \(el2n\).*allowed: model unet2d"):
        validate_params(params)


def merged(base: dict, overlay: dict) -> dict:
    """As Snakemake's --configfile: dicts merge recursively, the rest (lists too) is replaced."""
    result = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merged(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


STUDIES = sorted(Path("workflow/studies").glob("*.yaml"))
OVERLAYS = [[path] for path in STUDIES] + [
    [Path("workflow/studies/evidence.yaml"), Path("workflow/studies/gpu.yaml")]
]


@pytest.mark.parametrize("overlays", OVERLAYS, ids=lambda paths: "+".join(p.stem for p in paths))
def test_every_study_overlay_is_valid(overlays, tmp_path):
    """CUDA is not checked: the paper's studies ask for it and may be planned on a CPU machine."""
    result = DEFAULT
    for path in overlays:
        result = merged(result, yaml.safe_load(path.read_text()))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(result))
    assert load_params(tmp_path / "params.yaml", check_cuda=False) == result


def test_validation_does_not_import_torch_unless_a_device_asks_for_cuda():
    """Snakemake validates on every parse (dry runs included): it must stay light."""
    code = (
        "import sys; from diffprune.config import load_params; load_params('params.yaml'); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
