"""InterCLR method: the per-step memory update against numpy (§1.8), sampling and margin wiring
(§1.7), 1 vs 8 devices, exact resume of bank/labels/centroids, and the CLI smoke run.

Kernel-level behaviour (k-means, 2-means vs sklearn, sampler uniformity, margin values, bank
sharding) is covered by test_kmeans / test_bank / test_sampling / test_margins; these tests check
that the method wires those kernels as the reference does.
"""
import json
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from sklearn.cluster import KMeans

from ssl_jax import sharding, trainer
from ssl_jax.data import sources
from ssl_jax.methods import get_method, interclr
from ssl_jax.ops import bank as bank_lib

from trainer_utils import REPO, assert_trees_equal, build_trainer, read_state, tiny_config


# ------------------------------------------------------------------------------------------------
# Helpers.
# ------------------------------------------------------------------------------------------------
def _build(config, devices):
  mesh, source, state, step, ctx = build_trainer(config, devices)
  return mesh, get_method(config.method), source, state, step, ctx


def _batch(source, indices, mesh):
  return jax.device_put(source.get_batch(np.asarray(indices)), sharding.batch_sharded(mesh))


def _unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ---- numpy transcription of the reference's memory (interclr_memory.py, spec §1.8) ----
def np_update_samples(feats, labels, cents, idx, keys):
  feats, labels = feats.copy(), labels.copy()
  new = (keys @ cents.T).argmax(1)
  ratio = np.mean(new != labels[idx])
  for j, i in enumerate(idx):  # sequential writes: the last duplicate wins
    feats[i], labels[i] = keys[j], new[j]
  return feats, labels, ratio


def np_update_centroids(feats, labels, cents, which=None):
  cents = cents.copy()
  for c in range(len(cents)) if which is None else which:
    if np.any(labels == c):
      cents[c] = feats[labels == c].mean(0)
  return cents


def np_deal_with_small_clusters(feats, labels, cents, min_cluster):
  labels, num_classes = labels.copy(), len(cents)
  small = np.flatnonzero(np.bincount(labels, minlength=num_classes) < min_cluster)
  inclusion = np.setdiff1d(np.arange(num_classes), small)
  for s in small:
    rows = np.flatnonzero(labels == s)
    if len(rows):
      labels[rows] = inclusion[(cents[inclusion] @ feats[rows].T).argmax(0)]
  for e in small:  # _redirect_empty_clusters, sklearn 2-means of the current largest cluster
    largest = np.bincount(labels, minlength=num_classes).argmax()
    members = np.flatnonzero(labels == largest)
    sub = KMeans(n_clusters=2, random_state=0, max_iter=20, n_init=10).fit(feats[members]).labels_
    if sub[0] == 1:  # ssl_jax convention: the half holding the lowest index keeps the label
      sub = 1 - sub
    labels[members[sub == 1]] = e
    cents = np_update_centroids(feats, labels, cents, which=(largest, e))
  return labels, cents


def _designed_bank(n, dim, seed=0):
  """A bank whose §1.8 step has a unique answer for any keys.

  Clusters 0..2*dim-1 are tight blobs around +-e_i, so every unit key has a positive dot
  product (>= 1/sqrt(dim)) with some centroid. Cluster L = 2*dim (the largest) is 200 exact
  +-u pairs around two opposite directions: its centroid is ~0, so no key is ever relabelled
  into it, and any 2-means splits it into its two blobs. Cluster S = 2*dim + 1 has one row, so
  it is dissolved and re-seeded from a half of L.
  """
  rng = np.random.default_rng(seed)
  axis_clusters, big, half = 2 * dim, 400, 200
  u = _unit(rng.normal(size=dim))
  big_rows = np.concatenate([u + 0.02 * rng.normal(size=(half, dim)), np.zeros((half, dim))])
  big_rows[half:] = -big_rows[:half]
  per_axis = rng.multinomial(n - big - 1, np.ones(axis_clusters) / axis_clusters)
  axis_rows = [np.eye(dim)[a % dim] * (1 if a < dim else -1) for a in range(axis_clusters)]
  feats = np.concatenate(
      [r + 0.05 * rng.normal(size=(k, dim)) for r, k in zip(axis_rows, per_axis)]
      + [big_rows, np.eye(dim)[3][None]])
  labels = np.concatenate([np.full(k, a) for a, k in enumerate(per_axis)]
                          + [np.full(big, axis_clusters), [axis_clusters + 1]])
  perm = rng.permutation(n)
  feats, labels = _unit(feats[perm]), labels[perm].astype(np.int32)
  return feats, labels, axis_clusters + 2


