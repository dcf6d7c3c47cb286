"""SwAV (Caron et al. 2020): swapped prediction of Sinkhorn codes over multi-crop views.

Matches facebookresearch/swav (`main_swav.py`, `src/resnet50.py`) unless stated otherwise:

* Model: backbone -> projection head Linear -> BN -> ReLU -> Linear -> L2-normalise -> prototypes
  (a bias-free Linear(D -> K), kernel (D, K), a TOP-LEVEL param entry `prototypes` so the trainer
  can freeze it by name). The backbone runs once per resolution group (all crops of one size in
  one batch, so its BN statistics are per group); the pooled features of every crop are then
  concatenated and the head, BN included, runs once over all crops (spec §2.2).
* Prototypes are L2-normalised per prototype before every step (`prepare_params`, the reference's
  in-place `normalize(w, dim=1)` on the (K, D) torch weight = axis 0 of the Flax kernel).
* Codes: Sinkhorn-Knopp (float32, no gradient) on the scores of each crop in `crops_for_assign`,
  optionally over queue rows prepended to the batch rows; only the batch rows' codes are kept.
* Loss: every other crop predicts those codes with softmax(scores / T) (ssl_jax.ops.swav_loss).
* Queue (FB): zeros at step `queue_start_epoch * steps_per_epoch`, filled newest-first with the
  detached embeddings after the codes are computed (so the batch is never duplicated); it takes
  part in Sinkhorn ("in use") iff its last row is non-zero, i.e. once it is full, and its scores
  are always recomputed with the current prototypes. FB resets the in-use flag at each epoch
  start, but the queue stays full across epochs, so the flag is set again at the first check:
  "last row non-zero" is the same rule without host state.
* Prototype freezing: `frozen_params` marks `prototypes` frozen for the first
  `freeze_prototypes_niters` steps; the trainer then keeps both the params and their optimiser
  state (FB sets their grad to None, so SGD/LARC skip them: no decay, no momentum).
* Collapse monitors: the entropy of the mean code (ln K when prototypes are used uniformly, 0 when
  every sample picks one) and `collapse_flag` = 1 when the loss is within 2% of ln K (the collapse
  plateau at ln 3000 = 8.006 of the FB README; the loss also starts near ln K, so the flag means
  collapse only when it stays on after the first epochs).

Row layout. Views arrive as groups [V_g, B, S, S, 3] with the batch axis sharded. Inside the model
each group is flattened batch-major ([B * V_g] rows, image i's crops adjacent): the sharded batch
axis stays the leading axis, so no resharding is needed, and with `bn_groups = G > 1` each BN group
holds B/G images x all their crops of that size -- the set one reference GPU normalises over.

Sinkhorn row sums (`config.swav.sinkhorn_row_sums`): 'global' (FB, default) lets every
prototype's marginal run over the global batch (+ queue). 'per_device' reproduces mmselfsup, which
skips the all-reduce of the prototype sums: rows are split into `config.swav.sinkhorn_groups`
groups (the reference GPU count, e.g. 8 for 8 x 32) and each group, its queue rows followed by its
batch rows, is equipartitioned alone. The group count is a property of the run being reproduced,
not of the hardware (like `config.model.bn_groups`), so 1 chip and N chips give the same numbers;
the queue is then kept as G per-group FIFOs, as each reference GPU keeps its own.

`config.swav`: num_prototypes, dim, hidden_dim, temperature, epsilon, sinkhorn_iterations,
crops_for_assign, queue_length (0 = no queue), queue_start_epoch, freeze_prototypes_niters,
sinkhorn_row_sums ('global' | 'per_device'), sinkhorn_groups.
"""
import functools
import math
from typing import Dict, Optional, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ssl_jax import models
from ssl_jax.methods.base import Method
from ssl_jax.ops import infonce
from ssl_jax.ops.sinkhorn import sinkhorn_knopp
from ssl_jax.ops.swav_loss import code_entropy_stats, swapped_prediction_loss

ROW_SUM_MODES = ('global', 'per_device')
# A loss within this fraction of ln K is flagged as the collapse plateau (FB README: a loss stuck
# at ln 3000 = 8.006). "Near", not "above": a randomly initialised low-dimensional head can start
# well above ln K, which is not collapse.
COLLAPSE_TOLERANCE = 0.02


@flax.struct.dataclass
class SwAVState:
  queue: Optional[jax.Array]   # [len(crops_for_assign), L, D] f32, newest first; None: no queue
  queue_start_step: jax.Array  # int32 scalar: first step that writes into the queue


