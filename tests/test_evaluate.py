"""Evaluation helpers against independent references: weighted kNN (scikit-learn neighbours) and the
two accuracy weightings (B-17)."""
import numpy as np
from sklearn.neighbors import NearestNeighbors

from spcl_jax import evaluate


def test_knn_votes_match_a_scikit_learn_neighbour_reference():
    rng = np.random.default_rng(0)
    train_x, test_x = rng.normal(size=(300, 16)), rng.normal(size=(40, 16))
    train_y = rng.integers(0, 5, 300)
    k, temperature = 7, 0.07
    scores = evaluate.knn_predict(train_x.astype(np.float32), train_y, test_x.astype(np.float32), 5, k, temperature)
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
    assert evaluate.accuracies(logits, labels, 1) == (0.8, 0.8)
    top1, _ = evaluate.accuracies(logits, labels, 1, batch_size=3)  # batches [3 right], [1 of 2 right]
    assert top1 == (1.0 + 0.5) / 2
    assert evaluate.top_k(10) == 5 and evaluate.top_k(3) == 2
