"""Sinkhorn-Knopp equipartition for SwAV codes (Caron et al., 2020, Alg. 1).

The reference (`facebookresearch/swav:main_swav.py: distributed_sinkhorn`) works
on `Q = exp(scores / eps)^T` of shape (K, n) and alternates
  * prototype normalisation: every prototype (row of Q) gets mass 1/K, with the
    row sums all-reduced over devices, i.e. taken over the *global* batch;
  * sample normalisation: every sample (column of Q) gets mass 1/Btot, with
    Btot the total number of samples over all devices;
and finally multiplies by Btot so that each sample's code sums to 1.

Here everything is written in the (n, K) layout of the scores (rows = samples,
columns = prototypes) on the *global* array. Under `jit` with the rows sharded
over the "data" axis, XLA turns the reductions over rows into the same
all-reduce the reference does by hand, so the global behaviour needs no
collective in this file.

Numerics. The reference exponentiates without any shift (fine for |s| <= 1 in
fp32 at eps = 0.05, but exp(1/0.03) is already 3e14 and fp16/bf16 overflow). We
compute in float32 and subtract, per prototype, the max over the rows that share
that prototype's marginal. Any positive per-prototype factor is cancelled
exactly by the first prototype normalisation, so the result equals the
reference; it only removes overflow. For the same reason the reference's first
step, dividing by the total mass, is a no-op here and is dropped. With the shift
every prototype has an entry equal to 1, so its sum is never 0 (the case
mmselfsup patches with `Q += 1e-12`).
"""
from typing import Optional

import jax
import jax.numpy as jnp

_ROW_SUM_MODES = ("global", "per_device")


def sinkhorn_knopp(
    scores: jax.Array,
    *,
    epsilon: float = 0.05,
    num_iters: int = 3,
    row_sums: str = "global",
    mesh: Optional[jax.sharding.Mesh] = None,
    axis_name: str = "data",
) -> jax.Array:
  """Soft equipartitioned assignments of samples to prototypes (no gradient).

  Args:
    scores: [n, K] similarities z . C^T of one assignment crop, rows = samples
      (current batch, optionally preceded by queue rows). Any float dtype; the
      computation is float32. Write it on the global batch: if the rows are
      sharded over devices the prototype marginals are still global.
    epsilon: entropic regularisation; codes ~ exp(scores / epsilon).
    num_iters: number of Sinkhorn iterations (reference: 3), at least 1.
    row_sums: which rows share a prototype marginal ("row sums" of the
      reference's transposed Q).
      * "global" (facebookresearch): every prototype gets mass 1/K over all n
        rows.
      * "per_device" (mmselfsup `distributed_sinkhorn`, which skips the
        all-reduce of the prototype sums): rows are split into G contiguous
        groups, G = mesh.shape[axis_name], and every prototype gets mass 1/K
        inside each group. Group g is rows [g*n/G, (g+1)*n/G), i.e. exactly the
        shard device g holds when the rows are sharded P(axis_name), so the
        caller must lay out rows per device (each device's queue rows followed
        by its batch rows, as in the reference). Implemented as a reshape to
        [G, n/G, K]; with rows sharded over the axis every group stays on its
        device, which is what a shard_map would do, without needing one.
    mesh: the device mesh; only read in "per_device" mode, for G.
    axis_name: data-parallel axis of `mesh` (per_device mode only).

  Returns:
    codes: [n, K] float32, every row sums to 1. After the last iteration the
    rows are exact distributions while the prototype marginals (column means)
    are only approximately 1/K; they converge as num_iters grows.

  Raises:
    ValueError: on bad shapes or options (see messages).
  """
  if scores.ndim != 2:
    raise ValueError(
        f"sinkhorn_knopp expects scores of shape [n, K], got {scores.shape}; "
        "call it once per assignment crop (or jax.vmap over crops).")
  if num_iters < 1:
    raise ValueError(f"num_iters must be >= 1, got {num_iters}.")
  if not epsilon > 0:
    raise ValueError(f"epsilon must be > 0, got {epsilon}.")
  if row_sums not in _ROW_SUM_MODES:
    raise ValueError(
        f"row_sums must be one of {_ROW_SUM_MODES}, got {row_sums!r}.")

  n, num_prototypes = scores.shape
  if row_sums == "global":
    num_groups = 1
  else:
    if mesh is None:
      raise ValueError(
          "row_sums='per_device' needs mesh= (the data-parallel mesh) to know "
          "how many device groups the rows form.")
    if axis_name not in mesh.shape:
      raise ValueError(
          f"axis_name {axis_name!r} is not an axis of the mesh "
          f"{dict(mesh.shape)}.")
    num_groups = mesh.shape[axis_name]
    if n % num_groups:
      raise ValueError(
          f"row_sums='per_device': {n} rows cannot be split evenly over "
          f"{num_groups} devices; use a per-device row count times devices.")

  # Codes are targets, never differentiated through (torch.no_grad in the ref).
  logits = jax.lax.stop_gradient(scores).astype(jnp.float32) / epsilon
  # [G, n/G, K]: axis 1 holds the rows that share a prototype marginal.
  logits = logits.reshape(num_groups, n // num_groups, num_prototypes)
  # Per-prototype shift (see module docstring): exact, and removes overflow.
  logits = logits - jnp.max(logits, axis=1, keepdims=True)
  q = jnp.exp(logits)

  # The reference's Btot is the global row count in both modes; in
  # per_device mode it only rescales, and the sample normalisation cancels it.
  total_rows = float(n)
  for _ in range(num_iters):
    # Each prototype gets mass 1/K over its rows.
    q = q / jnp.sum(q, axis=1, keepdims=True) / num_prototypes
    # Each sample gets mass 1/Btot (its own row sum: samples are never split).
    q = q / jnp.sum(q, axis=2, keepdims=True) / total_rows
  q = q * total_rows  # rows (samples) now sum to 1
  return q.reshape(n, num_prototypes)
