"""Per-image augmentation ops against numpy re-implementations of torchvision / PIL formulas."""
import colorsys
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from ssl_jax.data import augment as A


def _image(h, w, seed=0):
  return np.random.RandomState(seed).rand(h, w, 3).astype(np.float32)


# Jitted once per shape: eager op-by-op dispatch compiles every primitive separately.
_crop_params = jax.jit(A.crop_params_from_uniforms, static_argnums=(0, 1, 6, 7))
_resized_crop = jax.jit(A.resized_crop, static_argnames=("size", "method"))
_center_crop_resize = jax.jit(A.center_crop_resize, static_argnames=("size",))
_adjust_hue = jax.jit(A.adjust_hue)
_apply_color_jitter = jax.jit(A.apply_color_jitter)
_blur_with_sigma = jax.jit(A.blur_with_sigma, static_argnames=("kernel_size",))
_blend_ops = jax.jit(lambda x, f: jnp.stack([A.adjust_brightness(x, f),
                                             A.adjust_contrast(x, f),
                                             A.adjust_saturation(x, f)]))


# ------------------------------------------------------------------------------------------------
# numpy references
# ------------------------------------------------------------------------------------------------


def np_crop_params(height, width, u_area, u_log_ratio, u_top, u_left, scale, ratio):
  """torchvision RandomResizedCrop.get_params written as a loop, uniforms given."""
  area = height * width
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  for t in range(10):
    target_area = area * (scale[0] + (scale[1] - scale[0]) * float(u_area[t]))
    aspect = math.exp(log_lo + (log_hi - log_lo) * float(u_log_ratio[t]))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return int(u_top * (height - h + 1)), int(u_left * (width - w + 1)), h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    w, h = int(round(height * max(ratio))), height
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def _pil_filter(x, method):
  x = abs(x)
  if method == "bilinear":
    return max(0.0, 1.0 - x)
  a = -0.5
  if x < 1:
    return ((a + 2) * x - (a + 3)) * x * x + 1
  if x < 2:
    return (((x - 5) * x + 8) * x - 4) * a
  return 0.0


def np_pil_weights(in_size, out_size, method):
  """PIL's precompute_coeffs (Resample.c): window [xmin, xmax) around each output centre."""
  scale = in_size / out_size
  filterscale = max(scale, 1.0)
  support = (1.0 if method == "bilinear" else 2.0) * filterscale
  weights = np.zeros((out_size, in_size))
  for o in range(out_size):
    center = (o + 0.5) * scale
    xmin = max(int(center - support + 0.5), 0)
    xmax = min(int(center + support + 0.5), in_size)
    for x in range(xmin, xmax):
      weights[o, x] = _pil_filter((x - center + 0.5) / filterscale, method)
    weights[o] /= weights[o].sum()
  return weights


def np_resized_crop(image, top, left, h, w, size, method):
  crop = image[top:top + h, left:left + w].astype(np.float64)
  out = np.einsum("oh,hwc->owc", np_pil_weights(h, size, method), crop)
  out = np.einsum("pw,owc->opc", np_pil_weights(w, size, method), out)
  return np.clip(out, 0, 1)


def np_gray(x):
  return 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]


def np_blend(x, degenerate, f):
  return np.clip(f * x + (1 - f) * degenerate, 0, 1)


def np_hue(x, shift):
  out = np.empty_like(x)
  for idx in np.ndindex(x.shape[:-1]):
    h, s, v = colorsys.rgb_to_hsv(*x[idx].astype(np.float64))
    out[idx] = colorsys.hsv_to_rgb((h + shift) % 1.0, s, v)
  return out


NP_JITTER_OPS = (
    lambda x, f: np_blend(x, 0.0, f),
    lambda x, f: np_blend(x, np_gray(x).mean(), f),
    lambda x, f: np_blend(x, np_gray(x)[..., None], f),
    np_hue,
)


def np_blur(image, sigma, ksize):
  """torchvision gaussian_blur: linspace kernel, reflect pad, separable."""
  x = np.linspace(-(ksize - 1) / 2, (ksize - 1) / 2, ksize)
  k = np.exp(-0.5 * (x / sigma) ** 2)
  k /= k.sum()
  r = ksize // 2
  padded = np.pad(image.astype(np.float64), ((r, r), (r, r), (0, 0)), mode="reflect")
  h, w = image.shape[:2]
  rows = sum(k[t] * padded[t:t + h] for t in range(ksize))
  return sum(k[t] * rows[:, t:t + w] for t in range(ksize))


