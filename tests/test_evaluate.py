"""Evaluation helpers against independent references: weighted kNN (scikit-learn neighbours), the
two accuracy weightings (DIFFERENCES.md, B-17), and the best-valid linear head (a float64 numpy evaluation per epoch)."""
import jax
import numpy as np
from sklearn.neighbors import NearestNeighbors

from configs import default
from spcl_jax import evaluate, probes, startup
from spcl_jax.method import METHODS


def test_knn_votes_match_a_scikit_learn_neighbour_reference():
    rng = np.random.default_rng(0)
    train_x, test_x = rng.normal(size=(300, 16)), rng.normal(size=(40, 16))
    train_y = rng.integers(0, 5, 300)
    k, temperature = 7, 0.07
    scores = probes.knn_predict(train_x.astype(np.float32), train_y, test_x.astype(np.float32), 5, k, temperature)
    distance, index = NearestNeighbors(n_neighbors=k, metric="cosine").fit(train_x).kneighbors(test_x)
    expected = np.zeros((40, 5))
    for row in range(40):
        for d, j in zip(distance[row], index[row]):
            expected[row, train_y[j]] += np.exp((1.0 - d) / temperature)
    np.testing.assert_allclose(scores, expected, rtol=2e-4)
    assert (scores.argmax(1) == expected.argmax(1)).all()


def test_accuracies_weight_by_sample_or_by_batch_as_written():
    logits = np.eye(3)[[0, 1, 2, 0, 1]]
    labels = np.array([0, 1, 2, 1, 1])  # one miss, in the last, smaller batch
    assert probes.accuracies(logits, labels, 1) == (0.8, 0.8)
    top1, _ = probes.accuracies(logits, labels, 1, batch_size=3)  # batches [3 right], [1 of 2 right]
    assert top1 == (1.0 + 0.5) / 2
    assert probes.top_k(10) == 5 and probes.top_k(3) == 2


def _blobs(rng, centres, n):
    labels = rng.integers(0, len(centres), n)
    return (centres[labels] + rng.normal(size=(n, centres.shape[1]))).astype(np.float32), labels


def test_best_valid_head_is_the_epoch_of_highest_valid_top1():
    config = default.get_config()
    config.finetune_epochs, config.finetune_batch_size, config.finetune_learning_rate = 8, 16, 2.0
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(3, 6))
    train_x, train_y = _blobs(rng, centres, 48)
    valid_x, valid_y = _blobs(rng, centres, 60)

    def heads():
        batch, orders = evaluate.epoch_orders(startup.evaluation(config), config.seed, len(train_y))
        epochs = (((train_x[idx], train_y[idx]) for idx in order) for order in orders)
        return evaluate.linear_head_epochs(startup.evaluation(config), evaluate.cached_features, epochs,
                                           len(train_y) // batch, 6, 3, jax.random.key(0))

    weights = [(np.asarray(h.fc.kernel[...], np.float64), np.asarray(h.fc.bias[...], np.float64)) for h in heads()]
    expected = [np.mean(np.argmax(valid_x @ w + b, axis=1) == valid_y) for w, b in weights]  # float64 reference
    best = int(np.argmax(expected))
    assert best < len(expected) - 1 and expected[best] > expected[-1], expected  # a real choice to make

    choice = evaluate.choose_heads(heads(), evaluate.top1_scorer(valid_x, valid_y))
    np.testing.assert_allclose(choice.scores, expected, rtol=1e-12)
    assert choice.best_epoch == best
    np.testing.assert_array_equal(choice.best.fc.kernel[...], weights[best][0].astype(np.float32))
    np.testing.assert_array_equal(choice.last.fc.kernel[...], weights[-1][0].astype(np.float32))
    without_valid = evaluate.choose_heads(heads())
    assert without_valid.best is None and without_valid.best_epoch == -1
    np.testing.assert_array_equal(without_valid.last.fc.kernel[...], weights[-1][0].astype(np.float32))


def test_choose_heads_keeps_the_first_of_equal_best_scores():
    scores = {"a": 0.5, "b": 0.7, "c": 0.7, "d": 0.6}
    choice = evaluate.choose_heads(iter("abcd"), scores.get)
    assert (choice.last, choice.best, choice.best_epoch, choice.scores) == ("d", "b", 1, [0.5, 0.7, 0.7, 0.6])
    assert evaluate.choose_heads(iter(()), scores.get) == (None, None, -1, [])


def test_monitor_and_reports_use_valid_then_test():
    class Splits:
        valid, test = np.zeros(0), np.zeros(4)

    assert [name for name, _ in evaluate.eval_sets(Splits)] == ["test"]
    Splits.valid = np.zeros(2)
    assert [name for name, _ in evaluate.eval_sets(Splits)] == ["valid", "test"]


def test_as_written_accuracies_average_batches_of_the_pretraining_batch_size():
    """B-17 as written: the original's evaluation loaders all use `batch_size`, and it averages per batch."""
    from configs import digits
    from spcl_jax import network, sharding
    from conftest import load_splits

    config = digits.get_config()
    config.batch_size, config.finetune_batch_size, config.eval_metric_weighting = 128, 64, "batch"
    splits = load_splits(config)
    graphdef = network.create(startup.architecture(config), METHODS["spcl"], splits.num_classes, config.seed)[0]
    parts = startup.parts(config, METHODS["spcl"], splits)
    assert evaluate.Evaluator(parts, splits, graphdef, sharding.data_mesh()).per_batch == 128
    config.eval_metric_weighting = "sample"
    parts = startup.parts(config, METHODS["spcl"], splits)
    assert evaluate.Evaluator(parts, splits, graphdef, sharding.data_mesh()).per_batch is None
