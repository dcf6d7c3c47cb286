"""MoCo kernels: InfoNCE against numpy, FIFO queue/pointer, exact EMA, ShuffleBN key un-permute."""
import jax
import jax.numpy as jnp
import numpy as np

from ssl_jax.methods.base import ema_update
from ssl_jax.ops import infonce


def test_contrastive_loss_matches_numpy():
  rng = np.random.RandomState(0)
  q = rng.randn(4, 6); q /= np.linalg.norm(q, axis=1, keepdims=True)
  k = rng.randn(4, 6); k /= np.linalg.norm(k, axis=1, keepdims=True)
  queue = rng.randn(10, 6); queue /= np.linalg.norm(queue, axis=1, keepdims=True)
  l_pos, l_neg = infonce.queue_logits(jnp.asarray(q), jnp.asarray(k), jnp.asarray(queue))
  loss, metrics = infonce.contrastive_loss(l_pos, l_neg, 0.2)
  logits = np.concatenate([(q * k).sum(1, keepdims=True), q @ queue.T], 1) / 0.2
  logits -= logits.max(1, keepdims=True)
  expected = -(logits[:, 0] - np.log(np.exp(logits).sum(1))).mean()
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  assert 0.0 <= float(metrics['instance_acc']) <= 1.0


def test_loss_gradient_only_through_query():
  q = jnp.ones((2, 3)) / np.sqrt(3)
  k = jnp.eye(3)[:2]
  queue = jnp.eye(3)

  def f(q, k, queue):
    return infonce.contrastive_loss(*infonce.queue_logits(q, k, queue), 0.2)[0]

  gq, gk, gqueue = jax.grad(f, argnums=(0, 1, 2))(q, k, queue)
  assert np.abs(np.asarray(gq)).sum() > 0
  assert np.abs(np.asarray(gk)).sum() == 0 and np.abs(np.asarray(gqueue)).sum() == 0


def test_masked_negatives_drop_out_of_softmax():
  l_pos = jnp.array([0.5])
  l_neg = jnp.array([[0.1, 0.9]])
  masked, _ = infonce.contrastive_loss(l_pos, l_neg, 1.0, neg_mask=jnp.array([[True, False]]))
  plain, _ = infonce.contrastive_loss(l_pos, l_neg[:, :1], 1.0)
  np.testing.assert_allclose(float(masked), float(plain), rtol=1e-6)


def test_enqueue_hand_computed():
  queue = jnp.zeros((6, 2))
  keys1 = jnp.array([[1., 1.], [2., 2.]])
  keys2 = jnp.array([[3., 3.], [4., 4.]])
  keys3 = jnp.array([[5., 5.], [6., 6.]])
  keys4 = jnp.array([[7., 7.], [8., 8.]])
  ptr = jnp.int32(0)
  for keys in (keys1, keys2, keys3):
    queue, ptr = infonce.enqueue(queue, ptr, keys)
  np.testing.assert_array_equal(np.asarray(queue)[:, 0], [1, 2, 3, 4, 5, 6])
  assert int(ptr) == 0  # wrapped around: 6 % 6
  queue, ptr = infonce.enqueue(queue, ptr, keys4)  # oldest entries are overwritten first
  np.testing.assert_array_equal(np.asarray(queue)[:, 0], [7, 8, 3, 4, 5, 6])
  assert int(ptr) == 2


def test_ema_update_exact():
  ema = {'a': jnp.array([1.0, 2.0]), 'b': {'c': jnp.array(4.0)}}
  online = {'a': jnp.array([3.0, -2.0]), 'b': {'c': jnp.array(0.0)}}
  out = ema_update(ema, online, 0.75)
  np.testing.assert_array_equal(np.asarray(out['a']), [0.75 * 1 + 0.25 * 3, 0.75 * 2 - 0.25 * 2])
  assert float(out['b']['c']) == 3.0
  # The momentum encoder receives no gradient from the online parameters.
  g = jax.grad(lambda p: ema_update(ema, p, 0.5)['a'].sum())(online)
  assert float(jnp.abs(g['a']).sum()) == 0.0
