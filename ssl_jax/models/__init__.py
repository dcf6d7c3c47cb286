"""Model zoo: `build_backbone(model_cfg)` and the projection heads."""
import jax.numpy as jnp

from ssl_jax.models.heads import Encoder, MLPHead
from ssl_jax.models.resnet import ARCHS, ResNet, feature_dim

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


def compute_dtype(model_cfg):
  name = model_cfg.get('dtype', 'float32')
  if name not in DTYPES:
    raise ValueError(f'config.model.dtype={name!r}; use one of {sorted(DTYPES)}.')
  return DTYPES[name]


def build_backbone(model_cfg) -> ResNet:
  """Builds the backbone named by `model_cfg.name` (resnet_tiny, resnet18, resnet50, ...)."""
  if model_cfg.name not in ARCHS:
    raise ValueError(f'config.model.name={model_cfg.name!r} is not a known backbone; '
                     f'choose one of {sorted(ARCHS)}.')
  stage_sizes, block = ARCHS[model_cfg.name]
  return ResNet(stage_sizes=stage_sizes, block_cls=block, width=model_cfg.get('width', 64),
                stem=model_cfg.get('stem', 'imagenet'), bn_groups=model_cfg.get('bn_groups', 1),
                zero_init_residual=model_cfg.get('zero_init_residual', False),
                dtype=compute_dtype(model_cfg))


def backbone_dim(model_cfg) -> int:
  return feature_dim(model_cfg.name, model_cfg.get('width', 64))


__all__ = ['build_backbone', 'backbone_dim', 'compute_dtype', 'Encoder', 'MLPHead', 'ResNet']
