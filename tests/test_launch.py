"""launch.py: --help, and one-line errors with exit status 2 and no files for every kind of bad input."""
import os
import subprocess
import sys

import pytest

from configs import default
from spcl_jax import config_validation
from spcl_jax.errors import ConfigError
from spcl_jax import method as methods

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(*args, cwd=None, timeout=120):
    return subprocess.run([sys.executable, os.path.join(ROOT, "launch.py"), *args],
                          cwd=cwd or ROOT, capture_output=True, text=True, timeout=timeout)


def test_help_documents_flags():
    result = launch("--help")
    assert result.returncode == 0
    for flag in ("--config", "--workdir", "--coordinator_address", "--num_processes", "--process_id"):
        assert flag in result.stdout


BAD = [
    (["--config.batch_siz=3"], "unknown config key 'batch_siz'"),
    (["--config.batch_size=abc"], "--config.batch_size=abc"),
    (["--config.learning_rate=-1"], "learning_rate=-1.0; valid: a number > 0"),
    (["--config.learning_rate=0"], "learning_rate=0.0; valid: a number > 0"),
    (["--config.n_epochs=0"], "n_epochs=0; valid: a number > 0"),
    (["--config.batch_size=12"], "batch_size=12; valid: a multiple of the global device count 8"),
    (["--config.num_prototypes=1"], "num_prototypes=1; valid: an integer >= 2"),
    (["--config.num_prototypes=5000"], "num_prototypes=5000; valid: at most the pretrain set size 1347"),
    (["--config.batch_size=4096"], "batch_size=4096; valid: at most the training set size 1347"),
    (["--config.method=spcl", "--config.batch_size=24", "--config.pair_sampling=exact_half",
      "--config.num_prototypes=7", "--config.dataset=digits", "--config.mode=linear_eval"],
     "load_checkpoint_dir=''; valid: a checkpoint directory"),
    (["--config.dataset=mnist"], "dataset='mnist'; valid: digits | cifar10"),
    (["--config.model=resnet7"], "model='resnet7'; valid: resnet18 | resnet34"),
    (["--config.optimiser=rmsprop"], "optimiser='rmsprop'; valid: lars | sgd | adam"),
    (["--config.cluster_loss=MSE"], "cluster_loss='MSE'; valid: CE | SCE"),
    (["--config.metric_loss=SCE"], "metric_loss='SCE'; valid: BCE | L1 | L2"),
    (["--config.method=byol"], "method='byol'; valid: spcl | simclr"),
    (["--config.jitter_p=1.5"], "jitter_p=1.5; valid: a probability in [0, 1]"),
    (["--config.crop_scale=(0.5,)"], "crop_scale=(0.5,)"),
]


@pytest.mark.slow
@pytest.mark.parametrize("overrides,message", BAD, ids=lambda v: str(v)[:40])
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, overrides, message):
    workdir = tmp_path / "run"
    result = launch("--config", "configs/digits.py", f"--workdir={workdir}", *overrides)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("launch.py: error: ")
    assert message in lines[0]
    assert "Traceback" not in result.stderr
    assert not workdir.exists()


def test_missing_config_file(tmp_path):
    result = launch("--config", "configs/nope.py", f"--workdir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert result.stderr.strip() == ("launch.py: error: config file 'configs/nope.py' not found; "
                                     "valid: a file like configs/digits.py")
    assert not (tmp_path / "run").exists()


def test_every_dataset_config_is_valid_and_overrides_only_deltas():
    import importlib

    reference = default.get_config()
    for name in ("digits", "cifar10", "cifar100", "stl10", "imagenet", "imagenet100", "tinyimagenet"):
        module = importlib.import_module(f"configs.{name}")
        assert "python launch.py --config configs/" in module.__doc__
        config = module.get_config()
        if config.dataset in ("imagenet", "imagenet100", "tinyimagenet"):
            config.dataset_path = "/data/x"
        assert config_validation.validate(config, reference, 8).name == "spcl"


def test_every_default_option_has_a_comment():
    path = os.path.join(ROOT, "configs", "default.py")
    for line in open(path):
        if line.strip().startswith("c.") and "=" in line:
            assert "#" in line, line


@pytest.mark.parametrize("flags,method", [
    ((None, None, None), "spcl"), ((True, True, None), "spcl"), ((True, False, None), "cluster"),
    ((False, True, None), "metric"), ((False, False, None), "simclr"), ((True, True, True), "supervised"),
])
def test_original_method_flags_map_onto_method(flags, method):
    config = default.get_config()
    config.clustering_use, config.metric_learn, config.supervised = flags
    assert methods.resolve(config).name == method


def test_schema_rejects_unknown_and_mistyped_keys():
    reference = default.get_config()
    config = default.get_config()
    config.unlock()
    config.extra = 1
    with pytest.raises(ConfigError, match="unknown key 'extra'"):
        config_validation.validate(config, reference, 1)
    config = default.get_config()
    config.unlock()
    del config["temperature"]
    config.temperature = "hot"
    with pytest.raises(ConfigError, match="temperature='hot'; valid: a value of type float"):
        config_validation.validate(config, reference, 1)


def test_as_written_classifier_width_needs_few_prototypes():
    config = default.get_config()
    config.prototype_classifier_width = "n_classes"
    with pytest.raises(ConfigError, match="prototype_classifier_width"):
        config_validation.validate(config, default.get_config(), 1)
    config.num_prototypes = 10
    assert config_validation.validate(config, default.get_config(), 1).name == "spcl"


def test_odd_batch_is_refused_for_the_exact_half_pair_sampler():
    config = default.get_config()
    config.batch_size = 13
    with pytest.raises(ConfigError, match="batch_size=13; valid: an even number"):
        config_validation.validate(config, default.get_config(), 1)
    config.pair_sampling = "bernoulli"
    assert config_validation.validate(config, default.get_config(), 1).name == "spcl"