# ------------------------------------------------------------------------------------------------
# Random resized crop
# ------------------------------------------------------------------------------------------------


def test_crop_params_match_torchvision_loop():
  rng = np.random.RandomState(1)
  for height, width, scale in [(60, 100, (0.08, 1.0)), (37, 23, (0.2, 1.0)),
                               (50, 50, (0.5, 1.0)), (20, 80, (0.9, 1.0))]:
    for _ in range(8):
      u = rng.rand(22).astype(np.float32)
      got = _crop_params(height, width, u[:10], u[10:20], u[20], u[21], scale, (3 / 4, 4 / 3))
      want = np_crop_params(height, width, u[:10], u[10:20], u[20], u[21], scale,
                            (3 / 4, 4 / 3))
      assert tuple(int(v) for v in got) == want, (height, width, scale, u)


def test_crop_params_takes_first_fitting_try():
  # Try 0 asks for the whole area at ratio 3/4 (h = 115 > 100: does not fit); try 1 fits.
  u_area = np.array([1.0] + [0.0] * 9, np.float32)
  u_ratio = np.zeros(10, np.float32)
  top, left, h, w = _crop_params(100, 100, u_area, u_ratio, 0.999, 0.0, (0.5, 1.0),
                                 (3 / 4, 4 / 3))
  # try 1: area 5000 at ratio 3/4 -> w = round(sqrt(3750)) = 61, h = round(sqrt(6666.7)) = 82.
  assert (int(h), int(w)) == (82, 61)
  assert (int(top), int(left)) == (100 - 82, 0)


@pytest.mark.parametrize("height,width,want", [
    (10, 100, (0, 43, 10, 13)),   # too wide: h = H, w = round(10 * 4/3) = 13, centred.
    (100, 10, (43, 0, 13, 10)),   # too tall: w = W, h = round(10 / (3/4)) = 13.
    (10, 10, (0, 0, 10, 10)),     # ratio in range: the whole image.
])
def test_crop_params_fallback_is_centre_crop(height, width, want):
  # Whole-area requests at ratio 3/4 never fit these images, so all 10 tries fail.
  got = A.crop_params_from_uniforms(height, width, np.ones(10, np.float32),
                                    np.zeros(10, np.float32), 0.5, 0.5, (0.9, 1.0),
                                    (3 / 4, 4 / 3))
  assert tuple(int(v) for v in got) == want


def test_crop_boxes_respect_bounds_over_many_keys():
  height, width, scale, ratio = 60, 100, (0.2, 0.6), (3 / 4, 4 / 3)
  keys = jax.random.split(jax.random.key(0), 3000)
  sample = jax.jit(jax.vmap(lambda k: jnp.stack(A.sample_crop_params(k, height, width, scale,
                                                                     ratio))))
  top, left, h, w = np.asarray(sample(keys)).T
  assert (top >= 0).all() and (left >= 0).all()
  assert (top + h <= height).all() and (left + w <= width).all()
  # Rounding w and h moves the area by at most (w + h) / 2 + 1/4 pixels.
  slack = (w + h) / 2 + 0.25
  area = h * w
  assert (area >= scale[0] * height * width - slack).all()
  assert (area <= scale[1] * height * width + slack).all()
  # w = round(r * h0) with |h - h0| <= 1/2, r in ratio.
  assert (w >= ratio[0] * (h - 0.5) - 0.5).all() and (w <= ratio[1] * (h + 0.5) + 0.5).all()
  # Offsets cover the whole free range (uniform randint), not just the centre.
  assert top.min() == 0 and left.min() == 0
  assert (top == height - h).any() and (left == width - w).any()


@pytest.mark.parametrize("method", ["bilinear", "bicubic"])
def test_resized_crop_matches_pil_algorithm(method):
  image = _image(24, 32)
  size = 16
  for box in [(3, 1, 20, 30),   # downscale (antialiased kernel)
              (2, 1, 7, 9),     # upscale
              (5, 9, 16, 16),   # same size: plain copy of the box
              (0, 0, 24, 32)]:  # whole image
    got = _resized_crop(jnp.asarray(image), *box, size=size, method=method)
    want = np_resized_crop(image, *box, size, method)
    np.testing.assert_allclose(got, want, atol=1e-5, err_msg=str(box))  # f32 vs f64 weights.


