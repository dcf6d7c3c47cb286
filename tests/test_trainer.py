"""Trainer: 1 vs 8 devices, exact resume, SIGKILL recovery, NaN guard, clear errors."""
import json
import os
import signal
import subprocess
import sys
import time

import shutil

import jax
import numpy as np
import pytest

from ssl_jax import trainer
from ssl_jax.data import pipeline

from trainer_utils import REPO, assert_trees_equal, build_trainer, read_state, tiny_config


def _one_step(config, devices):
  mesh, source, state, step, _ = build_trainer(config, devices)
  batch = next(pipeline.TrainIterator(source, global_batch_size=config.batch_size, seed=0,
                                      mesh=mesh))
  state, metrics = step(state, batch)
  state, metrics2 = step(state, next(pipeline.TrainIterator(
      source, global_batch_size=config.batch_size, seed=0, mesh=mesh, start_step=1)))
  return jax.device_get(state), jax.device_get(metrics), jax.device_get(metrics2)


def test_same_step_on_1_and_8_devices():
  if jax.device_count() < 8:
    pytest.skip('needs 8 (fake) devices')
  config = tiny_config()
  s1, m1, m1b = _one_step(config, jax.devices()[:1])
  s8, m8, m8b = _one_step(config, jax.devices()[:8])
  np.testing.assert_allclose(m1['loss'], m8['loss'], atol=1e-5)
  np.testing.assert_allclose(m1b['loss'], m8b['loss'], atol=1e-5)
  for a, b in ((s1.params, s8.params), (s1.ema_params, s8.ema_params),
               (s1.batch_stats, s8.batch_stats), (s1.method_state.queue, s8.method_state.queue)):
    assert_trees_equal(a, b, atol=1e-5)
  assert int(s1.method_state.queue_ptr) == int(s8.method_state.queue_ptr) == 32


def test_resume_equals_uninterrupted(tmp_path):
  straight = str(tmp_path / 'straight')
  split = str(tmp_path / 'split')
  trainer.train_and_evaluate(tiny_config(), straight)
  first = trainer.train_and_evaluate(tiny_config(stop_at_step=3), split)
  assert first['step'] == 3
  second = trainer.train_and_evaluate(tiny_config(), split)
  assert second['step'] == 6
  (step_a, a), (step_b, b) = read_state(straight), read_state(split)
  assert step_a == step_b == 6
  assert_trees_equal(a, b)  # bit-exact: params, optimiser, EMA, BN stats, queue, ptr, rng
  with open(os.path.join(split, 'summary.json')) as f:
    summary = json.load(f)
  assert {'step', 'loss', 'knn_top1', 'images_per_sec'} <= set(summary)


def test_sigkill_resumes_from_last_checkpoint(tmp_path):
  workdir = str(tmp_path / 'run')
  cmd = [sys.executable, '-m', 'ssl_jax.main', '--config=configs/mocov2.py:smoke',
         f'--workdir={workdir}', '--config.num_steps=400', '--config.checkpoint_every_steps=4',
         '--config.data.image_size=16', '--config.augment.size=16', '--config.model.width=4',
         '--config.batch_size=16', '--config.moco.queue_size=64']
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2')
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  deadline = time.time() + 240
  while time.time() < deadline:
    steps = [int(d) for d in os.listdir(ckpt_dir) if d.isdigit()] if os.path.isdir(ckpt_dir) else []
    if steps and max(steps) >= 8:
      break
    time.sleep(0.5)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at, _ = read_state(workdir)
  assert 8 <= killed_at < 400
  resumed = subprocess.run(cmd[:5] + ['--config.num_steps=%d' % (killed_at + 4)] + cmd[6:],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert f'Resumed from {ckpt_dir}/{killed_at}' in resumed.stdout
  with open(os.path.join(workdir, 'summary.json')) as f:
    assert json.load(f)['step'] == killed_at + 4


@pytest.fixture(scope='module')
def stopped_run(tmp_path_factory):
  """A run checkpointed at step 3 of 6; tests get their own copy of its workdir."""
  workdir = str(tmp_path_factory.mktemp('stopped') / 'run')
  trainer.train_and_evaluate(tiny_config(stop_at_step=3), workdir)
  return workdir


def _copy(run, tmp_path, name):
  dst = str(tmp_path / name)
  shutil.copytree(run, dst)
  return dst


def test_nan_loss_stops_and_keeps_last_good_checkpoint(stopped_run, tmp_path):
  workdir = _copy(stopped_run, tmp_path, 'nan')
  with pytest.raises(FloatingPointError, match=r'step \d+.*last good checkpoint \(step 3\)'):
    trainer.train_and_evaluate(tiny_config(**{'optimizer.lr': 1e30}), workdir)
  step, _ = read_state(workdir)
  assert step == 3


def test_checkpoint_from_other_model_is_refused_and_kept(stopped_run, tmp_path):
  workdir = _copy(stopped_run, tmp_path, 'other')
  with pytest.raises(ValueError, match='different model'):
    trainer.train_and_evaluate(tiny_config(**{'model.width': 8}), workdir)
  assert read_state(workdir)[0] == 3


def test_corrupt_checkpoint_gives_clear_error(stopped_run, tmp_path):
  workdir = _copy(stopped_run, tmp_path, 'corrupt')
  meta_dir = os.path.join(workdir, 'checkpoints', '3', 'meta')
  for name in os.listdir(meta_dir):
    with open(os.path.join(meta_dir, name), 'w') as f:
      f.write('{not json')
  with pytest.raises(RuntimeError, match='cannot be read.*left in place'):
    trainer.train_and_evaluate(tiny_config(), workdir)
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', '3'))


def test_bad_inputs_give_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError):
    trainer.train_and_evaluate(tiny_config(**{'data.name': 'npz', 'data.path': '/nope.npz'}),
                               str(tmp_path / 'a'))
  bad = tmp_path / 'float.npz'
  x = np.random.rand(32, 16, 16, 3).astype(np.float32)
  y = np.zeros(32, np.int64)
  np.savez(bad, x_train=x, y_train=y, x_test=x, y_test=y)
  with pytest.raises(ValueError, match='uint8'):
    trainer.train_and_evaluate(tiny_config(**{'data.name': 'npz', 'data.path': str(bad)}),
                               str(tmp_path / 'b'))
  bad_shape = tmp_path / 'gray.npz'
  g = np.zeros((32, 16, 16), np.uint8)
  np.savez(bad_shape, x_train=g, y_train=y, x_test=g, y_test=y)
  with pytest.raises(ValueError, match='shape|rank|channel'):
    trainer.train_and_evaluate(tiny_config(**{'data.name': 'npz', 'data.path': str(bad_shape)}),
                               str(tmp_path / 'c'))
  with pytest.raises(ValueError, match='divisible'):
    trainer.train_and_evaluate(tiny_config(batch_size=12), str(tmp_path / 'd'))


def test_cli_unknown_key_and_variant():
  out = subprocess.run([sys.executable, '-m', 'ssl_jax.main', '--config=configs/mocov2.py:smoke',
                        '--workdir=/tmp/unused', '--config.optimizer.lrr=1'], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode != 0
  assert "config.optimizer has no field 'lrr' (did you mean lr?)" in out.stderr
  out = subprocess.run([sys.executable, '-m', 'ssl_jax.main', '--config=configs/mocov2.py:nope',
                        '--workdir=/tmp/unused'], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
  assert "Unknown config variant 'nope'" in out.stderr
