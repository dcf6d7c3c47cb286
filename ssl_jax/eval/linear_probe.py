"""Linear probes on a frozen backbone (spec §5.2).

* SwAV setting (`resnet50_linear-8xb32-coslr-100e`): GAP feature ("pooled") -> Linear with
  N(0, 0.01) weights and zero bias; SGD lr 0.3, momentum 0.9, wd 1e-6, batch 256, 100 epochs,
  cosine per epoch to 0; train views RandomResizedCrop(224, (0.08, 1)) + flip.
* Multi-head (`resnet50_mhead_linear-8xb32-steplr-90e`): one head per tap feature1..feature5
  on the pooled maps (features.py): BatchNorm without affine per channel (PyTorch momentum 0.1
  = flax 0.9; statistics over the global batch, i.e. SyncBN) -> flatten -> Linear; the loss is
  the sum of the five CEs (the heads share nothing, so each is trained independently); SGD
  nesterov lr 0.01, momentum 0.9, wd 1e-4, step x0.1 at epochs 30 and 60 of 90; train views
  RandomResizedCrop + flip + ColorJitter(0.4, 0.4, 0.4, 0) + AlexNet PCA lighting.

The backbone is always in eval mode (frozen BN). Two training paths:
* augmented: every step crops the images on device and runs the frozen backbone;
* cached (augmentation off): features are extracted once and the heads train on them, which
  is the same computation without the backbone forward in every epoch.
Validation features are deterministic, so they are always extracted once.
"""
from typing import Callable, Dict, Iterator, Optional, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ssl_jax import optim, sharding
from ssl_jax.data import augment

# AlexNet "Lighting" PCA noise (fb.resnet.torch / mmselfsup): ImageNet RGB eigen-decomposition.
LIGHTING_EIGVAL = (0.2175, 0.0188, 0.0045)
LIGHTING_EIGVEC = ((-0.5675, 0.7192, 0.4009), (-0.5808, -0.0045, -0.8140),
                   (-0.5836, -0.6948, 0.4203))


class LinearHeads(nn.Module):
  """One linear classifier per tap, optionally after a non-affine per-channel BatchNorm.

  Attributes:
    num_classes: outputs of every head.
    channels: {tap: C} for the taps with BatchNorm (flat features are [C * h * w], C-major);
      taps absent from it get no BatchNorm.
  """
  num_classes: int
  channels: Dict[str, int]

  @nn.compact
  def __call__(self, feats: Dict[str, jax.Array], train: bool) -> Dict[str, jax.Array]:
    logits = {}
    for name in sorted(feats):
      x = feats[name]
      if name in self.channels:
        c = self.channels[name]
        x = x.reshape(x.shape[0], c, -1)
        x = nn.BatchNorm(use_running_average=not train, axis=1, momentum=0.9, epsilon=1e-5,
                         use_scale=False, use_bias=False, name=f"bn_{name}")(x)
        x = x.reshape(x.shape[0], -1)
      logits[name] = nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(0.01),
                              bias_init=nn.initializers.zeros, name=f"fc_{name}")(x)
    return logits


@flax.struct.dataclass
class ProbeState:
  step: jax.Array
  params: dict
  batch_stats: dict
  opt_state: optax.OptState


def lighting(key: jax.Array, image: jax.Array, alphastd: float = 0.1) -> jax.Array:
  """AlexNet PCA lighting on a [0, 1] RGB image: + eigvec @ (alpha * eigval), alpha~N(0, std)."""
  alpha = alphastd * jax.random.normal(key, (3,))
  rgb = jnp.asarray(LIGHTING_EIGVEC) @ (alpha * jnp.asarray(LIGHTING_EIGVAL))
  return image + rgb


def make_train_view(size: int, *, jitter: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
                    lighting_std: float = 0.0, scale=(0.08, 1.0), mean=augment.IMAGENET_MEAN,
                    std=augment.IMAGENET_STD) -> Callable:
  """fn(key, uint8 [B, H, W, 3]) -> normalised float32 [B, size, size, 3] training views."""
  def one(key, image):
    k_crop, k_flip, k_jitter, k_light = jax.random.split(key, 4)
    x = augment.random_resized_crop(k_crop, image, size, scale)
    x = augment.horizontal_flip(k_flip, x)
    if any(jitter):
      x = augment.color_jitter(k_jitter, x, *jitter, p=1.0)
    if lighting_std:
      x = lighting(k_light, x, lighting_std)
    return x

  def fn(key, images):
    keys = jax.random.split(key, images.shape[0])
    views = jax.vmap(one)(keys, images.astype(jnp.float32) / 255.0)
    return augment.normalize(views, mean, std)

  return fn


