"""Frozen-backbone features for the eval protocols: taps, reference pooling, sharded extraction.

Taps are the backbone outputs (see ssl_jax.models.resnet): "pooled" (global average of
feature5, the kNN / SwAV-linear feature) and "feature1".."feature5" (stem before max-pool and
the four stages). The multi-head linear protocol and the VOC07 SVM pool the stage taps to a
fixed small grid like mmselfsup's `MultiPooling` (spec §5.2b):

  'specified' (reference default): AvgPool2d(k, s, p) per tap, designed for ResNet-50 at 224 px
      feature1 (10, 10, 4) -> 64x12x12 = 9216, feature2 (16, 8, 0) -> 256x6x6 = 9216,
      feature3 (13, 5, 0) -> 512x4x4 = 8192, feature4 (8, 3, 0) -> 1024x3x3 = 9216,
      feature5 (6, 1, 0) -> 2048x2x2 = 8192.
    PyTorch's AvgPool2d counts the zero padding in the average (count_include_pad=True).
  'adaptive': AdaptiveAvgPool2d to 12, 6, 4, 3, 2 (same dims at 224 px; also valid for small
    images, e.g. the 32 px CIFAR/digits smoke runs, where the fixed kernels do not fit).

Pooled maps are flattened channel-major (C, H, W), the layout of PyTorch's `x.view(B, -1)`, so
a flattened vector can be reshaped to [C, H*W] for the per-channel BatchNorm of the heads.
"""
from typing import Callable, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ssl_jax import sharding
from ssl_jax.data import augment, pipeline

TAPS = ("feature1", "feature2", "feature3", "feature4", "feature5")
OUTPUTS = ("pooled",) + TAPS
SPECIFIED_POOLING = {"feature1": (10, 10, 4), "feature2": (16, 8, 0), "feature3": (13, 5, 0),
                     "feature4": (8, 3, 0), "feature5": (6, 1, 0)}
ADAPTIVE_SIZES = {"feature1": 12, "feature2": 6, "feature3": 4, "feature4": 3, "feature5": 2}
POOLINGS = ("specified", "adaptive")


def _adaptive_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] averaging matrix of PyTorch's adaptive bins [floor(i n/o), ceil((i+1) n/o))."""
  m = np.zeros((out_size, in_size), np.float32)
  for i in range(out_size):
    start = (i * in_size) // out_size
    end = -(-((i + 1) * in_size) // out_size)
    m[i, start:end] = 1.0 / (end - start)
  return m


def pool_map(x: jax.Array, name: str, pooling: str = "specified") -> jax.Array:
  """Pools one stage map [B, H, W, C] to the tap's small grid [B, h, w, C]."""
  if pooling == "specified":
    kernel, stride, pad = SPECIFIED_POOLING[name]
    if min(x.shape[1:3]) + 2 * pad < kernel:
      raise ValueError(f"{name} is {x.shape[1]}x{x.shape[2]}, smaller than the reference "
                       f"AvgPool2d kernel {kernel} (designed for 224 px inputs); use "
                       "pooling='adaptive' for small images.")
    return nn.avg_pool(x, (kernel, kernel), (stride, stride), padding=((pad, pad), (pad, pad)),
                       count_include_pad=True)
  if pooling == "adaptive":
    size = ADAPTIVE_SIZES[name]
    rows = jnp.asarray(_adaptive_matrix(x.shape[1], size))
    cols = jnp.asarray(_adaptive_matrix(x.shape[2], size))
    return jnp.einsum("oh,bhwc,pw->bopc", rows, x, cols, precision=jax.lax.Precision.HIGHEST)
  raise ValueError(f"pooling={pooling!r}; use one of {POOLINGS}.")


def tap_features(outputs: Dict[str, jax.Array], taps: Sequence[str],
                 pooling: str = "specified") -> Dict[str, jax.Array]:
  """Backbone outputs -> flat float32 features per tap ("pooled" is used as is)."""
  feats = {}
  for name in taps:
    if name not in OUTPUTS:
      raise ValueError(f"Unknown tap {name!r}; use any of {OUTPUTS}.")
    x = outputs[name].astype(jnp.float32)
    if name != "pooled":
      x = pool_map(x, name, pooling)
      x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)  # (C, H, W) order
    feats[name] = x
  return feats


def tap_channels(outputs: Dict[str, jax.ShapeDtypeStruct], taps: Sequence[str]) -> Dict[str, int]:
  """Channels C of each tap (the per-channel BatchNorm of the multi-head probe needs them)."""
  return {name: int(outputs[name].shape[-1]) for name in taps}


def output_shapes(backbone: nn.Module, variables, image_size: int) -> Dict:
  """Shapes of the backbone outputs at `image_size` without running it (jax.eval_shape)."""
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  return jax.eval_shape(lambda v, x: backbone.apply(v, x, train=False), variables, images)