# ------------------------------------------------------------------------------------------------
# Model.
# ------------------------------------------------------------------------------------------------
class Prototypes(nn.Module):
  """Bias-free Linear(D -> K) with PyTorch's default init U(+-1/sqrt(D)), as the reference.

  The dot runs at full float32 precision: the scores are exponentiated with 1/epsilon = 20 in
  Sinkhorn, where TF32/bf16 rounding of the scores would be amplified.
  """
  num_prototypes: int

  @nn.compact
  def __call__(self, z):
    dim = z.shape[-1]
    bound = 1.0 / np.sqrt(dim)
    init = lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound,
                                                                    bound)
    kernel = self.param('kernel', init, (dim, self.num_prototypes))
    return jnp.dot(z.astype(jnp.float32), kernel, precision=jax.lax.Precision.HIGHEST)


def _batch_major(views):
  """[V, B, S, S, C] -> [B * V, S, S, C] with image i's V crops at rows i*V .. i*V+V-1."""
  num_views, batch = views.shape[:2]
  return jnp.swapaxes(views, 0, 1).reshape((batch * num_views,) + views.shape[2:])


class SwAVModel(nn.Module):
  """Backbone + projection head (with BN) + prototypes.

  Called with one image batch x [B, H, W, 3] it returns the backbone dict plus 'embedding'
  (un-normalised head output), 'z' (unit embedding) and 'scores' (z . C^T); this is what the
  trainer's feature extraction uses (train=False). Called with a list of resolution groups
  [V_g, B, S_g, S_g, 3] (the view function's output) it runs the backbone once per group and the
  head once over all crops, and returns 'pooled' [V, B, C], 'embedding', 'z' [V, B, D] and
  'scores' [V, B, K] with the crops in view order (group 0's views first).
  """
  backbone: nn.Module
  head: nn.Module
  num_prototypes: int

  def setup(self):
    self.prototypes = Prototypes(self.num_prototypes)

  def _project(self, pooled, train):
    embedding = self.head(pooled, train).astype(jnp.float32)
    z = infonce.l2_normalize(embedding)
    return embedding, z, self.prototypes(z)

  def __call__(self, x, train: bool = True):
    if not isinstance(x, (list, tuple)):
      out = dict(self.backbone(x, train))
      out['embedding'], out['z'], out['scores'] = self._project(out['pooled'], train)
      return out
    batch = x[0].shape[1]
    if any(g.ndim != 5 or g.shape[1] != batch for g in x):
      raise ValueError('SwAVModel expects a list of view groups [V_g, B, S, S, 3] with one B, got '
                       f'{[tuple(g.shape) for g in x]}.')
    pooled = []
    for group in x:  # one backbone pass per resolution: BN statistics per crop size
      feats = self.backbone(_batch_major(group), train)['pooled']
      pooled.append(feats.reshape(batch, group.shape[0], -1))
    pooled = jnp.concatenate(pooled, axis=1)           # [B, V, C]
    num_views = pooled.shape[1]
    # One head pass over every crop: its BN normalises all crops jointly (reference).
    flat = [a.reshape(batch, num_views, -1) for a in
            self._project(pooled.reshape(batch * num_views, -1), train)]
    to_view_major = lambda a: jnp.swapaxes(a, 0, 1)   # [V, B, ...] for the loss
    embedding, z, scores = (to_view_major(a) for a in flat)
    return {'pooled': to_view_major(pooled), 'embedding': embedding, 'z': z, 'scores': scores}


def create_model(config):
  check_config(config)
  sw, model_cfg = config.swav, config.model
  head = models.MLPHead(hidden_dim=sw.hidden_dim, out_dim=sw.dim, num_layers=2, use_bn=True,
                        bn_groups=model_cfg.get('bn_groups', 1),
                        dtype=models.compute_dtype(model_cfg))
  return SwAVModel(backbone=models.build_backbone(model_cfg), head=head,
                   num_prototypes=sw.num_prototypes)


def normalize_prototypes(params):
  """Returns params with every prototype (column of the (D, K) kernel) of unit L2 norm."""
  kernel = params['prototypes']['kernel']
  return {**params, 'prototypes': {**params['prototypes'],
                                   'kernel': infonce.l2_normalize(kernel, axis=0)}}


def prepare_params(config, params):
  """Per-step prototype normalisation (reference: in place, outside autograd, before forward)."""
  del config
  return normalize_prototypes(params)


def init_variables(config, model, rng, views):
  """Initialises through the multi-crop path; prototypes start normalised.

  Normalising at init is what the first step's `prepare_params` does anyway; doing it here makes
  the stored prototypes a fixed point, so frozen prototypes stay bit-identical to the init.
  """
  del config
  variables = model.init(rng, list(views), train=True)
  return {'params': normalize_prototypes(variables['params']),
          'batch_stats': variables.get('batch_stats', {})}


