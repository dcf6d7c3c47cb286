"""The single trainer: one jitted, donated train step for every method.

Sections: state -> train step -> features/online kNN -> loop. The method (ssl_jax/methods/*.py)
supplies the model, loss and state update; everything else lives here: a Mesh over all devices
with a `data` axis (batch sharded, state replicated), state built with `jax.eval_shape` and born
sharded, augmentation on device inside the step, RNG as fold_in(seed_key, step), orbax
checkpoints with automatic resume, a NaN/inf guard that never checkpoints a bad state, TensorBoard
logging of loss/lr/l2 norms/img/s, online weighted kNN, and `summary.json` at the end.
"""
import json
import os
import time
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ssl_jax import checkpointing, metric_writers, optim, sharding
from ssl_jax.data import pipeline, sources, views
from ssl_jax.methods import get_method


# ------------------------------------------------------------------------------------------------
# Train state.
# ------------------------------------------------------------------------------------------------
@flax.struct.dataclass
class TrainState:
  step: jax.Array            # int32 scalar; also the data position (one global batch per step)
  params: Any
  batch_stats: Any
  opt_state: Any
  ema_params: Any            # momentum encoder ({} for methods without one)
  ema_batch_stats: Any
  method_state: Any          # queue / bank / labels / centroids / ... (the method's dataclass)
  rng: jax.Array             # the run's root key; per-step keys are fold_in(rng, step)


def create_train_state(config, method, model, tx, view_fn, image_shape, num_train, mesh):
  """Returns (state, shardings), the state created directly with its (replicated) sharding."""
  init_batch = max(config.model.get('bn_groups', 1), 1) * 2

  def init(seed_key):
    init_rng, state_rng, view_rng = jax.random.split(seed_key, 3)
    images = jnp.zeros((init_batch,) + tuple(image_shape), jnp.uint8)
    sample_views = view_fn(view_rng, images)
    variables = method.init_variables(config, model, init_rng, sample_views)
    params, batch_stats = variables['params'], variables['batch_stats']
    ema_params = jax.tree.map(jnp.copy, params) if method.uses_ema else {}
    ema_stats = jax.tree.map(jnp.copy, batch_stats) if method.uses_ema else {}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                      opt_state=tx.init(params), ema_params=ema_params, ema_batch_stats=ema_stats,
                      method_state=method.init_method_state(config, state_rng, num_train),
                      rng=seed_key)

  seed_key = jax.random.PRNGKey(config.seed)
  abstract = jax.eval_shape(init, seed_key)
  shardings = jax.tree.map(lambda _: sharding.replicated(mesh), abstract)
  state = jax.jit(init, out_shardings=shardings)(seed_key)
  return state, shardings


# ------------------------------------------------------------------------------------------------
# Train step.
# ------------------------------------------------------------------------------------------------
def _freeze(tx, new_params, old_params, new_opt, old_opt, frozen):
  """Keeps frozen top-level parameters *and their optimiser state* untouched (SwAV prototypes:
  the reference skips their update entirely, so weight decay and momentum must not move them)."""
  mask = {k: jax.tree.map(lambda _, f=frozen.get(k, False): jnp.asarray(f), v)
          for k, v in new_params.items()}
  pick = lambda m, new, old: jnp.where(m, old, new)
  params = jax.tree.map(pick, mask, new_params, old_params)
  opt_mask = optax.tree_map_params(
      tx, lambda _, m: m, new_opt, mask,
      transform_non_params=lambda v: jax.tree.map(lambda _: jnp.asarray(False), v))
  opt_state = jax.tree.map(pick, opt_mask, new_opt, old_opt)
  return params, opt_state


class Built(NamedTuple):
  """What `build` makes for a method: the pieces a run, a test or a benchmark needs."""
  model: Any
  tx: Any
  schedule: Any
  view_fn: Any
  state: Any           # the initial, sharded TrainState
  train_step: Any      # jitted, state-donating step


def build(config, method, mesh, image_shape, num_train, total_steps, steps_per_epoch) -> Built:
  """Model, optimiser, schedule, augmentation, initial state and jitted step for `config`.

  Args:
    config: the run's ConfigDict.
    method: a Method (`get_method(config.method)` or a benchmark's own).
    mesh: the device mesh.
    image_shape: (H, W, C) of the stored training images.
    num_train: number of training examples (InterCLR's bank has a row per example).
    total_steps, steps_per_epoch: the schedule's length and epoch.
  """
  schedule = optim.lr_schedule(config.optimizer, total_steps, steps_per_epoch)
  tx = optim.make_optimizer(config.optimizer, schedule)
  model = method.create_model(config)
  view_fn = views.build_view_fn(config.augment)
  state, shardings = create_train_state(config, method, model, tx, view_fn, image_shape,
                                        num_train, mesh)
  train_step = make_train_step(config, method, model, tx, view_fn, schedule, mesh, shardings)
  return Built(model, tx, schedule, view_fn, state, train_step)


