"""Tap pooling (reference MultiPooling), dims, and sharded feature extraction."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ssl_jax import sharding
from ssl_jax.data import sources
from ssl_jax.eval import features
from ssl_jax.models import build_backbone


def tiny_backbone(width=4):
  return build_backbone(ml_collections.ConfigDict(dict(
      name='resnet_tiny', stem='cifar', width=width, bn_groups=1, dtype='float32')))


def numpy_variables(backbone, image_size, seed=0):
  """He-normal conv kernels, unit BN, drawn with numpy: `backbone.init` compiles one threefry
  program per initializer, which costs minutes on a loaded 2-core CI machine."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: backbone.init(
      jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)), train=False))

  def fill(path, s):
    name = jax.tree_util.keystr(path)
    if 'kernel' in name:
      return rng.normal(size=s.shape).astype(np.float32) * np.sqrt(2.0 / np.prod(s.shape[:-1]))
    if 'var' in name or 'scale' in name:
      return np.ones(s.shape, np.float32)
    return np.zeros(s.shape, np.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def test_mhead_dims_resnet50_224_from_shapes_only():
  backbone = build_backbone(ml_collections.ConfigDict(dict(
      name='resnet50', stem='imagenet', width=64, bn_groups=1, dtype='float32')))
  variables = jax.eval_shape(
      lambda: backbone.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)), train=False))
  want = {'feature1': 9216, 'feature2': 9216, 'feature3': 8192, 'feature4': 9216,
          'feature5': 8192, 'pooled': 2048}
  for pooling in features.POOLINGS:
    assert features.feature_dims(backbone, variables, 224, features.OUTPUTS, pooling) == want
  shapes = features.output_shapes(backbone, variables, 224)
  assert features.tap_channels(shapes, features.TAPS) == {
      'feature1': 64, 'feature2': 256, 'feature3': 512, 'feature4': 1024, 'feature5': 2048}
  assert shapes['feature1'].shape == (1, 112, 112, 64)  # stem before the max-pool


def torch_avg_pool(x, k, s, p):
  """AvgPool2d(k, s, p) with count_include_pad=True on NHWC numpy, by loops."""
  x = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  out_h, out_w = (x.shape[1] - k) // s + 1, (x.shape[2] - k) // s + 1
  out = np.zeros((x.shape[0], out_h, out_w, x.shape[3]))
  for i in range(out_h):
    for j in range(out_w):
      out[:, i, j] = x[:, i * s:i * s + k, j * s:j * s + k].mean(axis=(1, 2))
  return out


def torch_adaptive_pool(x, size):
  h, w = x.shape[1:3]
  out = np.zeros((x.shape[0], size, size, x.shape[3]))
  for i in range(size):
    for j in range(size):
      r0, r1 = (i * h) // size, -(-((i + 1) * h) // size)
      c0, c1 = (j * w) // size, -(-((j + 1) * w) // size)
      out[:, i, j] = x[:, r0:r1, c0:c1].mean(axis=(1, 2))
  return out


def test_pooling_matches_torch_definitions():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 30, 30, 3)).astype(np.float32)
  got = features.pool_map(jnp.asarray(x), 'feature1', 'specified')   # (10, 10, 4): 4x4
  np.testing.assert_allclose(got, torch_avg_pool(x, 10, 10, 4), atol=1e-5)
  x7 = rng.normal(size=(2, 7, 7, 3)).astype(np.float32)
  np.testing.assert_allclose(features.pool_map(jnp.asarray(x7), 'feature5', 'specified'),
                             torch_avg_pool(x7, 6, 1, 0), atol=1e-5)
  for name, size in features.ADAPTIVE_SIZES.items():
    got = features.pool_map(jnp.asarray(x7), name, 'adaptive')         # uneven bins
    np.testing.assert_allclose(got, torch_adaptive_pool(x7, size), atol=1e-5)
  # Flattened channel-major, as torch's x.view(B, -1) on NCHW.
  flat = features.tap_features({'feature5': jnp.asarray(x7)}, ['feature5'], 'adaptive')
  np.testing.assert_allclose(flat['feature5'],
                             torch_adaptive_pool(x7, 2).transpose(0, 3, 1, 2).reshape(2, -1),
                             atol=1e-5)
  with pytest.raises(ValueError, match="pooling='adaptive'"):
    features.pool_map(jnp.zeros((1, 4, 4, 2)), 'feature5', 'specified')
  with pytest.raises(ValueError, match='Unknown tap'):
    features.tap_features({}, ['feature9'])


@pytest.fixture(scope='module')
def tiny_setup():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(37, 16, 16, 3), dtype=np.uint8)
  source = sources.ArraySource(images, np.arange(37) % 5, num_classes=5, name='tiny')
  backbone = tiny_backbone()
  variables = numpy_variables(backbone, 16)
  return source, backbone, variables


def test_extract_sharded_equals_direct_forward(tiny_setup):
  source, backbone, variables = tiny_setup
  taps = ('pooled', 'feature2', 'feature5')
  view = features.normalize_view()
  outs = {}
  for num_devices in (1, 8):
    mesh = sharding.make_mesh(jax.devices()[:num_devices])
    # 37 images in batches of 16: the last batch is padded and its pad rows dropped.
    outs[num_devices] = features.extract(backbone, variables, source, view_fn=view, taps=taps,
                                         pooling='adaptive', batch_size=16, mesh=mesh)
  direct = features.tap_features(
      backbone.apply(variables, view(jnp.asarray(source.images)), train=False), taps, 'adaptive')
  for num_devices, (feats, labels) in outs.items():
    np.testing.assert_array_equal(labels, np.arange(37) % 5)
    for name in taps:
      assert feats[name].shape == (37, direct[name].shape[1])
      np.testing.assert_allclose(feats[name], direct[name], rtol=1e-4, atol=1e-5,
                                 err_msg=f'{name} on {num_devices} devices')


def test_extract_rejects_nan_features(tiny_setup):
  source, backbone, variables = tiny_setup
  broken = jax.tree.map(lambda x: x * jnp.nan, variables)
  with pytest.raises(ValueError, match='NaN'):
    features.extract(backbone, broken, source, view_fn=features.normalize_view(),
                     batch_size=16, mesh=sharding.make_mesh(jax.devices()[:1]))
