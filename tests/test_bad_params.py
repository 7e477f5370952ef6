"""Every bad configuration that can be caught before the first job is caught by validate_params,
with one line that names the key, the bad value and what is allowed."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from diffprune import config, config_devices
from diffprune.config import load_params, metric_names, validate_params
from diffprune.errors import ConfigError
from diffprune.metrics import PR_K
from tests.conftest import TINY_UNET as TINY_TRAIN
from tests.test_config import DELETE, params

CLASSIFIER_FREE = {
    "evaluate.features": ["efficientnet-lite0"],
    "report.metric": "fd_efficientnet_lite0",
    "report.metrics": ["kid_efficientnet_lite0"],
    "report.claims.novelty_metric": "novelty_mean_efficientnet_lite0",
}
DIT = {"train.model": "dit", "train.block_channels": DELETE}
LATENT = {"train.space": "latent", "autoencoder.source": "train"}


def with_changes(changes: dict) -> dict:
    """The default params with dotted keys set (DELETE removes the key)."""
    return params(**{key.replace(".", "__"): value for key, value in changes.items()})


def case(key, value, expected, shown=None, **context):
    """A bad value at `key` (on top of `context`, dotted keys with __ for .); `shown`: how the
    message names the key, when not as `key = value`."""
    changes = {k.replace("__", "."): v for k, v in context.items()} | {key: value}
    return pytest.param(
        changes,
        key,
        value,
        expected,
        shown,
        id=f"{key}={'DELETE' if value is DELETE else value!r}"[:60],
    )


CASES = [
    # the schema: ranges, types, enums, unknown and missing keys
    case("train.steps", 0, "train.steps = 0: must be >= 1"),
    case("sample.num_samples", 3, "sample.num_samples = 3: must be >= 4"),  # PR_K + 1 rows
    case("train.lr", "fast", "train.lr = 'fast' has the wrong type; expected number"),
    case("embed.model", "vgg16", "allowed: efficientnet-lite0, clip-vit-b32, dinov2-vits14"),
    case("study.methods", ["kmeans-magic"], "study.methods.0 = 'kmeans-magic' is not allowed"),
    case("train.stepz", 5, "train: unknown key(s) stepz; allowed: attention", shown="stepz"),
    case("cluster.k", DELETE, "cluster: 'k' is a required property", shown="'k'"),
    case("embed.device", "tpu", "embed.device = 'tpu' is not allowed; allowed: auto | cpu | cuda"),
    case("train.mixed_precision", "fp8", "allowed: auto, no, bf16, fp16"),
    case("train.fused_adamw", "yes", "is not allowed; allowed: auto, true, false"),
    case("train.data_on_device", 1, "is not allowed; allowed: auto, true, false"),
    case("train.tf32", "on", "train.tf32 = 'on' has the wrong type; expected boolean"),
    case("train.compile", 1, "train.compile = 1 has the wrong type; expected boolean"),
    case("study.seeds", [], "study.seeds = []: needs at least 1 item(s)"),
    case("report.dir", "out", "report.dir = 'out' is not allowed; allowed: results or a folder"),
    case("study.ratios", [0.5, 1.0], "study.ratios.1 = 1.0: must be < 1"),
    case("autoencoder.loss", "huber", "allowed: mse, l1"),
    case("embed.num_workers", "all", "= 'all' is not allowed; allowed: auto | an integer >= 0"),
    case("embed.num_workers", -1, "embed.num_workers = -1: must be >= 0"),
    case("scores.num_workers", 2.0, "has the wrong type; expected string or integer (write 2, not"),
    case("autoencoder.encode_num_workers", True, "= True has the wrong type; expected string or"),
    # integers written as floats (JSON Schema counts 300.0 as an integer), and bools
    case("data.train_size", 300.0, "must be null or an integer >= 1 (write 300, not 300.0)"),
    case("train.steps", 1000.0, "has the wrong type; expected integer (write 1000, not 1000.0)"),
    case("cluster.k", 10.0, "cluster.k = 10.0 has the wrong type; expected integer"),
    case("study.seeds", [0, 1.0], "study.seeds.1 = 1.0 has the wrong type; expected integer"),
    case("train.block_channels", [16, 32.0], "train.block_channels.1 = 32.0 has the wrong type"),
    case("train.batch_size", True, "train.batch_size = True has the wrong type; expected integer"),
    case("scores.timestep", 15.0, "must be null or an integer >= 0 (write 15, not 15.0)"),
    case("sample.num_samples", 512.0, "expected integer (write 512, not 512.0)"),
    # seeds: numpy and faiss take 0 .. 2**31 - 1
    case("cluster.seed", 2**31, "cluster.seed = 2147483648: must be <= 2147483647"),
    case("data.seed", -1, "data.seed = -1: must be >= 0"),
    case("study.seeds", [0, 2**32], "study.seeds.1 = 4294967296: must be <= 2147483647"),
    case("classifier.seed", 2**31, "classifier.seed = 2147483648: must be <= 2147483647"),
    # metric names: what evaluate writes for evaluate.features
    case("report.metric", "fd_clasifier", "not a metric of evaluate.features (did you mean fd_c"),
    case("report.metrics", ["fd_classifier", "fd_inception"], "allowed: fd_classifier, kid_c"),
    case("report.metrics", ["class_kl"], "allowed: fd_efficientnet_lite0", **CLASSIFIER_FREE),
    case("report.claims.novelty_metric", "novelty_mean_inception", "allowed: novelty_mean_cla"),
    case("report.metric", "fd_efficientnet-lite0", "is not allowed; allowed: matching"),
    # sizes against the data
    case("cluster.k", 20000, "cluster.k = 20000: must be <= the number of training images"),
    case("cluster.k", 70000, "60000 (all of fashion-mnist's train split", data__train_size=None),
    case("cluster.fit_size", 5, "must be null (fit on all points) or in [cluster.k, N] = [10, 1"),
    case("cluster.fit_size", 20000, "[cluster.k, N] = [10, 10000 (data.train_size)]"),
    case("cluster.fit_size", 0, "cluster.fit_size = 0: must be >= 1"),
    case("cluster.fit_size", 2.5, "cluster.fit_size = 2.5 has the wrong type"),
    case("data.train_size", 70000, "must be <= 60000 (fashion-mnist's train split), or null"),
    case("data.test_size", 20000, "data.test_size = 20000: must be <= 10000"),
    case("skew.size", 20000, "<= the number of training images, 10000", skew__arms=["random"]),
    case("skew.keep", 6000, "skew.keep = 6000: must be <= skew.size (5000)", skew__arms=["random"]),
    case("skew.k", 6000, "must be <= skew.size (5000)", skew__arms=["cluster-balanced"]),
    case("skew.keep", 5, "keeps skew.keep // skew.k = 0 images", skew__arms=["cluster-balanced"]),
    case("skew.keep", 6, "must be >= 10 (fashion-mnist's classes)", skew__arms=["label-balanced"]),
    case("skew.minority_classes", [3, 12], "labels are 0..9", skew__arms=["skewed"]),
    # ratios
    case("study.ratios", [0], "study.extra_runs: [cluster-balanced_r0.0]"),
    case("study.ratios", [0.5, 0.99995], "keeps floor(10000 * (1 - 0.99995)) = 0 of the N = 10000"),
    case("study.ratios", [0.99999], "ratio <= 1 - 1/N = 0.999983", data__train_size=None),
    # resolutions against the networks
    case("train.resolution", 15, "must be divisible by 2**(len(train.block_channels)-1) = 2"),
    case("train.resolution", 15, "be divisible by the patch size of DiT-S/2 (2)", **DIT),
    case(
        "train.resolution",
        18,
        "must be divisible by the autoencoder's down-sampling factor",
        **LATENT,
        autoencoder__block_channels=[16, 16, 16],
    ),
    case(
        "train.resolution",
        24,
        "its latents' size 3 (train.resolution // 8) must be divisible by the patch size",
        **DIT,
        **LATENT,
        autoencoder__block_channels=[16, 16, 16, 16],
    ),
    case(
        "train.resolution",
        18,
        "must be divisible by train.dit.patch (4)",
        **DIT,
        train__dit_size="custom",
        train__dit={"depth": 2, "width": 32, "heads": 2, "patch": 4},
    ),
    # devices, sampling steps, mixed precision
    case("train.device", "cuda", "train.device = 'cuda': no CUDA device is visible"),
    case("cluster.device", "cuda:0", "use auto or cpu"),
    case("sample.steps", 2000, "<= train.num_train_timesteps (1000)", train__objective="ddpm"),
    case("train.mixed_precision", "fp16", "fp16 mixed precision needs CUDA", train__device="cpu"),
    # the cross-key rules that were there before
    case("data.path", None, "the imagefolder source needs", data__source="imagefolder"),
    case("scores.timestep", 1000, "must be < train.num_train_timesteps (1000), or null"),
    case("scores.num_snapshots", 301, "scores.num_snapshots = 301: must be <= scores.steps (300)"),
    case("sample.guidance_scale", 4.0, "guidance needs a conditional model"),
    case("autoencoder.pretrained", None, "pretrained needs", autoencoder__source="pretrained"),
]  # fmt: skip


@pytest.fixture(autouse=True)
def no_gpu(monkeypatch):
    """Validate as on a machine without CUDA, whatever this one has."""
    monkeypatch.setattr(config_devices, "_cuda_devices", lambda: 0)


def shown_value(value) -> list[str]:
    """How a message may show `value` (a list: its last, bad item)."""
    if isinstance(value, list) and value:
        value = value[-1]
    return [repr(value), str(value), json.dumps(value)]


@pytest.mark.parametrize(("changes", "key", "value", "expected", "shown"), CASES)
def test_bad_params_get_one_line_with_key_value_and_allowed(changes, key, value, expected, shown):
    with pytest.raises(ConfigError) as info:
        validate_params(with_changes(changes), check_cuda=True)
    message = str(info.value)
    assert len(message.splitlines()) == 1, message
    assert message.startswith("params.yaml: ")
    assert expected in message
    if shown is not None:
        assert shown in message
    else:
        assert key in message
        assert any(f" = {text}" in message for text in shown_value(value)), message


def test_there_are_at_least_40_distinct_cases():
    assert len({(str(p.values[0]), p.values[3]) for p in CASES}) >= 40


def test_yaml_syntax_error_names_line_column_and_problem(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("data:\n  source: fashion-mnist\ntrain: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_params(path)
    message = str(info.value)
    assert len(message.splitlines()) == 1
    assert message.startswith(f"{path}: not valid YAML at line 4, column 1: expected ','")


def test_cuda_devices_beyond_the_visible_are_refused(monkeypatch):
    monkeypatch.setattr(config_devices, "_cuda_devices", lambda: 1)
    cuda = with_changes({"train.device": "cuda", "embed.device": "cuda:0"})
    validate_params(cuda, check_cuda=True)
    with pytest.raises(ConfigError, match=r"embed.device = 'cuda:1': only 1 CUDA device\(s\)"):
        validate_params(with_changes({"embed.device": "cuda:1"}), check_cuda=True)


def probe():
    raise AssertionError("CUDA probed")


def test_cuda_is_probed_only_when_a_device_asks_for_it_and_the_caller_too(monkeypatch, tmp_path):
    """load_params checks by default; validate_params (Snakemake's parse, dry runs and cluster
    submission included) only when asked; neither probes without a cuda device."""
    monkeypatch.setattr(config_devices, "_cuda_devices", probe)
    load_params("params.yaml")
    validate_params(with_changes({"train.device": "cuda"}))
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(with_changes({"train.device": "cuda"})))
    with pytest.raises(AssertionError, match="CUDA probed"):
        load_params(path)


def test_ratio_of_the_last_image_is_allowed():
    validate_params(with_changes({"study.ratios": [0.9999]}))  # keeps 1 of 10000


def test_metric_names_are_what_evaluate_writes(tmp_path, monkeypatch):
    """Run the real evaluation on a tiny case: its metric keys are metric_names's list."""
    from diffprune import evaluate
    from diffprune.features import FeatureExtractor
    from diffprune.metrics import reference_stats, save_reference

    rng = np.random.default_rng(0)
    samples = rng.integers(0, 256, size=(12, 4, 4, 1), dtype=np.uint8)
    features = ["classifier", "efficientnet-lite0", "inception"]
    paths = {}
    for name in ("test", "train"):
        paths[name] = tmp_path / f"{name}.npz"
        save_reference(paths[name], reference_stats(rng.normal(size=(12, 4))))
    np.save(tmp_path / "modes.npy", rng.normal(size=(3, 4)))
    extractor = FeatureExtractor("fake", 4, lambda x: x.reshape(len(x), -1)[:, :4] / 255.0)
    metrics = evaluate.evaluate_samples(
        samples,
        extractors=dict.fromkeys(features, extractor),
        test_references=dict.fromkeys(features, paths["test"]),
        train_references=dict.fromkeys(features, paths["train"]),
        modes=dict.fromkeys(features, tmp_path / "modes.npy"),
        kept_ids=np.arange(6),
    )
    monkeypatch.setattr(evaluate.cnn, "load_classifier", lambda path: _FakeClassifier)
    monkeypatch.setattr(evaluate.cnn, "predict", lambda model, x: np.arange(len(x)) % 3)
    metrics |= evaluate.class_balance(samples, classifier_path="x", train_labels=np.arange(9) % 3)
    numbers = {k for k, v in metrics.items() if isinstance(v, float)}
    assert numbers == set(metric_names(features))


