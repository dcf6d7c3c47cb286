r"""Cost of InterCLR's memory-bank operations per train step (network excluded).

  python benchmarks/bank_ops.py [--rows=1281167] [--dim=128] [--batch=256] [--clusters=10000]
      [--pool=128000] [--neg=16384] [--strategy=semihard] [--approx] [--steps=3] [--scale=1]

Times, on one device and for the whole global batch, each piece of work the InterCLR step
adds to MoCo v2 (the real functions of ssl_jax.methods.interclr / ssl_jax.ops, jitted, median
over --steps after one warm-up call):

  similarity       qn @ bank^T, [B, N] f32 at full precision
  pool + draw      top-P pool of every row, then neg_num uniform draws without replacement
                   outside the query's cluster (sample_negatives)
  positives        label-sorted bank order + one uniform member of each query's cluster
  gather + logits  bank[neg_idx] ([B, neg_num, D]) and the [B, neg_num] negative logits
  write + relabel  the B key rows written into the bank, relabelled by nearest centroid (§1.8 A)
  small clusters   the per-step check for clusters below min_cluster when none is (§1.8 C)
  inter + memory   all of the above in one jitted, bank-donated function (a step's bank work
                   when the centroids are not due)
  centroid refresh member means of every cluster (§1.8 B, every 10 steps; amortised /10)

Memory: XLA's memory analysis of the fused `inter + memory` function at the unscaled --rows,
--pool, --neg sizes (compile only, so the full ImageNet size can be analysed on any machine): the bank itself plus
the temporaries (the [B, N] similarities, the pool, the gathered negatives). It also counts
bank-sized copies in the compiled, donated function (0 means the bank is updated in place).

--scale=S divides rows, clusters, pool and neg_num by S (batch and dim unchanged), so the mean
cluster size and the pool/neg ratios stay those of the reference. The `ms x S` column is the
measured time times S, a rough full-size estimate on the same device: the matmul, gathers and
draws are linear in the scaled sizes, but the top-k pool is superlinear on CPU (sort based),
so the estimate is low (see the measurements below). Figures are for the whole global batch on
one device; with the batch sharded over n chips the similarity, pool, draw and gather parts run
1/n per chip, the replicated bank parts (positives' sort, write, checks, refresh) do not shrink.

Measured on the idle 2-core CPU (2026-11-24), semihard, exact top-k (the pool from
ssl_jax/ops/topk.py's subsample-seeded top-k, which XLA:CPU runs faster than a bare lax.top_k;
"bare" = the same run with it switched off):

  sizes (rows / pool / neg)      similarity  pool+draw  positives  gather  write  refresh  step
  1,281,167 / 128,000 / 16,384      931 ms   20330 ms     250 ms   1012 ms   7 ms   38 ms  22.0 s
    (bare lax.top_k: pool+draw 25048 ms, step 27.4 s)
  128,116 / 12,800 / 1,638 (S=10)    98 ms    1393 ms       4 ms     98 ms   1 ms    4 ms  1.51 s
    (bare lax.top_k: pool+draw 1558 ms, step 1.72 s)
  50,000 / 500 / 128, batch 128, 80 clusters: similarity 10.9, pool+draw 31.5 (bare 41),
    positives 1.6 ms (7.7 with the (label, index) pair sort that ImageNet's sizes still need)
    python benchmarks/bank_ops.py [--scale=10]
    python benchmarks/bank_ops.py --rows=50000 --clusters=80 --pool=500 --neg=128 --batch=128
  (step = the fused `inter + memory` function, refresh amortised over 10 steps.) The top-k pool
  dominates; config.interclr.approx_top_k=True switches it to lax.approx_max_k, XLA's
  approximate top-k for TPU (not measured here: no TPU; on CPU it falls back to exact). At full
  size XLA's memory analysis gives 635 MiB of bank state and 2215 MiB of step temporaries (the
  [256, 1.28M] f32 similarities alone are 1.25 GiB; /8 per chip with the batch over 8 chips);
  on CPU the seeded top-k's padded copy of the similarities adds 672 MiB (2887 MiB); peak host
  RSS of the full-size CPU run 3.5 GB (before the seeded top-k); 0 bank-sized copies (the bank
  is written in place).

Last line: JSON.
"""
import argparse
import functools
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from ssl_jax.methods import interclr  # noqa: E402
from ssl_jax.ops import bank as bank_lib  # noqa: E402
from ssl_jax.ops import infonce, sampling  # noqa: E402


