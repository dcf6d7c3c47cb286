"""InfoNCE with a queue of negatives (MoCo's contrastive head), float32 throughout."""
import jax
import jax.numpy as jnp


def l2_normalize(x, axis=-1, eps=1e-12):
  """x / max(||x||, eps), as torch.nn.functional.normalize (the references' `norm`)."""
  x = x.astype(jnp.float32)
  norm = jnp.linalg.norm(x, axis=axis, keepdims=True)
  return x / jnp.maximum(norm, eps)


def queue_logits(q, k, queue):
  """Positive and negative cosine logits before the temperature.

  Args:
    q: [B, D] unit queries (gradient flows).
    k: [B, D] unit keys (treated as constants).
    queue: [K, D] unit negatives (constants).
  Returns:
    (l_pos [B], l_neg [B, K]).
  """
  k = jax.lax.stop_gradient(k)
  queue = jax.lax.stop_gradient(queue)
  l_pos = jnp.einsum('bd,bd->b', q, k)
  l_neg = jnp.einsum('bd,kd->bk', q, queue)
  return l_pos, l_neg


def contrastive_loss(l_pos, l_neg, temperature, neg_mask=None):
  """Mean cross-entropy of [l_pos, l_neg] / T with the positive at index 0.

  Args:
    l_pos: [B] positive logits (cosines, possibly with a margin applied).
    l_neg: [B, K] negative logits.
    temperature: softmax temperature (0.2 for MoCo v2 / InterCLR, 0.07 for MoCo v1).
    neg_mask: optional bool [B, K]; False entries are excluded from the softmax.
  Returns:
    (loss, metrics) with the top-1 "instance accuracy" (positive ranked first).
  """
  logits = jnp.concatenate([l_pos[:, None], l_neg], axis=1).astype(jnp.float32) / temperature
  if neg_mask is not None:
    valid = jnp.concatenate([jnp.ones_like(neg_mask[:, :1]), neg_mask], axis=1)
    logits = jnp.where(valid, logits, -jnp.inf)
  loss = -jax.nn.log_softmax(logits, axis=1)[:, 0]
  accuracy = (jnp.argmax(logits, axis=1) == 0).astype(jnp.float32)
  return loss.mean(), {'instance_acc': accuracy.mean(), 'pos_sim': l_pos.mean(),
                       'neg_sim': l_neg.mean()}


def enqueue(queue, ptr, keys):
  """FIFO update: write `keys` at `ptr` and advance it (queue length % batch == 0 is checked at init).

  Returns (new_queue, new_ptr).
  """
  batch = keys.shape[0]
  queue = jax.lax.dynamic_update_slice(queue, keys.astype(queue.dtype), (ptr, 0))
  return queue, (ptr + batch) % queue.shape[0]