def make_train_step(config, method, model, tx, view_fn, schedule, mesh, state_shardings):
  def train_step(state, batch):
    if method.prepare_params is not None:  # e.g. SwAV re-normalises its prototypes every step
      state = state.replace(params=method.prepare_params(config, state.params))
    step_rng = jax.random.fold_in(state.rng, state.step)
    view_rng, loss_rng = jax.random.split(step_rng)
    crops = view_fn(view_rng, batch['image'])

    def loss_of(params):
      return method.loss_fn(config, model, params, state, crops, batch, loss_rng)

    (loss, aux), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if method.frozen_params is not None:
      params, opt_state = _freeze(tx, params, state.params, opt_state, state.opt_state,
                                  method.frozen_params(config, state.step))
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              batch_stats=aux['batch_stats'])
    new_state = method.update_state(config, new_state, aux)
    metrics = {'loss': loss, 'lr': schedule(state.step), 'l2_grads': optax.tree.norm(grads),
               'l2_params': optax.tree.norm(params),
               'l2_updates': optax.tree.norm(jax.tree.map(jnp.subtract, params, state.params)),
               **aux.get('metrics', {})}
    return new_state, metrics

  return jax.jit(train_step,
                 in_shardings=(state_shardings, sharding.batch_sharded(mesh)),
                 out_shardings=(state_shardings, sharding.replicated(mesh)),
                 donate_argnums=0)


# ------------------------------------------------------------------------------------------------
# Features and online kNN.
# ------------------------------------------------------------------------------------------------
class Context:
  """What host-side method hooks (InterCLR's initial clustering) may use."""

  def __init__(self, config, model, mesh, train_source, eval_view):
    self.config, self.model, self.mesh = config, model, mesh
    self.train_source, self.eval_view = train_source, eval_view
    self._fns = {}

  def extract(self, params, batch_stats, source=None, output='pooled'):
    """Eval-mode features of every example of `source` (default: the train split), in index order.

    Returns (features [N, C] float32 numpy, labels [N] int32 numpy).
    """
    from ssl_jax.eval import features  # pylint: disable=g-import-not-at-top
    source = self.train_source if source is None else source
    if output not in self._fns:
      def fn(variables, images):
        return {output: self.model.apply(variables, self.eval_view(images), train=False)[output]}
      self._fns[output] = jax.jit(fn, out_shardings=sharding.batch_sharded(self.mesh))
    feats, labels = features.extract_in_index_order(
        self._fns[output], {'params': params, 'batch_stats': batch_stats}, source,
        self.config.get('eval_batch_size', self.config.batch_size), self.mesh)
    return feats[output].astype(np.float32), labels


def knn_eval(ctx, state, eval_source, knn_cfg):
  from ssl_jax.eval import knn  # pylint: disable=g-import-not-at-top
  train_f, train_y = ctx.extract(state.params, state.batch_stats)
  test_f, test_y = ctx.extract(state.params, state.batch_stats, source=eval_source)
  ks = tuple(knn_cfg.get('ks', (knn_cfg.get('k', 20),)))
  return knn.knn_eval(train_f, train_y, test_f, test_y, eval_source.num_classes, ks=ks,
                      temperature=knn_cfg.get('temperature', 0.07))


# ------------------------------------------------------------------------------------------------
# Loop.
# ------------------------------------------------------------------------------------------------
def _online_knn(ctx, state, eval_source, config, writer, step):
  knn = knn_eval(ctx, state, eval_source, config.knn)
  writer.write_scalars(step, knn)
  metric_writers.log(f'step {step}: ' + ' '.join(f'{k}={v:.4f}' for k, v in knn.items()))
  return knn


def _check_finite(history, last_good_step, directory):
  for step, metrics in history:
    loss, grads = float(metrics['loss']), float(metrics['l2_grads'])
    if not (np.isfinite(loss) and np.isfinite(grads)):
      where = (f'the last good checkpoint (step {last_good_step}) is kept in {directory}'
               if last_good_step else 'no checkpoint had been written yet')
      raise FloatingPointError(
          f'Non-finite loss/gradient at step {step + 1} (loss={loss}, l2_grads={grads}); training '
          f'stopped and {where}. Lower the learning rate, use float32 (config.model.dtype), or '
          'check the input data; rerunning on the same --workdir resumes from that checkpoint.')