# ------------------------------------------------------------------------------------------------
# The memory update of a real train step equals the numpy transcription of §1.8.
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def designed_run():
  base = tiny_config('interclr', 'smoke')
  dim = base.moco.dim
  source = sources.get_source(base.data, 'train')
  feats, labels, num_classes = _designed_bank(len(source), dim)
  config = tiny_config('interclr', 'smoke', **{'interclr.num_classes': num_classes,
                                              'interclr.min_cluster': 3,
                                              'interclr.centroids_update_interval': 10})
  mesh, _, source, state, step_fn, _ = _build(config, jax.devices()[:1])
  shardings = jax.tree.map(lambda x: x.sharding, state)
  # A row of the big cluster, a repeated index (5, last write wins) and arbitrary rows.
  big_row = int(np.flatnonzero(labels == num_classes - 2)[0])
  indices = np.array([big_row, 5, 17, 5] + list(range(100, 112)), np.int32)
  template = jax.device_get(state)  # the step donates its input: each test puts a fresh copy
  return config, mesh, source, step_fn, (template, shardings), feats, labels, indices


def _designed_state(template, feats, labels, num_classes, step):
  """The host-side train state `template` with the designed bank (centroids = member means)."""
  cents = np_update_centroids(feats, labels, np.zeros((num_classes, feats.shape[1])))
  bank = bank_lib.MemoryBank(features=feats.astype(np.float32), labels=labels,
                             centroids=cents.astype(np.float32))
  return template.replace(step=np.int32(step),
                          method_state=template.method_state.replace(bank=bank))


@pytest.mark.parametrize('step', [9, 4])  # (9 + 1) % 10 == 0 refreshes the centroids; 4 doesn't
def test_step_updates_bank_like_numpy_transcription(designed_run, step):
  config, mesh, source, step_fn, (template, shardings), feats, labels, indices = designed_run
  num_classes = config.interclr.num_classes
  state = jax.device_put(_designed_state(template, feats, labels, num_classes, step), shardings)
  cents = np_update_centroids(feats, labels, np.zeros((num_classes, feats.shape[1])))
  new_state, metrics = step_fn(state, _batch(source, indices, mesh))
  new_bank = jax.device_get(new_state.method_state.bank)
  keys = np.asarray(new_state.method_state.queue)[:len(indices)]  # the enqueued keys
  np.testing.assert_allclose(np.linalg.norm(keys, axis=1), 1.0, atol=1e-6)

  f, lab, ratio = np_update_samples(feats, labels, cents, indices, keys.astype(np.float64))  # A
  c = np_update_centroids(f, lab, cents) if (step + 1) % 10 == 0 else cents                 # B
  lab, c = np_deal_with_small_clusters(f, lab, c, 3)                                         # C
  np.testing.assert_allclose(new_bank.features, f, atol=1e-6)
  np.testing.assert_array_equal(new_bank.labels, lab)
  np.testing.assert_allclose(new_bank.centroids, c, atol=1e-5)
  np.testing.assert_allclose(metrics['change_ratio'], ratio, atol=1e-6)
  counts = np.bincount(lab, minlength=config.interclr.num_classes)
  assert int(metrics['clusters_dissolved']) == 1  # the singleton
  assert (int(metrics['cluster_empty']), int(metrics['cluster_min_size']),
          int(metrics['cluster_max_size'])) == (0, counts.min(), counts.max())
  if (step + 1) % 10:  # no refresh: only the two re-seeded clusters' centroids changed
    changed = np.flatnonzero(np.any(np.asarray(new_bank.centroids) != cents.astype(np.float32),
                                    axis=1))
    assert set(changed) <= {config.interclr.num_classes - 2, config.interclr.num_classes - 1}
  for name in ('intra_loss', 'inter_loss'):
    assert np.isfinite(float(metrics[name]))
  np.testing.assert_allclose(float(metrics['loss']), 0.75 * float(metrics['intra_loss'])
                             + 0.25 * float(metrics['inter_loss']), rtol=1e-5)


