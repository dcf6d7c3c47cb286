"""InterCLR (Xie et al. 2020, arXiv 2008.11702): MoCo v2 + an inter-image branch on a memory bank.

Matches `mmselfsup@0.x:mmselfsup/models/algorithms/interclr_moco.py` and its memory/hook (spec §1):

* Intra branch: MoCo v2 unchanged (query vs momentum key, FIFO queue, ShuffleBN), reusing
  `ssl_jax.methods.moco` (`create_model`, `encode_keys`, queue init).
* Inter branch (§1.7), on the same 128-d query (the reference's `share_neck=True`; a separate
  inter neck is not implemented): positive = a random bank entry of the query's cluster (its own
  index included); `neg_num` negatives from the bank ('semihard' by default: uniform without
  replacement from the `pool_size` most similar entries outside the query's cluster); cosine
  margin `phi = cos - m` with m = -0.5, i.e. the positive gets +0.5 (the paper's "less
  stringent" boundary), optional arc margin; same temperature as the intra branch.
* Loss `0.75 * intra + 0.25 * inter` (`1 * intra` during optional `warmup_epochs`, as the
  reference hook's warm-up; 0 in the reference recipe).
* Online labels (§1.8), in the reference's order after the loss: (A) the global batch's keys
  replace their bank rows and those rows are relabelled by the nearest UN-normalised centroid;
  (B) every `centroids_update_interval` iterations ((step + 1) % interval == 0, mmcv's
  `every_n_iters`) all centroids become member means; (C) every
  `small_clusters_interval` iterations clusters below `min_cluster` are dissolved and re-seeded by
  2-means of the largest cluster. All of it runs inside the jitted, donated train step: A is an
  in-place row scatter (`after_reads` orders it after the loss's reads of the bank so XLA need
  not copy it), B and C sit behind `lax.cond`s (when no cluster is small C costs a bincount of
  the N labels: 10 ms for 1.28M rows on CPU), so the step never syncs with the host and the
  bank, labels and centroids are ordinary train state, checkpointed and restored with the rest.
* Initial labels (§1.5): `prepare` (fresh runs only; a resumed run restores the bank) embeds
  the whole training set with the untrained query encoder in eval mode (`ctx.extract`), runs the
  jitted k-means of `ssl_jax.ops.kmeans` (no faiss, no PCA, 20 Lloyd iterations, k = 10,000)
  and builds the bank from it.

Bank layout: the whole state is replicated by the trainer, so the bank is REPLICATED on every
chip (ImageNet: 1,281,167 x 128 f32 = 656 MB, plus 5 MB labels and 5 MB centroids per chip);
every op is written on global arrays with the batch sharded (the [B, N] similarity, its top-k
pool and the gathered negatives are per-chip slices of the batch), so a row-sharded bank would
only need the trainer to give these leaves `P('data')` (see benchmarks/bank_ops.py for cost).

`config.interclr`: num_classes, min_cluster, centroids_update_interval, small_clusters_interval,
neg_num, neg_sampling, pool_size, approx_top_k, {intra,inter}_{cos,arc}_margin[_loss],
intra_loss_weight, inter_loss_weight, warmup_epochs, kmeans_iters, kmeans_init, kmeans_chunk,
split_max_rows.
`config.moco` is MoCo v2's block (queue, temperature for both branches, key momentum).
"""
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from ssl_jax import metric_writers
from ssl_jax.methods import moco
from ssl_jax.methods.base import Method, ema_update
from ssl_jax.ops import bank as bank_lib
from ssl_jax.ops import infonce, kmeans as kmeans_lib, margins, sampling

# fold_in constant that gives the initial k-means its own stream of the run's root key.
_KMEANS_STREAM = 0x4B4D


@flax.struct.dataclass
class InterCLRState:
  queue: jax.Array       # [K, D] unit rows (MoCo's FIFO of keys)
  queue_ptr: jax.Array   # int32 scalar
  bank: bank_lib.MemoryBank   # features [N, D], labels [N], centroids [C, D]


