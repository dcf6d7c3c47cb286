"""ResNet backbones (ImageNet and CIFAR stems) that expose the stage taps feature1..feature5.

The forward returns a dict so the eval package can probe any stage: `feature1` is the stem output
*before* the max-pool (the mmselfsup multi-head protocol taps it there), `feature2..5` are the
outputs of the four residual stages, and `pooled` is the global average of `feature5`.
Convolutions use Kaiming-normal fan-out init like the reference ResNets; BatchNorm is
`GroupedBatchNorm` so MoCo's per-GPU statistics can be reproduced on any device count.
"""
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from ssl_jax.models.layers import GroupedBatchNorm

conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


class BasicBlock(nn.Module):
  filters: int
  strides: int
  norm: Any
  dtype: Any
  zero_init_residual: bool = False
  expansion = 1

  @nn.compact
  def __call__(self, x, train: bool):
    conv = functools.partial(nn.Conv, use_bias=False, kernel_init=conv_init, dtype=self.dtype)
    residual = x
    y = conv(self.filters, (3, 3), self.strides, padding=1)(x)
    y = nn.relu(self.norm()(y, not train))
    y = conv(self.filters, (3, 3), padding=1)(y)
    last_init = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
    y = self.norm(scale_init=last_init)(y, not train)
    if residual.shape != y.shape:
      residual = conv(self.filters, (1, 1), self.strides, name='proj_conv')(residual)
      residual = self.norm(name='proj_bn')(residual, not train)
    return nn.relu(y + residual)


class Bottleneck(nn.Module):
  filters: int
  strides: int
  norm: Any
  dtype: Any
  zero_init_residual: bool = False
  expansion = 4

  @nn.compact
  def __call__(self, x, train: bool):
    conv = functools.partial(nn.Conv, use_bias=False, kernel_init=conv_init, dtype=self.dtype)
    residual = x
    y = nn.relu(self.norm()(conv(self.filters, (1, 1))(x), not train))
    # Stride on the 3x3 conv (torchvision "ResNet v1.5", as in mmselfsup and the SwAV repo).
    y = nn.relu(self.norm()(conv(self.filters, (3, 3), self.strides, padding=1)(y), not train))
    y = conv(self.filters * 4, (1, 1))(y)
    last_init = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
    y = self.norm(scale_init=last_init)(y, not train)
    if residual.shape != y.shape:
      residual = conv(self.filters * 4, (1, 1), self.strides, name='proj_conv')(residual)
      residual = self.norm(name='proj_bn')(residual, not train)
    return nn.relu(y + residual)


class ResNet(nn.Module):
  """ResNet with taps.

  Attributes:
    stage_sizes: blocks per stage.
    block_cls: BasicBlock or Bottleneck.
    width: channels of the stem and first stage (64 for the standard nets).
    stem: 'imagenet' (7x7/2 conv + 3x3/2 max-pool) or 'cifar' (3x3/1 conv, no max-pool).
    bn_groups: BatchNorm statistic groups (see GroupedBatchNorm).
    bn_momentum: running-average decay.
    zero_init_residual: zero-init the last BN scale of every block (mmselfsup SwAV does this).
    dtype: compute dtype (bfloat16 on TPU/GPU); parameters and BN statistics stay float32.
  """
  stage_sizes: Sequence[int]
  block_cls: Any
  width: int = 64
  stem: str = 'imagenet'
  bn_groups: int = 1
  bn_momentum: float = 0.9
  zero_init_residual: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True):
    norm = functools.partial(GroupedBatchNorm, num_groups=self.bn_groups, momentum=self.bn_momentum,
                             dtype=self.dtype)
    x = x.astype(self.dtype)
    out = {}
    if self.stem == 'imagenet':
      x = nn.Conv(self.width, (7, 7), 2, padding=3, use_bias=False, kernel_init=conv_init,
                  dtype=self.dtype, name='stem_conv')(x)
      x = nn.relu(norm(name='stem_bn')(x, not train))
      out['feature1'] = x
      x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    elif self.stem == 'cifar':
      x = nn.Conv(self.width, (3, 3), 1, padding=1, use_bias=False, kernel_init=conv_init,
                  dtype=self.dtype, name='stem_conv')(x)
      x = nn.relu(norm(name='stem_bn')(x, not train))
      out['feature1'] = x
    else:
      raise ValueError(f"Unknown stem {self.stem!r}: use 'imagenet' or 'cifar'.")
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        strides = 2 if i > 0 and j == 0 else 1
        x = self.block_cls(self.width * 2**i, strides, norm, self.dtype, self.zero_init_residual,
                           name=f'stage{i + 1}_block{j + 1}')(x, train)
      out[f'feature{i + 2}'] = x
    out['pooled'] = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    return out


ARCHS = {
    'resnet_tiny': ([1, 1, 1, 1], BasicBlock),   # test-sized
    'resnet18': ([2, 2, 2, 2], BasicBlock),
    'resnet34': ([3, 4, 6, 3], BasicBlock),
    'resnet50': ([3, 4, 6, 3], Bottleneck),
    'resnet101': ([3, 4, 23, 3], Bottleneck),
}


def feature_dim(name: str, width: int = 64) -> int:
  """Channels of `pooled` for an architecture (512 for ResNet-18, 2048 for ResNet-50)."""
  _, block = ARCHS[name]
  return width * 8 * block.expansion
