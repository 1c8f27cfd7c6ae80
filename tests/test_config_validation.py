"""spcl_jax.config_validation: every kind of bad input is refused in one line (through launch.py's own parsing
and main, in this process; the checks against the loaded data run in test_launch), the schema, the dataset
configs, and a fuzz of 300 override sets."""
import os
from types import SimpleNamespace

import numpy as np
import pytest

from configs import default
from conftest import ROOT
from spcl_jax import config_validation
from spcl_jax.errors import ConfigError

BAD = [
    (["--config.batch_siz=3"], "unknown config key 'batch_siz'"),
    (["--config.batch_size=abc"], "--config.batch_size=abc"),
    (["--config.learning_rate=-1"], "learning_rate=-1.0; valid: a number > 0"),
    (["--config.learning_rate=0"], "learning_rate=0.0; valid: a number > 0"),
    (["--config.n_epochs=0"], "n_epochs=0; valid: a number > 0"),
    (["--config.batch_size=12"], "batch_size=12; valid: a multiple of the global device count 8"),
    (["--config.num_prototypes=1"], "num_prototypes=1; valid: an integer >= 2"),
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
    (["--config.keep_checkpoints=1"], "keep_checkpoints=1; valid: an integer in [2, 1000]"),
    (["--config.divergence_factor=-1"], "divergence_factor=-1.0; valid: a number >= 0"),
    (["--config.crop_scale=(0.5,\"a\")"], "crop_scale=(0.5, 'a'); valid: a value of type tuple like (0.08, 1.0)"),
    (["--config.crop_scale=(0.5,1.5)"], "crop_scale=(0.5, 1.5); valid: (low, high) with high <= 1"),
    (["--config.temperature=1e-8"], "temperature=1e-08; valid: a number in [0.01, 10]"),
    (["--config.temperature=100"], "temperature=100.0; valid: a number in [0.01, 10]"),
    (["--config.knn_temperature=0.001"], "knn_temperature=0.001; valid: a number in [0.02, 10]"),
    (["--config.momentum=1"], "momentum=1.0; valid: a number in [0, 1)"),
    (["--config.weight_decay=1"], "weight_decay=1.0; valid: a number in [0, 1)"),
    (["--config.finetune_weight_decay=-0.1"], "finetune_weight_decay=-0.1; valid: a number in [0, 1)"),
    (["--config.pca_eigen_floor=1"], "pca_eigen_floor=1.0; valid: a number in [0, 1)"),
    (["--config.jitter_d=3"], "jitter_d=3.0; valid: a number in [0, 2.5]"),
    (["--config.jitter_d=-1"], "jitter_d=-1.0; valid: a number in [0, 2.5]"),
    (["--config.seed=-1"], "seed=-1; valid: an integer in [0, 4294967295]"),
    (["--config.seed=4294967296"], "seed=4294967296; valid: an integer in [0, 4294967295]"),
    (["--config.seed=18446744073709551616"], "seed=18446744073709551616; valid: an integer in [0, 4294967295]"),
    (["--config.image_size=1"], "image_size=1; valid: an integer >= 8 (the network with stem=auto downsamples by 8)"),
    (["--config.stem=imagenet"], "image_size=16; valid: an integer >= 32 (the network with stem=imagenet downsamples"),
    (["--config.rebuild_member_table=False", "--config.pre_classes=1"],
     "pre_classes=1; valid: an integer >= 2 with rebuild_member_table=False (spcl's pairs then come from"),
    (["--config.n_classes=0"], "n_classes=0; valid: a number > 0, or 0 (every class of the data) with "
                               "infer_from_data=True"),
    (["--config.infer_from_data=True", "--config.pre_classes=-1"], "pre_classes=-1; valid: a number > 0, or 0"),
    (["--config.dataset_path=s3://bucket/records"], "dataset_path='s3://bucket/records'; valid: a local path or "
                                                    "gs://bucket/path"),
    (["--config.records_cache_dir=gs://bucket/cache"], "records_cache_dir='gs://bucket/cache'; valid: a local directory"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=lambda v: str(v)[:40])
def test_bad_input_is_one_line_and_exit_2(in_process_launch, capsys, overrides, message):
    assert in_process_launch(overrides) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("launch.py: error: ")
    assert message in lines[0]


def test_every_dataset_config_is_valid_and_overrides_only_deltas():
    import importlib

    reference = default.get_config()
    for name in ("digits", "cifar10", "cifar100", "stl10", "imagenet", "imagenet100", "tinyimagenet", "imagefolder"):
        module = importlib.import_module(f"configs.{name}")
        assert "python launch.py --config configs/" in module.__doc__
        config = module.get_config()
        if config.dataset in ("imagenet", "imagenet100", "tinyimagenet", "imagefolder"):
            config.dataset_path = "/data/x"
        assert config_validation.validate(config, reference, 8).name == "spcl"


def test_every_default_option_has_a_comment():
    path = os.path.join(ROOT, "configs", "default.py")
    for line in open(path):
        if line.strip().startswith("c.") and "=" in line:
            assert "#" in line, line


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


def test_pair_methods_need_fewer_prototypes_than_images():
    """K = N k-means prototypes hold one image each: no same-prototype pair for spcl or metric (K = N - 1 holds
    two in one by pigeonhole); the prototype classifier of method=cluster trains with K = N."""
    config = default.get_config()
    config.num_prototypes = 100
    with pytest.raises(ConfigError, match=r"num_prototypes=100; valid: at most 99, one less than the pretrain set "
                                          r"size 100 \(spcl pairs two images of one prototype\)"):
        config_validation.check_pretrain_size(config, 100)
    config_validation.check_pretrain_size(config, 101)
    with pytest.raises(ConfigError, match="num_prototypes=100; valid: at most the pretrain set size 99$"):
        config_validation.check_pretrain_size(config, 99)
    config.method = "cluster"
    config_validation.check_pretrain_size(config, 100)
    config.method, config.rebuild_member_table = "metric", False  # pairs from ground-truth classes (B-2)
    config_validation.check_pretrain_size(config, 100)


def test_odd_batch_is_refused_for_the_exact_half_pair_sampler():
    config = default.get_config()
    config.batch_size = 13
    with pytest.raises(ConfigError, match="batch_size=13; valid: an even number"):
        config_validation.validate(config, default.get_config(), 1)
    config.pair_sampling = "bernoulli"
    assert config_validation.validate(config, default.get_config(), 1).name == "spcl"


def test_fit_to_data_fits_only_an_infer_from_data_config_and_validates_the_result():
    splits = SimpleNamespace(num_classes=3, pre_classes=3, pretrain=range(100), train=range(40))
    config = default.get_config()
    assert config_validation.fit_to_data(config, splits, 8) is config
    config.infer_from_data, config.n_classes, config.pre_classes, config.n_epochs = True, 0, 0, 50
    fitted = config_validation.fit_to_data(config, splits, 8)
    assert [fitted[k] for k in ("n_classes", "pre_classes", "batch_size", "num_prototypes", "warmup_epochs")] == [
        3, 3, 96, 2, 5]
    assert (config.n_classes, config.batch_size) == (0, 512)  # a copy
    config.method, config.finetune_batch_size = "simclr", 120  # no prototypes to fit, no pairs: any multiple of 3
    assert [config_validation.fit_to_data(config, splits, 3)[k] for k in ("batch_size", "num_prototypes")] == [99, 512]
    config.method = "supervised"  # trains on the train split
    assert config_validation.fit_to_data(config, splits, 8).batch_size == 40
    config.method, config.rebuild_member_table = "spcl", False  # pairs from the ground-truth classes need two
    with pytest.raises(ConfigError, match="^invalid config: pre_classes=1; valid: an integer >= 2 with "
                                          "rebuild_member_table=False"):
        config_validation.fit_to_data(config, SimpleNamespace(num_classes=1, pre_classes=1, pretrain=range(100),
                                                              train=range(40)), 8)


def test_classes_left_to_the_data_are_checked_once_it_is_known(in_process_launch):
    assert in_process_launch(["--config.infer_from_data=True", "--config.n_classes=0", "--config.pre_classes=0",
                              "--config.rebuild_member_table=False", "--config.prototype_classifier_width=n_classes"]) == 0


def _fuzz_value(rng, key, reference):
    """A random, often wrong, value for `key` as a command-line string."""
    want = reference[key]
    pool = ["", "0", "-1", "1", "2", "7", "-0.5", "0.5", "1e6", "-1e6", "1e308", "1e309", "nan", "inf", "-inf",
            "True", "False", "None", "abc", "'x'", "()", "(1,)", "(0.5, 0.1)", "(0.1, 0.5)", "(1, 2, 3)", "[1, 2]",
            "(nan, 1)", "99999999999999999999999", "0x10", "1_000", "{}", "é", " 8", "8 "]
    if isinstance(want, str) and rng.random() < 0.4:
        pool = list(config_validation.choices().get(key, ())) or pool
    if isinstance(want, (int, float)) and not isinstance(want, bool) and rng.random() < 0.4:
        nearby = [want * 10.0 ** int(rng.integers(-3, 4)), -want, want + 1, 0]
        return str(type(want)(nearby[int(rng.integers(len(nearby)))]))
    return str(rng.choice(pool))


def test_fuzzed_configs_are_accepted_or_refused_in_one_line(in_process_launch, capsys):
    """300 random override sets (fixed seed): wrong types, out-of-range, NaN/huge/empty values, unknown
    keys, tuples of the wrong length. Each must pass validation or end with one line and exit 2."""
    rng = np.random.default_rng(10)
    reference = default.get_config()
    keys = sorted(reference.keys())
    outcomes = {0: 0, 2: 0}
    for _ in range(300):
        overrides = []
        for _ in range(rng.integers(1, 4)):
            key = str(rng.choice(keys)) if rng.random() < 0.85 else "".join(rng.choice(list("abcxyz_."), 6))
            overrides.append(f"--config.{key}={_fuzz_value(rng, key, reference) if key in reference else '1'}")
        code = in_process_launch(overrides)
        err = capsys.readouterr().err
        assert code in outcomes, (overrides, code, err)
        outcomes[code] += 1
        lines = [line for line in err.splitlines() if line.strip()]
        if code == 2:
            assert len(lines) == 1 and lines[0].startswith("launch.py: error: "), (overrides, err)
        assert "Traceback" not in err, (overrides, err)
        if code == 0:
            numbers = [v for value in in_process_launch.accepted.values()
                       for v in (value if isinstance(value, (tuple, list)) else (value,)) if isinstance(v, float)]
            assert all(np.isfinite(numbers)), overrides
    assert min(outcomes.values()) > 20, outcomes  # both outcomes exercised


CONFIG_FILES = {
    "syntax error": ("def get_config(:\n", r"config file {path} line 1: .*; fix it \(a config file is Python, like "
                                           r"configs/digits.py\)"),
    "failing import": ("import no_such_module_xyz\n", r"config file {path} cannot be loaded \(ModuleNotFoundError: No "
                                                      r"module named 'no_such_module_xyz' at line 1\); fix it or its imports"),
    "exception in get_config": ("def get_config():\n    raise ValueError('boom')\n",
                                r"get_config\(\) in {path} raised ValueError: boom at line 2"),
    "no get_config": ("x = 1\n", r"config file {path} defines no get_config\(\); valid: a file like configs/digits.py, "
                                 r"whose get_config\(\) returns the config"),
    "returns a dict": ("def get_config():\n    return {}\n", r"get_config\(\) in {path} returned a dict; valid: an "
                                                            r"ml_collections.ConfigDict, e.g. configs.default.get_config\(\) "
                                                            r"with changes"),
    "lacks keys": ("import ml_collections\ndef get_config():\n    return ml_collections.ConfigDict({'seed': 0})\n",
                   r"get_config\(\) in {path} returned a config without [a-z_]+, [a-z_]+, [a-z_]+, [a-z_]+, [a-z_]+ and "
                   r"\d+ more keys; valid: start from configs.default.get_config\(\), which holds every option"),
}


@pytest.mark.parametrize("case", CONFIG_FILES)
def test_a_broken_config_file_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch, case):
    import re
    import sys

    import launch as launch_py

    text, message = CONFIG_FILES[case]
    path = tmp_path / "broken.py"
    path.write_text(text)
    argv = ["launch.py", "--config", str(path), f"--workdir={tmp_path / 'run'}"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as stopped:
        launch_py._parse_flags(argv)
    assert stopped.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and re.fullmatch("launch.py: error: " + message.format(path=re.escape(str(path))), lines[0]), lines
    assert sorted(os.listdir(tmp_path)) == ["broken.py"]