def create_state(heads: LinearHeads, tx, feature_dims: Dict[str, int], seed: int) -> ProbeState:
  feats = {name: jnp.zeros((2, d), jnp.float32) for name, d in feature_dims.items()}
  # One jitted init: an eager init compiles one program per initializer.
  variables = jax.jit(lambda key: heads.init(key, feats, train=False))(jax.random.key(seed))
  params = variables["params"]
  return ProbeState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params))


def make_train_step(heads: LinearHeads, tx, mesh, features_fn: Optional[Callable] = None):
  """Jitted (state, batch, key) -> (state, metrics).

  Args:
    heads: the LinearHeads module.
    tx: optax optimiser.
    mesh: "data" mesh; the batch is sharded, the state replicated.
    features_fn: (key, batch, frozen) -> {tap: [B, dim]} for the augmented path, `frozen` being
      the backbone variables (an argument, not a closure: no 100 MB constants in the program);
      None when batch["features"] already holds them (cached path).
  """
  def step(state, batch, key, frozen):
    key = jax.random.fold_in(key, state.step)
    feats = batch["features"] if features_fn is None else features_fn(key, batch, frozen)
    feats = jax.lax.stop_gradient(feats)

    def loss_fn(params):
      logits, updates = heads.apply({"params": params, "batch_stats": state.batch_stats}, feats,
                                    train=True, mutable=["batch_stats"])
      losses = {name: optax.softmax_cross_entropy_with_integer_labels(
          lg.astype(jnp.float32), batch["label"]).mean() for name, lg in logits.items()}
      return sum(losses.values()), (losses, updates.get("batch_stats", {}))

    (loss, (losses, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    state = ProbeState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                       batch_stats=stats, opt_state=opt_state)
    return state, {"loss": loss, **{f"loss_{k}": v for k, v in losses.items()}}

  rep, data = sharding.replicated(mesh), sharding.batch_sharded(mesh)
  return jax.jit(step, in_shardings=(rep, data, rep, rep), out_shardings=(rep, rep),
                 donate_argnums=0)


def make_eval_fn(heads: LinearHeads):
  """Jitted (state, {tap: feats}) -> {tap: top-5 class ids}."""
  def fn(state, batch):
    logits = heads.apply({"params": state.params, "batch_stats": state.batch_stats}, batch,
                         train=False)
    return {name: jax.lax.top_k(lg, min(5, lg.shape[-1]))[1] for name, lg in logits.items()}
  return jax.jit(fn)


def evaluate(eval_fn, state: ProbeState, feats: Dict[str, np.ndarray], labels, batch_size: int,
             mesh) -> Dict[str, np.ndarray]:
  """Top-1/top-5 accuracy (fractions) of every head on cached eval features.

  Returns:
    {tap: [top1, top5]}.
  """
  labels = np.asarray(labels)
  n = len(labels)
  batch_size = max(mesh.devices.size, batch_size - batch_size % mesh.devices.size)
  hits = {name: np.zeros((2,)) for name in feats}
  data = sharding.batch_sharded(mesh)
  for start in range(0, n, batch_size):
    rows = np.arange(start, start + batch_size)
    real = rows < n
    rows = np.where(real, rows, 0)   # padded rows are dropped below
    batch = {name: jax.device_put(x[rows], data) for name, x in feats.items()}
    top = eval_fn(state, batch)
    for name, t in top.items():
      t = np.asarray(t)[real]
      y = labels[rows[real]]
      hits[name] += [np.sum(t[:, 0] == y), np.sum(np.any(t == y[:, None], axis=1))]
  return {name: h / n for name, h in hits.items()}


def cached_batches(feats: Dict[str, np.ndarray], labels: np.ndarray, batch_size: int, seed: int,
                   epoch: int, mesh) -> Iterator[dict]:
  """One epoch of shuffled batches of cached features (remainder dropped, static shapes)."""
  order = np.random.default_rng([seed, epoch]).permutation(len(labels))
  data = sharding.batch_sharded(mesh)
  for b in range(len(labels) // batch_size):
    rows = order[b * batch_size:(b + 1) * batch_size]
    yield {"features": {k: jax.device_put(v[rows], data) for k, v in feats.items()},
           "label": jax.device_put(labels[rows].astype(np.int32), data)}


def train_probe(*, num_classes: int, feature_dims: Dict[str, int], channels: Dict[str, int],
                opt_cfg: ml_collections.ConfigDict, epochs: int, steps_per_epoch: int,
                batch_size: int, seed: int, mesh, epoch_batches: Callable[[int], Iterator[dict]],
                eval_feats: Dict[str, np.ndarray], eval_labels: np.ndarray,
                features_fn: Optional[Callable] = None, frozen=None, eval_every_epochs: int = 1,
                log: Optional[Callable[[str], None]] = None) -> Dict[str, float]:
  """Trains the heads and reports top-1/top-5 per head (final and best over evaluations).

  Args:
    num_classes: classes.
    feature_dims: {tap: flat dim}.
    channels: {tap: C} for taps that get the non-affine BatchNorm (empty for SwAV linear).
    opt_cfg: config.optimizer (ssl_jax.optim: sgd, lr, schedule, milestones, nesterov, ...).
    epochs: training epochs.
    steps_per_epoch: optimizer steps per epoch.
    batch_size: global batch.
    seed: init / augmentation seed.
    mesh: "data" mesh.
    epoch_batches: epoch -> iterator of batches ({"features" or "image", "label"}).
    eval_feats, eval_labels: cached validation features and labels.
    features_fn: (key, batch, frozen) -> features for the augmented path; None when cached.
    frozen: backbone variables passed to `features_fn`.
    eval_every_epochs: evaluation cadence (the last epoch is always evaluated).
    log: optional printer.

  Returns:
    {"top1/<tap>", "top5/<tap>", "best_top1/<tap>", "loss"} as fractions.
  """
  schedule = optim.lr_schedule(opt_cfg, epochs * steps_per_epoch, steps_per_epoch)
  tx = optim.make_optimizer(opt_cfg, schedule)
  heads = LinearHeads(num_classes, dict(channels))
  state = jax.device_put(create_state(heads, tx, feature_dims, seed), sharding.replicated(mesh))
  train_step = make_train_step(heads, tx, mesh, features_fn)
  eval_fn = make_eval_fn(heads)
  key = jax.device_put(jax.random.key(seed + 1), sharding.replicated(mesh))
  frozen = jax.device_put({} if frozen is None else frozen, sharding.replicated(mesh))
  best, metrics, loss = {}, {}, float("nan")
  for epoch in range(epochs):
    step_metrics = None
    for batch in epoch_batches(epoch):
      state, step_metrics = train_step(state, batch, key, frozen)
    if step_metrics is None:
      raise ValueError(f"Epoch {epoch} of the linear probe had no batch: the train split is "
                       f"smaller than batch_size={batch_size}.")
    loss = float(step_metrics["loss"])
    if not np.isfinite(loss):
      raise FloatingPointError(f"Linear probe loss is {loss} at epoch {epoch + 1}; lower "
                               "config.optimizer.lr or check the features.")
    if (epoch + 1) % eval_every_epochs == 0 or epoch + 1 == epochs:
      metrics = evaluate(eval_fn, state, eval_feats, eval_labels, batch_size, mesh)
      for name, (top1, _) in metrics.items():
        best[name] = max(best.get(name, 0.0), float(top1))
      if log:
        log(f"epoch {epoch + 1}/{epochs} loss {loss:.4f} " + " ".join(
            f"top1/{k}={v[0]:.4f}" for k, v in sorted(metrics.items())))
  out = {"loss": loss}
  for name, (top1, top5) in metrics.items():
    out[f"top1/{name}"], out[f"top5/{name}"] = float(top1), float(top5)
    out[f"best_top1/{name}"] = best[name]
  return out