# ------------------------------------------------------------------------------------------------
# Config checks and state.
# ------------------------------------------------------------------------------------------------
def sinkhorn_groups(config) -> int:
  """Number of row groups that share prototype marginals (1 = FB's global row sums)."""
  mode = config.swav.get('sinkhorn_row_sums', 'global')
  if mode not in ROW_SUM_MODES:
    raise ValueError(f'config.swav.sinkhorn_row_sums={mode!r}; use one of {ROW_SUM_MODES}.')
  if mode == 'global':
    return 1
  groups = int(config.swav.get('sinkhorn_groups', 0))
  if groups < 1:
    raise ValueError("config.swav.sinkhorn_row_sums='per_device' needs config.swav."
                     'sinkhorn_groups >= 1: the GPU count of the reference run (mmselfsup: 8).')
  return groups


def queue_length(config) -> int:
  """config.swav.queue_length reduced to a multiple of the global batch (reference)."""
  length = int(config.swav.get('queue_length', 0))
  return length - length % config.batch_size


def check_config(config):
  sw, batch = config.swav, config.batch_size
  num_views = sum(config.augment.num_crops) if config.augment.get('num_crops') else 2
  crops = tuple(sw.crops_for_assign)
  if not crops or len(set(crops)) != len(crops) or not all(0 <= c < num_views for c in crops):
    raise ValueError(f'config.swav.crops_for_assign={crops} must be distinct crop indices in '
                     f'[0, {num_views}) (the augment recipe makes {num_views} crops).')
  groups = sinkhorn_groups(config)
  if batch % groups:
    raise ValueError(f'config.batch_size={batch} is not divisible by config.swav.sinkhorn_groups='
                     f'{groups}.')
  length = int(sw.get('queue_length', 0))
  if length < 0 or (length and queue_length(config) == 0):
    raise ValueError(f'config.swav.queue_length={length} must be 0 (no queue) or at least '
                     f'config.batch_size={batch}; it is rounded down to a multiple of the batch.')
  for name in ('temperature', 'epsilon'):
    if not sw[name] > 0:
      raise ValueError(f'config.swav.{name} must be > 0, got {sw[name]}.')


