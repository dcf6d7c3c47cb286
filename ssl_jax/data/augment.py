"""Per-image augmentation ops that run on device (jit / vmap friendly).

Images are float32 HWC in [0, 1]. Every random op `op(key, image, ...)` works on ONE image and
draws all its randomness with one `jax.random.uniform` call, then calls the deterministic
`op_from_uniforms(u, image, ...)`; the formulas themselves (`resized_crop`, `adjust_hue`,
`apply_color_jitter`, `blur_with_sigma`, ...) take explicit parameters so they can be tested
against numpy references. Batch with `jax.vmap` over `jax.random.split(key, B)`; with
`jax_threefry_partitionable` the result does not depend on how the batch is sharded. The view
recipes (views.py) draw the uniforms of all ops of a view at once: every threefry call site
costs ~0.5 s of XLA compile on CPU, and a split/bernoulli/permutation-per-op design had ~20.

Which reference is matched:
* Crop boxes and jitter factors: torchvision `RandomResizedCrop.get_params` and
  `ColorJitter.get_params`.
* Resampling: PIL `Image.resize` of the cropped image (MoCo / SwAV / PatchMix feed PIL images to
  torchvision): separable filter, pixel centres at +0.5, kernel widened by the scale factor when
  downscaling (antialias), weights renormalised over the pixels of the crop only. Bicubic uses
  PIL's a = -0.5. We build the weight matrices ourselves instead of calling
  `jax.image.scale_and_translate` (same antialiased kernels and cost: two dense matmuls), because
  that function lets pixels just outside the crop leak into its border rows, which PIL's
  crop-then-resize never does.
* Colour: torchvision's functional tensor formulas (blend + clamp, HSV hue rotation) with the
  ITU-R 601-2 luma weights 0.299 / 0.587 / 0.114 of PIL's `convert("L")`.
* Blur: torchvision `GaussianBlur` (SimCLR convention): odd kernel ~10% of the image side,
  separable, reflect padding. MoCo / SwAV use PIL's untruncated blur with radius = sigma; a 10%
  kernel truncates sigma = 2 at 96 px to +-2 sigma, a visually tiny change.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple, Union

import jax
import jax.numpy as jnp

Array = jax.Array
Scalar = Union[float, Array]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# ITU-R 601-2 luma transform, as PIL `convert("L")`.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
# torchvision RandomResizedCrop tries 10 random boxes before falling back to a centre crop.
NUM_CROP_TRIES = 10
# Number of uniforms each `*_from_uniforms` op consumes.
CROP_UNIFORMS = 2 * NUM_CROP_TRIES + 2  # area and log-ratio per try, then top, left.
FLIP_UNIFORMS = 1
JITTER_UNIFORMS = 9  # 4 factors, 4 for the order, 1 for apply.
GRAY_UNIFORMS = 1
BLUR_UNIFORMS = 2  # apply, sigma.
SOLARIZE_UNIFORMS = 1
_HIGHEST = jax.lax.Precision.HIGHEST
_METHODS = ("bilinear", "bicubic")


# ------------------------------------------------------------------------------------------------
# Geometry: random resized crop, flip, eval centre crop.
# ------------------------------------------------------------------------------------------------


def _filter(x: Array, method: str) -> Array:
  """PIL resampling kernels evaluated at distance `x` (in input pixels / kernel scale)."""
  x = jnp.abs(x)
  if method == "bilinear":
    return jnp.maximum(0.0, 1.0 - x)
  if method == "bicubic":
    a = -0.5  # PIL's bicubic (torchvision's tensor path uses -0.75 without antialias).
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return jnp.where(x < 1.0, near, jnp.where(x < 2.0, far, 0.0))
  raise ValueError(f"Unknown interpolation {method!r}; use one of {_METHODS}.")


def resample_weights(in_size: int, out_size: int, start: Scalar, length: Scalar,
                     method: str = "bilinear") -> Array:
  """Matrix that resamples the input span [start, start + length) onto `out_size` pixels.

  Matches PIL's `precompute_coeffs` applied to the cropped image: output pixel o samples at
  centre start + (o + 0.5) * length / out_size; when downscaling the kernel is stretched by
  length / out_size (antialias); pixels outside the crop get weight 0 and each row is
  renormalised.

  Args:
    in_size: number of input pixels along this axis (static).
    out_size: number of output pixels (static).
    start: first pixel of the crop (int, may be traced).
    length: crop length in pixels (int >= 1, may be traced).
    method: "bilinear" or "bicubic".

  Returns:
    float32 [out_size, in_size] weights; rows sum to 1.
  """
  start = jnp.asarray(start, jnp.float32)
  length = jnp.asarray(length, jnp.float32)
  scale = length / out_size
  kernel_scale = jnp.maximum(scale, 1.0)
  centers = start + (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * scale
  index = jnp.arange(in_size, dtype=jnp.float32)
  weights = _filter((index[None, :] + 0.5 - centers[:, None]) / kernel_scale, method)
  inside = (index >= start) & (index < start + length)
  weights = jnp.where(inside[None, :], weights, 0.0)
  total = weights.sum(axis=1, keepdims=True)
  return weights / jnp.where(total == 0.0, 1.0, total)


def _apply_weights(image: Array, rows: Array, cols: Array) -> Array:
  # HIGHEST: on GPU/TPU the default f32 matmul is TF32/bf16, coarser than a uint8 level.
  out = jnp.einsum("oh,hwc->owc", rows, image, precision=_HIGHEST)
  out = jnp.einsum("pw,owc->opc", cols, out, precision=_HIGHEST)
  return jnp.clip(out, 0.0, 1.0)  # PIL clips bicubic overshoot to the valid range.


def resized_crop(image: Array, top: Scalar, left: Scalar, height: Scalar, width: Scalar,
                 size: int, method: str = "bilinear") -> Array:
  """Crops the box (top, left, height, width) and resizes it to size x size (PIL semantics).

  Static shapes: the crop is never materialised; the box only enters the resampling weights.

  Args:
    image: float32 [H, W, C].
    top, left, height, width: integer box (may be traced).
    size: output side (static).
    method: "bilinear" or "bicubic".

  Returns:
    float32 [size, size, C] in [0, 1].
  """
  in_h, in_w = image.shape[:2]
  rows = resample_weights(in_h, size, top, height, method)
  cols = resample_weights(in_w, size, left, width, method)
  return _apply_weights(image, rows, cols)


def crop_params_from_uniforms(height: int, width: int, u_area: Array, u_log_ratio: Array,
                              u_top: Scalar, u_left: Scalar,
                              scale: Sequence[float] = (0.08, 1.0),
                              ratio: Sequence[float] = (3 / 4, 4 / 3)
                              ) -> Tuple[Array, Array, Array, Array]:
  """torchvision `RandomResizedCrop.get_params` from pre-drawn uniforms, with static shapes.

  All tries are evaluated at once and the first one that fits is taken; if none fits the
  fallback is torchvision's centre crop clamped to the ratio range.

  Args:
    height, width: image size (static ints).
    u_area, u_log_ratio: [T] uniforms in [0, 1) for the T tries (area and log aspect ratio).
    u_top, u_left: uniforms in [0, 1) for the offset of the accepted box
      (torchvision: randint(0, H - h + 1)).
    scale: range of the crop area as a fraction of the image area.
    ratio: range of the aspect ratio w / h.

  Returns:
    int32 scalars (top, left, h, w).
  """
  if not 0 < scale[0] <= scale[1]:
    raise ValueError(f"scale must satisfy 0 < min <= max, got {tuple(scale)}.")
  if not 0 < ratio[0] <= ratio[1]:
    raise ValueError(f"ratio must satisfy 0 < min <= max, got {tuple(ratio)}.")
  area = float(height * width)
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  target_area = area * (scale[0] + (scale[1] - scale[0]) * u_area)
  aspect = jnp.exp(log_lo + (log_hi - log_lo) * u_log_ratio)
  # jnp.round rounds half to even, like Python's round() in torchvision.
  w = jnp.round(jnp.sqrt(target_area * aspect)).astype(jnp.int32)
  h = jnp.round(jnp.sqrt(target_area / aspect)).astype(jnp.int32)
  fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  first = jnp.argmax(fits)

  # Fallback (static): whole image, clamped to the ratio range, centred.
  in_ratio = width / height
  if in_ratio < min(ratio):
    fallback_w, fallback_h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    fallback_w, fallback_h = int(round(height * max(ratio))), height
  else:
    fallback_w, fallback_h = width, height

  found = fits.any()
  h = jnp.where(found, h[first], fallback_h)
  w = jnp.where(found, w[first], fallback_w)
  top = jnp.minimum(jnp.floor(u_top * (height - h + 1)).astype(jnp.int32), height - h)
  left = jnp.minimum(jnp.floor(u_left * (width - w + 1)).astype(jnp.int32), width - w)
  top = jnp.where(found, top, (height - fallback_h) // 2)
  left = jnp.where(found, left, (width - fallback_w) // 2)
  return top, left, h, w


def _split_crop_uniforms(u: Array):
  t = NUM_CROP_TRIES
  return u[:t], u[t:2 * t], u[2 * t], u[2 * t + 1]


def sample_crop_params(key: Array, height: int, width: int,
                       scale: Sequence[float] = (0.08, 1.0),
                       ratio: Sequence[float] = (3 / 4, 4 / 3)
                       ) -> Tuple[Array, Array, Array, Array]:
  """Draws a RandomResizedCrop box (top, left, h, w) for an image of the given size."""
  u = jax.random.uniform(key, (CROP_UNIFORMS,))
  return crop_params_from_uniforms(height, width, *_split_crop_uniforms(u), scale, ratio)


def random_resized_crop_from_uniforms(u: Array, image: Array, size: int,
                                      scale: Sequence[float] = (0.08, 1.0),
                                      ratio: Sequence[float] = (3 / 4, 4 / 3),
                                      method: str = "bilinear") -> Array:
  """`random_resized_crop` driven by CROP_UNIFORMS uniforms in [0, 1)."""
  top, left, h, w = crop_params_from_uniforms(image.shape[0], image.shape[1],
                                              *_split_crop_uniforms(u), scale, ratio)
  return resized_crop(image, top, left, h, w, size, method)


def random_resized_crop(key: Array, image: Array, size: int,
                        scale: Sequence[float] = (0.08, 1.0),
                        ratio: Sequence[float] = (3 / 4, 4 / 3),
                        method: str = "bilinear") -> Array:
  """torchvision RandomResizedCrop(size, scale, ratio) on one float image -> [size, size, C]."""
  return random_resized_crop_from_uniforms(jax.random.uniform(key, (CROP_UNIFORMS,)), image,
                                           size, scale, ratio, method)


def horizontal_flip_from_uniforms(u: Array, image: Array, p: Scalar = 0.5) -> Array:
  """`horizontal_flip` driven by FLIP_UNIFORMS uniforms (flip iff u[0] < p)."""
  return jnp.where(u[0] < p, image[:, ::-1], image)


def horizontal_flip(key: Array, image: Array, p: Scalar = 0.5) -> Array:
  """Mirrors the image left-right with probability p."""
  return horizontal_flip_from_uniforms(jax.random.uniform(key, (FLIP_UNIFORMS,)), image, p)


def center_crop_resize(image: Array, size: int, crop_fraction: float = 0.875,
                       method: str = "bilinear") -> Array:
  """Eval transform: Resize(short side = floor(size / crop_fraction)) then CenterCrop(size).

  torchvision semantics (Resize(256) + CenterCrop(224) for size 224). An image that is already
  size x size is returned unchanged (CIFAR eval is ToTensor + Normalize only).

  Args:
    image: float32 [H, W, C].
    size: output side.
    crop_fraction: fraction of the resized short side kept by the centre crop, in (0, 1].
    method: "bilinear" or "bicubic".

  Returns:
    float32 [size, size, C].
  """
  in_h, in_w = image.shape[:2]
  if in_h == size and in_w == size:
    return image
  if not 0.0 < crop_fraction <= 1.0:
    raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}.")
  short = int(math.floor(size / crop_fraction))
  if in_h <= in_w:  # torchvision: long side = int(short * long / short_in).
    new_h, new_w = short, int(short * in_w / in_h)
  else:
    new_h, new_w = int(short * in_h / in_w), short
  top = int(round((new_h - size) / 2.0))
  left = int(round((new_w - size) / 2.0))
  rows = resample_weights(in_h, new_h, 0, in_h, method)[top:top + size]
  cols = resample_weights(in_w, new_w, 0, in_w, method)[left:left + size]
  return _apply_weights(image, rows, cols)


# ------------------------------------------------------------------------------------------------
# Colour: torchvision ColorJitter, RandomGrayscale, Solarize.
# ------------------------------------------------------------------------------------------------


def rgb_to_grayscale(image: Array) -> Array:
  """Luma [..., H, W] of an RGB image (ITU-R 601-2)."""
  r, g, b = image[..., 0], image[..., 1], image[..., 2]
  return LUMA_WEIGHTS[0] * r + LUMA_WEIGHTS[1] * g + LUMA_WEIGHTS[2] * b


def _blend(image: Array, degenerate: Scalar, factor: Scalar) -> Array:
  return jnp.clip(factor * image + (1.0 - factor) * degenerate, 0.0, 1.0)


def adjust_brightness(image: Array, factor: Scalar) -> Array:
  """torchvision adjust_brightness: blend with black."""
  return _blend(image, 0.0, factor)


def adjust_contrast(image: Array, factor: Scalar) -> Array:
  """torchvision adjust_contrast: blend with the mean grey level of the image."""
  return _blend(image, rgb_to_grayscale(image).mean(), factor)


def adjust_saturation(image: Array, factor: Scalar) -> Array:
  """torchvision adjust_saturation: blend with the grayscale image."""
  return _blend(image, rgb_to_grayscale(image)[..., None], factor)


def rgb_to_hsv(image: Array) -> Array:
  """RGB [..., 3] in [0, 1] -> HSV [..., 3], hue in [0, 1) (torchvision `_rgb2hsv`)."""
  r, g, b = image[..., 0], image[..., 1], image[..., 2]
  # torchvision picks the hue branch with `maxc == r` / `maxc == g`. Under jit XLA may compute
  # r and max(r, g, b) in different fusions with 1-ulp differences (it did when the batch was
  # sharded), and then neither equality holds and the "b is max" branch rotates the hue
  # wildly. Comparisons between the channels themselves select the same branch in exact
  # arithmetic, and hue is continuous across branches at ties, so ulp noise stays ulp noise.
  r_is_max = (r >= g) & (r >= b)
  g_is_max = (g >= b) & ~r_is_max
  maxc = jnp.maximum(jnp.maximum(r, g), b)
  minc = jnp.minimum(jnp.minimum(r, g), b)
  delta = maxc - minc
  is_grey = delta == 0.0
  saturation = delta / jnp.where(is_grey, 1.0, maxc)
  safe_delta = jnp.where(is_grey, 1.0, delta)
  rc, gc, bc = (maxc - r) / safe_delta, (maxc - g) / safe_delta, (maxc - b) / safe_delta
  hue = jnp.where(r_is_max, bc - gc, jnp.where(g_is_max, 2.0 + rc - bc, 4.0 + gc - rc))
  hue = jnp.mod(hue / 6.0, 1.0)
  return jnp.stack([hue, saturation, maxc], axis=-1)


def hsv_to_rgb(hsv: Array) -> Array:
  """HSV [..., 3] -> RGB [..., 3] (torchvision `_hsv2rgb`, p/q/t clamped to [0, 1])."""
  h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
  h6 = h * 6.0
  sector_f = jnp.floor(h6)
  frac = h6 - sector_f
  sector = sector_f.astype(jnp.int32) % 6
  p = jnp.clip(v * (1.0 - s), 0.0, 1.0)
  q = jnp.clip(v * (1.0 - s * frac), 0.0, 1.0)
  t = jnp.clip(v * (1.0 - s * (1.0 - frac)), 0.0, 1.0)
  in_sector = [sector == k for k in range(6)]
  r = jnp.select(in_sector, [v, q, p, p, t, v])
  g = jnp.select(in_sector, [t, v, v, q, p, p])
  b = jnp.select(in_sector, [p, p, t, v, v, q])
  return jnp.stack([r, g, b], axis=-1)


def adjust_hue(image: Array, hue_factor: Scalar) -> Array:
  """torchvision adjust_hue: rotate the hue by `hue_factor` turns (in [-0.5, 0.5])."""
  hsv = rgb_to_hsv(image)
  hue = jnp.mod(hsv[..., 0] + hue_factor, 1.0)
  return hsv_to_rgb(jnp.concatenate([hue[..., None], hsv[..., 1:]], axis=-1))


def _blend_op(image: Array, op: Array, factor: Array) -> Array:
  """Brightness (op 0), contrast (1) or saturation (2) chosen at run time; one shared blend."""
  grey = rgb_to_grayscale(image)
  degenerate = jnp.where(op == 0, 0.0, jnp.where(op == 1, grey.mean(), grey))[..., None]
  return _blend(image, degenerate, factor)


def apply_color_jitter(image: Array, factors: Array, order: Array,
                       use_hue: bool = True) -> Array:
  """ColorJitter with fixed factors (brightness, contrast, saturation, hue) and op order.

  `order` is a permutation of 0..3 (0 brightness, 1 contrast, 2 saturation, 3 hue), applied
  left to right like torchvision's `fn_idx`. A per-sample `lax.switch` would become a select over
  all branches under vmap (16 op evaluations); instead the three blends are applied in their
  order in 3 slots before the (single, expensive) hue rotation and 3 slots after it, each slot
  being the identity (factor 1) on the wrong side of the hue.

  Args:
    image: float32 [H, W, 3] in [0, 1].
    factors: float32 [4]; brightness/contrast/saturation factors (1 = identity) and hue shift.
    order: int [4] permutation of 0..3.
    use_hue: static; False skips the hue op (torchvision skips it when hue == 0).

  Returns:
    float32 [H, W, 3] in [0, 1].
  """
  order = jnp.asarray(order, jnp.int32)
  hue_position = jnp.argmax(order == 3)
  # The blend ops in their order of application (hue moved to the end, order kept otherwise).
  blend_ops = order[jnp.argsort(jnp.where(order == 3, 4, jnp.arange(4)))[:3]]
  for slot in range(3):
    active = slot < hue_position
    image = _blend_op(image, blend_ops[slot], jnp.where(active, factors[blend_ops[slot]], 1.0))
  if use_hue:
    image = adjust_hue(image, factors[3])
  for slot in range(3):
    active = slot >= hue_position
    image = _blend_op(image, blend_ops[slot], jnp.where(active, factors[blend_ops[slot]], 1.0))
  return image


def jitter_params_from_uniforms(u: Array, brightness: float, contrast: float,
                                saturation: float, hue: float) -> Tuple[Array, Array]:
  """torchvision `ColorJitter.get_params` from uniforms u[0:8].

  Returns:
    factors [4]: b ~ U[max(0, 1 - b), 1 + b] (c, s likewise), h ~ U[-h, h];
    order [4]: a uniformly random permutation of 0..3 (argsort of 4 uniforms).
  """
  lows = jnp.array([max(0.0, 1.0 - brightness), max(0.0, 1.0 - contrast),
                    max(0.0, 1.0 - saturation), -hue], jnp.float32)
  highs = jnp.array([1.0 + brightness, 1.0 + contrast, 1.0 + saturation, hue], jnp.float32)
  factors = lows + (highs - lows) * u[:4]
  return factors, jnp.argsort(u[4:8]).astype(jnp.int32)


def color_jitter_from_uniforms(u: Array, image: Array, brightness: float, contrast: float,
                               saturation: float, hue: float, p: Scalar = 0.8) -> Array:
  """`color_jitter` driven by JITTER_UNIFORMS uniforms (u[8] < p applies it)."""
  if min(brightness, contrast, saturation, hue) < 0 or hue > 0.5:
    raise ValueError("ColorJitter strengths must be >= 0 and hue <= 0.5, got "
                     f"{(brightness, contrast, saturation, hue)}.")
  if brightness == contrast == saturation == hue == 0:
    return image
  factors, order = jitter_params_from_uniforms(u, brightness, contrast, saturation, hue)
  jittered = apply_color_jitter(image, factors, order, use_hue=hue > 0)
  return jnp.where(u[8] < p, jittered, image)


def color_jitter(key: Array, image: Array, brightness: float, contrast: float,
                 saturation: float, hue: float, p: Scalar = 0.8) -> Array:
  """RandomApply([ColorJitter(brightness, contrast, saturation, hue)], p).

  Factors as torchvision: b ~ U[max(0, 1 - b), 1 + b] (c, s likewise), h ~ U[-h, h], the four
  ops in a random order.
  """
  return color_jitter_from_uniforms(jax.random.uniform(key, (JITTER_UNIFORMS,)), image,
                                    brightness, contrast, saturation, hue, p)


def grayscale(image: Array) -> Array:
  """Grayscale image replicated over 3 channels."""
  return jnp.repeat(rgb_to_grayscale(image)[..., None], 3, axis=-1)


def random_grayscale_from_uniforms(u: Array, image: Array, p: Scalar = 0.2) -> Array:
  """`random_grayscale` driven by GRAY_UNIFORMS uniforms."""
  return jnp.where(u[0] < p, grayscale(image), image)


def random_grayscale(key: Array, image: Array, p: Scalar = 0.2) -> Array:
  """torchvision RandomGrayscale(p) with 3 output channels."""
  return random_grayscale_from_uniforms(jax.random.uniform(key, (GRAY_UNIFORMS,)), image, p)


def solarize_image(image: Array, threshold: float = 0.5) -> Array:
  """x -> 1 - x where x >= threshold (threshold 0.5 == PIL's 128 for uint8-derived pixels)."""
  return jnp.where(image >= threshold, 1.0 - image, image)


def solarize_from_uniforms(u: Array, image: Array, p: Scalar, threshold: float = 0.5) -> Array:
  """`solarize` driven by SOLARIZE_UNIFORMS uniforms."""
  return jnp.where(u[0] < p, solarize_image(image, threshold), image)


def solarize(key: Array, image: Array, p: Scalar, threshold: float = 0.5) -> Array:
  """RandomSolarize(threshold, p)."""
  return solarize_from_uniforms(jax.random.uniform(key, (SOLARIZE_UNIFORMS,)), image, p,
                                threshold)


# ------------------------------------------------------------------------------------------------
# Gaussian blur.
# ------------------------------------------------------------------------------------------------


def blur_kernel_size(side: int) -> int:
  """SimCLR/torchvision convention: int(10% of the side), made odd, at least 3 (224 -> 23)."""
  size = int(0.1 * side)
  size += 1 - size % 2
  return max(size, 3)


def gaussian_kernel1d(sigma: Scalar, kernel_size: int) -> Array:
  """Normalised 1-D Gaussian taps at offsets -(k-1)/2 .. (k-1)/2 (torchvision)."""
  x = jnp.arange(kernel_size, dtype=jnp.float32) - (kernel_size - 1) / 2.0
  pdf = jnp.exp(-0.5 * jnp.square(x / sigma))
  return pdf / pdf.sum()


def blur_matrix(sigma: Scalar, size: int, kernel_size: int) -> Array:
  """[size, size] matrix of a 1-D Gaussian blur with reflect padding: blurred = M @ x.

  Entry (o, n) holds the tap at offset n - o plus the taps that reflect padding folds onto
  pixel n (padded positions -n and 2 (size - 1) - n; valid while kernel_size // 2 < size).
  Blurring as a matmul keeps the op a single dot: the direct 23-tap sum let XLA fuse (and so
  recompute) the colour-jitter chain into every tap, ~5x slower on CPU.
  """
  radius = kernel_size // 2
  taps = gaussian_kernel1d(sigma, kernel_size)
  out = jnp.arange(size)[:, None]
  src = jnp.arange(size)[None, :]

  def tap(offset):  # taps[offset + radius] for |offset| <= radius, else 0.
    inside = jnp.abs(offset) <= radius
    return jnp.where(inside, taps[jnp.clip(offset + radius, 0, kernel_size - 1)], 0.0)

  matrix = tap(src - out)
  matrix += jnp.where(src >= 1, tap(-src - out), 0.0)
  matrix += jnp.where(src <= size - 2, tap(2 * (size - 1) - src - out), 0.0)
  return matrix


def blur_with_sigma(image: Array, sigma: Scalar, kernel_size: int) -> Array:
  """Separable Gaussian blur with reflect padding (torchvision gaussian_blur).

  Args:
    image: float32 [H, W, C].
    sigma: standard deviation in pixels (may be traced).
    kernel_size: odd number of taps (static), smaller than 2 * min(H, W).

  Returns:
    float32 [H, W, C].
  """
  if kernel_size % 2 != 1 or kernel_size // 2 >= min(image.shape[:2]):
    raise ValueError(f"kernel_size must be odd and smaller than 2 * image side, got "
                     f"{kernel_size} for an image of shape {image.shape}.")
  rows = blur_matrix(sigma, image.shape[0], kernel_size)
  cols = blur_matrix(sigma, image.shape[1], kernel_size)
  out = jnp.einsum("oh,hwc->owc", rows, image, precision=_HIGHEST)
  return jnp.einsum("pw,owc->opc", cols, out, precision=_HIGHEST)


def gaussian_blur_from_uniforms(u: Array, image: Array, p: Scalar,
                                sigma: Sequence[float] = (0.1, 2.0),
                                kernel_size: int | None = None) -> Array:
  """`gaussian_blur` driven by BLUR_UNIFORMS uniforms (u[0] < p applies, u[1] picks sigma)."""
  if kernel_size is None:
    kernel_size = blur_kernel_size(min(image.shape[:2]))
  blurred = blur_with_sigma(image, sigma[0] + (sigma[1] - sigma[0]) * u[1], kernel_size)
  return jnp.where(u[0] < p, blurred, image)


def gaussian_blur(key: Array, image: Array, p: Scalar,
                  sigma: Sequence[float] = (0.1, 2.0),
                  kernel_size: int | None = None) -> Array:
  """RandomApply([GaussianBlur(kernel_size, sigma ~ U(sigma))], p); kernel 10% of the side."""
  return gaussian_blur_from_uniforms(jax.random.uniform(key, (BLUR_UNIFORMS,)), image, p,
                                     sigma, kernel_size)


def normalize(image: Array, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD) -> Array:
  """(image - mean) / std over the channel (last) axis."""
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return (image - mean) / std
