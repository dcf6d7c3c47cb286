"""SwAV method: codes/queue vs numpy, loss by hand, freezing, queue entry, 1 vs 8 devices, CLI."""
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_jax import config_utils, trainer
from ssl_jax.data import pipeline, views
from ssl_jax.methods import get_method, swav

from trainer_utils import REPO, assert_trees_equal, build_trainer, tiny_config


def _np_sinkhorn(scores, epsilon=0.05, num_iters=3):
  """facebookresearch/swav `distributed_sinkhorn` on one device, float64."""
  q = np.exp(np.asarray(scores, np.float64) / epsilon).T  # (K, n)
  num_prototypes, n = q.shape
  q /= q.sum()
  for _ in range(num_iters):
    q /= q.sum(axis=1, keepdims=True)
    q /= num_prototypes
    q /= q.sum(axis=0, keepdims=True)
    q /= n
  return (q * n).T


# Method-level tests compile without XLA's backend optimisations: on a loaded 2-core CPU the
# optimised compile of a (tiny) model's init takes ~10x longer than the unoptimised one, and these
# tests check values, not speed.
_jit = functools.partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0})


def _unit(x, axis=-1):
  return x / np.linalg.norm(x, axis=axis, keepdims=True)


def _swav_config(**overrides):
  """tiny_config for SwAV: 16-px digits, width-4 ResNet, batch 16, crops 2x16 + 2x8."""
  base = {'augment.sizes': (16, 8), 'swav.num_prototypes': 20, 'swav.dim': 8,
          'swav.hidden_dim': 16}
  return tiny_config('swav', **{**base, **overrides})


# ------------------------------------------------------------------------------------------------
# Codes and queue kernels (no network).
# ------------------------------------------------------------------------------------------------
def test_assignment_codes_match_numpy_with_and_without_queue():
  rng = np.random.RandomState(0)
  batch, length, dim, k = 8, 12, 5, 7
  z = _unit(rng.randn(batch, dim))
  queue = _unit(rng.randn(length, dim))
  protos = _unit(rng.randn(dim, k), axis=0)
  scores = z @ protos
  kw = dict(epsilon=0.05, num_iters=3)
  args = (jnp.asarray(scores, jnp.float32), jnp.asarray(queue, jnp.float32),
          jnp.asarray(protos, jnp.float32))
  off = swav.assignment_codes(*args, jnp.asarray(False), **kw)
  np.testing.assert_allclose(off, _np_sinkhorn(scores), atol=1e-5)
  # In use: queue scores recomputed with the prototypes, prepended, only batch rows kept.
  on = swav.assignment_codes(*args, jnp.asarray(True), **kw)
  expected = _np_sinkhorn(np.concatenate([queue @ protos, scores]))[-batch:]
  np.testing.assert_allclose(on, expected, atol=1e-5)
  assert np.abs(np.asarray(on) - np.asarray(off)).max() > 1e-3
  # mmselfsup per-device row sums, 2 groups: group g = its 6 queue rows then its 4 batch rows.
  grouped = swav.assignment_codes(*args, jnp.asarray(True), groups=2, **kw)
  for g in range(2):
    rows = np.concatenate([queue[6 * g:6 * g + 6] @ protos, scores[4 * g:4 * g + 4]])
    np.testing.assert_allclose(grouped[4 * g:4 * g + 4], _np_sinkhorn(rows)[-4:], atol=1e-5)


def test_push_queue_newest_first_per_group():
  queue = jnp.arange(8, dtype=jnp.float32)[:, None] + 1  # rows 1..8
  new = jnp.array([[10.], [20.]])
  np.testing.assert_array_equal(swav.push_queue(queue, new)[:, 0], [10, 20, 1, 2, 3, 4, 5, 6])
  # Two groups (reference GPUs) of 4 rows, each takes its own batch row at its front.
  np.testing.assert_array_equal(swav.push_queue(queue, new, groups=2)[:, 0],
                                [10, 1, 2, 3, 20, 5, 6, 7])