def test_step_updates_bank_in_place(designed_run):
  """No copy of the [N, D] bank or the [N] labels in the compiled, donated step.

  Without `interclr.after_reads` XLA copies both twice per step (2 x 656 MB on ImageNet).
  """
  config, mesh, source, step_fn, (template, shardings), feats, _, indices = designed_run
  state = jax.device_put(template, shardings)
  hlo = step_fn.lower(state, _batch(source, indices, mesh)).compile().as_text()
  n, dim = feats.shape
  for shape in (rf'f32\[{n},{dim}\]', rf's32\[{n}\]'):
    assert not re.findall(rf'= {shape}\S* copy(-start)?\(', hlo), shape


# ------------------------------------------------------------------------------------------------
# Inter branch: sampling and margins as wired by the method.
# ------------------------------------------------------------------------------------------------
def _cfg(**kw):
  cfg = dict(neg_num=8, neg_sampling='semihard', pool_size=24, approx_top_k=False,
             inter_cos_margin_loss=True, inter_cos_margin=-0.5, inter_arc_margin_loss=False,
             inter_arc_margin=0.0)
  cfg.update(kw)
  return ml_collections.ConfigDict(cfg)


def test_inter_samples_positives_in_cluster_and_semihard_negatives_from_pool():
  rng = np.random.default_rng(0)
  n, dim, b = 64, 8, 6
  feats = _unit(rng.normal(size=(n, dim))).astype(np.float32)
  labels = rng.permutation(np.arange(n) % 4).astype(np.int32)
  bank = bank_lib.MemoryBank(features=jnp.asarray(feats), labels=jnp.asarray(labels),
                             centroids=jnp.zeros((4, dim)))
  qn = _unit(rng.normal(size=(b, dim))).astype(np.float32)
  idx = np.array([0, 3, 9, 9, 40, 63])
  for seed in range(5):
    out = jax.device_get(interclr.inter_logits(_cfg(), jnp.asarray(qn), jnp.asarray(idx), bank,
                                               jax.random.key(seed)))
    query_labels = labels[idx]
    np.testing.assert_array_equal(out['query_labels'], query_labels)
    np.testing.assert_array_equal(labels[out['pos_idx']], query_labels)  # positives share it
    sim = qn @ feats.T
    for i in range(b):
      pool = np.argsort(-sim[i])[:24]
      drawn = out['neg_idx'][i][out['valid'][i]]
      assert len(drawn) == min(8, np.sum(labels[pool] != query_labels[i]))
      assert np.all(labels[drawn] != query_labels[i])  # never the query's cluster
      assert set(drawn) <= set(pool)                   # only from the top-P pool
      assert len(set(drawn)) == len(drawn)
    np.testing.assert_allclose(out['l_pos'], np.sum(qn * feats[out['pos_idx']], 1), atol=1e-5)
    np.testing.assert_allclose(out['l_neg'], np.einsum('bd,bkd->bk', qn, feats[out['neg_idx']]),
                               atol=1e-5)


def test_inter_gradient_flows_only_through_the_query():
  rng = np.random.default_rng(1)
  feats = jnp.asarray(_unit(rng.normal(size=(32, 4))), jnp.float32)
  bank = bank_lib.MemoryBank(features=feats, labels=jnp.arange(32, dtype=jnp.int32) % 4,
                             centroids=jnp.zeros((4, 4)))
  qn = jnp.asarray(_unit(rng.normal(size=(3, 4))), jnp.float32)
  idx = jnp.array([0, 1, 2])

  def loss(qn, features):
    return interclr.inter_loss(_cfg(pool_size=16), qn, idx, bank.replace(features=features),
                               jax.random.key(0), 0.2)[0]

  g_q, g_bank = jax.grad(loss, argnums=(0, 1))(qn, feats)
  assert float(jnp.abs(g_q).sum()) > 0 and float(jnp.abs(g_bank).sum()) == 0


