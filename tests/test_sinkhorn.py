"""Tests for ssl_jax.ops.sinkhorn against float64 transcriptions of the refs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ssl_jax.ops.sinkhorn import sinkhorn_knopp


def _reference_sinkhorn(out, epsilon, num_iters):
  """facebookresearch/swav distributed_sinkhorn, world_size 1, in float64."""
  q = np.exp(np.asarray(out, np.float64) / epsilon).T  # (K, n)
  total_rows = q.shape[1]
  num_prototypes = q.shape[0]
  q /= np.sum(q)
  for _ in range(num_iters):
    q /= np.sum(q, axis=1, keepdims=True)
    q /= num_prototypes
    q /= np.sum(q, axis=0, keepdims=True)
    q /= total_rows
  q *= total_rows
  return q.T


def _distributed_reference(out, epsilon, num_iters, world_size,
                           all_reduce_row_sums):
  """Simulates the multi-GPU reference loop on `world_size` row shards.

  all_reduce_row_sums=True is facebookresearch (prototype sums all-reduced),
  False is mmselfsup (all-reduce skipped unless a sum is exactly 0). The total
  mass and Btot = n_loc * world_size are global in both.
  """
  shards = np.split(np.asarray(out, np.float64), world_size, axis=0)
  qs = [np.exp(s / epsilon).T for s in shards]
  num_prototypes, n_loc = qs[0].shape
  total_rows = n_loc * world_size
  total = sum(np.sum(q) for q in qs)
  qs = [q / total for q in qs]
  for _ in range(num_iters):
    row_sums = [np.sum(q, axis=1, keepdims=True) for q in qs]
    if all_reduce_row_sums:
      row_sums = [sum(row_sums)] * world_size
    qs = [q / r / num_prototypes for q, r in zip(qs, row_sums)]
    qs = [q / np.sum(q, axis=0, keepdims=True) / total_rows for q in qs]
  return np.concatenate([q.T * total_rows for q in qs], axis=0)


def _random_scores(seed, n, k):
  """Cosine-like scores: rows of unit z against unit prototypes, in [-1, 1]."""
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(n, 16))
  c = rng.normal(size=(k, 16))
  z /= np.linalg.norm(z, axis=1, keepdims=True)
  c /= np.linalg.norm(c, axis=1, keepdims=True)
  return (z @ c.T).astype(np.float32)


def _data_mesh():
  return Mesh(np.array(jax.devices()), ("data",))


@pytest.mark.parametrize("n,k,epsilon,num_iters", [
    (24, 10, 0.05, 3),   # reference defaults, n > K
    (8, 30, 0.05, 3),    # fewer samples than prototypes
    (32, 12, 0.03, 3),   # the README's anti-collapse epsilon
    (16, 6, 0.1, 1),
    (16, 6, 0.05, 10),
])
def test_matches_float64_reference(n, k, epsilon, num_iters):
  scores = _random_scores(n * 100 + k, n, k)
  codes = sinkhorn_knopp(jnp.asarray(scores), epsilon=epsilon,
                         num_iters=num_iters)
  assert codes.dtype == jnp.float32 and codes.shape == (n, k)
  np.testing.assert_allclose(
      codes, _reference_sinkhorn(scores, epsilon, num_iters),
      rtol=1e-5, atol=1e-6)


def test_global_mode_equals_distributed_facebook_loop():
  scores = _random_scores(1, 32, 7)
  np.testing.assert_allclose(
      sinkhorn_knopp(jnp.asarray(scores)),
      _distributed_reference(scores, 0.05, 3, world_size=4,
                             all_reduce_row_sums=True),
      rtol=1e-5, atol=1e-6)


def test_rows_sum_to_one_and_prototype_marginals_converge():
  n, k = 40, 8
  scores = _random_scores(2, n, k)
  marginal_errors = []
  for num_iters in (1, 3, 30, 100):
    codes = np.asarray(sinkhorn_knopp(jnp.asarray(scores), num_iters=num_iters))
    np.testing.assert_allclose(codes.sum(axis=1), 1.0, rtol=1e-5)
    assert (codes >= 0).all()
    # Column mass of codes / n is each prototype's share of the batch;
    # error measured relative to the target 1/K.
    marginal_errors.append(np.max(np.abs(codes.sum(axis=0) / n * k - 1)))
  # The reference default (3 iterations) is only roughly equipartitioned on
  # these peaked inputs (measured 14%); 30 iterations reach 0.2%, 100 reach
  # float32 precision.
  assert marginal_errors[1] < 0.25
  assert marginal_errors[2] < 1e-2
  assert marginal_errors[3] < 1e-4
  assert marginal_errors[0] > marginal_errors[1] > marginal_errors[2]
  # Without equipartition the argmax prototype share would be far from 1/K.
  softmax = jax.nn.softmax(scores / 0.05, axis=1)
  assert np.max(np.abs(softmax.sum(axis=0) / n * k - 1)) > 0.5


def test_invariant_to_per_prototype_shift_and_row_permutation():
  scores = _random_scores(3, 24, 9)
  codes = sinkhorn_knopp(jnp.asarray(scores))
  shift = np.linspace(-0.5, 0.5, 9, dtype=np.float32)
  np.testing.assert_allclose(
      sinkhorn_knopp(jnp.asarray(scores + shift)), codes, rtol=1e-4, atol=1e-6)
  perm = np.random.default_rng(0).permutation(24)
  np.testing.assert_allclose(
      sinkhorn_knopp(jnp.asarray(scores[perm])), np.asarray(codes)[perm],
      rtol=1e-5, atol=1e-7)


def test_sharded_over_devices_equals_single_device(n_devices):
  mesh = _data_mesh()
  scores = _random_scores(4, 4 * n_devices, 11)
  expected = sinkhorn_knopp(jnp.asarray(scores))
  sharded_scores = jax.device_put(scores, NamedSharding(mesh, P("data")))
  fn = jax.jit(sinkhorn_knopp, out_shardings=NamedSharding(mesh, P("data")))
  codes = fn(sharded_scores)
  assert len(codes.sharding.device_set) == n_devices
  np.testing.assert_allclose(codes, expected, rtol=1e-6, atol=1e-7)


def test_per_device_mode_runs_reference_per_group(n_devices):
  mesh = _data_mesh()
  rows_per_device, k = 5, 6
  scores = _random_scores(5, rows_per_device * n_devices, k)
  sharded_scores = jax.device_put(scores, NamedSharding(mesh, P("data")))
  fn = jax.jit(lambda s: sinkhorn_knopp(s, row_sums="per_device", mesh=mesh))
  codes = np.asarray(fn(sharded_scores))
  expected = np.concatenate([
      _reference_sinkhorn(group, 0.05, 3)
      for group in np.split(scores, n_devices, axis=0)])
  np.testing.assert_allclose(codes, expected, rtol=1e-5, atol=1e-6)
  # Same as the simulated multi-GPU mmselfsup loop (global mass and Btot).
  np.testing.assert_allclose(
      codes,
      _distributed_reference(scores, 0.05, 3, n_devices,
                             all_reduce_row_sums=False),
      rtol=1e-5, atol=1e-6)
  # And genuinely different from the global equipartition.
  global_codes = np.asarray(sinkhorn_knopp(jnp.asarray(scores)))
  assert np.max(np.abs(codes - global_codes)) > 1e-2


def test_per_device_mode_on_one_device_equals_global():
  mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
  scores = jnp.asarray(_random_scores(6, 12, 5))
  np.testing.assert_allclose(
      sinkhorn_knopp(scores, row_sums="per_device", mesh=mesh),
      sinkhorn_knopp(scores), rtol=1e-6)


# float16 included: exp(1 / 0.03) = 3e14 would overflow it without the shift.
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_finite_for_extreme_scores_small_epsilon(dtype):
  # Worst case for exp(s / eps) with |s| <= 1 and eps = 0.03: scores at +-1,
  # a sample that is -1 to every prototype, and a prototype no sample likes.
  rng = np.random.default_rng(7)
  scores = rng.choice([-1.0, 1.0], size=(64, 50)).astype(np.float32)
  scores[0, :] = -1.0
  scores[:, 0] = -1.0
  scores[1:10] = rng.uniform(-1, 1, size=(9, 50))
  codes = sinkhorn_knopp(jnp.asarray(scores, dtype), epsilon=0.03)
  assert codes.dtype == jnp.float32
  assert np.isfinite(np.asarray(codes)).all()
  np.testing.assert_allclose(np.asarray(codes).sum(axis=1), 1.0, rtol=1e-5)


def test_bf16_input_matches_reference_on_rounded_values():
  scores = _random_scores(8, 16, 10)
  scores_bf16 = jnp.asarray(scores, jnp.bfloat16)
  np.testing.assert_allclose(
      sinkhorn_knopp(scores_bf16),
      _reference_sinkhorn(np.asarray(scores_bf16.astype(jnp.float32)), 0.05, 3),
      rtol=1e-5, atol=1e-6)


def test_no_gradient_flows():
  scores = jnp.asarray(_random_scores(9, 8, 4))
  weights = jnp.arange(32.0).reshape(8, 4)
  grad = jax.grad(lambda s: jnp.sum(sinkhorn_knopp(s) * weights))(scores)
  np.testing.assert_array_equal(grad, np.zeros_like(grad))


def test_vmap_over_assignment_crops():
  scores = np.stack([_random_scores(10, 12, 5), _random_scores(11, 12, 5)])
  codes = jax.vmap(sinkhorn_knopp)(jnp.asarray(scores))
  for crop in range(2):
    np.testing.assert_allclose(
        codes[crop], _reference_sinkhorn(scores[crop], 0.05, 3),
        rtol=1e-5, atol=1e-6)


def test_bad_input_raises():
  scores = jnp.zeros((6, 4))
  with pytest.raises(ValueError, match=r"\[n, K\]"):
    sinkhorn_knopp(jnp.zeros((2, 6, 4)))
  with pytest.raises(ValueError, match="num_iters"):
    sinkhorn_knopp(scores, num_iters=0)
  with pytest.raises(ValueError, match="epsilon"):
    sinkhorn_knopp(scores, epsilon=0.0)
  with pytest.raises(ValueError, match="row_sums"):
    sinkhorn_knopp(scores, row_sums="local")
  with pytest.raises(ValueError, match="mesh"):
    sinkhorn_knopp(scores, row_sums="per_device")
  mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
  with pytest.raises(ValueError, match="evenly"):
    sinkhorn_knopp(scores, row_sums="per_device", mesh=mesh)
  with pytest.raises(ValueError, match="axis"):
    sinkhorn_knopp(scores, row_sums="per_device", mesh=mesh, axis_name="batch")


def test_collectives_match_the_reference_communication(n_devices):
  # Global mode: only all-reduces of per-prototype sums/maxes, as the
  # reference's dist.all_reduce; the [n, K] matrix is never gathered.
  # Per-device mode: no communication at all, like mmselfsup.
  mesh = _data_mesh()
  scores = jax.device_put(jnp.zeros((4 * n_devices, 6)),
                          NamedSharding(mesh, P("data")))
  for row_sums, expected in (("global", {"all-reduce"}), ("per_device", set())):
    fn = jax.jit(lambda s, m=row_sums: sinkhorn_knopp(s, row_sums=m, mesh=mesh))
    hlo = fn.lower(scores).compile().as_text()
    collectives = {op for op in ("all-reduce", "all-gather", "all-to-all",
                                 "collective-permute", "reduce-scatter")
                   if f"{op}(" in hlo or f"{op}-start(" in hlo}
    assert collectives == expected, (row_sums, collectives)
