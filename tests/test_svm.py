"""VOC AP definitions, the sklearn VOC07 / low-shot protocols and the batched JAX solver."""
import warnings

import numpy as np
import pytest

from ssl_jax.eval import svm, svm_jax, voc_ap


def synthetic_voc(n_train=150, n_test=120, dim=24, num_classes=4, seed=0, noise=1.2):
  """Non-negative multi-label features (a latent code through a random ReLU layer)."""
  rng = np.random.default_rng(seed)
  mu = rng.normal(size=(num_classes, 8))
  mix = rng.normal(size=(8, dim)) / np.sqrt(8)

  def split(n):
    y = (rng.random((n, num_classes)) < 0.3).astype(np.int32)
    y[np.arange(num_classes), np.arange(num_classes)] = 1  # every class has positives
    h = y @ mu + noise * rng.normal(size=(n, 8))
    x = np.maximum(h @ mix + 0.3 * rng.normal(size=(n, dim)), 0)
    difficult = (y == 1) & (rng.random(y.shape) < 0.1)
    difficult[np.arange(num_classes), np.arange(num_classes)] = False
    return x, np.where(difficult, -1, y)

  return split(n_train), split(n_test)


# ------------------------------------------------------------------------------- VOC AP
def test_ap_hand_computed():
  scores = [0.9, 0.8, 0.7, 0.6, 0.5]
  targets = [1, 0, 1, 0, 1]
  # P = 1, 1/2, 2/3, 1/2, 3/5 at R = 1/3, 1/3, 2/3, 2/3, 1; envelope at the three recall steps
  # is 1, 2/3, 3/5 -> (1 + 2/3 + 3/5) / 3 = 34/45.
  assert voc_ap.average_precision(scores, targets) == pytest.approx(34 / 45)
  # 11-point: t = 0..0.3 -> 1 (4 points), 0.4..0.6 -> 2/3 (3), 0.7..1.0 -> 3/5 (4).
  assert voc_ap.average_precision(scores, targets, '11point') == pytest.approx(8.4 / 11)
  # A difficult (-1) image is dropped wherever it ranks.
  for method in voc_ap.METHODS:
    with_difficult = voc_ap.average_precision([0.95] + scores, [-1] + targets, method)
    assert with_difficult == voc_ap.average_precision(scores, targets, method)
  assert voc_ap.average_precision([3.0, 2.0, 1.0], [1, 1, 0]) == 1.0
  assert voc_ap.average_precision([1.0, 2.0, 3.0], [1, 0, 0]) == pytest.approx(1 / 3)


def _envelope_bruteforce(scores, targets):
  keep = targets >= 0
  ranked = targets[keep][np.argsort(-scores[keep], kind='stable')] == 1
  precision = np.cumsum(ranked) / np.arange(1, len(ranked) + 1)
  return np.mean([precision[k:].max() for k in np.flatnonzero(ranked)])


def _eleven_point_bruteforce(scores, targets):
  keep = targets >= 0
  ranked = targets[keep][np.argsort(-scores[keep], kind='stable')] == 1
  precision = np.cumsum(ranked) / np.arange(1, len(ranked) + 1)
  recall = np.cumsum(ranked) / ranked.sum()
  return np.mean([precision[recall >= t - 1e-12].max(initial=0.0)
                  for t in np.linspace(0, 1, 11)])


def test_ap_matches_definitions_on_random_rankings():
  rng = np.random.default_rng(0)
  scores = rng.normal(size=(60, 7))
  targets = rng.choice([-1, 0, 1], size=(60, 7), p=[0.1, 0.6, 0.3])
  targets[0] = 1
  env = voc_ap.average_precision(scores, targets)
  eleven = voc_ap.average_precision(scores, targets, '11point')
  for c in range(7):
    assert env[c] == pytest.approx(_envelope_bruteforce(scores[:, c], targets[:, c]))
    assert eleven[c] == pytest.approx(_eleven_point_bruteforce(scores[:, c], targets[:, c]))
  mean, per_class = voc_ap.mean_average_precision(scores, targets)
  assert mean == pytest.approx(env.mean()) and per_class.shape == (7,)


def test_ap_bad_input():
  with pytest.raises(ValueError, match='no positive'):
    voc_ap.average_precision([0.1, 0.2], [0, -1])
  with pytest.raises(ValueError, match='NaN'):
    voc_ap.average_precision([np.nan, 0.2], [1, 0])
  with pytest.raises(ValueError, match='same shape'):
    voc_ap.average_precision([0.1, 0.2], [1, 0, 0])


# -------------------------------------------------------------------- sklearn protocol
def reference_voc07(train_x, train_t, test_x, test_t, costs):
  """The spec's protocol written out directly with sklearn (serial loop)."""
  from sklearn.model_selection import cross_val_score
  from sklearn.svm import LinearSVC
  norm = lambda x: x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-5)
  train_x, test_x = norm(train_x.astype(np.float64)), norm(test_x.astype(np.float64))
  aps = []
  for c in range(train_t.shape[1]):
    y = np.where(train_t[:, c] == 1, 1, -1)
    cv, models = [], []
    for cost in costs:
      clf = LinearSVC(C=cost, class_weight={1: 2, -1: 1}, intercept_scaling=1.0, penalty='l2',
                      loss='squared_hinge', tol=1e-4, dual=True, max_iter=2000, random_state=0)
      cv.append(np.mean(cross_val_score(clf, train_x, y, cv=3, scoring='average_precision')))
      models.append(clf.fit(train_x, y))
    best = models[int(np.argmax(cv))]
    keep = test_t[:, c] != -1
    aps.append(_envelope_bruteforce(best.decision_function(test_x[keep]), test_t[keep, c]))
  return np.mean(aps), np.array(aps)