# Query (1, 0). Row 0 is the query's own index and the only member of its cluster, so it is the
# positive: cosine 0.6. 'hard' with neg_num 3 takes every other row: cosines 0.8, 0, -1.
_MARGIN_BANK = bank_lib.MemoryBank(
    features=jnp.array([[0.6, 0.8], [0.0, 1.0], [-1.0, 0.0], [0.8, 0.6]]),
    labels=jnp.array([0, 1, 1, 2], jnp.int32), centroids=jnp.zeros((3, 2)))


@pytest.mark.parametrize('margins, phi', [
    (dict(), 1.1),                                                   # cosine -0.5: 0.6 + 0.5
    (dict(inter_cos_margin_loss=False), 0.6),                        # no margin
    (dict(inter_cos_margin_loss=False, inter_arc_margin_loss=True,   # cos(acos 0.6 + 0.5)
          inter_arc_margin=0.5), 0.6 * 0.8775826 - 0.8 * 0.4794255),
    (dict(inter_arc_margin_loss=True, inter_arc_margin=0.5),         # cosine first (1.1), then
     1.1 * 0.8775826),                                               # arc with sin clipped to 0
])
def test_inter_margin_logits_and_loss_hand_computed(margins, phi):
  cfg = _cfg(neg_sampling='hard', neg_num=3, **margins)
  qn, idx = jnp.array([[1.0, 0.0]]), jnp.array([0])
  out = interclr.inter_logits(cfg, qn, idx, _MARGIN_BANK, jax.random.key(0))
  np.testing.assert_allclose(out['l_pos'], [0.6], atol=1e-6)
  np.testing.assert_allclose(out['l_neg'], [[0.8, 0.0, -1.0]], atol=1e-6)
  got_phi = interclr.positive_margin(out['l_pos'], cfg.inter_cos_margin_loss, cfg.inter_cos_margin,
                                     cfg.inter_arc_margin_loss, cfg.inter_arc_margin)
  np.testing.assert_allclose(got_phi, [phi], atol=1e-6)
  loss, _, _ = interclr.inter_loss(cfg, qn, idx, _MARGIN_BANK, jax.random.key(0), 0.2)
  logits = np.array([phi, 0.8, 0.0, -1.0]) / 0.2
  np.testing.assert_allclose(float(loss), np.log(np.exp(logits).sum()) - logits[0], rtol=1e-5)


def test_warmup_epochs_train_the_intra_branch_alone():
  cfg = ml_collections.ConfigDict(dict(intra_loss_weight=0.75, inter_loss_weight=0.25,
                                       warmup_epochs=2))
  for step, weights in ((0, (1.0, 0.0)), (19, (1.0, 0.0)), (20, (0.75, 0.25)), (99, (0.75, 0.25))):
    np.testing.assert_allclose(interclr.loss_weights(cfg, jnp.int32(step), 10), weights)
  cfg.warmup_epochs = 0
  np.testing.assert_allclose(interclr.loss_weights(cfg, jnp.int32(0), 10), (0.75, 0.25))


# ------------------------------------------------------------------------------------------------
# Config checks.
# ------------------------------------------------------------------------------------------------
def test_configs_and_bad_settings():
  for variant in ('imagenet', 'cifar10', 'cifar10_cpu', 'smoke'):
    c = tiny_config('interclr', variant)
    assert c.method == 'interclr' and c.interclr.inter_cos_margin == -0.5
  default = tiny_config('interclr', 'default')
  assert default.data.tfds_name == 'imagenet2012' and default.data.sampler == 'with_replacement'
  assert (default.interclr.num_classes, default.interclr.neg_num, default.interclr.pool_size) == (
      10000, 16384, 128000)
  c = tiny_config('interclr', 'smoke')
  key = jax.random.key(0)
  with pytest.raises(ValueError, match='min_cluster'):
    interclr.init_method_state(c, key, 50)  # 20 clusters x 3 > 50 rows
  with pytest.raises(ValueError, match='pool_size'):
    interclr.init_method_state(tiny_config('interclr', 'smoke', **{'interclr.pool_size': 8}),
                               key, 1437)
  with pytest.raises(ValueError, match='neg_sampling'):
    interclr.init_method_state(tiny_config('interclr', 'smoke',
                                           **{'interclr.neg_sampling': 'easy'}), key, 1437)