def test_queue_fills_from_start_step_and_enters_only_once_full():
  rng = np.random.RandomState(1)
  num_views, batch, dim, k = 3, 4, 6, 5
  z = jnp.asarray(_unit(rng.randn(num_views, batch, dim)), jnp.float32)
  protos = jnp.asarray(_unit(rng.randn(dim, k), axis=0), jnp.float32)
  scores = jnp.einsum('vbd,dk->vbk', z, protos)
  state = swav.SwAVState(queue=jnp.zeros((2, 2 * batch, dim)),
                         queue_start_step=jnp.asarray(1, jnp.int32))
  loss_of = _jit(functools.partial(swav.swav_loss, crops_for_assign=(0, 1), temperature=0.1,
                                   epsilon=0.05, num_iters=3))
  no_queue = swav.SwAVState(queue=None, queue_start_step=state.queue_start_step)
  plain_loss, _, _ = loss_of(scores, z, protos, no_queue, jnp.asarray(0))
  # Embeddings pushed at each step (distinct from the batch: a queue holding copies of the batch
  # rows would leave the codes unchanged).
  pushed = [jnp.asarray(_unit(rng.randn(num_views, batch, dim)), jnp.float32) for _ in range(4)]
  in_use = []
  for step in range(4):
    loss, queue, metrics = loss_of(scores, pushed[step], protos, state, jnp.asarray(step))
    in_use.append(float(metrics['queue_in_use']))
    if step == 0:  # before the start step nothing is written
      np.testing.assert_array_equal(queue, 0.0)
    if in_use[-1] == 0.0:  # a queue not yet full leaves the loss as without one
      np.testing.assert_allclose(loss, plain_loss, rtol=1e-6)
    else:
      assert abs(float(loss) - float(plain_loss)) > 1e-4
    state = state.replace(queue=queue)
  assert in_use == [0.0, 0.0, 0.0, 1.0]  # written at steps 1 and 2, full from step 3
  # Written at steps 1, 2, 3 (newest first); step 1's rows were shifted out by step 3's.
  np.testing.assert_array_equal(state.queue[0], np.concatenate([pushed[3][0], pushed[2][0]]))
  np.testing.assert_array_equal(state.queue[1], np.concatenate([pushed[3][1], pushed[2][1]]))


# ------------------------------------------------------------------------------------------------
# Model and loss at the method level.
# ------------------------------------------------------------------------------------------------
def test_loss_equals_hand_computed_two_crop_case():
  config = _swav_config(**{'augment.sizes': (16,), 'augment.num_crops': (2,),
                           'augment.min_scales': (0.14,), 'augment.max_scales': (1.0,),
                           'swav.queue_length': 0})
  method = get_method('swav')
  model = method.create_model(config)
  images = jnp.asarray(np.random.RandomState(2).randint(0, 256, (8, 16, 16, 3)), jnp.uint8)
  crops = _jit(views.build_view_fn(config.augment))(jax.random.PRNGKey(0), images)
  variables = _jit(functools.partial(method.init_variables, config, model))(
      jax.random.PRNGKey(1), crops)
  params = method.prepare_params(config, variables['params'])
  np.testing.assert_allclose(np.linalg.norm(params['prototypes']['kernel'], axis=0), 1.0,
                             rtol=1e-6)
  state = trainer.TrainState(
      step=jnp.asarray(0), params=params, batch_stats=variables['batch_stats'], opt_state=None,
      ema_params={}, ema_batch_stats={}, rng=None,
      method_state=method.init_method_state(config, None, 100))

  @_jit
  def loss_and_outputs(state, crops):
    loss, aux = method.loss_fn(config, model, state.params, state, crops, None, None)
    out, _ = model.apply({'params': state.params, 'batch_stats': state.batch_stats}, crops,
                         train=True, mutable=['batch_stats'])
    return loss, aux, out

  loss, aux, out = loss_and_outputs(state, crops)
  z = np.asarray(out['z'], np.float64)
  np.testing.assert_allclose(np.linalg.norm(z, axis=-1), 1.0, rtol=1e-5)
  scores = z @ np.asarray(params['prototypes']['kernel'], np.float64)
  np.testing.assert_allclose(out['scores'], scores, atol=1e-5)
  log_p = scores / 0.1 - np.log(np.exp(scores / 0.1).sum(-1, keepdims=True))
  codes = [_np_sinkhorn(scores[0]), _np_sinkhorn(scores[1])]
  cross_entropy = lambda q, lp: -(q * lp).sum(-1).mean()
  expected = 0.5 * (cross_entropy(codes[0], log_p[1]) + cross_entropy(codes[1], log_p[0]))
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  assert set(aux['metrics']) >= {'code_entropy', 'collapse_flag', 'queue_in_use'}
  assert 0 < float(aux['metrics']['code_entropy']) <= np.log(20) + 1e-5


