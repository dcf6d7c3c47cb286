"""ssl_jax.ops.topk: the pruned top-k returns exactly lax.top_k's values and indices."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from ssl_jax import sharding
from ssl_jax.ops import topk


def assert_same_as_lax(x, k, fn=topk.pruned_top_k):
  values, indices = jax.jit(fn, static_argnums=1)(x, k)
  ref_values, ref_indices = jax.lax.top_k(x, k)
  np.testing.assert_array_equal(np.asarray(indices), np.asarray(ref_indices))
  np.testing.assert_array_equal(np.asarray(values), np.asarray(ref_values))
  assert indices.dtype == ref_indices.dtype


@pytest.mark.parametrize('shape,k', [((16, 5000), 100), ((3, 4, 2000), 64), ((8, 1000), 1),
                                     ((8, 1000), 1000), ((5, 7), 3)])
def test_random_rows_match_lax(shape, k):
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  assert_same_as_lax(x, k)


def test_ties_keep_lower_index_first():
  # Ten distinct values over 4,000 entries: every boundary is a tie, and the sentinels (equal
  # to some entries) must not change which tied entries are returned.
  x = jax.random.randint(jax.random.PRNGKey(1), (12, 4000), 0, 10).astype(jnp.float32)
  assert_same_as_lax(x, 150)


def test_masked_and_infinite_entries():
  # InterCLR's 'hard' strategy masks same-cluster entries with -inf; some rows have fewer
  # than k finite entries, so -inf ties reach the output.
  x = np.array(jax.random.normal(jax.random.PRNGKey(2), (6, 3000)))
  x[:, ::3] = -np.inf
  x[1, :] = -np.inf
  x[1, :40] = 1.0
  x[2, 7] = np.inf
  assert_same_as_lax(jnp.asarray(x), 200)


def test_seeded_rows_report_exactness():
  x = jax.random.normal(jax.random.PRNGKey(3), (4, 2000))
  k = 50
  ref_values, ref_indices = jax.lax.top_k(x, k)
  kth = np.asarray(ref_values[:, -1:])
  # Rows 0-1: threshold below the k-th value (exact); rows 2-3: above it (too few entries).
  beta = jnp.asarray(np.concatenate([kth[:2] - 0.5, kth[2:] + 1e-3]))
  values, indices, exact = topk.seeded_top_k(x, k, beta)
  np.testing.assert_array_equal(np.asarray(exact), [True, True, False, False])
  np.testing.assert_array_equal(np.asarray(indices[:2]), np.asarray(ref_indices[:2]))
  np.testing.assert_array_equal(np.asarray(values[:2]), np.asarray(ref_values[:2]))
  assert np.all(np.asarray(indices[2:]).min(axis=1) < 0)  # sentinels were kept


def test_misleading_subsample_falls_back_to_exact():
  # Large values only at the subsampled positions: the threshold is the j-th largest of them,
  # fewer than k entries exceed it, so pruned_top_k must take its lax.top_k fallback.
  stride, k = 20, 100
  x = np.array(jax.random.uniform(jax.random.PRNGKey(4), (4, 4000)))
  x[:, ::stride] += 10.0
  sub_threshold = np.sort(x[:, ::stride], axis=1)[:, -int(np.ceil(2.5 * k / stride))]
  assert np.all((x > sub_threshold[:, None]).sum(axis=1) < k)  # the fallback case
  assert_same_as_lax(jnp.asarray(x), k,
                     lambda a, kk: topk.pruned_top_k(a, kk, stride=stride, oversample=2.5))


def test_top_k_dispatch():
  assert topk.use_pruning(50_000, 500) == (jax.default_backend() == 'cpu')
  assert not topk.use_pruning(1000, 500)   # n < 8 k: nothing to prune
  assert not topk.use_pruning(50_000, 10)  # small k: the heap is cheap already
  x = jax.random.normal(jax.random.PRNGKey(5), (4, 20_000))
  assert_same_as_lax(x, 500, topk.top_k)
  assert_same_as_lax(x, 10, topk.top_k)


def test_batch_sharded_matches_single_device():
  mesh = sharding.make_mesh()
  rows = 2 * mesh.devices.size
  x = jax.random.normal(jax.random.PRNGKey(6), (rows, 6000))
  xs = jax.device_put(x, NamedSharding(mesh, P('data')))
  values, indices = jax.jit(topk.pruned_top_k, static_argnums=1)(xs, 300)
  ref_values, ref_indices = jax.lax.top_k(x, 300)
  np.testing.assert_array_equal(np.asarray(indices), np.asarray(ref_indices))
  np.testing.assert_array_equal(np.asarray(values), np.asarray(ref_values))


def test_invalid_k():
  with pytest.raises(ValueError, match='k must be in'):
    topk.pruned_top_k(jnp.zeros((2, 10)), 11)
