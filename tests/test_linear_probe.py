"""Linear probe heads, training on cached features (1 vs 8 devices), augmented views."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ssl_jax import config_utils as cu
from ssl_jax import sharding
from ssl_jax.eval import features, linear_probe
from test_eval_features import numpy_variables, tiny_backbone


def test_heads_init_and_channel_batchnorm():
  heads = linear_probe.LinearHeads(num_classes=10, channels={'feature2': 4})
  feats = {'pooled': jnp.zeros((2, 600)), 'feature2': jnp.zeros((2, 4 * 9))}
  variables = jax.jit(lambda k: heads.init(k, feats, train=False))(jax.random.key(0))
  params = variables['params']
  assert set(params) == {'fc_pooled', 'fc_feature2'}            # non-affine BN: no params
  kernel = np.asarray(params['fc_pooled']['kernel'])
  assert kernel.shape == (600, 10) and abs(kernel.std() - 0.01) < 1e-3   # N(0, 0.01)
  assert not np.any(params['fc_pooled']['bias'])
  assert variables['batch_stats']['bn_feature2']['mean'].shape == (4,)   # one per channel
  # Statistics are per channel over (batch, positions), as BatchNorm2d; PyTorch momentum 0.1.
  x = np.random.default_rng(0).normal(size=(8, 4, 9)) * np.arange(1.0, 5.0)[None, :, None] + 3
  _, state = heads.apply(variables, {'pooled': jnp.zeros((8, 600)),
                                     'feature2': jnp.asarray(x.reshape(8, -1), jnp.float32)},
                         train=True, mutable=['batch_stats'])
  stats = state['batch_stats']['bn_feature2']
  np.testing.assert_allclose(stats['mean'], 0.1 * x.mean(axis=(0, 2)), rtol=1e-4)
  np.testing.assert_allclose(stats['var'], 0.9 + 0.1 * x.var(axis=(0, 2)), rtol=1e-4)


def _separable(n, dim, num_classes, seed):
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=(num_classes, dim)) * 3
  labels = rng.integers(0, num_classes, n)
  return (centers[labels] + rng.normal(size=(n, dim))).astype(np.float32), labels.astype(np.int32)


def _train(mesh, epochs=4):
  feats, labels = _separable(256, 12, 3, seed=0)
  eval_feats, eval_labels = _separable(64, 12, 3, seed=0)
  opt = cu.sgd(0.1, weight_decay=1e-4, schedule='step')
  opt.milestones = (3,)
  opt.nesterov = True
  train = {'pooled': feats, 'feature5': feats * 0.5}
  return linear_probe.train_probe(
      num_classes=3, feature_dims={'pooled': 12, 'feature5': 12}, channels={'feature5': 3},
      opt_cfg=opt, epochs=epochs, steps_per_epoch=256 // 32, batch_size=32, seed=0, mesh=mesh,
      epoch_batches=lambda e: linear_probe.cached_batches(train, labels, 32, 0, e, mesh),
      eval_feats={'pooled': eval_feats, 'feature5': eval_feats * 0.5}, eval_labels=eval_labels)


def test_cached_training_learns_and_is_device_count_invariant():
  one = _train(sharding.make_mesh(jax.devices()[:1]))
  eight = _train(sharding.make_mesh(jax.devices()))
  assert one['top1/pooled'] > 0.9 and one['top1/feature5'] > 0.9
  assert one['top5/pooled'] == 1.0                         # 3 classes: top-5 is everything
  for key, value in one.items():
    assert eight[key] == pytest.approx(value, abs=1e-5), key


def test_loss_is_sum_of_head_cross_entropies():
  heads = linear_probe.LinearHeads(num_classes=3, channels={})
  tx = optax.sgd(0.0)
  state = linear_probe.create_state(heads, tx, {'pooled': 5, 'feature1': 7}, seed=0)
  mesh = sharding.make_mesh(jax.devices()[:1])
  rng = np.random.default_rng(0)
  batch = {'features': {'pooled': rng.normal(size=(4, 5)).astype(np.float32),
                        'feature1': rng.normal(size=(4, 7)).astype(np.float32)},
           'label': np.array([0, 1, 2, 1], np.int32)}
  step = linear_probe.make_train_step(heads, tx, mesh)
  want = 0.0
  for name in ('pooled', 'feature1'):
    p = state.params[f'fc_{name}']
    logits = batch['features'][name] @ np.asarray(p['kernel']) + np.asarray(p['bias'])
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    want += -np.mean(logp[np.arange(4), batch['label']])
  _, metrics = step(state, batch, jax.random.key(0), {})
  assert float(metrics['loss']) == pytest.approx(want, rel=1e-5)


def test_train_view_and_lighting():
  fn = jax.jit(linear_probe.make_train_view(8, jitter=(0.4, 0.4, 0.4, 0.0), lighting_std=0.1))
  images = np.random.default_rng(0).integers(0, 256, (3, 12, 12, 3), dtype=np.uint8)
  a, b = fn(jax.random.key(0), images), fn(jax.random.key(0), images)
  assert a.shape == (3, 8, 8, 3) and np.array_equal(a, b)
  assert not np.allclose(a, fn(jax.random.key(1), images))
  # Lighting adds eigvec @ (alpha * eigval) to every pixel.
  image = jnp.full((2, 2, 3), 0.5)
  key = jax.random.key(3)
  alpha = 0.1 * np.asarray(jax.random.normal(key, (3,)))
  shift = np.asarray(linear_probe.LIGHTING_EIGVEC) @ (alpha * np.asarray(
      linear_probe.LIGHTING_EIGVAL))
  np.testing.assert_allclose(linear_probe.lighting(key, image),
                             np.broadcast_to(0.5 + shift, (2, 2, 3)),
                             atol=1e-6)


def test_augmented_path_with_frozen_backbone():
  backbone = tiny_backbone()
  variables = numpy_variables(backbone, 16)
  view = linear_probe.make_train_view(16)
  mesh = sharding.make_mesh(jax.devices())
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (32, 16, 16, 3), dtype=np.uint8)
  labels = (np.arange(32) % 4).astype(np.int32)

  def features_fn(key, batch, frozen):
    outputs = backbone.apply(frozen, view(key, batch['image']), train=False)
    return features.tap_features(outputs, ('pooled',))

  data = sharding.batch_sharded(mesh)
  batches = lambda e: iter([{'image': jax.device_put(images[:16], data),
                             'label': jax.device_put(labels[:16], data)}])
  eval_feats = {'pooled': rng.normal(size=(10, 32)).astype(np.float32)}
  result = linear_probe.train_probe(
      num_classes=4, feature_dims={'pooled': 32}, channels={},
      opt_cfg=cu.sgd(0.3, weight_decay=1e-6, schedule='cosine_epoch'), epochs=2,
      steps_per_epoch=1, batch_size=16, seed=0, mesh=mesh, epoch_batches=batches,
      eval_feats=eval_feats, eval_labels=labels[:10], features_fn=features_fn, frozen=variables)
  assert np.isfinite(result['loss']) and 0.0 <= result['top1/pooled'] <= 1.0
