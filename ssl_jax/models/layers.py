"""Normalisation and dense layers shared by backbones and heads.

`GroupedBatchNorm` is the piece that makes MoCo-style methods correct under SPMD: with a sharded
batch under `jax.jit`, a plain BatchNorm computes statistics over the *global* batch (SyncBN), which
lets the query/key pair leak information through the statistics (facebookresearch/moco#46). Here
statistics are computed per group of `B / num_groups` consecutive samples, so one chip with
`num_groups=8` computes exactly what the reference 8-GPU run computes, and N chips compute the same
numbers as one chip. Groups never straddle devices when `num_groups` is a multiple of the device
count, so no communication is added.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


class GroupedBatchNorm(nn.Module):
  """BatchNorm with statistics per group of consecutive samples.

  Attributes:
    num_groups: number of independent statistic groups along the batch axis (1 = plain BN over the
      whole global batch, i.e. SyncBN).
    momentum: running-average decay (PyTorch momentum 0.1 == 0.9 here).
    epsilon: variance epsilon.
    use_scale, use_bias: affine parameters (False for the non-affine multi-head probe BN).
    scale_init: initialiser of the scale (zeros for zero-init residual branches).
    dtype: output dtype; statistics are always computed in float32.
  """
  num_groups: int = 1
  momentum: float = 0.9
  epsilon: float = 1e-5
  use_scale: bool = True
  use_bias: bool = True
  scale_init: Any = nn.initializers.ones
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, use_running_average: bool):
    features = x.shape[-1]
    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((features,), jnp.float32))
    ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones((features,), jnp.float32))
    x32 = x.astype(jnp.float32)
    if use_running_average:
      y = (x32 - ra_mean.value) * jax.lax.rsqrt(ra_var.value + self.epsilon)
    else:
      batch = x.shape[0]
      if batch % self.num_groups:
        raise ValueError(
            f'GroupedBatchNorm: batch {batch} is not divisible by num_groups={self.num_groups}; '
            'choose a batch size that is a multiple of config.model.bn_groups.')
      xg = x32.reshape((self.num_groups, batch // self.num_groups) + x.shape[1:])
      axes = tuple(range(1, xg.ndim - 1))
      mean = xg.mean(axes, keepdims=True)
      var = jnp.square(xg - mean).mean(axes, keepdims=True)
      y = ((xg - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
      if not self.is_initializing():
        # Running statistics: the average of the per-group statistics (each reference GPU keeps its
        # own; averaging them is the natural single-copy equivalent).
        group_mean = mean.reshape(self.num_groups, features).mean(0)
        group_var = var.reshape(self.num_groups, features).mean(0)
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * group_mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * group_var
    if self.use_scale:
      y = y * self.param('scale', self.scale_init, (features,), jnp.float32)
    if self.use_bias:
      y = y + self.param('bias', nn.initializers.zeros, (features,), jnp.float32)
    return y.astype(self.dtype)


class TorchDense(nn.Module):
  """Dense layer initialised like PyTorch's nn.Linear (the reference heads use that init)."""
  features: int
  use_bias: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    fan_in = x.shape[-1]
    bound = 1.0 / np.sqrt(fan_in)
    init = lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)
    kernel = self.param('kernel', init, (fan_in, self.features))
    y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      y = y + self.param('bias', init, (self.features,)).astype(self.dtype)
    return y