def init_method_state(config, rng, num_train_examples):
  del rng
  check_config(config)
  steps_per_epoch = max(num_train_examples // config.batch_size, 1)
  start = int(round(config.swav.get('queue_start_epoch', 0) * steps_per_epoch))
  num_assign = len(config.swav.crops_for_assign)
  length = queue_length(config)
  # No queue is None rather than a zero-length array (checkpoints cannot store empty arrays).
  queue = jnp.zeros((num_assign, length, config.swav.dim), jnp.float32) if length else None
  return SwAVState(queue=queue, queue_start_step=jnp.asarray(start, jnp.int32))


def frozen_params(config, step) -> Dict[str, jax.Array]:
  """Prototypes skip their update while step < freeze_prototypes_niters (FB: grad = None)."""
  return {'prototypes': step < config.swav.get('freeze_prototypes_niters', 0)}


# ------------------------------------------------------------------------------------------------
# Codes, queue and loss.
# ------------------------------------------------------------------------------------------------
def _grouped_sinkhorn(scores, *, epsilon, num_iters):
  """[G, n, K] -> [G, n, K]: each group equipartitioned on its own (global mode within it)."""
  solve = functools.partial(sinkhorn_knopp, epsilon=epsilon, num_iters=num_iters)
  return jax.vmap(solve)(scores)


def assignment_codes(batch_scores, queue_rows, prototypes, use_queue, *, epsilon, num_iters,
                     groups=1):
  """Sinkhorn codes of one assignment crop's batch rows (no gradient).

  Args:
    batch_scores: [B, K] scores of the crop.
    queue_rows: [L, D] stored embeddings (L may be 0), G blocks of L/G rows, newest first.
    prototypes: [D, K] current (normalised) prototypes; queue scores are recomputed with them.
    use_queue: bool scalar; if True the queue rows join the Sinkhorn problem.
    epsilon, num_iters: Sinkhorn settings.
    groups: G row groups with separate prototype marginals (1 = global, FB).

  Returns:
    [B, K] float32 codes, rows summing to 1.
  """
  batch, num_prototypes = batch_scores.shape
  length = queue_rows.shape[0]
  solve = functools.partial(_grouped_sinkhorn, epsilon=epsilon, num_iters=num_iters)
  per_group = batch // groups
  batch_scores = jax.lax.stop_gradient(batch_scores).astype(jnp.float32)
  grouped_batch = batch_scores.reshape(groups, per_group, num_prototypes)

  def without_queue():
    return solve(grouped_batch).reshape(batch, num_prototypes)

  if length == 0:
    return without_queue()

  def with_queue():
    queue_scores = jnp.dot(jax.lax.stop_gradient(queue_rows), jax.lax.stop_gradient(prototypes),
                           precision=jax.lax.Precision.HIGHEST)
    rows = jnp.concatenate(  # per group: its queue rows, then its batch rows (reference order)
        [queue_scores.reshape(groups, length // groups, num_prototypes), grouped_batch], axis=1)
    return solve(rows)[:, -per_group:].reshape(batch, num_prototypes)

  return jax.lax.cond(use_queue, with_queue, without_queue)


def push_queue(queue_rows, embeddings, *, groups=1):
  """Newest-first FIFO: each of the G blocks shifts by its B/G rows and takes them at its front."""
  length, dim = queue_rows.shape
  blocks = queue_rows.reshape(groups, length // groups, dim)
  new = jax.lax.stop_gradient(embeddings).astype(queue_rows.dtype).reshape(groups, -1, dim)
  keep = length // groups - new.shape[1]
  return jnp.concatenate([new, blocks[:, :keep]], axis=1).reshape(length, dim)


def swav_loss(scores, z, prototypes, method_state, step, *, crops_for_assign: Sequence[int],
              temperature, epsilon, num_iters, groups=1):
  """Swapped-prediction loss of one step, the new queue and metrics.

  Args:
    scores: [V, B, K] z . C^T of every crop (gradient flows).
    z: [V, B, D] unit embeddings (only the assignment crops' rows go to the queue, detached).
    prototypes: [D, K] normalised prototype kernel.
    method_state: SwAVState.
    step: int32 scalar, the step being taken (0-based).
    crops_for_assign, temperature, epsilon, num_iters, groups: see the module docstring.

  Returns:
    (loss, new_queue [A, L, D] (None if there is no queue), metrics dict).
  """
  queue = method_state.queue
  has_queue = queue is not None and queue.shape[1] > 0
  dim = z.shape[-1]
  # FB checks the queue of the first assignment crop; all crops' queues fill in lockstep.
  in_use = jnp.any(queue[0, -1] != 0) if has_queue else jnp.asarray(False)
  codes = jnp.stack([
      assignment_codes(scores[crop], queue[i] if has_queue else jnp.zeros((0, dim)), prototypes,
                       in_use, epsilon=epsilon, num_iters=num_iters, groups=groups)
      for i, crop in enumerate(crops_for_assign)])
  loss = swapped_prediction_loss(scores, codes, crops_for_assign, temperature)
  if has_queue:
    pushed = jnp.stack([push_queue(queue[i], z[crop], groups=groups)
                        for i, crop in enumerate(crops_for_assign)])
    queue = jnp.where(step >= method_state.queue_start_step, pushed, queue)
  ln_k = math.log(scores.shape[-1])
  metrics = {**code_entropy_stats(codes), 'queue_in_use': in_use.astype(jnp.float32),
             'loss_over_ln_k': loss / ln_k,
             'collapse_flag': (jnp.abs(loss / ln_k - 1.0) < COLLAPSE_TOLERANCE).astype(
                 jnp.float32)}
  return loss, queue, metrics


def loss_fn(config, model, params, state, views, batch, rng):
  del batch, rng
  sw = config.swav
  out, updates = model.apply({'params': params, 'batch_stats': state.batch_stats}, list(views),
                             train=True, mutable=['batch_stats'])
  loss, queue, metrics = swav_loss(
      out['scores'], out['z'], params['prototypes']['kernel'], state.method_state, state.step,
      crops_for_assign=tuple(sw.crops_for_assign), temperature=sw.temperature,
      epsilon=sw.epsilon, num_iters=sw.sinkhorn_iterations, groups=sinkhorn_groups(config))
  return loss, {'batch_stats': updates['batch_stats'], 'queue': queue, 'metrics': metrics}


def update_state(config, state, aux):
  del config
  return state.replace(method_state=state.method_state.replace(queue=aux['queue']))


METHOD = Method(name='swav', create_model=create_model, init_method_state=init_method_state,
                loss_fn=loss_fn, update_state=update_state, init_variables=init_variables,
                frozen_params=frozen_params, prepare_params=prepare_params)

__all__ = ['METHOD', 'SwAVModel', 'SwAVState', 'Prototypes', 'assignment_codes', 'push_queue',
           'swav_loss', 'normalize_prototypes']
