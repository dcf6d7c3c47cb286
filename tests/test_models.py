"""Backbones: tap shapes, grouped BatchNorm statistics, and 1- vs 8-device equality."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ssl_jax import models, sharding
from ssl_jax.models.layers import GroupedBatchNorm


def _cfg(**kw):
  base = dict(name='resnet_tiny', stem='cifar', width=8, bn_groups=1, dtype='float32')
  base.update(kw)
  return ml_collections.ConfigDict(base)


@pytest.mark.parametrize('name,dims', [
    ('resnet18', [64, 64, 128, 256, 512]),
    ('resnet50', [64, 256, 512, 1024, 2048]),
])
def test_imagenet_taps_shapes(name, dims):
  model = models.build_backbone(_cfg(name=name, stem='imagenet', width=64))
  out = jax.eval_shape(lambda: model.init_with_output(
      jax.random.PRNGKey(0), jnp.zeros((2, 224, 224, 3)), train=False)[0])
  sizes = [112, 56, 28, 14, 7]
  for i, (d, s) in enumerate(zip(dims, sizes)):
    assert out[f'feature{i + 1}'].shape == (2, s, s, d)
  assert out['pooled'].shape == (2, dims[-1])
  assert models.backbone_dim(_cfg(name=name, width=64)) == dims[-1]


def test_cifar_stem_keeps_resolution():
  model = models.build_backbone(_cfg())
  out, _ = model.init_with_output(jax.random.PRNGKey(0), jnp.ones((2, 32, 32, 3)), train=False)
  assert out['feature1'].shape == (2, 32, 32, 8)
  assert out['feature5'].shape == (2, 4, 4, 64)


def test_grouped_bn_matches_numpy_per_group():
  x = np.random.RandomState(0).randn(8, 3, 3, 4).astype(np.float32) * 3 + 1
  bn = GroupedBatchNorm(num_groups=4, momentum=0.9)
  variables = bn.init(jax.random.PRNGKey(0), x, use_running_average=False)
  y, upd = bn.apply(variables, x, use_running_average=False, mutable=['batch_stats'])
  xg = x.reshape(4, 2, 3, 3, 4)
  mean = xg.mean(axis=(1, 2, 3), keepdims=True)
  var = xg.var(axis=(1, 2, 3), keepdims=True)
  expected = ((xg - mean) / np.sqrt(var + 1e-5)).reshape(x.shape)
  np.testing.assert_allclose(np.asarray(y), expected, atol=1e-5)
  np.testing.assert_allclose(np.asarray(upd['batch_stats']['mean']),
                             0.1 * mean.reshape(4, 4).mean(0), atol=1e-6)
  np.testing.assert_allclose(np.asarray(upd['batch_stats']['var']),
                             0.9 + 0.1 * var.reshape(4, 4).mean(0), atol=1e-6)
  # Samples only see their own group: changing group 0 leaves group 1..3 outputs unchanged.
  x2 = x.copy()
  x2[:2] *= 5
  y2, _ = bn.apply(variables, x2, use_running_average=False, mutable=['batch_stats'])
  np.testing.assert_allclose(np.asarray(y2)[2:], np.asarray(y)[2:], atol=1e-6)


def test_grouped_bn_rejects_indivisible_batch():
  bn = GroupedBatchNorm(num_groups=3)
  with pytest.raises(ValueError, match='bn_groups'):
    bn.init(jax.random.PRNGKey(0), jnp.ones((8, 2)), use_running_average=False)


def test_grouped_bn_same_on_1_and_8_devices():
  if jax.device_count() < 8:
    pytest.skip('needs 8 (fake) devices')
  model = models.build_backbone(_cfg(bn_groups=8))
  x = jax.random.normal(jax.random.PRNGKey(1), (16, 16, 16, 3))
  variables = model.init(jax.random.PRNGKey(0), x, train=True)

  def fwd(v, x):
    out, upd = model.apply(v, x, train=True, mutable=['batch_stats'])
    return out['pooled'], upd

  results = []
  for devices in (jax.devices()[:1], jax.devices()[:8]):
    mesh = sharding.make_mesh(devices)
    xs = jax.device_put(x, sharding.batch_sharded(mesh))
    vs = jax.device_put(variables, sharding.replicated(mesh))
    results.append(jax.jit(fwd)(vs, xs))
  np.testing.assert_allclose(results[0][0], results[1][0], atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), results[0][1],
               results[1][1])
