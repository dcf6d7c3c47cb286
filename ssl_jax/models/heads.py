"""Projection heads and the encoder (backbone + head) that every method trains."""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ssl_jax.models.layers import GroupedBatchNorm, TorchDense


class MLPHead(nn.Module):
  """Projection MLP: [Linear -> (BN) -> ReLU] x (num_layers - 1) -> Linear.

  MoCo v2 / InterCLR neck: hidden 2048, 2 layers, no BN. MoCo v1: num_layers=1 (a single Linear).
  SwAV: 2 layers with BN. Linear layers use PyTorch's default init like the references.
  """
  hidden_dim: int = 2048
  out_dim: int = 128
  num_layers: int = 2
  use_bn: bool = False
  bn_groups: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True):
    for i in range(self.num_layers - 1):
      x = TorchDense(self.hidden_dim, dtype=self.dtype, name=f'dense{i}')(x)
      if self.use_bn:
        x = GroupedBatchNorm(self.bn_groups, dtype=self.dtype, name=f'bn{i}')(x, not train)
      x = nn.relu(x)
    return TorchDense(self.out_dim, dtype=self.dtype, name=f'dense{self.num_layers - 1}')(x)


class Encoder(nn.Module):
  """Backbone + projection head. Returns the backbone dict plus `embedding` (un-normalised)."""
  backbone: nn.Module
  head: nn.Module

  def __call__(self, x, train: bool = True):
    out = dict(self.backbone(x, train))
    out['embedding'] = self.head(out['pooled'], train).astype(jnp.float32)
    return out