# ------------------------------------------------------------------------------------------------
# Config checks and state.
# ------------------------------------------------------------------------------------------------
def check_config(config, num_train_examples):
  """Raises ValueError for settings the bank of `num_train_examples` rows cannot honour."""
  cfg, n = config.interclr, num_train_examples
  if cfg.neg_sampling not in sampling.STRATEGIES:
    raise ValueError(f'config.interclr.neg_sampling={cfg.neg_sampling!r}; use one of '
                     f'{sampling.STRATEGIES}.')
  if not 2 <= cfg.num_classes <= n:
    raise ValueError(f'config.interclr.num_classes={cfg.num_classes} must be in [2, {n}] (the '
                     f'bank has one row per training image: {n}).')
  if cfg.num_classes * cfg.min_cluster > n:
    raise ValueError(f'config.interclr.num_classes * min_cluster = {cfg.num_classes} * '
                     f'{cfg.min_cluster} exceeds the {n} bank rows, so some cluster would always '
                     'be small; lower num_classes or min_cluster.')
  if not 1 <= cfg.neg_num <= n:
    raise ValueError(f'config.interclr.neg_num={cfg.neg_num} must be in [1, {n}].')
  if cfg.neg_sampling in ('semihard', 'semieasy') and not cfg.neg_num <= cfg.pool_size <= n:
    raise ValueError(f'config.interclr.pool_size={cfg.pool_size} must lie in [neg_num='
                     f'{cfg.neg_num}, {n}] for {cfg.neg_sampling!r} sampling.')
  for name in ('centroids_update_interval', 'small_clusters_interval', 'min_cluster'):
    if cfg[name] < 1:
      raise ValueError(f'config.interclr.{name}={cfg[name]} must be >= 1.')


def init_method_state(config, rng, num_train_examples):
  """Queue as MoCo; a placeholder bank (random unit rows, labels i % C) until `prepare`.

  The placeholder is a valid bank (member means as centroids, no small cluster when
  N >= C * min_cluster), so a step run without `prepare` (benchmarks) costs what a real one does.
  """
  check_config(config, num_train_examples)
  queue_rng, bank_rng = jax.random.split(rng)
  queue = moco.init_method_state(config, queue_rng, num_train_examples)
  n, c = num_train_examples, config.interclr.num_classes
  features = infonce.l2_normalize(jax.random.normal(bank_rng, (n, config.moco.dim), jnp.float32))
  labels = jnp.arange(n, dtype=jnp.int32) % c
  centroids = jax.ops.segment_sum(features, labels, num_segments=c)
  centroids = centroids / jnp.maximum(bank_lib.cluster_counts(labels, c), 1)[:, None]
  bank = bank_lib.MemoryBank(features=features, labels=labels, centroids=centroids)
  return InterCLRState(queue=queue.queue, queue_ptr=queue.queue_ptr, bank=bank)


def prepare(config, ctx, state):
  """Initial clustering (spec §1.5): k-means of the untrained query encoder's embeddings.

  Host hook, run once before step 0 of a fresh run (never on resume: the bank is restored).
  """
  cfg = config.interclr
  start = time.time()
  features, _ = ctx.extract(state.params, state.batch_stats, output='embedding')
  old = state.method_state.bank
  if features.shape != old.features.shape:
    raise ValueError(f'The training set gave embeddings of shape {features.shape} but the bank '
                     f'was built for {old.features.shape}; config.moco.dim and the dataset must '
                     'agree.')
  extracted = time.time()
  # Row-shard the k-means input when the rows divide evenly (each scan chunk then keeps every
  # chip busy); ImageNet's 1,281,167 rows do not, and it runs replicated: a one-off ~66 TFLOP
  # (20 iterations of a 1.28M x 10,000 x 128 distance matmul).
  spec = P('data') if features.shape[0] % ctx.mesh.devices.size == 0 else P()
  x = jax.device_put(features, NamedSharding(ctx.mesh, spec))
  key = jax.random.fold_in(state.rng, _KMEANS_STREAM)
  _, labels = kmeans_lib.kmeans(key, x, cfg.num_classes, num_iters=cfg.kmeans_iters,
                                chunk_size=cfg.kmeans_chunk, init=cfg.kmeans_init)
  # The reference discards faiss's centroids and recomputes them from the labels (init_memory).
  bank = bank_lib.init_memory(features, np.asarray(labels), cfg.num_classes)
  bank = jax.tree.map(lambda new, like: jax.device_put(new, like.sharding), bank, old)
  counts = np.bincount(np.asarray(labels), minlength=cfg.num_classes)
  metric_writers.log(
      f'InterCLR initial clustering: {features.shape[0]} embeddings, {cfg.num_classes} clusters '
      f'(sizes {counts.min()}..{counts.max()}); extraction {extracted - start:.1f} s, k-means '
      f'{time.time() - extracted:.1f} s.')
  return state.replace(method_state=state.method_state.replace(bank=bank))


# ------------------------------------------------------------------------------------------------
# Loss.
# ------------------------------------------------------------------------------------------------
def positive_margin(l_pos, cos_on, cos_m, arc_on, arc_m):
  """The reference's decision boundary on the positive cosine: cosine margin, then arc margin."""
  if cos_on:
    l_pos = margins.apply_margin(l_pos, 'cosine', cos_m)
  if arc_on:
    l_pos = margins.apply_margin(l_pos, 'arc', arc_m)
  return l_pos