_FakeClassifier = SimpleNamespace(config={"num_classes": 3})


def test_metric_names_cover_the_report_descriptions():
    from diffprune.report import DESCRIPTIONS

    assert set(DESCRIPTIONS) <= {*config.METRIC_BASES, *config.CLASS_METRICS}


def test_each_default_is_written_once_in_the_schema_and_used_by_the_library():
    """The schema's `default:` entries are the only defaults: no module keeps a DEFAULTS table,
    a partial section gets them in the library as in load_params, and every default passes the
    schema it stands in."""
    from diffprune import autoencoder, defaults, diffusion, scores, train

    for module in (config, diffusion, autoencoder, scores, train):
        assert not [n for n in vars(module) if n.endswith("DEFAULTS")], module.__name__
    assert defaults.defaults("scores") == {
        "el2n_draws": 1, "timestep": 15, "weights": "ema", "num_workers": "auto", "shards": 1,
    }  # fmt: skip
    partial = {k: v for k, v in diffusion.resolve_config(TINY_TRAIN).items() if k in TINY_TRAIN}
    assert partial == TINY_TRAIN
    filled = diffusion.resolve_config(TINY_TRAIN)
    assert filled == {**defaults.defaults("train"), **TINY_TRAIN}
    ae = autoencoder.resolve_config({"source": "pretrained", "pretrained": "x"})
    assert {k: ae[k] for k in defaults.defaults("autoencoder")} == {
        **defaults.defaults("autoencoder"),
        "pretrained": "x",
    }
    params = config.load_params("params.yaml", check_cuda=False)
    for section, values in params.items():
        given = defaults.defaults(section) if isinstance(values, dict) else {}
        assert not config.value_problems(section, given), section
        assert set(given) <= set(values), section


