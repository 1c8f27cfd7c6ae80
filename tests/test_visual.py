"""The run's pictures and results files: the cluster figure (one panel, or two with ground truth), the
losses figure from a metrics.jsonl, and results.json / results.md naming every metric's protocol."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from configs import digits
from spcl_jax import evaluate, visual
from spcl_jax.metrics import MetricWriter


def _colours(image):
    return len(np.unique(image.reshape(-1, 3), axis=0))


def _blobs(n=600, classes=5, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    return rng.normal(size=(classes, 2))[labels] * 5 + rng.normal(size=(n, 2)), labels


def test_ticks_are_round_values_inside_the_range():
    assert [text for _, text in visual.ticks(-0.3, 9.7)] == ["0", "2", "4", "6", "8"]
    assert [text for _, text in visual.ticks(0.0012, 0.0049)] == ["0.002", "0.003", "0.004"]
    assert [text for _, text in visual.ticks(0, 5e-6)][:2] == ["0.0e+00", "1.0e-06"]
    assert [value for value, _ in visual.ticks(1, 300)] == [100, 200, 300]


def test_cluster_figure_has_a_ground_truth_panel_only_when_labels_exist():
    points, labels = _blobs()
    pseudo = np.random.default_rng(1).integers(0, 64, len(labels))  # more prototypes than legend entries
    both = visual.cluster_figure(points, pseudo, labels, epoch=3)
    assert both.shape == (visual.PANEL_HEIGHT, 2 * visual.PANEL_WIDTH, 3) and both.dtype == np.uint8
    assert _colours(both[:, visual.PANEL_WIDTH:]) > 20  # five classes, antialiased text, grid
    one = visual.cluster_figure(points, pseudo, np.full(len(labels), -1), epoch=3)
    assert one.shape == (visual.PANEL_HEIGHT, visual.PANEL_WIDTH, 3) and _colours(one) > 20
    np.testing.assert_array_equal(one, both[:, :visual.PANEL_WIDTH])
    partly = labels.copy()
    partly[:100] = -1  # STL-10: unlabelled images among the labelled ones
    assert visual.cluster_figure(points, pseudo, partly, epoch=3).shape == both.shape


def test_losses_figure_is_written_from_a_metrics_file(tmp_path):
    writer = MetricWriter(tmp_path)
    for step in range(1, 41):
        writer.write(step, step // 10, {"train/loss": 3 - step / 20, "train/loss_contrastive": 2 - step / 40,
                                        "train/loss_prototype": 1 - step / 80, "train/lr": min(step, 10) / 10,
                                        "train/grad_norm": 1.0})
    writer.write(40, 4, {"linear_eval/test_top1": 0.9})
    writer.close()
    evaluate.write_summary(str(tmp_path), {}, digits.get_config(), "cluster", 40)
    assert os.listdir(tmp_path / "figs") == ["losses.png"] and not (tmp_path / "results.json").exists()
    image = np.asarray(Image.open(tmp_path / "figs" / "losses.png"))
    assert image.shape == (visual.PANEL_HEIGHT, 2 * visual.PANEL_WIDTH, 3) and _colours(image) > 20
    series_colours = [tuple(c) for c in np.unique(image.reshape(-1, 3), axis=0)]
    assert all(colour in series_colours for colour in visual.SERIES_COLOURS[:3])  # total, contrastive, prototype
    assert not any(p.startswith(".") for p in os.listdir(tmp_path / "figs"))  # no temporary left


def test_losses_figure_keeps_the_last_value_of_a_step_and_skips_non_finite_ones():
    records = [{"step": 1, "train/loss": 2.0}, {"step": 2, "train/loss": "nan"}, {"step": 1, "train/loss": 1.0},
               {"step": 3, "train/loss": 0.5}]
    steps, values = visual._series(records, "train/loss")
    assert steps.tolist() == [1, 3] and values.tolist() == [1.0, 0.5]
    empty = visual.losses_figure([])  # nothing logged yet: axes and a note, no error
    assert empty.shape == (visual.PANEL_HEIGHT, 2 * visual.PANEL_WIDTH, 3)


@pytest.mark.parametrize("protocol", ["fast", "original"])
def test_results_files_hold_the_metrics_and_their_protocols(tmp_path, protocol):
    config = digits.get_config()
    config.linear_eval_protocol = protocol
    results = {"linear_eval/test_top1": 0.9733, "linear_eval/test_top5": 0.999, "linear_eval/best_epoch": 37,
               "knn/test_top1": 0.95, "linear_eval/random_init_test_top1": 0.8311}
    (tmp_path / "metrics.jsonl").write_text("")
    evaluate.write_summary(str(tmp_path), results, config, "spcl", 250)
    saved = json.load(open(tmp_path / "results.json"))
    assert saved["metrics"] == results and saved["step"] == 250 and saved["linear_eval_protocol"] == protocol
    assert (saved["dataset"], saved["method"], saved["model"], saved["epochs"]) == ("digits", "spcl", "resnet18", 50)
    assert f"linear_eval_protocol={protocol}" in saved["protocols"]["linear_eval"] and "k=20," in saved["protocols"]["knn"]
    table = (tmp_path / "results.md").read_text()
    assert table.startswith("# spcl on digits (resnet18): results at step 250 (epoch 50)\n")
    rows = {line.split(" | ")[0][3:-1]: line for line in table.splitlines() if line.startswith("| `")}
    assert list(rows) == list(results)
    assert "| 97.33% | trained | linear probe" in rows["linear_eval/test_top1"]
    assert f"={protocol}, 100 epochs," in rows["linear_eval/test_top1"]
    assert "| 37 |" in rows["linear_eval/best_epoch"]
    assert "| 95.00% | trained | weighted kNN" in rows["knn/test_top1"]
    assert "| 83.11% | random initialisation | linear probe" in rows["linear_eval/random_init_test_top1"]
    assert sorted(os.listdir(tmp_path)) == ["figs", "metrics.jsonl", "results.json", "results.md"]