# ------------------------------------------------------------------------------------------------
# Trainer level: 1 vs 8 devices, CLI run, resume.
# ------------------------------------------------------------------------------------------------
def _two_steps(step_fn, state, source, mesh, indices):
  history = []
  for batch_indices in (indices, indices[::-1]):
    state, metrics = step_fn(state, _batch(source, batch_indices, mesh))
    history.append(jax.device_get(metrics))
  return jax.device_get(state), history


def test_same_steps_on_1_and_8_devices(designed_run):
  """Steps 9 and 10 of the designed bank (centroid refresh, dissolve + 2-means re-seed)."""
  if jax.device_count() < 8:
    pytest.skip('needs 8 (fake) devices')
  config, mesh1, source, step1, (template, shardings1), feats, labels, indices = designed_run
  mesh8, _, _, state8, step8, _ = _build(config, jax.devices()[:8])
  shardings8 = jax.tree.map(lambda x: x.sharding, state8)
  del state8
  start = _designed_state(template, feats, labels, config.interclr.num_classes, step=9)
  s1, h1 = _two_steps(step1, jax.device_put(start, shardings1), source, mesh1, indices)
  s8, h8 = _two_steps(step8, jax.device_put(start, shardings8), source, mesh8, indices)
  assert int(h1[0]['clusters_dissolved']) == int(h8[0]['clusters_dissolved']) == 1
  for m1, m8 in zip(h1, h8):
    for name in ('loss', 'intra_loss', 'inter_loss', 'change_ratio', 'cluster_min_size',
                 'cluster_max_size'):
      np.testing.assert_allclose(m1[name], m8[name], atol=1e-5)
  np.testing.assert_array_equal(s1.method_state.bank.labels, s8.method_state.bank.labels)
  for a, b in ((s1.params, s8.params), (s1.ema_params, s8.ema_params),
               (s1.batch_stats, s8.batch_stats), (s1.method_state, s8.method_state)):
    assert_trees_equal(a, b, atol=1e-5)


# tiny_config's shrinking plus a centroid refresh every 2 steps, as CLI flags and in-process.
_TINY = {'data.image_size': 16, 'augment.size': 16, 'model.width': 4, 'batch_size': 16,
         'eval_batch_size': 400, 'log_every_steps': 2, 'checkpoint_every_steps': 3,
         'num_steps': 6, 'moco.queue_size': 64, 'interclr.centroids_update_interval': 2}


def test_cli_smoke_run_and_resume_restores_bank_exactly(tmp_path, capsys):
  straight, resumed = tmp_path / 'straight', tmp_path / 'resumed'
  cmd = [sys.executable, '-m', 'ssl_jax.main', '--config=configs/interclr.py:smoke',
         f'--workdir={straight}'] + [f'--config.{k}={v}' for k, v in _TINY.items()]
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'InterCLR initial clustering: 1437 embeddings, 20 clusters' in out.stdout
  with open(straight / 'summary.json') as f:
    summary = json.load(f)
  assert summary['method'] == 'interclr' and summary['step'] == 6
  assert 0.0 < summary['knn_top1'] <= 1.0

  # Resume a copy of the run's step-3 checkpoint to step 6 in-process: it must end bit-exactly
  # where the uninterrupted run did (bank rows, labels, centroids refreshed at steps 4 and 6,
  # queue, EMA, optimiser), and must not re-run the initial clustering.
  shutil.copytree(straight / 'checkpoints' / '3', resumed / 'checkpoints' / '3')
  capsys.readouterr()
  assert trainer.train_and_evaluate(tiny_config('interclr', 'smoke', **_TINY),
                                    str(resumed))['step'] == 6
  log = capsys.readouterr().out
  assert 'Resumed from' in log and 'initial clustering' not in log
  (step_a, a), (step_b, b) = read_state(str(straight)), read_state(str(resumed))
  assert step_a == step_b == 6
  for name in ('features', 'labels', 'centroids'):
    np.testing.assert_array_equal(a['method_state']['bank'][name],
                                  b['method_state']['bank'][name])
  assert_trees_equal(a, b)