def inter_logits(cfg, qn, idx, bank, rng):
  """Positive / negative cosines of the inter-image branch (spec §1.7), before any margin.

  Args:
    cfg: config.interclr.
    qn: [B, D] unit queries (gradient flows through them only).
    idx: [B] dataset indices of the queries.
    bank: MemoryBank as it was before this step's write.
    rng: PRNG key.

  Returns:
    dict with l_pos [B], l_neg [B, neg_num], valid [B, neg_num] (False: a padding slot, only
    when the pool holds fewer than neg_num other-cluster entries), pos_idx [B], neg_idx
    [B, neg_num], query_labels [B].
  """
  pos_rng, neg_rng = jax.random.split(rng)
  query_labels = bank.labels[idx]
  pos_idx = sampling.sample_positives(pos_rng, bank.labels, query_labels)
  sim = None if cfg.neg_sampling == 'random' else sampling.bank_similarity(qn, bank.features)
  neg_idx, valid = sampling.sample_negatives(
      neg_rng, sim, bank.labels, query_labels, num_neg=cfg.neg_num, strategy=cfg.neg_sampling,
      pool_size=cfg.pool_size, approx=cfg.approx_top_k)
  features = lax.stop_gradient(bank.features)
  l_pos = jnp.einsum('bd,bd->b', qn, features[pos_idx])
  l_neg = jnp.einsum('bd,bkd->bk', qn, features[neg_idx])
  return {'l_pos': l_pos, 'l_neg': l_neg, 'valid': valid, 'pos_idx': pos_idx,
          'neg_idx': neg_idx, 'query_labels': query_labels}


def inter_loss(cfg, qn, idx, bank, rng, temperature):
  """(L_inter, metrics, inter_logits output): CE over [phi(l_pos), l_neg] / T."""
  out = inter_logits(cfg, qn, idx, bank, rng)
  l_pos = positive_margin(out['l_pos'], cfg.inter_cos_margin_loss, cfg.inter_cos_margin,
                          cfg.inter_arc_margin_loss, cfg.inter_arc_margin)
  loss, metrics = infonce.contrastive_loss(l_pos, out['l_neg'], temperature,
                                           neg_mask=out['valid'])
  return loss, {'inter_acc': metrics['instance_acc'], 'inter_pos_sim': out['l_pos'].mean()}, out


def after_reads(x, *reads):
  """`x` unchanged in value but data-dependent on `reads`, so XLA schedules it after them.

  The bank rows are written by a scatter that does not otherwise depend on the loss's reads of
  the old bank (similarities, pool, gathers); XLA then cannot prove an in-place write safe and
  copies the features and the labels twice per step (2 x 656 MB for ImageNet; seen in the
  compiled XLA:CPU train step; tests/test_interclr.py and benchmarks/bank_ops.py count them).
  Adding min(|s|, 0), which is 0 for every finite s, of a sum of the reads' results creates the
  dependency (on XLA:CPU an optimization_barrier does not).
  """
  total = sum(jnp.sum(lax.stop_gradient(r).astype(jnp.float32)) for r in reads)
  return x + jnp.minimum(jnp.abs(total), 0.0).astype(x.dtype)


def update_memory(cfg, bank, idx, keys, step, rng):
  """One iteration of online label maintenance (spec §1.8 A, B, C), in the reference's order.

  Args:
    cfg: config.interclr.
    bank: MemoryBank before the write.
    idx: [B] dataset indices of the global batch.
    keys: [B, D] unit keys norm(k) of the momentum encoder.
    step: int32 scalar, the iteration index (0-based, before the increment).
    rng: PRNG key for the 2-means re-seeds.

  Returns:
    (bank, metrics): change_ratio, clusters_dissolved (clusters below min_cluster this step)
    and the cluster sizes after the update (cluster_empty / _min_size / _max_size, what the
    reference's hook logs).
  """
  c = bank.num_classes
  bank, change_ratio = bank_lib.update_samples(bank, idx, keys)                      # A
  refresh = (step + 1) % cfg.centroids_update_interval == 0                          # B
  centroids = lax.cond(refresh, lambda b: bank_lib.update_centroids(b).centroids,
                       lambda b: b.centroids, bank)
  bank = bank.replace(centroids=centroids)
  repair = (step + 1) % cfg.small_clusters_interval == 0                             # C
  small = bank_lib.cluster_counts(bank.labels, c) < cfg.min_cluster
  bank = bank_lib.deal_with_small_clusters(bank, rng, cfg.min_cluster, enabled=repair,
                                           max_split_rows=cfg.split_max_rows)
  stats = bank_lib.cluster_stats(bank)
  metrics = {'change_ratio': change_ratio,
             'clusters_dissolved': jnp.where(repair, jnp.sum(small), 0),
             'cluster_empty': stats['empty'], 'cluster_min_size': stats['min_size'],
             'cluster_max_size': stats['max_size']}
  return bank, metrics