@pytest.mark.parametrize("method,pil_method", [("bilinear", Image.BILINEAR),
                                               ("bicubic", Image.BICUBIC)])
def test_resized_crop_matches_pillow(method, pil_method):
  image = (np.random.RandomState(3).rand(40, 48, 3) * 255).astype(np.uint8)
  top, left, h, w, size = 4, 7, 29, 35, 16
  pil = Image.fromarray(image).crop((left, top, left + w, top + h)).resize((size, size),
                                                                           pil_method)
  got = _resized_crop(jnp.asarray(image, jnp.float32) / 255, top, left, h, w, size=size,
                      method=method)
  # PIL rounds to uint8 after each of its two passes: at most ~1 grey level apart.
  np.testing.assert_allclose(np.asarray(got) * 255, np.asarray(pil, np.float64), atol=1.01)


def test_random_resized_crop_shape_and_range():
  out = jax.jit(A.random_resized_crop, static_argnums=2)(jax.random.key(0),
                                                         jnp.asarray(_image(30, 40)), 17)
  assert out.shape == (17, 17, 3) and out.dtype == jnp.float32
  assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_center_crop_resize_identity_at_size():
  image = jnp.asarray(_image(32, 32))
  np.testing.assert_array_equal(_center_crop_resize(image, size=32), image)


def test_center_crop_resize_matches_pillow_resize_then_centre_crop():
  image = (np.random.RandomState(4).rand(40, 48, 3) * 255).astype(np.uint8)
  # size 32 / 0.875 -> short side 36, long int(36 * 48 / 40) = 43; crop top 2, left round(5.5).
  pil = Image.fromarray(image).resize((43, 36), Image.BILINEAR).crop((6, 2, 38, 34))
  got = _center_crop_resize(jnp.asarray(image, jnp.float32) / 255, size=32)
  assert got.shape == (32, 32, 3)
  np.testing.assert_allclose(np.asarray(got) * 255, np.asarray(pil, np.float64), atol=1.01)


# ------------------------------------------------------------------------------------------------
# Colour
# ------------------------------------------------------------------------------------------------


def _colour_image():
  image = _image(5, 6, seed=7)
  image[0, 0] = [0.3, 0.3, 0.3]  # grey pixel (hue undefined -> 0)
  image[0, 1] = [1.0, 0.0, 0.0]
  image[0, 2] = [0.0, 1.0, 1.0]
  image[0, 3] = [0.2, 0.9, 0.9]  # tie between g and b maxima
  image[0, 4] = [0.0, 0.0, 0.0]
  return image


def test_blend_ops_match_torchvision_formulas():
  image = _colour_image()
  for factor in [0.0, 0.6, 1.0, 1.4]:
    got = _blend_ops(jnp.asarray(image), factor)
    for op in range(3):  # brightness, contrast, saturation
      np.testing.assert_allclose(got[op], NP_JITTER_OPS[op](image, factor), atol=1e-6,
                                 err_msg=f"op {op} factor {factor}")


def test_grayscale_uses_itu_601_luma_on_three_channels():
  image = _colour_image()
  got = A.grayscale(jnp.asarray(image))
  assert got.shape == image.shape
  np.testing.assert_allclose(got, np.repeat(np_gray(image)[..., None], 3, -1), atol=1e-6)


def test_adjust_hue_matches_colorsys():
  image = _colour_image()
  for shift in [-0.5, -0.1, 0.0, 0.05, 0.37, 0.5]:
    np.testing.assert_allclose(_adjust_hue(jnp.asarray(image), shift), np_hue(image, shift),
                               atol=1e-4, err_msg=f"shift {shift}")


def test_hsv_round_trip():
  image = _colour_image()
  round_trip = jax.jit(lambda x: A.hsv_to_rgb(A.rgb_to_hsv(x)))
  np.testing.assert_allclose(round_trip(jnp.asarray(image)), image, atol=1e-6)


def test_apply_color_jitter_applies_ops_in_the_given_order():
  image = _colour_image()
  factors = (1.3, 0.7, 1.6, 0.21)
  # Hue at every position, and the blends in several relative orders.
  for order in [(0, 1, 2, 3), (3, 2, 1, 0), (1, 3, 0, 2), (2, 0, 3, 1), (0, 3, 2, 1),
                (1, 2, 0, 3), (2, 1, 3, 0)]:
    want = image.astype(np.float64)
    for op in order:
      want = NP_JITTER_OPS[op](want, factors[op])
    got = _apply_color_jitter(jnp.asarray(image), jnp.asarray(factors), jnp.asarray(order))
    np.testing.assert_allclose(got, want, atol=1e-4, err_msg=str(order))  # f32 hue round trip


