"""View recipes: turn a uint8 image batch into normalised augmented views, on device.

`build_view_fn(aug_cfg)` returns a pure, jit-friendly `fn(key, images_uint8 [B, H, W, 3])`
giving a list of groups, one per resolution (group 0 = largest), each float32
[V_g, B, S_g, S_g, 3]; the crop order used by the methods is the concatenation of the groups.
Every view has its own key (split from `key`); it draws one row of uniforms per image, which
drive all the random ops of that image (see augment.py on why one draw).

Per-view op order (every recipe): crop -> flip -> [grayscale if `gray_before_jitter`] ->
colour jitter -> grayscale -> blur -> solarize -> normalise. This is the order of MoCo v2,
SwAV (FB) and BYOL/PatchMix up to the flip, which commutes with all the photometric ops (blur
uses a symmetric kernel and reflect padding). MoCo v1 applies grayscale before the jitter.

Small images (CIFAR, 32 px): the reference configs are ImageNet ones; at 32 px a Gaussian blur
with sigma up to 2 px wipes out most of the object, and the common CIFAR ports of MoCo/SimCLR/
BYOL drop it. The config helpers therefore set blur_p = 0 when `small_image` (default: the
largest crop is <= 64 px).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, List, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections

from ssl_jax.data import augment

RECIPES = ("two_crops", "multi_crop", "asymmetric", "eval")
_SMALL_IMAGE_MAX_SIDE = 64

ViewFn = Callable[[jax.Array, jax.Array], List[jax.Array]]


@dataclasses.dataclass(frozen=True)
class _Group:
  """Static description of one resolution group."""
  size: int
  num_views: int
  scale: Tuple[float, float]
  blur_p: Tuple[float, ...]  # one per view of the group
  solarize_p: Tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class _Ops:
  """Static per-view op settings shared by every group."""
  ratio: Tuple[float, float]
  method: str
  flip_p: float
  jitter: Tuple[float, float, float, float]
  jitter_p: float
  gray_p: float
  gray_before_jitter: bool
  blur_sigma: Tuple[float, float]
  solarize_threshold: float


def _per_view(value, total: int, name: str) -> Tuple[float, ...]:
  """A float applies to every view; a sequence must give one value per view."""
  if isinstance(value, (int, float)):
    return (float(value),) * total
  value = tuple(float(v) for v in value)
  if len(value) != total:
    raise ValueError(f"aug_cfg.{name} has {len(value)} entries but the recipe makes {total} "
                     "views; give one probability per view or a single float.")
  return value


def _groups(cfg: ml_collections.ConfigDict) -> List[_Group]:
  """Resolution groups of a (non-eval) recipe, largest first."""
  recipe = cfg.recipe
  if recipe in ("two_crops", "asymmetric"):
    sizes, counts, scales = (cfg.size,), (2,), (tuple(cfg.scale),)
  elif recipe == "multi_crop":
    sizes, counts = tuple(cfg.sizes), tuple(cfg.num_crops)
    scales = tuple(zip(cfg.min_scales, cfg.max_scales))
    if not len(sizes) == len(counts) == len(cfg.min_scales) == len(cfg.max_scales):
      raise ValueError("multi_crop needs sizes, num_crops, min_scales and max_scales of the same "
                       f"length, got {sizes}, {counts}, {cfg.min_scales}, {cfg.max_scales}.")
    if list(sizes) != sorted(sizes, reverse=True):
      raise ValueError(f"multi_crop sizes must be in decreasing order (group 0 = largest), got "
                       f"{sizes}.")
  else:
    raise ValueError(f"Unknown aug_cfg.recipe {recipe!r}; use one of {RECIPES}.")
  total = sum(counts)
  if recipe == "asymmetric" and isinstance(cfg.blur_p, (int, float)) and isinstance(
      cfg.get("solarize_p", 0.0), (int, float)):
    raise ValueError("The asymmetric recipe needs per-view tuples blur_p / solarize_p, e.g. "
                     "(1.0, 0.1) and (0.0, 0.2) (BYOL); use two_crops for symmetric views.")
  blur_p = _per_view(cfg.blur_p, total, "blur_p")
  solarize_p = _per_view(cfg.get("solarize_p", 0.0), total, "solarize_p")
  groups, offset = [], 0
  for size, count, scale in zip(sizes, counts, scales):
    groups.append(_Group(int(size), int(count), (float(scale[0]), float(scale[1])),
                         blur_p[offset:offset + count], solarize_p[offset:offset + count]))
    offset += count
  return groups


def _ops(cfg: ml_collections.ConfigDict) -> _Ops:
  method = cfg.get("interpolation", "bilinear")
  if method not in ("bilinear", "bicubic"):
    raise ValueError(f"aug_cfg.interpolation must be 'bilinear' or 'bicubic', got {method!r}.")
  jitter = tuple(float(v) for v in cfg.jitter)
  if len(jitter) != 4:
    raise ValueError(f"aug_cfg.jitter must be (brightness, contrast, saturation, hue), got "
                     f"{jitter}.")
  return _Ops(ratio=tuple(cfg.get("ratio", (3 / 4, 4 / 3))), method=method,
              flip_p=float(cfg.flip_p), jitter=jitter, jitter_p=float(cfg.jitter_p),
              gray_p=float(cfg.grayscale_p),
              gray_before_jitter=bool(cfg.get("gray_before_jitter", False)),
              blur_sigma=tuple(cfg.blur_sigma),
              solarize_threshold=float(cfg.get("solarize_threshold", 0.5)))


_UNIFORMS_PER_VIEW = (augment.CROP_UNIFORMS, augment.FLIP_UNIFORMS, augment.JITTER_UNIFORMS,
                      augment.GRAY_UNIFORMS, augment.BLUR_UNIFORMS, augment.SOLARIZE_UNIFORMS)
_NUM_UNIFORMS = sum(_UNIFORMS_PER_VIEW)


def _augment_image(u, image, blur_p, solarize_p, *, group: _Group, ops: _Ops):
  """One view of one float image from its _NUM_UNIFORMS uniforms.

  Ops whose probability is statically 0 are not traced at all (under vmap a random op costs
  its full price whether or not it fires).
  """
  bounds = [0]
  for n in _UNIFORMS_PER_VIEW:
    bounds.append(bounds[-1] + n)
  u_crop, u_flip, u_jitter, u_gray, u_blur, u_solarize = (
      u[a:b] for a, b in zip(bounds[:-1], bounds[1:]))
  x = augment.random_resized_crop_from_uniforms(u_crop, image, group.size, group.scale,
                                                ops.ratio, ops.method)
  if ops.flip_p > 0:
    x = augment.horizontal_flip_from_uniforms(u_flip, x, ops.flip_p)
  if ops.gray_p > 0 and ops.gray_before_jitter:
    x = augment.random_grayscale_from_uniforms(u_gray, x, ops.gray_p)
  if ops.jitter_p > 0:
    x = augment.color_jitter_from_uniforms(u_jitter, x, *ops.jitter, p=ops.jitter_p)
  if ops.gray_p > 0 and not ops.gray_before_jitter:
    x = augment.random_grayscale_from_uniforms(u_gray, x, ops.gray_p)
  if max(group.blur_p) > 0:
    x = augment.gaussian_blur_from_uniforms(u_blur, x, blur_p, ops.blur_sigma)
  if max(group.solarize_p) > 0:
    x = augment.solarize_from_uniforms(u_solarize, x, solarize_p, ops.solarize_threshold)
  return x


def _check_images(images: jax.Array) -> None:
  if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != jnp.uint8:
    raise ValueError("Expected uint8 images [B, H, W, 3] (the host batch 'image' field), got "
                     f"{images.dtype} {images.shape}.")


def _to_float(images: jax.Array) -> jax.Array:
  return images.astype(jnp.float32) / 255.0


def eval_view_fn(aug_cfg: ml_collections.ConfigDict) -> Callable[[jax.Array], jax.Array]:
  """Deterministic eval transform: fn(images_uint8 [B, H, W, 3]) -> [B, S, S, 3] float32.

  Resize(short side = floor(S / crop_fraction)) + CenterCrop(S) + normalise; images already
  S x S are only normalised. S is `aug_cfg.size` (or the largest multi-crop size).
  """
  size = int(aug_cfg.sizes[0]) if aug_cfg.get("sizes") else int(aug_cfg.size)
  crop_fraction = float(aug_cfg.get("crop_fraction", 0.875))
  method = aug_cfg.get("interpolation", "bilinear")
  mean, std = tuple(aug_cfg.mean), tuple(aug_cfg.std)

  def fn(images: jax.Array) -> jax.Array:
    _check_images(images)
    crop = lambda im: augment.center_crop_resize(im, size, crop_fraction, method)
    return augment.normalize(jax.vmap(crop)(_to_float(images)), mean, std)

  return fn


def build_view_fn(aug_cfg: ml_collections.ConfigDict) -> ViewFn:
  """Builds the training view function of a recipe.

  Args:
    aug_cfg: ConfigDict with `recipe` in RECIPES and the fields of the helpers below
      (`mocov2_config` etc.).

  Returns:
    fn(key, images_uint8 [B, H, W, 3]) -> list of float32 [V_g, B, S_g, S_g, 3], one per
    resolution group, largest first. Pure and jit-friendly (not jitted itself). The "eval"
    recipe gives one group with one deterministic view (the key is unused).
  """
  if aug_cfg.recipe == "eval":
    eval_fn = eval_view_fn(aug_cfg)
    return lambda key, images: [eval_fn(images)[None]]
  groups, ops = _groups(aug_cfg), _ops(aug_cfg)
  mean, std = tuple(aug_cfg.mean), tuple(aug_cfg.std)
  total_views = sum(g.num_views for g in groups)

  def fn(key: jax.Array, images: jax.Array) -> List[jax.Array]:
    _check_images(images)
    images = _to_float(images)
    batch = images.shape[0]
    view_keys = jax.random.split(key, total_views)
    outputs, offset = [], 0
    for group in groups:
      per_image = jax.vmap(
          lambda u, im, bp, sp, g=group: _augment_image(u, im, bp, sp, group=g, ops=ops),
          in_axes=(0, 0, None, None))

      def one_view(view_key, blur_p, solarize_p, per_image=per_image):
        # Row i of the uniforms belongs to image i; with jax_threefry_partitionable the rows
        # do not depend on how the batch is sharded.
        u = jax.random.uniform(view_key, (batch, _NUM_UNIFORMS))
        return per_image(u, images, blur_p, solarize_p)

      views = jax.vmap(one_view)(view_keys[offset:offset + group.num_views],
                                 jnp.asarray(group.blur_p, jnp.float32),
                                 jnp.asarray(group.solarize_p, jnp.float32))
      outputs.append(augment.normalize(views, mean, std))
      offset += group.num_views
    return outputs

  return fn


# ------------------------------------------------------------------------------------------------
# Reference recipes.
# ------------------------------------------------------------------------------------------------


def _is_small(size: int, small_image) -> bool:
  return size <= _SMALL_IMAGE_MAX_SIDE if small_image is None else bool(small_image)


def _base_config(**overrides) -> ml_collections.ConfigDict:
  cfg = dict(recipe="two_crops", size=224, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3),
             interpolation="bilinear", flip_p=0.5, jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8,
             grayscale_p=0.2, gray_before_jitter=False, blur_p=0.5, blur_sigma=(0.1, 2.0),
             solarize_p=0.0, solarize_threshold=0.5, mean=augment.IMAGENET_MEAN,
             std=augment.IMAGENET_STD, crop_fraction=0.875)
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


def mocov2_config(size: int = 224, small_image: bool | None = None) -> ml_collections.ConfigDict:
  """MoCo v2 (spec §1.3, §4.1): RRC(0.2, 1), jitter (0.4, 0.4, 0.4, 0.1) p 0.8, grey 0.2,
  blur p 0.5 sigma U(0.1, 2) (0 for small images), flip."""
  return _base_config(size=size, blur_p=0.0 if _is_small(size, small_image) else 0.5)


def mocov1_config(size: int = 224) -> ml_collections.ConfigDict:
  """MoCo v1: RRC(0.2, 1), grayscale 0.2 *then* ColorJitter(0.4, 0.4, 0.4, 0.4) always, flip."""
  return _base_config(size=size, jitter=(0.4, 0.4, 0.4, 0.4), jitter_p=1.0,
                      gray_before_jitter=True, blur_p=0.0)


def swav_config(sizes: Sequence[int] = (224, 96), num_crops: Sequence[int] = (2, 6),
                min_scales: Sequence[float] = (0.14, 0.05),
                max_scales: Sequence[float] = (1.0, 0.14),
                small_image: bool | None = None) -> ml_collections.ConfigDict:
  """SwAV multi-crop (spec §2.8): jitter (0.8, 0.8, 0.8, 0.2) p 0.8, grey 0.2, blur p 0.5.

  The FB code normalises with std (0.228, 0.224, 0.225) (a typo of 0.229); we keep the
  standard ImageNet std, a 0.4% rescale of the red channel.
  """
  small = _is_small(max(sizes), small_image)
  return _base_config(recipe="multi_crop", size=int(sizes[0]), sizes=tuple(sizes),
                      num_crops=tuple(num_crops), min_scales=tuple(min_scales),
                      max_scales=tuple(max_scales), scale=(min_scales[0], max_scales[0]),
                      jitter=(0.8, 0.8, 0.8, 0.2), blur_p=0.0 if small else 0.5)


def byol_config(size: int = 224, small_image: bool | None = None) -> ml_collections.ConfigDict:
  """BYOL-style asymmetric views as in PatchMix (spec §3.7).

  View 1: blur p 1.0, no solarize; view 2: blur p 0.1, solarize p 0.2. Bicubic RRC with
  scale (0.05, 1) (ImageNet) or (0.1, 1) (CIFAR); jitter (0.4, 0.4, 0.2, 0.1) p 0.8; grey 0.2.
  """
  small = _is_small(size, small_image)
  return _base_config(recipe="asymmetric", size=size, scale=(0.1 if small else 0.05, 1.0),
                      interpolation="bicubic", jitter=(0.4, 0.4, 0.2, 0.1),
                      blur_p=(0.0, 0.0) if small else (1.0, 0.1), solarize_p=(0.0, 0.2))


def eval_config(size: int = 224, crop_fraction: float = 0.875) -> ml_collections.ConfigDict:
  """Eval transform: Resize(size / crop_fraction) + CenterCrop(size) + normalise."""
  return _base_config(recipe="eval", size=size, crop_fraction=crop_fraction)