def inter_branch_and_memory(cfg, qn, idx, keys, bank, step, rng, temperature):
  """The inter-image loss on the bank as it was, then that bank's update for this step.

  Returns:
    (L_inter, metrics, new_bank): what an InterCLR step adds to MoCo v2 (also what
    benchmarks/bank_ops.py times).
  """
  inter_rng, repair_rng = jax.random.split(rng)
  loss, metrics, out = inter_loss(cfg, qn, idx, bank, inter_rng, temperature)
  keys = after_reads(keys, out['l_pos'], out['l_neg'])  # write in place, after every read
  bank, bank_metrics = update_memory(cfg, bank, idx, keys, step, repair_rng)
  return loss, {**metrics, **bank_metrics}, bank


def loss_weights(cfg, step, steps_per_epoch):
  """(intra, inter) loss weights at `step`: 1 and 0 during the first `warmup_epochs` epochs.

  The reference's InterCLRHook.before_train_epoch: epochs before `warmup_epochs` train the intra
  branch alone (its weight 1), while the bank and labels are still maintained every step.
  """
  warm = step < round(cfg.get('warmup_epochs', 0) * steps_per_epoch)
  return (jnp.where(warm, 1.0, cfg.intra_loss_weight),
          jnp.where(warm, 0.0, cfg.inter_loss_weight))


def loss_fn(config, model, params, state, views, batch, rng):
  cfg = config.interclr
  temperature = config.moco.temperature
  x_q, x_k = views[0][0], views[0][1]
  key_rng, inter_rng = jax.random.split(rng)
  ema_params = ema_update(state.ema_params, params, config.moco.momentum)
  out, updates = model.apply({'params': params, 'batch_stats': state.batch_stats}, x_q, train=True,
                             mutable=['batch_stats'])
  q = infonce.l2_normalize(out['embedding'])
  k, ema_batch_stats = moco.encode_keys(config, model, state, ema_params, x_k, key_rng)
  method_state = state.method_state

  l_pos, l_neg = infonce.queue_logits(q, k, method_state.queue)
  l_pos = positive_margin(l_pos, cfg.intra_cos_margin_loss, cfg.intra_cos_margin,
                          cfg.intra_arc_margin_loss, cfg.intra_arc_margin)
  intra, intra_metrics = infonce.contrastive_loss(l_pos, l_neg, temperature)
  # The memory update reads only constants (keys are stop-gradient, the bank is state), so it
  # is computed here, after the loss (which sees the previous bank, §1.12), and installed by
  # update_state; computing it here lets its metrics reach the step's log.
  inter, inter_metrics, bank = inter_branch_and_memory(
      cfg, q, batch['index'], k, method_state.bank, state.step, inter_rng, temperature)
  # One epoch = the trainer's len(train split) // batch_size steps; the bank has a row per image.
  steps_per_epoch = max(method_state.bank.labels.shape[0] // config.batch_size, 1)
  intra_weight, inter_weight = loss_weights(cfg, state.step, steps_per_epoch)
  loss = intra_weight * intra + inter_weight * inter
  # intra_loss / inter_loss are logged unweighted (the reference logs them times 0.75 / 0.25).
  metrics = {'intra_loss': intra, 'inter_loss': inter, 'intra_acc': intra_metrics['instance_acc'],
             **inter_metrics}
  aux = {'batch_stats': updates['batch_stats'], 'ema_params': ema_params,
         'ema_batch_stats': ema_batch_stats, 'keys': k, 'bank': bank, 'metrics': metrics}
  return loss, aux


def update_state(config, state, aux):
  del config
  method_state = state.method_state
  queue, ptr = infonce.enqueue(method_state.queue, method_state.queue_ptr, aux['keys'])
  return state.replace(ema_params=aux['ema_params'], ema_batch_stats=aux['ema_batch_stats'],
                       method_state=InterCLRState(queue=queue, queue_ptr=ptr, bank=aux['bank']))


METHOD = Method(name='interclr', create_model=moco.create_model,
                init_method_state=init_method_state, loss_fn=loss_fn, update_state=update_state,
                uses_ema=True, prepare=prepare)
