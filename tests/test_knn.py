"""Weighted kNN against a brute-force numpy reference, ties, sharding and bad input."""
import jax
import numpy as np
import pytest

from ssl_jax import sharding
from ssl_jax.eval import knn


def reference_knn(train, train_labels, test, num_classes, k, temperature):
  """Brute force in float64 with the documented tie rule (lower bank index, lower class id)."""
  train = train / np.linalg.norm(train, axis=1, keepdims=True)
  test = test / np.linalg.norm(test, axis=1, keepdims=True)
  ranked = []
  for q in test:
    sim = train @ q
    nbrs = np.argsort(-sim, kind='stable')[:k]
    scores = np.zeros(num_classes)
    np.add.at(scores, train_labels[nbrs], np.exp(sim[nbrs] / temperature))
    ranked.append(np.argsort(-scores, kind='stable'))
  return np.array(ranked)


def _data(seed=0, n=300, m=70, dim=16, num_classes=7):
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=(num_classes, dim))
  train_labels = rng.integers(0, num_classes, n)
  test_labels = rng.integers(0, num_classes, m)
  train = centers[train_labels] + 1.5 * rng.normal(size=(n, dim))
  test = centers[test_labels] + 1.5 * rng.normal(size=(m, dim))
  return train.astype(np.float32), train_labels, test.astype(np.float32), test_labels


@pytest.mark.parametrize('num_devices', [1, 8])
def test_sweep_matches_bruteforce_reference(num_devices):
  train, train_labels, test, _ = _data()
  mesh = sharding.make_mesh(jax.devices()[:num_devices])
  # chunk_size 32 leaves a padded last chunk (70 = 2 * 32 + 6).
  got = knn.knn_sweep(train, train_labels, test, 7, ks=(1, 10, 20, 100, 200), temperature=0.07,
                      num_ranks=7, chunk_size=32, mesh=mesh)
  for k, ranked in got.items():
    want = reference_knn(train.astype(np.float64), train_labels, test.astype(np.float64), 7, k,
                         0.07)
    # The whole ranking agrees, including unvoted classes (score 0, ordered by class id).
    np.testing.assert_array_equal(ranked, want, err_msg=f'k={k}')


def test_ties_lowest_bank_index_then_lowest_class():
  # Bank rows 0 and 1 are identical (exact ties in similarity) with labels 3 and 1.
  train = np.array([[1, 0], [1, 0], [0, 1], [-1, 0]], np.float32)
  labels = np.array([3, 1, 2, 0])
  query = np.array([[1, 0]], np.float32)
  for num_devices in (1, 8):
    mesh = sharding.make_mesh(jax.devices()[:num_devices])
    # k=1: the nearer of the two tied rows is the lower bank index -> label 3.
    assert knn.weighted_knn(train, labels, query, 4, k=1, mesh=mesh)[0, 0] == 3
    # k=2: classes 1 and 3 tie on weight exp(1/T) -> lower class id first, then 3.
    ranked = knn.weighted_knn(train, labels, query, 4, k=2, num_ranks=4, mesh=mesh)
    np.testing.assert_array_equal(ranked[0], [1, 3, 0, 2])


def test_weights_follow_temperature():
  # One close neighbour of class 0 against two farther ones of class 1: a low temperature lets
  # the closest win, a high one lets the majority win.
  train = np.array([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8]], np.float32)
  labels = np.array([0, 1, 1])
  query = np.array([[1.0, 0.0]], np.float32)
  assert knn.weighted_knn(train, labels, query, 2, k=3, temperature=0.07)[0, 0] == 0
  assert knn.weighted_knn(train, labels, query, 2, k=3, temperature=10.0)[0, 0] == 1


def test_knn_eval_accuracies():
  train, train_labels, test, test_labels = _data(seed=1)
  metrics = knn.knn_eval(train, train_labels, test, test_labels, 7, ks=(3, 20))
  assert set(metrics) == {'knn_top1@3', 'knn_top5@3', 'knn_top1@20', 'knn_top5@20'}
  for k in (3, 20):
    want = reference_knn(train.astype(np.float64), train_labels, test.astype(np.float64), 7, k,
                         0.07)
    assert metrics[f'knn_top1@{k}'] == pytest.approx(np.mean(want[:, 0] == test_labels))
    top5 = np.mean(np.any(want[:, :min(5, k)] == test_labels[:, None], axis=1))
    assert metrics[f'knn_top5@{k}'] == pytest.approx(top5)
  assert metrics['knn_top5@20'] >= metrics['knn_top1@20'] > 0.5  # clusters are separable


def test_bad_input():
  train, train_labels, test, _ = _data(n=20, m=5)
  with pytest.raises(ValueError, match='k=\\[21\\]'):
    knn.weighted_knn(train, train_labels, test, 7, k=21)
  bad = test.copy()
  bad[2, 3] = np.nan
  with pytest.raises(ValueError, match='NaN'):
    knn.weighted_knn(train, train_labels, bad, 7, k=5)
  with pytest.raises(ValueError, match='train_labels must lie'):
    knn.weighted_knn(train, train_labels + 7, test, 7, k=5)
  with pytest.raises(ValueError, match='same D'):
    knn.weighted_knn(train, train_labels, test[:, :3], 7, k=5)