def feature_dims(backbone: nn.Module, variables, image_size: int, taps: Sequence[str],
                 pooling: str = "specified") -> Dict[str, int]:
  """Flat feature size of each tap, from shapes only (no forward pass is run)."""
  def fn(v, x):
    return tap_features(backbone.apply(v, x, train=False), taps, pooling)
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  shapes = jax.eval_shape(fn, variables, images)
  return {name: int(s.shape[-1]) for name, s in shapes.items()}


def normalize_view(mean=augment.IMAGENET_MEAN, std=augment.IMAGENET_STD) -> Callable:
  """uint8 images that are already at the model resolution -> normalised float32."""
  return lambda images: augment.normalize(images.astype(jnp.float32) / 255.0, mean, std)


def extract_in_index_order(fn: Callable, variables, source, batch_size: int,
                           mesh: jax.sharding.Mesh) -> Tuple[Dict[str, np.ndarray], np.ndarray]:
  """Runs `fn(variables, images) -> {name: [B, ...]}` over every example of `source`.

  Batches come from `pipeline.eval_batches` (padded to the global batch, sharded over `mesh`);
  the padding rows are dropped and the results put back in the source's index order.
  Returns ({name: numpy [N, ...]}, labels int32 [N]).
  """
  variables = jax.device_put(variables, sharding.replicated(mesh))
  feats, labels, index = {}, [], []
  for batch in pipeline.eval_batches(source, batch_size, mesh=mesh):
    out = fn(variables, batch["image"])
    mask = np.asarray(batch["mask"])
    for name, x in out.items():
      feats.setdefault(name, []).append(np.asarray(x)[mask])
    labels.append(np.asarray(batch["label"])[mask])
    index.append(np.asarray(batch["index"])[mask])
  order = np.argsort(np.concatenate(index), kind="stable")
  feats = {name: np.concatenate(v)[order] for name, v in feats.items()}
  return feats, np.concatenate(labels)[order].astype(np.int32)


class Extractor:
  """Sharded, jitted feature extraction for one (backbone, view, taps, pooling); reusable across
  sources with the same image shape without recompiling."""

  def __init__(self, backbone: nn.Module, *, view_fn: Callable,
               taps: Sequence[str] = ("pooled",), pooling: str = "specified",
               mesh: Optional[jax.sharding.Mesh] = None):
    self.taps, self.mesh = tuple(taps), sharding.make_mesh() if mesh is None else mesh

    def fn(variables, images):
      return tap_features(backbone.apply(variables, view_fn(images), train=False), self.taps,
                          pooling)

    self._fn = jax.jit(fn, out_shardings=sharding.batch_sharded(self.mesh))

  def __call__(self, variables, source, batch_size: int = 256,
               check_finite: bool = True) -> Tuple[Dict[str, np.ndarray], np.ndarray]:
    """Features of every example of `source` in index order; see `extract`."""
    sharding.check_batch_size(batch_size, self.mesh, "eval batch_size")
    feats, labels = extract_in_index_order(self._fn, variables, source, batch_size, self.mesh)
    if check_finite:
      for name, x in feats.items():
        if not np.all(np.isfinite(x)):
          raise ValueError(f"Features {name!r} of {getattr(source, 'name', 'source')} contain "
                           "NaN or inf: the checkpoint has diverged or the inputs are broken.")
    return feats, labels


def extract(backbone: nn.Module, variables, source, *, view_fn: Callable,
            taps: Sequence[str] = ("pooled",), pooling: str = "specified",
            batch_size: int = 256, mesh: Optional[jax.sharding.Mesh] = None,
            check_finite: bool = True) -> Tuple[Dict[str, np.ndarray], np.ndarray]:
  """Eval-mode features of every example of `source`, in index order, sharded over devices.

  Args:
    backbone: the frozen backbone module.
    variables: its {"params", "batch_stats"}.
    source: an ssl_jax.data.sources.Source.
    view_fn: device transform uint8 [B, H, W, 3] -> float32 normalised images
      (`views.eval_view_fn(...)` or `normalize_view()`).
    taps: which outputs to return (see OUTPUTS).
    pooling: "specified" or "adaptive" for the stage taps.
    batch_size: global batch (a multiple of the device count).
    mesh: 1-D "data" mesh (default: all devices).
    check_finite: raise if a feature is NaN/inf (a diverged checkpoint).

  Returns:
    ({tap: float32 [N, dim]}, labels int32 [N]).
  """
  return Extractor(backbone, view_fn=view_fn, taps=taps, pooling=pooling, mesh=mesh)(
      variables, source, batch_size, check_finite)
