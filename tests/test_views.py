"""View recipes: shapes, per-view settings, plumbing, normalisation, sharding invariance."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ssl_jax.data import augment as A
from ssl_jax.data import views

MEAN, STD = np.array(A.IMAGENET_MEAN), np.array(A.IMAGENET_STD)


def _images(batch=8, height=20, width=24, seed=0):
  return jnp.asarray(np.random.RandomState(seed).randint(0, 256, (batch, height, width, 3)),
                     jnp.uint8)


def _normalized(images_uint8):
  return (np.asarray(images_uint8, np.float64) / 255 - MEAN) / STD


def _no_random_ops(cfg):
  """Everything off except the crop, which takes the whole image: the identity pipeline."""
  cfg.update(dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0,
                  grayscale_p=0.0))
  return cfg


def _fast_jit(fn):
  """jit with LLVM -O0: ~3x faster to compile on CPU; these tests check values, not speed."""
  return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0})


# One jitted mocov2 view fn with every op on (blur forced on at 16 px), shared by the tests.
# Default compiler options: the sharding test must see the fusions a real run gets.
_MOCO_CFG = views.mocov2_config(size=16, small_image=False)
_MOCO_FN = jax.jit(views.build_view_fn(_MOCO_CFG))


@pytest.mark.parametrize("cfg,want", [
    (views.mocov2_config(16), [(2, 8, 16, 16, 3)]),
    (views.mocov1_config(16), [(2, 8, 16, 16, 3)]),
    (views.swav_config((16, 8), (2, 3)), [(2, 8, 16, 16, 3), (3, 8, 8, 8, 3)]),
    (views.byol_config(16), [(2, 8, 16, 16, 3)]),
    (views.eval_config(16), [(1, 8, 16, 16, 3)]),
])
def test_recipe_output_shapes_and_dtypes(cfg, want):
  out = jax.eval_shape(views.build_view_fn(cfg), jax.random.key(0), _images())
  assert [o.shape for o in out] == want
  assert all(o.dtype == jnp.float32 for o in out)


def test_two_crops_views_differ_and_are_deterministic_per_key():
  images = _images()
  (a,) = _MOCO_FN(jax.random.key(0), images)
  (b,) = _MOCO_FN(jax.random.key(0), images)
  (c,) = _MOCO_FN(jax.random.key(1), images)
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a[0], a[1])  # the two views of a batch
  assert not np.allclose(a, c)  # another key
  # Each image has its own randomness: 8 copies of one image give 8 different views.
  (same,) = _MOCO_FN(jax.random.key(0), jnp.repeat(images[:1], 8, axis=0))
  for i in range(8):
    for j in range(i):
      assert not np.allclose(same[0, i], same[0, j])
  # Values stay inside the normalised range of [0, 1] pixels.
  assert (a >= (0 - MEAN.max()) / STD.min() - 1e-5).all()
  assert (a <= (1 - MEAN.min()) / STD.min() + 1e-5).all()


def test_identity_pipeline_only_normalises():
  images = _images(4, 12, 12)
  cfg = _no_random_ops(views.mocov2_config(12, small_image=True))
  (out,) = _fast_jit(views.build_view_fn(cfg))(jax.random.key(3), images)
  for view in out:  # whole-image crop at the same size = identity resize.
    np.testing.assert_allclose(view, _normalized(images), atol=1e-5)


def test_mocov1_grayscale_comes_before_the_jitter():
  # Always grey, then always hue-rotate: a grey image has no hue, so the output is exactly the
  # grey input. In the MoCo v2 order (jitter, then grey) it would be the grey of a rotated image.
  cfg = _no_random_ops(_with(views.mocov1_config(8), jitter=(0.0, 0.0, 0.0, 0.5)))
  cfg.update(dict(jitter_p=1.0, grayscale_p=1.0))
  images = _images(2, 8, 8)
  (out,) = _fast_jit(views.build_view_fn(cfg))(jax.random.key(0), images)
  grey = A.grayscale(jnp.asarray(images, jnp.float32) / 255)
  for view in out:
    np.testing.assert_allclose(view, (np.asarray(grey) - MEAN) / STD, atol=1e-5)


def test_multi_crop_views_use_their_own_probabilities():
  # Per-view blur / solarize probabilities across two groups (the asymmetric recipe is the same
  # code path with one group). Crops take the whole image, sigma is fixed: outputs are exact.
  cfg = _no_random_ops(_with(views.swav_config((16, 8), (2, 2)), min_scales=(1.0, 1.0),
                             max_scales=(1.0, 1.0), blur_sigma=(1.0, 1.0),
                             blur_p=(1.0, 0.0, 0.0, 1.0), solarize_p=(0.0, 1.0, 1.0, 0.0)))
  images = _images(4, 16, 16)
  big, small = _fast_jit(views.build_view_fn(cfg))(jax.random.key(0), images)
  x = jnp.asarray(images, jnp.float32) / 255
  x_small = jax.jit(jax.vmap(lambda im: A.resized_crop(im, 0, 0, 16, 16, 8)))(x)
  blur = jax.jit(jax.vmap(lambda im: A.blur_with_sigma(im, 1.0, 3)))  # 3 taps: 10% of 16/8
  norm = lambda v: (np.asarray(v) - MEAN) / STD
  np.testing.assert_allclose(big[0], norm(blur(x)), atol=1e-5)
  np.testing.assert_allclose(big[1], norm(A.solarize_image(x)), atol=1e-5)
  np.testing.assert_allclose(small[0], norm(A.solarize_image(x_small)), atol=1e-5)
  np.testing.assert_allclose(small[1], norm(blur(x_small)), atol=1e-5)


def test_eval_recipe_and_eval_view_fn():
  images = _images(4, 16, 16)
  (out,) = _fast_jit(views.build_view_fn(views.eval_config(16)))(None, images)
  np.testing.assert_allclose(out[0], _normalized(images), atol=1e-5)
  big = _images(2, 20, 24)
  got = _fast_jit(views.eval_view_fn(views.eval_config(16)))(big)
  crop = jax.jit(jax.vmap(lambda im: A.center_crop_resize(im, 16)))
  want = crop(big.astype(jnp.float32) / 255)
  np.testing.assert_allclose(got, (np.asarray(want) - MEAN) / STD, atol=1e-5)


def test_normalisation_statistics_of_constant_image():
  images = jnp.full((2, 16, 16, 3), 128, jnp.uint8)
  (out,) = views.build_view_fn(views.eval_config(16))(None, images)
  np.testing.assert_allclose(out.mean(axis=(0, 1, 2, 3)), (128 / 255 - MEAN) / STD, atol=1e-5)


def test_config_helpers_match_references():
  moco = views.mocov2_config()
  assert (moco.scale, moco.jitter, moco.jitter_p, moco.grayscale_p, moco.blur_p) == (
      (0.2, 1.0), (0.4, 0.4, 0.4, 0.1), 0.8, 0.2, 0.5)
  assert views.mocov2_config(32).blur_p == 0.0  # small images drop the blur
  v1 = views.mocov1_config()
  assert (v1.jitter, v1.jitter_p, v1.gray_before_jitter, v1.blur_p) == (
      (0.4, 0.4, 0.4, 0.4), 1.0, True, 0.0)
  swav = views.swav_config()
  assert (swav.sizes, swav.num_crops, swav.min_scales, swav.max_scales, swav.blur_p) == (
      (224, 96), (2, 6), (0.14, 0.05), (1.0, 0.14), 0.5)
  byol = views.byol_config()
  assert (byol.blur_p, byol.solarize_p, byol.scale, byol.interpolation) == (
      (1.0, 0.1), (0.0, 0.2), (0.05, 1.0), "bicubic")
  assert views.byol_config(32).blur_p == (0.0, 0.0)


def test_bad_configs_and_inputs_raise():
  with pytest.raises(ValueError, match="recipe"):
    views.build_view_fn(_with(views.mocov2_config(), recipe="three_crops"))
  with pytest.raises(ValueError, match="one probability per view"):
    views.build_view_fn(_with(views.byol_config(), blur_p=(1.0, 0.1, 0.5)))
  with pytest.raises(ValueError, match="per-view"):
    views.build_view_fn(_with(views.mocov2_config(), recipe="asymmetric"))
  with pytest.raises(ValueError, match="decreasing"):
    views.build_view_fn(views.swav_config((96, 224)))
  with pytest.raises(ValueError, match="uint8"):
    _MOCO_FN(jax.random.key(0), jnp.zeros((2, 16, 16, 3), jnp.float32))


def _with(cfg, **overrides):
  cfg = cfg.to_dict()
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


def test_sharded_batch_gives_identical_views(n_devices):
  if n_devices < 2:
    pytest.skip("needs the fake multi-device CPU from conftest")
  images = _images(batch=8)
  key = jax.random.key(42)
  (single,) = _MOCO_FN(key, images)
  mesh = Mesh(np.array(jax.devices()), ("data",))
  sharded_images = jax.device_put(images, NamedSharding(mesh, P("data")))
  (sharded,) = _MOCO_FN(key, sharded_images)
  assert len(sharded.sharding.device_set) == n_devices
  # Sharded and unsharded programs fuse differently (ulp-level differences, ~1e-6 after
  # normalisation); a different random draw would differ by > 1e-2.
  np.testing.assert_allclose(sharded, single, atol=1e-5)