def test_multi_crop_forward_keeps_view_order():
  """Eval mode (fixed BN): the grouped batch-major forward equals a per-crop forward."""
  config = _swav_config()
  method = get_method('swav')
  model = method.create_model(config)
  images = jnp.asarray(np.random.RandomState(3).randint(0, 256, (4, 16, 16, 3)), jnp.uint8)
  crops = _jit(views.build_view_fn(config.augment))(jax.random.PRNGKey(0), images)
  variables = _jit(functools.partial(method.init_variables, config, model))(
      jax.random.PRNGKey(1), crops)
  apply = _jit(functools.partial(model.apply, train=False))
  out = apply(variables, crops)
  assert out['scores'].shape == (4, 4, 20) and out['pooled'].shape == (4, 4, 32)
  flat = [view for group in crops for view in group]
  for v, view in enumerate(flat):
    single = apply(variables, view)
    np.testing.assert_allclose(out['scores'][v], single['scores'], atol=1e-5)
    np.testing.assert_allclose(out['pooled'][v], single['pooled'], atol=1e-5)


def test_bad_config_gives_clear_errors():
  method = get_method('swav')
  with pytest.raises(ValueError, match='crops_for_assign'):
    method.create_model(_swav_config(**{'swav.crops_for_assign': (0, 9)}))
  with pytest.raises(ValueError, match='queue_length'):
    method.init_method_state(_swav_config(**{'swav.queue_length': 8}), None, 100)
  with pytest.raises(ValueError, match='sinkhorn_groups'):
    method.create_model(_swav_config(**{'swav.sinkhorn_row_sums': 'per_device',
                                        'swav.sinkhorn_groups': 3}))
  with pytest.raises(ValueError, match='sinkhorn_row_sums'):
    method.create_model(_swav_config(**{'swav.sinkhorn_row_sums': 'local'}))
  state = method.init_method_state(_swav_config(**{'swav.queue_length': 40,
                                                   'swav.queue_start_epoch': 2.0}), None, 100)
  assert state.queue.shape == (2, 32, 8)  # rounded down to a multiple of the batch (16)
  assert int(state.queue_start_step) == 2 * (100 // 16)
  assert method.init_method_state(_swav_config(**{'swav.queue_length': 0}), None, 100).queue is None


def test_imagenet_config_is_the_reference_recipe():
  c = config_utils.load_config_file(os.path.join(REPO, 'configs', 'swav.py'))
  assert (c.batch_size, c.num_epochs, c.model.name, c.model.bn_groups) == (256, 200, 'resnet50', 1)
  assert tuple(c.augment.sizes) == (224, 96) and tuple(c.augment.num_crops) == (2, 6)
  sw = c.swav
  assert (sw.num_prototypes, sw.dim, sw.temperature, sw.epsilon, sw.sinkhorn_iterations) == (
      3000, 128, 0.1, 0.05, 3)
  assert (sw.queue_length, sw.queue_start_epoch, sw.freeze_prototypes_niters) == (3840, 15, 5005)
  o = c.optimizer
  assert (o.name, o.lr, o.final_lr, o.weight_decay, o.warmup_epochs) == ('lars', 0.6, 6e-4, 1e-6, 0)
  for variant in ('smoke', 'cifar10', 'cifar10_cpu'):
    v = config_utils.load_config_file(os.path.join(REPO, 'configs', f'swav.py:{variant}'))
    get_method('swav').create_model(v)  # passes the config checks


# ------------------------------------------------------------------------------------------------
# The real trainer step.
# ------------------------------------------------------------------------------------------------
# Queue of 2 batches filling from step 0, prototypes frozen for 2 steps, weight decay on.
_STEP_CONFIG = {'swav.queue_length': 32, 'swav.queue_start_epoch': 0.0,
                'swav.freeze_prototypes_niters': 2, 'optimizer.weight_decay': 1e-3}


@functools.lru_cache(maxsize=None)
def _run_steps(num_devices, num_steps=3):
  """Initial state and the (state, metrics) after each of `num_steps` real train steps."""
  config = _swav_config(**_STEP_CONFIG)
  mesh, source, state, step, _ = build_trainer(config, jax.devices()[:num_devices])
  data = pipeline.TrainIterator(source, global_batch_size=config.batch_size, seed=0, mesh=mesh)
  history = [(jax.device_get(state), None)]
  for _ in range(num_steps):
    state, metrics = step(state, next(data))
    history.append((jax.device_get(state), jax.device_get(metrics)))
  data.close()
  return history


def test_frozen_prototypes_do_not_move_while_backbone_does():
  history = _run_steps(1)
  init = history[0][0]
  protos = lambda s: np.asarray(s.params['prototypes']['kernel'])
  momentum = lambda s: np.asarray(s.opt_state.momentum['prototypes']['kernel'])
  stem = lambda s: np.asarray(s.params['backbone']['stem_conv']['kernel'])
  for state, _ in history[1:3]:  # steps 0 and 1: frozen
    # Only the per-step re-normalisation of unit vectors touches them (float rounding).
    np.testing.assert_allclose(protos(state), protos(init), atol=1e-6, rtol=0)
    np.testing.assert_array_equal(momentum(state), 0.0)
    assert np.abs(stem(state) - stem(init)).max() > 1e-4
  after = history[3][0]  # step 2: free again; the same update rule now moves them
  assert np.abs(protos(after) - protos(init)).max() > 1e-4
  assert np.abs(momentum(after)).max() > 0


def test_queue_enters_the_trainer_step_only_once_full():
  history = _run_steps(1)
  queue_in_use = [float(m['queue_in_use']) for _, m in history[1:]]
  assert queue_in_use == [0.0, 0.0, 1.0]
  filled = lambda s: (np.abs(np.asarray(s.method_state.queue)).sum(-1) > 0).sum(-1).tolist()
  assert [filled(s) for s, _ in history] == [[0, 0], [16, 16], [32, 32], [32, 32]]
  first, second = history[1][0].method_state.queue, history[2][0].method_state.queue
  np.testing.assert_array_equal(second[:, 16:], first[:, :16])  # shifted, newest first
  np.testing.assert_allclose(np.linalg.norm(second, axis=-1), 1.0, rtol=1e-5)
  for _, metrics in history[1:]:
    assert np.isfinite(metrics['loss']) and metrics['collapse_flag'] in (0.0, 1.0)


def test_same_step_on_1_and_8_devices():
  if jax.device_count() < 8:
    pytest.skip('needs 8 (fake) devices')
  one, eight = _run_steps(1), _run_steps(8)
  for (s1, m1), (s8, m8) in zip(one[1:], eight[1:]):
    np.testing.assert_allclose(m1['loss'], m8['loss'], atol=1e-5)
    assert m1['queue_in_use'] == m8['queue_in_use']
  s1, s8 = one[-1][0], eight[-1][0]
  for a, b in ((s1.params, s8.params), (s1.batch_stats, s8.batch_stats),
               (s1.method_state.queue, s8.method_state.queue),
               (s1.opt_state.momentum, s8.opt_state.momentum)):
    assert_trees_equal(a, b, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# End to end.
# ------------------------------------------------------------------------------------------------
def test_smoke_config_runs_offline_from_the_cli(tmp_path):
  workdir = str(tmp_path / 'smoke')
  cmd = [sys.executable, '-m', 'ssl_jax.main', '--config=configs/swav.py:smoke',
         f'--workdir={workdir}', '--config.num_steps=4', '--config.model.width=4',
         # No queue here (the trainer-step tests cover it): checkpoints must store queue=None.
         '--config.batch_size=16', '--config.swav.queue_length=0',
         '--config.checkpoint_every_steps=2']
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2')
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  with open(os.path.join(workdir, 'summary.json')) as f:
    summary = json.load(f)
  assert summary['method'] == 'swav' and summary['step'] == 4
  assert 0.0 <= summary['knn_top1'] <= 1.0 and np.isfinite(summary['loss'])
