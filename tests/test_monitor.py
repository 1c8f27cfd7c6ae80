"""The online kNN monitor (`knn_every_epochs`) and the best-valid linear evaluation, through launch.py."""
import pytest

from configs import default
from spcl_jax import config_validation
from spcl_jax.errors import ConfigError
from spcl_jax.metrics import read_metrics
from conftest import launch


@pytest.mark.slow
def test_knn_monitor_every_n_epochs_and_best_valid_linear_eval(tmp_path):
    # TINY's 2 epochs of simclr: the same train step as test_train's simclr run (one compile for both).
    result = launch(tmp_path, "--config.method=simclr", "--config.knn_every_epochs=2",
                    "--config.val_sample=5", "--config.finetune_epochs=3", "--config.eval_random_init_baseline=False")
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_metrics(tmp_path)
    monitored = [r for r in records if "knn_monitor/valid_top1" in r]
    assert [(r["epoch"], r["step"]) for r in monitored] == [(2, 4)]  # the end of epoch 2 (of TINY's 2), not 1
    # 50 valid digits, 10 classes: chance is 0.1; even a barely trained encoder's kNN does far better.
    assert all(0.3 <= r["knn_monitor/valid_top1"] <= 1 for r in monitored), monitored
    assert not any("knn_monitor/test_top1" in r for r in records)
    logged = [line for line in result.stderr.splitlines() if "knn_monitor/valid_top1" in line]
    assert len(logged) == 1 and "epoch 2/2" in logged[0]

    final = records[-1]
    assert final["linear_eval/best_epoch"] in (1, 2, 3)
    assert final["linear_eval/best_epoch_valid_top1"] >= final["linear_eval/valid_top1"]  # the last epoch competes
    for key in ("linear_eval/test_top1", "linear_eval/best_epoch_test_top1", "linear_eval/best_epoch_test_top5",
                "linear_eval/best_epoch_valid_top5", "knn/valid_top1", "knn/test_top1"):
        assert 0 <= final[key] <= 1, key
    assert "best_epoch  " in result.stdout.replace("linear_eval/", "")


def test_knn_every_epochs_must_be_non_negative():
    config = default.get_config()
    config.knn_every_epochs = -1
    with pytest.raises(ConfigError, match=r"knn_every_epochs=-1; valid: a number >= 0"):
        config_validation.check_values(config, 8)
