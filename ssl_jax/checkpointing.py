"""One orbax CheckpointManager per workdir holding everything needed to continue a run.

Item `state` is the whole TrainState (params, optimiser state, BN stats, EMA params and stats,
method state such as queue/bank/labels/centroids, RNG key, step). Item `meta` is JSON: the config,
the data position and a model signature used to refuse a checkpoint written by another model.
Nothing here ever deletes a checkpoint except orbax's `max_to_keep` rotation of older steps.
"""
import json
import os
from typing import Any, Optional

import jax
import ml_collections
import orbax.checkpoint as ocp


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def model_signature(config) -> dict:
  """What must agree between a checkpoint and the config that resumes it."""
  return {'method': config.method, 'model': config.model.to_dict()}


class Checkpointer:
  """Thin wrapper: save/restore the TrainState plus JSON metadata."""

  def __init__(self, workdir: str, max_to_keep: int = 2):
    self.directory = checkpoint_dir(workdir)
    self.manager = ocp.CheckpointManager(
        self.directory, item_names=('state', 'meta'),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             enable_async_checkpointing=False))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state, meta: dict):
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(meta)), force=True)
    self.manager.wait_until_finished()

  def restore_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']

  def restore(self, step: int, abstract_state, config) -> tuple[Any, dict]:
    """Restores `step` into the structure/shardings of `abstract_state`.

    Raises ValueError when the checkpoint was written by a different method/model, RuntimeError
    when it cannot be read; the checkpoint files are left untouched either way.
    """
    where = os.path.join(self.directory, str(step))
    try:
      meta = self.restore_meta(step)
    except Exception as e:  # pylint: disable=broad-except
      raise RuntimeError(
          f'Checkpoint {where} cannot be read ({type(e).__name__}: {e}). It may be corrupt or '
          'partially written. It was left in place: move it aside to resume from an older step, or '
          'use a new --workdir.') from e
    expected, found = model_signature(config), meta.get('model_signature')
    if found != expected:
      raise ValueError(
          f'Checkpoint {where} was written by a different model: it has {found}, the config asks '
          f'for {expected}. Resume with the config that wrote it, or use a new --workdir (the '
          'existing checkpoint is kept).')
    try:
      restored = self.manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    except Exception as e:  # pylint: disable=broad-except
      raise RuntimeError(
          f'Checkpoint {where} does not match the train state this config builds '
          f'({type(e).__name__}: {e}). It was left in place; resume with the config that wrote it '
          'or use a new --workdir.') from e
    return restored['state'], meta

  def close(self):
    self.manager.close()


class Pretrained:
  """A backbone restored from a pretraining workdir for evaluation."""

  def __init__(self, config, backbone, variables, step):
    self.config, self.backbone, self.variables, self.step = config, backbone, variables, step


def load_pretrained(workdir: str, encoder: str = 'online', step: Optional[int] = None) -> Pretrained:
  """Loads the backbone of a pretraining run (the online or the momentum encoder).

  Args:
    workdir: the pretraining --workdir.
    encoder: 'online' (query encoder, what linear/kNN protocols use) or 'momentum' (EMA encoder).
    step: checkpoint step; default the latest.
  Returns:
    Pretrained(config, backbone module, {'params', 'batch_stats'} of the backbone, step).
  """
  from ssl_jax import models  # pylint: disable=g-import-not-at-top
  directory = checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    raise FileNotFoundError(
        f'No checkpoint in {directory}: --config.pretrained must be the --workdir of a finished '
        'or running pretraining job (python -m ssl_jax.main --config=configs/mocov2.py '
        '--workdir=...).')
  manager = ocp.CheckpointManager(directory, item_names=('state', 'meta'),
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'{directory} holds no complete checkpoint yet.')
  meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
  config = ml_collections.ConfigDict(json.loads(meta['config']))
  state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))['state']
  if encoder == 'online':
    params, stats = state['params'], state['batch_stats']
  elif encoder == 'momentum':
    if not state.get('ema_params'):
      raise ValueError(f'The run in {workdir} ({config.method}) has no momentum encoder; use '
                       "encoder='online'.")
    params, stats = state['ema_params'], state['ema_batch_stats']
  else:
    raise ValueError(f"encoder={encoder!r}; use 'online' or 'momentum'.")
  variables = {'params': params['backbone'], 'batch_stats': stats.get('backbone', {})}
  variables = jax.tree.map(jax.numpy.asarray, variables)
  return Pretrained(config, models.build_backbone(config.model), variables, step)