def make_bank(key, rows, dim, clusters):
  features = infonce.l2_normalize(jax.random.normal(key, (rows, dim), jnp.float32))
  labels = jnp.arange(rows, dtype=jnp.int32) % clusters
  centroids = jax.ops.segment_sum(features, labels, num_segments=clusters)
  centroids = centroids / jnp.maximum(bank_lib.cluster_counts(labels, clusters), 1)[:, None]
  return bank_lib.MemoryBank(features=features, labels=labels, centroids=centroids)


def median_ms(fn, *args, steps):
  """Median wall time of fn(*args) in ms over `steps` calls after one warm-up call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1000.0 * float(np.median(times))


def median_ms_donated(fn, bank, *args, steps):
  """As median_ms for fn(bank, *args) -> (bank, ...) that donates the bank; returns (ms, bank)."""
  times = []
  for i in range(steps + 1):
    start = time.perf_counter()
    bank, *rest = fn(bank, *args)
    jax.block_until_ready((bank, rest))
    if i:
      times.append(time.perf_counter() - start)
  return 1000.0 * float(np.median(times)), bank


def bank_sized_copies(compiled_text, rows, dim):
  """Number of copy instructions producing an f32[rows, dim] array in compiled HLO text."""
  pattern = re.compile(rf'= f32\[{rows},{dim}\]\S* copy(-start)?\(')
  return sum(1 for line in compiled_text.splitlines() if pattern.search(line))


def bank_config(neg, pool, strategy, approx):
  return ml_collections.ConfigDict(dict(
      neg_num=neg, neg_sampling=strategy, pool_size=pool, approx_top_k=approx, min_cluster=20,
      centroids_update_interval=10, small_clusters_interval=1, split_max_rows=4096,
      inter_cos_margin_loss=True, inter_cos_margin=-0.5, inter_arc_margin_loss=False,
      inter_arc_margin=0.0))


def inter_and_memory(bank, qn, keys, idx, key, step, *, cfg):
  """The bank work of one InterCLR step (the method's own function): L_inter, then §1.8 A-C."""
  loss, metrics, bank = interclr.inter_branch_and_memory(cfg, qn, idx, keys, bank, step, key, 0.2)
  return bank, loss, metrics


def analyse_full_size(args):
  """Compile-only memory analysis and bank-copy count at the unscaled sizes."""
  n, d, b, c = args.rows, args.dim, args.batch, args.clusters
  f32, i32 = jnp.float32, jnp.int32
  bank = bank_lib.MemoryBank(features=jax.ShapeDtypeStruct((n, d), f32),
                             labels=jax.ShapeDtypeStruct((n,), i32),
                             centroids=jax.ShapeDtypeStruct((c, d), f32))
  cfg = bank_config(args.neg, args.pool, args.strategy, args.approx)
  fn = jax.jit(functools.partial(inter_and_memory, cfg=cfg), donate_argnums=0)
  key = jax.eval_shape(lambda: jax.random.key(0))
  compiled = fn.lower(bank, jax.ShapeDtypeStruct((b, d), f32), jax.ShapeDtypeStruct((b, d), f32),
                      jax.ShapeDtypeStruct((b,), i32), key,
                      jax.ShapeDtypeStruct((), i32)).compile()
  memory = compiled.memory_analysis()
  bank_mib = (n * d * 4 + n * 4 + c * d * 4) / 2**20
  temp_mib = memory.temp_size_in_bytes / 2**20 if memory is not None else float('nan')
  return bank_mib, temp_mib, bank_sized_copies(compiled.as_text(), n, d)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--rows', type=int, default=1_281_167)
  parser.add_argument('--dim', type=int, default=128)
  parser.add_argument('--batch', type=int, default=256)
  parser.add_argument('--clusters', type=int, default=10_000)
  parser.add_argument('--pool', type=int, default=128_000)
  parser.add_argument('--neg', type=int, default=16_384)
  parser.add_argument('--strategy', default='semihard', choices=sampling.STRATEGIES)
  parser.add_argument('--approx', action='store_true', help='lax.approx_max_k for the pool')
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--scale', type=float, default=1.0,
                      help='divide rows/clusters/pool/neg by this (CPU); reports x scale')
  args = parser.parse_args()
  s = args.scale
  rows, clusters = int(args.rows / s), max(2, int(args.clusters / s))
  pool, neg, batch, dim = int(args.pool / s), max(1, int(args.neg / s)), args.batch, args.dim
  cfg = bank_config(neg, pool, args.strategy, args.approx)

  keys = jax.random.split(jax.random.key(0), 6)
  bank = jax.jit(make_bank, static_argnums=(1, 2, 3))(keys[0], rows, dim, clusters)
  qn = infonce.l2_normalize(jax.random.normal(keys[1], (batch, dim)))
  new_keys = infonce.l2_normalize(jax.random.normal(keys[2], (batch, dim)))
  idx = jax.random.choice(keys[3], rows, (batch,), replace=False).astype(jnp.int32)
  query_labels = bank.labels[idx]
  step0 = jnp.int32(0)  # (0 + 1) % 10 != 0: the centroids are not due

  similarity = jax.jit(sampling.bank_similarity)
  draw = jax.jit(lambda k, sim, labels, ql: sampling.sample_negatives(
      k, sim, labels, ql, num_neg=neg, strategy=args.strategy, pool_size=pool,
      approx=args.approx))
  positives = jax.jit(sampling.sample_positives)

  @jax.jit
  def gather_logits(features, qn, neg_idx):
    return jnp.einsum('bd,bkd->bk', qn, features[neg_idx])

  write = jax.jit(bank_lib.update_samples, donate_argnums=0)
  check = jax.jit(lambda b, k: (bank_lib.deal_with_small_clusters(b, k, 20),), donate_argnums=0)
  refresh = jax.jit(lambda b: (bank_lib.update_centroids(b),), donate_argnums=0)

  fused = jax.jit(functools.partial(inter_and_memory, cfg=cfg), donate_argnums=0)

  rows_out = []
  sim = similarity(qn, bank.features)
  rows_out.append(('similarity', median_ms(similarity, qn, bank.features, steps=args.steps)))
  if args.strategy == 'random':
    sim = None
  rows_out.append(('pool + draw', median_ms(draw, keys[4], sim, bank.labels, query_labels,
                                            steps=args.steps)))
  neg_idx, _ = draw(keys[4], sim, bank.labels, query_labels)
  del sim
  rows_out.append(('positives', median_ms(positives, keys[5], bank.labels, query_labels,
                                          steps=args.steps)))
  rows_out.append(('gather + logits', median_ms(gather_logits, bank.features, qn, neg_idx,
                                                steps=args.steps)))
  ms, bank = median_ms_donated(write, bank, idx, new_keys, steps=args.steps)
  rows_out.append(('write + relabel', ms))
  ms, bank = median_ms_donated(check, bank, keys[5], steps=args.steps)
  rows_out.append(('small clusters', ms))
  ms, bank = median_ms_donated(fused, bank, qn, new_keys, idx, keys[5], step0, steps=args.steps)
  rows_out.append(('inter + memory', ms))
  ms, bank = median_ms_donated(refresh, bank, steps=args.steps)
  rows_out.append(('centroid refresh', ms))

  bank_mib, temp_mib, copies = analyse_full_size(args)

  device = f'{jax.device_count()} x {jax.devices()[0].device_kind}'
  print(f'InterCLR bank ops on {device}: rows {rows}, dim {dim}, batch {batch}, clusters '
        f'{clusters}, pool {pool}, neg_num {neg}, {args.strategy}'
        f'{" (approx top-k)" if args.approx else ""}; scale 1/{s:g} of the requested sizes')
  print(f"{'operation':<20}{'ms':>10}{f'ms x {s:g}':>14}")
  for name, ms in rows_out:
    print(f'{name:<20}{ms:>10.1f}{ms * s:>14.1f}')
  fused_ms, refresh_ms = dict(rows_out)['inter + memory'], dict(rows_out)['centroid refresh']
  per_step = fused_ms + refresh_ms / cfg.centroids_update_interval
  print(f"{'per step (amortised)':<20}{per_step:>10.1f}{per_step * s:>14.1f}")
  print(f'at the unscaled sizes (XLA memory analysis, compile only): bank {bank_mib:.0f} MiB of '
        f'state, {temp_mib:.0f} MiB of step temporaries; bank-sized copies in the donated step: '
        f'{copies}')
  print(json.dumps({
      'device': device, 'rows': rows, 'dim': dim, 'batch': batch, 'clusters': clusters,
      'pool': pool, 'neg_num': neg, 'strategy': args.strategy, 'approx': args.approx,
      'scale': s, 'ms': {name: round(ms, 2) for name, ms in rows_out},
      'per_step_ms': round(per_step, 2), 'per_step_ms_x_scale': round(per_step * s, 1),
      'bank_mib': round(bank_mib, 1), 'temp_mib': round(temp_mib, 1), 'bank_copies': copies}))


if __name__ == '__main__':
  main()