def test_library_rules_are_the_config_rules():
    """One wording per rule: a library caller that skips params.yaml gets the schema's and
    config's message, not a second copy of the rule."""
    from diffprune import autoencoder, diffusion

    with pytest.raises(ConfigError, match=r"^train\.conditional = true: needs train\.model dit"):
        diffusion.resolve_config({**TINY_TRAIN, "conditional": True})
    with pytest.raises(ConfigError, match=r"^autoencoder\.pretrained = null: source pretrained"):
        autoencoder.resolve_config({"source": "pretrained"})
    with pytest.raises(
        ConfigError, match=r"train\.objective = 'edm' is not allowed; allowed: ddpm"
    ):
        diffusion.resolve_config({**TINY_TRAIN, "objective": "edm"})


FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not FASHION.exists(), reason="no local Fashion-MNIST copy")
def test_fashion_mnist_sizes_agree_with_the_files():
    from diffprune.data.fashion_mnist import FASHION_MNIST_CLASSES, read_idx

    train = read_idx(FASHION / "train-labels-idx1-ubyte.gz")
    test = read_idx(FASHION / "t10k-labels-idx1-ubyte.gz")
    assert (len(train), len(test)) == (config.FASHION_MNIST["train"], config.FASHION_MNIST["test"])
    assert len(FASHION_MNIST_CLASSES) == len(np.unique(train)) == config.FASHION_MNIST["classes"]


def test_num_samples_minimum_is_what_precision_recall_needs():
    schema = yaml.safe_load(config.SCHEMA.read_text())
    assert schema["properties"]["sample"]["properties"]["num_samples"]["minimum"] == PR_K + 1


def test_a_changed_feature_space_lists_the_allowed_metrics_once():
    changed = with_changes({"evaluate.features": ["efficientnet-lite0"]})
    with pytest.raises(ConfigError) as info:
        validate_params(changed)
    lines = str(info.value).splitlines()
    bad = [m for m in changed["report"]["metrics"] if not m.endswith("_efficientnet_lite0")]
    assert len(lines) == 2 + len(bad)  # report.metric, the bad metrics, claims.novelty_metric
    assert sum("fd_efficientnet_lite0, kid_efficientnet_lite0" in line for line in lines) == 1
    assert all("allowed: " in line for line in lines)