def write_summary(workdir, summary):
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'summary.json'), 'w', encoding='utf-8') as f:
      json.dump(summary, f, indent=1, sort_keys=True)
  metric_writers.log('summary ' + json.dumps(summary, sort_keys=True))


def train_and_evaluate(config, workdir: str, mesh=None) -> dict:
  """Pretrains `config.method`, resuming from `workdir` if it holds a checkpoint."""
  mesh = sharding.make_mesh() if mesh is None else mesh
  sharding.check_batch_size(config.batch_size, mesh)
  method = get_method(config.method)
  train_source = sources.get_source(config.data, config.data.train_split)
  eval_source = sources.get_source(config.data, config.data.eval_split)
  steps_per_epoch = len(train_source) // config.batch_size
  if steps_per_epoch == 0:
    raise ValueError(f'config.batch_size={config.batch_size} exceeds the {len(train_source)} '
                     f'examples of {train_source.name}.')
  total_steps = config.get('num_steps') or int(config.num_epochs * steps_per_epoch)
  # stop_at_step splits a run into several jobs (wall-time limits): it checkpoints and returns
  # early; the next job on the same workdir resumes with the identical schedule.
  stop_at = min(config.get('stop_at_step', 0) or total_steps, total_steps)
  built = build(config, method, mesh, train_source.image_shape, len(train_source), total_steps,
                steps_per_epoch)
  state, train_step = built.state, built.train_step
  ctx = Context(config, built.model, mesh, train_source, views.eval_view_fn(config.augment))

  os.makedirs(workdir, exist_ok=True)
  ckpt = checkpointing.Checkpointer(workdir, config.get('keep_checkpoints', 2))
  start = ckpt.latest_step() or 0
  if start:
    state, _ = ckpt.restore(start, state, config)
    metric_writers.log(f'Resumed from {ckpt.directory}/{start}.')
  elif method.prepare is not None:
    state = method.prepare(config, ctx, state)
  meta = lambda step: {'config': config.to_json(), 'data_position': step,
                       'model_signature': checkpointing.model_signature(config)}

  writer = metric_writers.MetricWriter(workdir, is_main=jax.process_index() == 0)
  writer.write_hparams(config.to_dict())
  progress = metric_writers.Progress(total_steps, start)
  data = pipeline.TrainIterator(train_source, global_batch_size=config.batch_size,
                                seed=config.seed, mesh=mesh, start_step=start,
                                sampler=config.data.get('sampler', 'permutation'))
  log_every = config.get('log_every_steps', 50)
  ckpt_every = config.get('checkpoint_every_steps', 1000)
  eval_every = config.get('eval_every_steps', 0)
  history, last_metrics, last_saved, summary = [], {}, start, {}
  timer_start = timer_step = None
  try:
    for step in range(start, stop_at):
      state, metrics = train_step(state, next(data))
      history.append((step, metrics))
      if method.after_step is not None:
        state = method.after_step(config, ctx, state)
      done = step + 1
      if timer_start is None:  # the first step includes compilation: time from its end
        jax.block_until_ready(metrics['loss'])
        timer_start, timer_step = time.time(), done
      last = done == stop_at
      if done % log_every == 0 or done % ckpt_every == 0 or last:
        _check_finite(history, last_saved, ckpt.directory)
        last_metrics = {k: float(v) for k, v in history[-1][1].items()}
        elapsed = time.time() - timer_start
        if done > timer_step and elapsed > 0:
          last_metrics['images_per_sec'] = (done - timer_step) * config.batch_size / elapsed
        history = []
        writer.write_scalars(done, last_metrics)
        metric_writers.log(progress.line(done, {k: last_metrics[k] for k in last_metrics
                                                if k in ('loss', 'lr', 'images_per_sec')}))
      if done % ckpt_every == 0 or last:
        ckpt.save(done, state, meta(done))
        last_saved = done
      if (eval_every and done % eval_every == 0) or done == total_steps:
        summary.update(_online_knn(ctx, state, eval_source, config, writer, done))
    if start >= total_steps:  # nothing left to train: still report the final metrics
      summary.update(_online_knn(ctx, state, eval_source, config, writer, start))
  finally:
    data.close()
    writer.close()
    ckpt.close()
  k = config.knn.get('k', 20)
  summary.update({'step': int(jax.device_get(state.step)), 'loss': last_metrics.get('loss'),
                  'images_per_sec': last_metrics.get('images_per_sec'),
                  'knn_top1': summary.get(f'knn_top1@{k}'), 'method': config.method})
  write_summary(workdir, summary)
  return summary
