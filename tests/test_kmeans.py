"""Tests for ssl_jax.ops.kmeans: nearest-centroid labels, no empty cluster, sharding, 2-means."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ssl_jax.ops import kmeans as kmeans_lib

N_BLOBS, PER_BLOB, DIM = 4, 30, 8


def _blobs(seed=0, spread=0.1):
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(N_BLOBS, DIM)) * 5
  x = np.concatenate([c + rng.normal(size=(PER_BLOB, DIM)) * spread for c in centres])
  return x.astype(np.float32), np.repeat(np.arange(N_BLOBS), PER_BLOB)


def _normalised(x):
  x = np.asarray(x, np.float64)
  return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-10)


def _assert_nearest(x, centroids, labels, tol=1e-5):
  sq_dist = ((_normalised(x)[:, None, :] - np.asarray(centroids, np.float64)[None]) ** 2).sum(-1)
  chosen = sq_dist[np.arange(len(labels)), np.asarray(labels)]
  np.testing.assert_array_less(chosen, sq_dist.min(axis=1) + tol)


def test_kmeans_plus_plus_recovers_separated_blobs():
  x, blob = _blobs()
  centroids, labels = kmeans_lib.kmeans(jax.random.key(0), x, N_BLOBS, chunk_size=16,
                                        init='kmeans++')
  labels = np.asarray(labels)
  # Same partition as the blobs, up to a renaming of the clusters.
  assert len({(b, l) for b, l in zip(blob, labels)}) == N_BLOBS
  assert len(set(labels)) == N_BLOBS
  xn = _normalised(x)
  for c in range(N_BLOBS):
    np.testing.assert_allclose(centroids[c], xn[labels == c].mean(0), atol=1e-5)
  _assert_nearest(x, centroids, labels)


@pytest.mark.parametrize('seed', [0, 1])
def test_duplicate_rows_leave_no_empty_cluster_and_labels_are_nearest(seed):
  # 40 distinct rows, each present 3 times (identical images): the random init then picks
  # identical centroids, all but one of which get no row; re-seeding must fix every one of them.
  x, _ = _blobs(seed)
  x = np.tile(x[::3], (3, 1))
  init_rows = np.asarray(jax.random.choice(jax.random.key(seed), len(x), (20,), replace=False))
  assert len(set(init_rows % 40)) < 20, 'precondition: the init holds duplicate centroids'
  centroids, labels = kmeans_lib.kmeans(jax.random.key(seed), x, 20, chunk_size=16)
  assert centroids.shape == (20, DIM) and labels.dtype == jnp.int32
  assert np.all(np.bincount(np.asarray(labels), minlength=20) > 0)
  _assert_nearest(x, centroids, labels)


def test_row_sharded_and_other_chunking_match_unsharded():
  x, _ = _blobs(3)
  key = jax.random.key(3)
  ref_centroids, ref_labels = kmeans_lib.kmeans(key, x, 20, chunk_size=16)
  mesh = Mesh(np.array(jax.devices()), ('data',))
  x_sharded = jax.device_put(x, NamedSharding(mesh, P('data')))
  # chunk_size 7 also exercises the padded last chunk (120 rows -> 18 chunks of 7).
  centroids, labels = kmeans_lib.kmeans(key, x_sharded, 20, chunk_size=7)
  np.testing.assert_array_equal(labels, ref_labels)
  np.testing.assert_allclose(centroids, ref_centroids, atol=1e-5)


def test_reseed_takes_farthest_member_of_largest_cluster():
  x = jnp.array([[0, 0], [3, 4], [3, 4], [1, 1], [2, 2], [5, 5]], jnp.float32)
  labels = jnp.array([0, 0, 0, 1, 1, 2], jnp.int32)
  counts = jnp.array([3, 2, 1, 0, 0], jnp.int32)  # clusters 3 and 4 empty
  sq_dist = jnp.array([0.1, 0.5, 0.4, 0.9, 0.3, 0.0])
  centroids = jnp.full((5, 2), -1.0)
  out = np.asarray(kmeans_lib._reseed_empty_clusters(x, centroids, labels, sq_dist, counts))
  # Cluster 3 <- row 1, the farthest member of the largest cluster 0. Counts become
  # [2, 2, 1, 1, 0]; the tie goes to cluster 0, whose farthest remaining member would be row 2,
  # but it duplicates the new seed (distance 0 now), so cluster 4 <- row 0.
  np.testing.assert_array_equal(out[3], [3, 4])
  np.testing.assert_array_equal(out[4], [0, 0])
  np.testing.assert_array_equal(out[:3], -1.0)


@pytest.mark.parametrize('max_rows', [None, 6])
def test_two_means_splits_masked_rows_by_sub_blob(max_rows):
  rng = np.random.default_rng(0)
  a = np.array([1.0, 0, 0, 0]) + rng.normal(size=(5, 4)) * 0.05
  b = np.array([0, 1.0, 0, 0]) + rng.normal(size=(4, 4)) * 0.05
  other = rng.normal(size=(5, 4))  # outside the mask; must stay False
  x = np.concatenate([other[:2], b[:2], a, other[2:], b[2:]]).astype(np.float32)
  mask = np.zeros(len(x), bool)
  mask[2:9] = True
  mask[12:] = True
  # max_rows=6 < 9 members fits the centres on a random subset (which must hold both blobs).
  assign = np.asarray(kmeans_lib.two_means(jax.random.key(1), x, jnp.asarray(mask),
                                           max_rows=max_rows))
  # The half holding the lowest-index member (row 2, a "b" row) keeps the old label.
  expected = np.zeros(len(x), bool)
  expected[4:9] = True  # the "a" rows
  np.testing.assert_array_equal(assign, expected)


def test_two_means_identical_members_fall_back_to_random_half():
  x = np.ones((10, 3), np.float32)
  mask = np.array([0, 1, 1, 1, 1, 1, 1, 1, 0, 0], bool)  # 7 identical members
  assign = np.asarray(kmeans_lib.two_means(jax.random.key(0), x, jnp.asarray(mask)))
  assert assign.sum() == 3 and not np.any(assign & ~mask)


def test_bad_arguments_raise():
  x = np.zeros((5, 3), np.float32)
  with pytest.raises(ValueError, match='k <= N'):
    kmeans_lib.kmeans(jax.random.key(0), x, 6)
  with pytest.raises(ValueError, match='init'):
    kmeans_lib.kmeans(jax.random.key(0), x, 2, init='forgy')
  with pytest.raises(ValueError, match=r'\[N, D\]'):
    kmeans_lib.kmeans(jax.random.key(0), x[0], 2)
