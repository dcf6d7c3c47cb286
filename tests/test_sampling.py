"""Tests for ssl_jax.ops.sampling: label constraints, pools, uniformity, fallbacks."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ssl_jax.ops import sampling

N, B, NUM_CLASSES = 64, 4, 4
NUM_DRAWS = 300


def _bank(seed=0):
  rng = np.random.default_rng(seed)
  labels = rng.permutation(np.arange(N) % NUM_CLASSES).astype(np.int32)
  sim = rng.uniform(-1, 1, size=(B, N)).astype(np.float32)  # distinct values
  idx = np.array([0, 5, 17, 40])
  return jnp.asarray(sim), jnp.asarray(labels), jnp.asarray(labels[idx]), idx


def _draws(fn, num=NUM_DRAWS):
  """fn(key) for `num` keys, stacked on a leading axis."""
  keys = jax.random.split(jax.random.key(42), num)
  return jax.tree.map(np.asarray, jax.vmap(fn)(keys))


def _assert_roughly_uniform(counts, expected):
  # Binomial counts: allow 5 standard deviations.
  sd = np.sqrt(expected)
  np.testing.assert_array_less(np.abs(counts - expected), 5 * sd + 1)


def test_positives_share_label_and_cover_cluster_uniformly():
  sim, labels, qlabels, idx = _bank()
  pos = _draws(lambda k: sampling.sample_positives(k, labels, qlabels))
  labels = np.asarray(labels)
  np.testing.assert_array_equal(labels[pos], np.broadcast_to(qlabels, pos.shape))
  for i in range(B):
    members = np.flatnonzero(labels == labels[idx[i]])
    counts = np.array([(pos[:, i] == m).sum() for m in members])
    assert counts.sum() == NUM_DRAWS and idx[i] in members  # own index is in the pool
    _assert_roughly_uniform(counts, NUM_DRAWS / len(members))


@pytest.mark.parametrize('approx', [False, True])
def test_semihard_from_top_pool_other_label_without_replacement(approx):
  sim, labels, qlabels, _ = _bank()
  pool_size, num_neg = 24, 8
  neg, valid = sampling.sample_negatives(jax.random.key(0), sim, labels, qlabels,
                                         num_neg=num_neg, strategy='semihard',
                                         pool_size=pool_size, approx=approx)
  neg, valid, labels_np = np.asarray(neg), np.asarray(valid), np.asarray(labels)
  assert neg.shape == (B, num_neg) and neg.dtype == np.int32
  for i in range(B):
    pool = np.argsort(-np.asarray(sim[i]))[:pool_size]
    allowed = pool[labels_np[pool] != int(qlabels[i])]
    assert valid[i].sum() == min(num_neg, len(allowed))
    drawn = neg[i][valid[i]]
    assert len(set(drawn)) == len(drawn)  # without replacement
    assert np.all(labels_np[drawn] != int(qlabels[i]))
    if not approx:  # approx_max_k may miss a few pool entries on TPU
      assert set(drawn) <= set(allowed)


def test_semihard_draws_are_uniform_over_allowed_pool():
  sim, labels, qlabels, _ = _bank()
  pool_size, num_neg = 24, 8
  sample = functools.partial(sampling.sample_negatives, sim=sim, labels=labels,
                             query_labels=qlabels, num_neg=num_neg, strategy='semihard',
                             pool_size=pool_size)
  neg, valid = _draws(lambda k: sample(k))
  assert valid.all()
  labels_np = np.asarray(labels)
  for i in range(B):
    pool = np.argsort(-np.asarray(sim[i]))[:pool_size]
    allowed = pool[labels_np[pool] != int(qlabels[i])]
    counts = np.array([(neg[:, i] == a).sum() for a in allowed])
    assert counts.sum() == NUM_DRAWS * num_neg
    _assert_roughly_uniform(counts, NUM_DRAWS * num_neg / len(allowed))


def test_semihard_fewer_valid_than_num_neg_is_masked():
  sim, labels, qlabels, _ = _bank()
  # Query 0's pool of 12: give all but 3 of its entries the query's label.
  pool = np.argsort(-np.asarray(sim[0]))[:12]
  labels = np.asarray(labels).copy()
  labels[pool] = int(qlabels[0])
  labels[pool[[2, 5, 9]]] = (int(qlabels[0]) + 1) % NUM_CLASSES
  neg, valid = sampling.sample_negatives(jax.random.key(1), sim, jnp.asarray(labels), qlabels,
                                         num_neg=8, strategy='semihard', pool_size=12)
  assert int(valid[0].sum()) == 3
  assert set(np.asarray(neg[0])[np.asarray(valid[0])]) == set(pool[[2, 5, 9]])


def test_semieasy_pool_is_least_similar():
  sim, labels, qlabels, _ = _bank()
  neg, valid = sampling.sample_negatives(jax.random.key(0), sim, labels, qlabels, num_neg=8,
                                         strategy='semieasy', pool_size=24)
  labels_np = np.asarray(labels)
  assert np.asarray(valid).all()
  for i in range(B):
    pool = np.argsort(np.asarray(sim[i]))[:24]
    drawn = np.asarray(neg[i])
    assert set(drawn) <= set(pool) and len(set(drawn)) == 8
    assert np.all(labels_np[drawn] != int(qlabels[i]))


def test_hard_is_exact_top_among_other_labels():
  sim, labels, qlabels, _ = _bank()
  neg, valid = sampling.sample_negatives(jax.random.key(0), sim, labels, qlabels, num_neg=10,
                                         strategy='hard')
  labels_np, sim_np = np.asarray(labels), np.asarray(sim)
  assert np.asarray(valid).all()
  for i in range(B):
    other = np.flatnonzero(labels_np != int(qlabels[i]))
    expected = other[np.argsort(-sim_np[i, other])[:10]]
    np.testing.assert_array_equal(neg[i], expected)


def test_random_excludes_query_label_and_is_uniform():
  sim, labels, qlabels, _ = _bank()
  num_neg = 16
  neg, valid = _draws(lambda k: sampling.sample_negatives(
      k, sim, labels, qlabels, num_neg=num_neg, strategy='random'))
  labels_np = np.asarray(labels)
  assert valid.all()
  for i in range(B):
    other = np.flatnonzero(labels_np != int(qlabels[i]))
    assert np.all(labels_np[neg[:, i]] != int(qlabels[i]))
    counts = np.array([(neg[:, i] == o).sum() for o in other])
    assert counts.sum() == NUM_DRAWS * num_neg
    _assert_roughly_uniform(counts, NUM_DRAWS * num_neg / len(other))


def test_random_with_single_cluster_is_all_invalid():
  sim, _, _, _ = _bank()
  labels = jnp.zeros((N,), jnp.int32)
  _, valid = sampling.sample_negatives(jax.random.key(0), sim, labels, jnp.zeros((B,), jnp.int32),
                                       num_neg=4, strategy='random')
  assert not np.asarray(valid).any()


@pytest.mark.parametrize('strategy', ['semihard', 'random'])
def test_batch_sharded_matches_unsharded(strategy):
  rng = np.random.default_rng(1)
  labels = jnp.asarray(rng.permutation(np.arange(N) % NUM_CLASSES), jnp.int32)
  sim = jnp.asarray(rng.uniform(-1, 1, size=(8, N)), jnp.float32)
  qlabels = labels[:8]
  sample = functools.partial(sampling.sample_negatives, num_neg=8, strategy=strategy,
                             pool_size=24)
  ref = sample(jax.random.key(3), sim, labels, qlabels)
  rows = NamedSharding(Mesh(np.array(jax.devices()), ('data',)), P('data'))
  out = sample(jax.random.key(3), jax.device_put(sim, rows), labels,
               jax.device_put(qlabels, rows))
  np.testing.assert_array_equal(out[0], ref[0])
  np.testing.assert_array_equal(out[1], ref[1])


def test_bank_similarity_is_f32_dot_without_gradient():
  rng = np.random.default_rng(0)
  qn, bank = rng.normal(size=(3, 5)), rng.normal(size=(7, 5))
  sim = sampling.bank_similarity(jnp.asarray(qn, jnp.float32), jnp.asarray(bank, jnp.float32))
  np.testing.assert_allclose(sim, qn @ bank.T, rtol=1e-5, atol=1e-5)
  grad = jax.grad(lambda q: sampling.bank_similarity(q, jnp.asarray(bank)).sum())(
      jnp.asarray(qn, jnp.float32))
  np.testing.assert_array_equal(grad, 0.0)


def test_bad_arguments_raise():
  sim, labels, qlabels, _ = _bank()
  with pytest.raises(ValueError, match='strategy'):
    sampling.sample_negatives(jax.random.key(0), sim, labels, qlabels, num_neg=4,
                              strategy='easy')
  with pytest.raises(ValueError, match='pool_size'):
    sampling.sample_negatives(jax.random.key(0), sim, labels, qlabels, num_neg=8,
                              strategy='semihard', pool_size=4)
  with pytest.raises(ValueError, match='num_neg'):
    sampling.sample_negatives(jax.random.key(0), sim, labels, qlabels, num_neg=N + 1,
                              strategy='hard')


def test_random_needs_no_similarities():
  sim, labels, qlabels, _ = _bank()
  sample = functools.partial(sampling.sample_negatives, labels=labels, query_labels=qlabels,
                             num_neg=8, strategy='random')
  with_sim, without = sample(jax.random.key(5), sim), sample(jax.random.key(5), None)
  np.testing.assert_array_equal(with_sim[0], without[0])
  np.testing.assert_array_equal(with_sim[1], without[1])
  with pytest.raises(ValueError, match='needs the similarities'):
    sampling.sample_negatives(jax.random.key(0), None, labels, qlabels, num_neg=8,
                              strategy='semihard', pool_size=24)
  with pytest.raises(ValueError, match='sim must be'):
    sampling.sample_negatives(jax.random.key(0), sim[:, :10], labels, qlabels, num_neg=8,
                              strategy='hard')


@pytest.mark.parametrize('max_label', [79, 3_000_000])
def test_label_order_is_stable_argsort(max_label):
  # 79: the packed single-key sort (label * N + index fits in int32); 3e6 * 1000 does not,
  # so the (label, index) pair sort runs. Both must give numpy's stable argsort.
  rng = np.random.default_rng(3)
  labels = rng.integers(0, 80, 1000).astype(np.int32)
  labels[rng.integers(0, 1000, 5)] = max_label
  order = jax.jit(sampling._label_order)(jnp.asarray(labels))
  np.testing.assert_array_equal(np.asarray(order), np.argsort(labels, kind='stable'))


def test_semihard_pool_on_a_bank_large_enough_for_the_pruned_top_k():
  # N = 20,000, pool 500: on CPU the pool comes from topk.pruned_top_k; every draw must still
  # lie in the exact top-500 and differ in label from the query.
  rng = np.random.default_rng(4)
  n, pool_size, num_neg = 20_000, 500, 64
  labels = rng.integers(0, 40, n).astype(np.int32)
  sim = rng.uniform(-1, 1, size=(B, n)).astype(np.float32)
  qlabels = labels[:B]
  neg, valid = sampling.sample_negatives(jax.random.key(2), jnp.asarray(sim), jnp.asarray(labels),
                                         jnp.asarray(qlabels), num_neg=num_neg,
                                         strategy='semihard', pool_size=pool_size)
  neg, valid = np.asarray(neg), np.asarray(valid)
  assert valid.all()
  for i in range(B):
    pool = set(np.argsort(-sim[i], kind='stable')[:pool_size])
    assert set(neg[i]) <= pool and len(set(neg[i])) == num_neg
    assert np.all(labels[neg[i]] != qlabels[i])