def test_jitter_params_from_uniforms_ranges_and_order():
  u = np.array([0.0, 0.5, 0.999999, 0.25, 0.9, 0.1, 0.5, 0.3, 0.0], np.float32)
  factors, order = A.jitter_params_from_uniforms(u, 0.4, 1.5, 0.8, 0.2)
  # brightness U[0.6, 1.4], contrast U[max(0, -0.5), 2.5], saturation U[0.2, 1.8], hue U[-.2, .2]
  np.testing.assert_allclose(factors, [0.6, 1.25, 1.8, -0.1], atol=1e-5)
  np.testing.assert_array_equal(order, [1, 3, 2, 0])


def test_solarize_threshold_matches_pil_128():
  x = jnp.asarray(np.array([0, 127, 128, 200, 255], np.float32) / 255)
  got = np.asarray(A.solarize_image(x, 0.5)) * 255
  np.testing.assert_allclose(got, [0, 127, 127, 55, 0], atol=1e-4)


def test_normalize():
  image = _image(3, 4)
  got = A.normalize(jnp.asarray(image), A.IMAGENET_MEAN, A.IMAGENET_STD)
  want = (image - np.array(A.IMAGENET_MEAN)) / np.array(A.IMAGENET_STD)
  np.testing.assert_allclose(got, want, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Blur
# ------------------------------------------------------------------------------------------------


def test_blur_kernel_size_is_odd_ten_percent():
  assert [A.blur_kernel_size(s) for s in (224, 96, 32, 16, 160)] == [23, 9, 3, 3, 17]


@pytest.mark.parametrize("sigma,ksize,shape", [(0.1, 3, (8, 8)), (1.0, 5, (9, 12)),
                                               (2.0, 23, (24, 30))])
def test_blur_matches_torchvision_reference(sigma, ksize, shape):
  image = _image(*shape, seed=5)
  got = _blur_with_sigma(jnp.asarray(image), sigma, kernel_size=ksize)
  np.testing.assert_allclose(got, np_blur(image, sigma, ksize), atol=1e-5)


def test_blur_rejects_bad_kernel():
  with pytest.raises(ValueError, match="odd"):
    A.blur_with_sigma(jnp.zeros((8, 8, 3)), 1.0, 4)
  with pytest.raises(ValueError, match="odd"):
    A.blur_with_sigma(jnp.zeros((8, 8, 3)), 1.0, 17)


# ------------------------------------------------------------------------------------------------
# Statistics of the random ops
# ------------------------------------------------------------------------------------------------


def test_random_op_rates_match_probabilities():
  n = 4000
  image = jnp.asarray(_image(8, 8, seed=9))

  def fired(key):
    keys = jax.random.split(key, 6)
    changed = lambda out: jnp.any(out != image)
    u = jax.random.uniform(keys[5], (A.JITTER_UNIFORMS,))
    _, order = A.jitter_params_from_uniforms(u, 0.4, 0.4, 0.4, 0.1)
    return jnp.stack([
        changed(A.horizontal_flip(keys[0], image, 0.3)),
        changed(A.color_jitter(keys[1], image, 0.4, 0.4, 0.4, 0.1, p=0.8)),
        changed(A.random_grayscale(keys[2], image, 0.2)),
        changed(A.gaussian_blur(keys[3], image, 0.5)),
        changed(A.solarize(keys[4], image, 0.6)),
        order[0] == 3,  # hue first: 1/4 for a uniform random order.
    ]).astype(jnp.float32)

  fired_many = jax.jit(jax.vmap(fired),  # LLVM -O0: 3x faster compile, same values
                       compiler_options={"xla_backend_optimization_level": 0})
  rates = np.asarray(fired_many(jax.random.split(jax.random.key(1), n)).mean(0))
  probs = np.array([0.3, 0.8, 0.2, 0.5, 0.6, 0.25])
  tolerance = 4.5 * np.sqrt(probs * (1 - probs) / n)  # ~4.5 sigma: flaky < 1e-4 per op.
  np.testing.assert_array_less(np.abs(rates - probs), tolerance)
