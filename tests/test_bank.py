"""Tests for ssl_jax.ops.bank against a numpy transcription of spec §1.8 (A, B, C)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from sklearn.cluster import KMeans

from ssl_jax.ops import bank as bank_lib

DIM, C, MIN_CLUSTER = 8, 6, 3


def _unit(v):
  v = np.asarray(v, np.float64)
  return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _direction(main, side=None, weight=0.0):
  v = np.zeros(DIM)
  v[main] = 1.0
  if side is not None:
    v[side] += weight
  return v


# Cluster layout (64 rows, shuffled): clusters 0 and 1 consist of two well separated sub-blobs
# (so any 2-means, ours or sklearn's, splits them the same way), clusters 4 and 5 lean towards
# clusters 2 and 3 (so their members have an unambiguous target when dissolved).
_LAYOUT = [  # (cluster, direction, rows)
    (0, _direction(0, 6, 0.5), 10), (0, _direction(0, 6, -0.5), 10),
    (1, _direction(1, 7, 0.5), 8), (1, _direction(1, 7, -0.5), 8),
    (2, _direction(2), 10), (3, _direction(3), 12),
    (4, _direction(4, 2, 0.3), 4), (5, _direction(5, 3, 0.3), 2)]


def _initial_bank_arrays(seed=0):
  rng = np.random.default_rng(seed)
  feats = np.concatenate([d + rng.normal(size=(n, DIM)) * 0.03 for _, d, n in _LAYOUT])
  labels = np.concatenate([np.full(n, c) for c, _, n in _LAYOUT])
  perm = rng.permutation(len(labels))
  # Un-normalised input features: init_memory must normalise them.
  scale = rng.uniform(0.5, 2.0, size=(len(perm), 1))
  return (feats[perm] * scale).astype(np.float32), labels[perm].astype(np.int32)


def _update_batch(labels):
  """A batch that makes cluster 4 small and writes one row twice (last write must win)."""
  rows4 = np.flatnonzero(labels == 4)
  row3 = np.flatnonzero(labels == 3)[0]
  row2 = np.flatnonzero(labels == 2)[0]
  idx = np.array([rows4[0], rows4[1], row3, row2, row3], np.int32)
  keys = _unit([_direction(0, 6, 0.5), _direction(0, 6, -0.5), _direction(1),
                _direction(2), _direction(3)]).astype(np.float32)
  return idx, keys


# ---- numpy transcription of the reference (interclr_memory.py, spec §1.8) ----


def np_init_memory(feats, labels):
  feats = feats / (np.linalg.norm(feats, axis=1, keepdims=True) + 1e-12)
  cents = np.stack([feats[labels == c].mean(0) for c in range(C)])
  return feats, labels.copy(), cents


def np_update_samples(feats, labels, cents, idx, keys):
  feats, labels = feats.copy(), labels.copy()
  new = (keys @ cents.T).argmax(1)
  change_ratio = np.mean(new != labels[idx])
  for j in range(len(idx)):  # a sequential write: the last duplicate wins
    feats[idx[j]] = keys[j]
    labels[idx[j]] = new[j]
  return feats, labels, change_ratio


def np_update_centroids(feats, labels, cents):
  cents = cents.copy()
  for c in range(C):
    if np.any(labels == c):
      cents[c] = feats[labels == c].mean(0)
  return cents


def np_deal_with_small_clusters(feats, labels, cents, min_cluster):
  labels, cents = labels.copy(), cents.copy()
  small = np.flatnonzero(np.bincount(labels, minlength=C) < min_cluster)
  if len(small) == 0:
    return labels, cents
  inclusion = np.setdiff1d(np.arange(C), small)
  for s in small:
    rows = np.flatnonzero(labels == s)
    if len(rows):
      labels[rows] = inclusion[(cents[inclusion] @ feats[rows].T).argmax(0)]
  for e in small:  # _redirect_empty_clusters
    largest = np.bincount(labels, minlength=C).argmax()
    members = np.flatnonzero(labels == largest)
    sub = KMeans(n_clusters=2, random_state=0, max_iter=20, n_init=10).fit(feats[members]).labels_
    assert 0 < sub.sum() < len(sub), 'test data must split cleanly'
    if sub[0] == 1:  # our documented convention: the half with the lowest index keeps the label
      sub = 1 - sub
    labels[members[sub == 1]] = e
    cents[largest] = feats[labels == largest].mean(0)
    cents[e] = feats[labels == e].mean(0)
  return labels, cents


def _reference_pipeline():
  feats0, labels0 = _initial_bank_arrays()
  feats, labels, cents = np_init_memory(feats0.astype(np.float64), labels0)
  idx, keys = _update_batch(labels)
  feats, labels, ratio = np_update_samples(feats, labels, cents, idx, keys.astype(np.float64))
  cents = np_update_centroids(feats, labels, cents)
  labels_c, cents_c = np_deal_with_small_clusters(feats, labels, cents, MIN_CLUSTER)
  return dict(feats0=feats0, labels0=labels0, idx=idx, keys=keys, feats=feats, ratio=ratio,
              labels_b=labels, cents_b=cents, labels=labels_c, cents=cents_c)


def _jax_pipeline(bank, idx, keys, chunk_size=4096):
  bank, ratio = bank_lib.update_samples(bank, jnp.asarray(idx), jnp.asarray(keys))
  bank_b = bank_lib.update_centroids(bank)
  assert bool(bank_lib.has_small_clusters(bank_b, MIN_CLUSTER))
  bank_c = bank_lib.deal_with_small_clusters(bank_b, jax.random.key(0), MIN_CLUSTER,
                                             chunk_size=chunk_size)
  return bank_b, bank_c, ratio


def test_full_iteration_matches_numpy_transcription():
  ref = _reference_pipeline()
  bank = bank_lib.init_memory(ref['feats0'], ref['labels0'], C)
  bank_b, bank_c, ratio = _jax_pipeline(bank, ref['idx'], ref['keys'])
  # Three of the five rows change label: two cluster-4 rows -> 0, the first write of the
  # duplicated cluster-3 row -> 1 (its last write goes back to 3).
  np.testing.assert_allclose(ratio, 0.6, atol=1e-7)
  np.testing.assert_allclose(ratio, ref['ratio'], atol=1e-7)
  np.testing.assert_allclose(bank_b.features, ref['feats'], atol=1e-6)
  np.testing.assert_array_equal(bank_b.labels, ref['labels_b'])
  np.testing.assert_allclose(bank_b.centroids, ref['cents_b'], atol=1e-6)
  # Clusters 4 and 5 were small; both are re-seeded from splits of clusters 0 and 1.
  np.testing.assert_array_equal(bank_c.labels, ref['labels'])
  np.testing.assert_allclose(bank_c.centroids, ref['cents'], atol=1e-6)
  np.testing.assert_allclose(bank_c.features, bank_b.features)
  counts = np.bincount(np.asarray(bank_c.labels), minlength=C)
  assert counts.min() >= MIN_CLUSTER and counts[4] == 11 and counts[5] == 8


def test_duplicate_index_last_write_wins():
  ref = _reference_pipeline()
  bank = bank_lib.init_memory(ref['feats0'], ref['labels0'], C)
  idx, keys = ref['idx'], ref['keys']
  bank, _ = bank_lib.update_samples(bank, jnp.asarray(idx), jnp.asarray(keys))
  np.testing.assert_array_equal(bank.features[idx[2]], keys[4])
  assert int(bank.labels[idx[2]]) == 3


def test_row_sharded_bank_matches_unsharded():
  ref = _reference_pipeline()
  mesh = Mesh(np.array(jax.devices()), ('data',))
  rows = NamedSharding(mesh, P('data'))
  bank = bank_lib.init_memory(ref['feats0'], ref['labels0'], C)
  bank = bank.replace(features=jax.device_put(bank.features, rows),
                      labels=jax.device_put(bank.labels, rows))
  # chunk_size=1 also runs the dissolve loop one member at a time.
  _, bank_c, _ = _jax_pipeline(bank, ref['idx'], ref['keys'], chunk_size=1)
  np.testing.assert_array_equal(bank_c.labels, ref['labels'])
  np.testing.assert_allclose(bank_c.centroids, ref['cents'], atol=1e-6)


def test_update_centroids_keeps_old_centroid_of_empty_cluster():
  feats0, labels0 = _initial_bank_arrays()
  bank = bank_lib.init_memory(feats0, labels0, C)
  rows5 = np.flatnonzero(labels0 == 5)
  keys = _unit([_direction(2), _direction(3)]).astype(np.float32)
  bank, ratio = bank_lib.update_samples(bank, jnp.asarray(rows5), jnp.asarray(keys))
  assert float(ratio) == 1.0
  updated = bank_lib.update_centroids(bank)
  assert int(bank_lib.cluster_stats(updated)['empty']) == 1
  np.testing.assert_array_equal(updated.centroids[5], bank.centroids[5])
  expected = np_update_centroids(np.asarray(bank.features), np.asarray(bank.labels),
                                 np.asarray(bank.centroids))
  np.testing.assert_allclose(updated.centroids, expected, atol=1e-6)


def test_no_small_cluster_is_a_no_op():
  feats0, labels0 = _initial_bank_arrays()
  bank = bank_lib.init_memory(feats0, labels0, C)
  assert not bool(bank_lib.has_small_clusters(bank, 2))
  assert bool(bank_lib.has_small_clusters(bank, 3))  # cluster 5 has 2 rows
  out = bank_lib.deal_with_small_clusters(bank, jax.random.key(0), 2)
  np.testing.assert_array_equal(out.labels, bank.labels)
  np.testing.assert_array_equal(out.centroids, bank.centroids)
  stats = bank_lib.cluster_stats(bank)
  assert (int(stats['empty']), int(stats['min_size']), int(stats['max_size'])) == (0, 2, 20)


def test_init_memory_normalises_and_averages():
  feats0, labels0 = _initial_bank_arrays()
  bank = bank_lib.init_memory(feats0, labels0, C)
  feats, _, cents = np_init_memory(feats0.astype(np.float64), labels0)
  np.testing.assert_allclose(bank.features, feats, atol=1e-6)
  np.testing.assert_allclose(bank.centroids, cents, atol=1e-6)
  # Centroids are means of unit rows, hence shorter than 1 (never renormalised).
  assert np.all(np.linalg.norm(bank.centroids, axis=1) < 1.0)
  assert bank.labels.dtype == jnp.int32 and bank.num_classes == C


def test_bad_input_raises():
  feats0, labels0 = _initial_bank_arrays()
  with pytest.raises(ValueError, match='empty'):
    bank_lib.init_memory(feats0, labels0, C + 1)
  with pytest.raises(ValueError, match='lie in'):
    bank_lib.init_memory(feats0, labels0, C - 1)
  bank = bank_lib.init_memory(feats0, labels0, C)
  with pytest.raises(ValueError, match='min_cluster'):
    bank_lib.deal_with_small_clusters(bank, jax.random.key(0), 11)  # 64 < 6 * 11


def test_disabled_repair_is_a_no_op_even_with_small_clusters():
  feats0, labels0 = _initial_bank_arrays()
  bank = bank_lib.init_memory(feats0, labels0, C)
  assert bool(bank_lib.has_small_clusters(bank, 3))  # cluster 5 has 2 rows

  @jax.jit
  def repair(bank, enabled):
    return bank_lib.deal_with_small_clusters(bank, jax.random.key(0), 3, enabled=enabled)

  off, on = repair(bank, jnp.bool_(False)), repair(bank, jnp.bool_(True))
  np.testing.assert_array_equal(off.labels, bank.labels)
  np.testing.assert_array_equal(off.centroids, bank.centroids)
  assert np.bincount(np.asarray(on.labels), minlength=C).min() >= 3