@pytest.fixture(scope='module')
def voc_small():
  return synthetic_voc()


@pytest.fixture(scope='module')
def sklearn_result(voc_small):
  (train_x, train_t), (test_x, test_t) = voc_small
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    return svm.voc07_svm(train_x, train_t, test_x, test_t, solver='sklearn', n_jobs=1)


def test_sklearn_protocol_equals_direct_reference(voc_small, sklearn_result):
  (train_x, train_t), (test_x, test_t) = voc_small
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    want_map, want_ap = reference_voc07(train_x, train_t, test_x, test_t, svm.COSTS)
  np.testing.assert_allclose(sklearn_result['ap'], want_ap, rtol=0, atol=1e-12)
  assert sklearn_result['map'] == pytest.approx(want_map, abs=1e-12)
  assert 0.5 < sklearn_result['map'] < 0.99  # a non-trivial problem
  assert len(svm.COSTS) == 19 and sorted(svm.COSTS)[0] == 0.5**19


def test_jax_solver_reproduces_sklearn_map(voc_small, sklearn_result):
  (train_x, train_t), (test_x, test_t) = voc_small
  got = svm.voc07_svm(train_x, train_t, test_x, test_t, solver='jax')
  assert abs(got['map'] - sklearn_result['map']) < 1e-3      # 0.1 mAP point
  np.testing.assert_allclose(got['cv_ap'], sklearn_result['cv_ap'], atol=0.02)
  np.testing.assert_allclose(got['ap'], sklearn_result['ap'], atol=0.01)


def test_jax_solver_optimum_matches_liblinear():
  """Weights of single problems equal LinearSVC's (same objective, converged)."""
  from sklearn.svm import LinearSVC
  (x, t), _ = synthetic_voc(n_train=80, dim=40, seed=3)
  x = svm.normalize_features(x)
  y = svm.binary_labels(t[:, 1])
  prepared = svm_jax.prepare(x)
  costs = (0.01, 1.0, 10.0)
  weight = np.where(y > 0, 2.0, 1.0)[:, None]
  _, beta, _, info = svm_jax.solve_path(prepared, y[:, None], weight, costs, tol=1e-5)
  assert info['unconverged'] == 0
  for j, cost in enumerate(costs):
    clf = LinearSVC(C=cost, class_weight={1: 2, -1: 1}, tol=1e-8, max_iter=100000,
                    random_state=0).fit(x, y)
    want = np.concatenate([clf.coef_[0], clf.intercept_])
    got = prepared.features.T.astype(np.float64) @ beta[j, :, 0]
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-3 * np.abs(want).max())


# ---------------------------------------------------------------------------- low-shot
def test_lowshot_targets_sampling():
  (_, t), _ = synthetic_voc(n_train=400)
  for k in (1, 4):
    s0 = svm.lowshot_targets(t, k, sample=0)
    assert np.all((s0 == 1).sum(0) == k) and np.all((s0 == 0).sum(0) == 19 * k)
    assert np.all(t[s0 == 1] == 1) and np.all(t[s0 == 0] == 0)   # difficult never picked
    np.testing.assert_array_equal(s0, svm.lowshot_targets(t, k, sample=0))
    assert not np.array_equal(s0, svm.lowshot_targets(t, k, sample=1))
  t_none = t.copy()
  t_none[:, 2] = np.where(t_none[:, 2] == 1, 0, t_none[:, 2])
  with pytest.raises(ValueError, match='Class 2 has no positive'):
    svm.lowshot_targets(t_none, 1, sample=0)


def test_lowshot_jax_matches_sklearn(voc_small):
  (train_x, train_t), (test_x, test_t) = voc_small
  kw = dict(ks=(1, 4), num_samples=2, costs=(0.0625, 1.0, 10.0))
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    ref = svm.lowshot_svm(train_x, train_t, test_x, test_t, solver='sklearn', n_jobs=2, **kw)
  got = svm.lowshot_svm(train_x, train_t, test_x, test_t, solver='jax', **kw)
  for k in (1, 4):
    np.testing.assert_allclose(got[k]['map'], ref[k]['map'], atol=2e-3)
    assert abs(got[k]['mean'] - ref[k]['mean']) < 1e-3
    assert ref[k]['min'] <= ref[k]['mean'] <= ref[k]['max']


def test_svm_bad_input(voc_small):
  (train_x, train_t), (test_x, test_t) = voc_small
  bad = train_x.copy()
  bad[3, 1] = np.nan
  with pytest.raises(ValueError, match='NaN'):
    svm.voc07_svm(bad, train_t, test_x, test_t)
  no_pos = train_t.copy()
  no_pos[:, 1] = 0
  with pytest.raises(ValueError, match=r'classes \[1\] have no positive'):
    svm.voc07_svm(train_x, no_pos, test_x, test_t)
  with pytest.raises(ValueError, match='solver'):
    svm.voc07_svm(train_x, train_t, test_x, test_t, solver='liblinear')
  with pytest.raises(ValueError, match='same layer'):
    svm.voc07_svm(train_x, train_t, test_x[:, :5], test_t)
