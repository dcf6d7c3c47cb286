"""Shared helpers for trainer-level tests: a tiny config and reading a checkpoint back."""
import os

import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from ssl_jax import config_utils

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(name='mocov2', variant='smoke', **overrides):
  """The smoke variant shrunk further: 16 px digits, width-4 ResNet, batch 16."""
  c = config_utils.load_config_file(os.path.join(REPO, 'configs', f'{name}.py') + f':{variant}')
  c.data.image_size = 16
  c.augment.size = 16
  c.model.width = 4
  c.batch_size = 16
  c.eval_batch_size = 400
  c.log_every_steps = 2
  c.checkpoint_every_steps = 3
  c.num_steps = 6
  if 'moco' in c:
    c.moco.queue_size = 64
  for key, value in overrides.items():
    config_utils.set_path(c, key, value)
  return c


def build_trainer(config, devices):
  """Everything the trainer builds for `config` on a mesh over `devices`, without running it.

  Returns (mesh, source, state, train_step, ctx): the train split, the initial (sharded) state,
  the jitted step (10-step schedule) and the feature-extraction context.
  """
  from ssl_jax import sharding, trainer  # pylint: disable=g-import-not-at-top
  from ssl_jax.data import sources, views  # pylint: disable=g-import-not-at-top
  from ssl_jax.methods import get_method  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh(devices)
  source = sources.get_source(config.data, 'train')
  built = trainer.build(config, get_method(config.method), mesh, source.image_shape, len(source),
                        10, 10)
  ctx = trainer.Context(config, built.model, mesh, source, views.eval_view_fn(config.augment))
  return mesh, source, built.state, built.train_step, ctx


def read_state(workdir, step=None):
  """The saved TrainState of `workdir` as a nested dict of numpy arrays."""
  mngr = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'), item_names=('state', 'meta'),
                               options=ocp.CheckpointManagerOptions(read_only=True))
  step = mngr.latest_step() if step is None else step
  state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))['state']
  return step, state


def assert_trees_equal(a, b, atol=0.0):
  import jax  # pylint: disable=g-import-not-at-top
  flat_a, tree_a = jax.tree.flatten(a)
  flat_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for x, y in zip(flat_a, flat_b):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


def as_config(d):
  return ml_collections.ConfigDict(d)
