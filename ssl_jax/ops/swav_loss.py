"""SwAV swapped-prediction loss and code statistics (Caron et al., 2020, Eq. 1-3).

Every crop v predicts the Sinkhorn codes of every *other* assignment crop s
with softmax(z_v . C^T / tau); the loss is the cross-entropy averaged over the
predicting crops and then over the assignment crops, as in
`facebookresearch/swav:main_swav.py` (`loss += subloss / (nmb_crops - 1)`,
then `loss /= len(crops_for_assign)`).
"""
from typing import Dict, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def swapped_prediction_loss(
    scores_per_crop: jax.Array,
    codes_per_assign_crop: jax.Array,
    crops_for_assign: Sequence[int],
    temperature: float,
) -> jax.Array:
  """SwAV loss L = mean_{s in A} mean_{v != s} CE(codes_s, softmax(scores_v/tau)).

  Args:
    scores_per_crop: [V, b, K] scores z_v . C^T of every crop v (all crops of
      the same b images, crop order as in the batch; assignment crops first in
      the reference). Any float dtype; computed in float32.
    codes_per_assign_crop: [len(A), b, K] Sinkhorn codes (rows sum to 1) of
      the assignment crops, in the order of `crops_for_assign`. Treated as
      constants (stop_gradient), as in the reference (`torch.no_grad`).
    crops_for_assign: A, the crop indices whose codes are targets (reference
      [0, 1]). Static python ints, distinct, in [0, V).
    temperature: tau of the prediction softmax (reference 0.1).

  Returns:
    Scalar float32 loss. It equals ln K when codes and predictions are both
    uniform (the collapse plateau, ln 3000 = 8.006, in the reference README).

  Raises:
    ValueError: on inconsistent shapes or crop indices.
  """
  crops_for_assign = tuple(int(c) for c in crops_for_assign)
  if scores_per_crop.ndim != 3:
    raise ValueError(
        f"scores_per_crop must be [V, b, K], got {scores_per_crop.shape}.")
  num_crops, batch, num_prototypes = scores_per_crop.shape
  if num_crops < 2:
    raise ValueError(f"swapped prediction needs >= 2 crops, got {num_crops}.")
  if (not crops_for_assign or len(set(crops_for_assign)) != len(crops_for_assign)
      or not all(0 <= c < num_crops for c in crops_for_assign)):
    raise ValueError(
        f"crops_for_assign must be distinct crop indices in [0, {num_crops}), "
        f"got {crops_for_assign}.")
  expected_codes_shape = (len(crops_for_assign), batch, num_prototypes)
  if codes_per_assign_crop.shape != expected_codes_shape:
    raise ValueError(
        f"codes_per_assign_crop must be [len(crops_for_assign), b, K] = "
        f"{expected_codes_shape}, got {codes_per_assign_crop.shape}.")
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}.")

  log_probs = jax.nn.log_softmax(
      scores_per_crop.astype(jnp.float32) / temperature, axis=-1)
  codes = jax.lax.stop_gradient(codes_per_assign_crop).astype(jnp.float32)
  # cross_entropy[a, v] = -(1/b) sum_i sum_k codes_a[i, k] log p_v[i, k].
  # Elementwise product + reduction (XLA fuses it) rather than an einsum, so
  # the loss stays exact float32 even where matmuls default to TF32/bf16.
  cross_entropy = -jnp.sum(
      codes[:, None] * log_probs[None], axis=(2, 3)) / batch
  # A crop never predicts its own code.
  others = np.ones((len(crops_for_assign), num_crops), np.float32)
  others[np.arange(len(crops_for_assign)), crops_for_assign] = 0.0
  per_assign_crop = jnp.sum(cross_entropy * others, axis=1) / (num_crops - 1)
  return jnp.mean(per_assign_crop)


def code_entropy_stats(codes: jax.Array) -> Dict[str, jax.Array]:
  """Collapse monitors for SwAV codes (or any rows of distributions).

  Args:
    codes: [..., K] assignment distributions (rows sum to 1); all leading axes
      are pooled as samples.

  Returns:
    Dict of scalars:
      "code_entropy": entropy (nats) of the mean code, i.e. of the batch's
        prototype usage; ln K when usage is uniform, 0 when every sample uses
        the same prototype (collapse).
      "code_sample_entropy": mean entropy of the individual codes; ln K for
        uniform (uninformative) codes, 0 for one-hot codes.
      "code_argmax_prototypes": number of distinct prototypes that are some
        sample's argmax (int32).
  """
  num_prototypes = codes.shape[-1]
  codes = jax.lax.stop_gradient(codes).astype(jnp.float32)
  codes = codes.reshape(-1, num_prototypes)
  mean_code = jnp.mean(codes, axis=0)
  # xlogy gives 0 log 0 = 0 for prototypes/entries with no mass.
  code_entropy = -jnp.sum(jax.scipy.special.xlogy(mean_code, mean_code))
  sample_entropy = -jnp.sum(jax.scipy.special.xlogy(codes, codes), axis=-1)
  argmax_counts = jnp.zeros(num_prototypes, jnp.int32).at[
      jnp.argmax(codes, axis=-1)].add(1)
  return {
      "code_entropy": code_entropy,
      "code_sample_entropy": jnp.mean(sample_entropy),
      "code_argmax_prototypes": jnp.sum(argmax_counts > 0).astype(jnp.int32),
  }
