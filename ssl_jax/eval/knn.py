"""Weighted k-nearest-neighbour classification on frozen features (spec §5.1).

mmselfsup's `knn_eval` (the DINO recipe): both feature sets are L2-normalised, the similarity is
the cosine, the k most similar bank entries vote for their label with weight exp(sim / T)
(T = 0.07), classes are ranked by their summed weight; top-1 and top-5 (over min(5, k) ranks).

On device, sharded: the bank (train features) is split row-wise over the mesh axis "data";
queries go through in fixed-size chunks, so the memory per device is chunk x (N / devices)
similarities. Each device takes the top-k of its own bank rows and the global top-k is taken
over the gathered candidates (`jax.shard_map`: per-shard top-k is the point here). One top-k
with the largest k serves every k of a sweep, since the first k of a sorted top-K are the top-k.

Deterministic tie rule (also used by the numpy reference in the tests):
* neighbours with equal similarity: the one with the lower bank (train) index is nearer;
* classes with equal summed weight: the lower class id ranks first.
Both follow from `lax.top_k`, which returns the lower index first among equal values; bank
shards are contiguous and gathered in device order, so the global rule holds on any mesh.
Classes that no neighbour voted for share score 0 and are ranked by the same rule, as the
reference ranks all classes (they can only matter for top-5 when k < 5 distinct labels vote).
"""
import functools
from typing import Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ssl_jax import sharding
from ssl_jax.ops import topk

DEFAULT_KS = (10, 20, 100, 200)
DEFAULT_TEMPERATURE = 0.07


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def _check_inputs(train_feats, train_labels, test_feats, num_classes, ks):
  """Host-side validation with actionable messages; returns float32/int32 numpy arrays."""
  train_feats = np.asarray(train_feats, np.float32)
  test_feats = np.asarray(test_feats, np.float32)
  train_labels = np.asarray(train_labels)
  if train_feats.ndim != 2 or test_feats.ndim != 2 or train_feats.shape[1] != test_feats.shape[1]:
    raise ValueError(f"train_feats {train_feats.shape} and test_feats {test_feats.shape} must be "
                     "[N, D] and [M, D] with the same D.")
  if train_labels.shape != (train_feats.shape[0],):
    raise ValueError(f"train_labels {train_labels.shape} must be [N] = [{train_feats.shape[0]}].")
  for name, x in (("train_feats", train_feats), ("test_feats", test_feats)):
    if not np.all(np.isfinite(x)):
      raise ValueError(f"{name} contain NaN or inf (the checkpoint or the extraction diverged); "
                       "kNN on them is meaningless.")
  if train_labels.size and (train_labels.min() < 0 or train_labels.max() >= num_classes):
    raise ValueError(f"train_labels must lie in [0, {num_classes}); got "
                     f"[{train_labels.min()}, {train_labels.max()}].")
  bad = [k for k in ks if not 1 <= k <= train_feats.shape[0]]
  if bad:
    raise ValueError(f"k={bad} is invalid for a bank of {train_feats.shape[0]} train features: "
                     "use 1 <= k <= number of train examples.")
  return train_feats, train_labels.astype(np.int32), test_feats


@functools.lru_cache(maxsize=16)
def _chunk_fn(mesh, max_k: int, ks: tuple, num_classes: int, temperature: float,
              num_ranks: int):
  """Jitted chunk -> {k: ranked classes [chunk, num_ranks]}; cached per static setting."""

  def local_topk(queries, bank, labels, valid):
    # queries [c, D] (replicated); bank/labels/valid: this device's contiguous bank rows.
    sim = jnp.matmul(queries, bank.T, precision=jax.lax.Precision.HIGHEST)
    sim = jnp.where(valid[None, :], sim, -jnp.inf)  # padding rows never become neighbours
    values, idx = topk.top_k(sim, max_k)  # = lax.top_k, faster on XLA:CPU
    nbr_labels = labels[idx]
    # Candidates of all shards, in device order = ascending bank index among equal values.
    values = jax.lax.all_gather(values, "data", axis=1, tiled=True)
    nbr_labels = jax.lax.all_gather(nbr_labels, "data", axis=1, tiled=True)
    values, pos = jax.lax.top_k(values, max_k)
    return values, jnp.take_along_axis(nbr_labels, pos, axis=1)

  # After the all_gather every device holds the same candidates, so the outputs are replicated;
  # all_gather's result is typed device-varying, hence check_vma=False.
  global_topk = jax.shard_map(local_topk, mesh=mesh,
                              in_specs=(P(), P("data"), P("data"), P("data")),
                              out_specs=(P(), P()), check_vma=False)

  def fn(queries, bank, labels, valid):
    values, nbr_labels = global_topk(l2_normalize(queries), bank, labels, valid)
    weights = jnp.exp(values / temperature)
    rows = jnp.arange(queries.shape[0])[:, None]
    out = {}
    for k in ks:
      scores = jnp.zeros((queries.shape[0], num_classes), jnp.float32)
      scores = scores.at[rows, nbr_labels[:, :k]].add(weights[:, :k])
      out[k] = jax.lax.top_k(scores, num_ranks)[1].astype(jnp.int32)
    return out

  return jax.jit(fn, out_shardings=NamedSharding(mesh, P()))


def _shard_bank(train_feats, train_labels, mesh, max_k):
  """Normalised bank padded so every device holds >= max_k rows; sharded along rows."""
  n = train_feats.shape[0]
  num_dev = mesh.devices.size
  per_dev = max(-(-n // num_dev), max_k)
  pad = per_dev * num_dev - n
  norms = np.linalg.norm(train_feats, axis=1, keepdims=True)
  bank = np.pad(train_feats / np.maximum(norms, 1e-12), ((0, pad), (0, 0)))
  labels = np.pad(train_labels, (0, pad))
  valid = np.arange(n + pad) < n
  row_sharding = NamedSharding(mesh, P("data"))
  return tuple(jax.device_put(x, row_sharding) for x in (bank, labels, valid))


def knn_sweep(train_feats, train_labels, test_feats, num_classes: int,
              ks: Sequence[int] = DEFAULT_KS, temperature: float = DEFAULT_TEMPERATURE, *,
              num_ranks: int = 5, chunk_size: int = 256,
              mesh: Optional[jax.sharding.Mesh] = None) -> Dict[int, np.ndarray]:
  """Weighted-kNN class rankings for several k from one neighbour search.

  Args:
    train_feats: [N, D] bank features (any scale; L2-normalised here).
    train_labels: int [N] in [0, num_classes).
    test_feats: [M, D] query features.
    num_classes: number of classes.
    ks: neighbour counts (each 1 <= k <= N).
    temperature: T in exp(sim / T).
    num_ranks: how many ranked classes to return per query (capped at num_classes).
    chunk_size: queries per device call (bounds memory to chunk_size x N/devices floats).
    mesh: 1-D mesh with axis "data" over which the bank is sharded (default: all devices).

  Returns:
    {k: int32 [M, min(num_ranks, num_classes)]}, classes by decreasing weighted vote.
  """
  ks = tuple(sorted({int(k) for k in ks}))
  if not ks:
    raise ValueError("ks is empty; pass at least one k.")
  if temperature <= 0:
    raise ValueError(f"temperature must be > 0, got {temperature}.")
  train_feats, train_labels, test_feats = _check_inputs(train_feats, train_labels, test_feats,
                                                        num_classes, ks)
  mesh = sharding.make_mesh() if mesh is None else mesh
  max_k = ks[-1]
  bank, labels, valid = _shard_bank(train_feats, train_labels, mesh, max_k)
  fn = _chunk_fn(mesh, max_k, ks, int(num_classes), float(temperature),
                 min(int(num_ranks), int(num_classes)))
  num_queries = test_feats.shape[0]
  chunk_size = max(1, min(int(chunk_size), num_queries))
  pieces = {k: [] for k in ks}
  replicated = NamedSharding(mesh, P())
  for start in range(0, num_queries, chunk_size):
    chunk = test_feats[start:start + chunk_size]
    real = chunk.shape[0]
    if real < chunk_size:  # static shape: one compilation for every chunk
      chunk = np.pad(chunk, ((0, chunk_size - real), (0, 0)))
    out = fn(jax.device_put(chunk, replicated), bank, labels, valid)
    for k in ks:
      pieces[k].append((out[k], real))
  return {k: np.concatenate([np.asarray(r)[:n] for r, n in pieces[k]]) for k in ks}


def weighted_knn(train_feats, train_labels, test_feats, num_classes: int, k: int,
                 temperature: float = DEFAULT_TEMPERATURE, **kwargs) -> np.ndarray:
  """Weighted-kNN predictions for one k.

  Args:
    train_feats, train_labels, test_feats, num_classes, temperature: as in `knn_sweep`.
    k: number of neighbours.
    **kwargs: num_ranks (default 5), chunk_size, mesh; see `knn_sweep`.

  Returns:
    int32 [M, min(num_ranks, num_classes)]: ranked class predictions; column 0 is the top-1.
  """
  return knn_sweep(train_feats, train_labels, test_feats, num_classes, (k,), temperature,
                   **kwargs)[int(k)]


def topk_accuracy(ranked: np.ndarray, labels, k_neighbours: int, top: int) -> float:
  """Fraction of queries whose label is among the first min(top, k_neighbours) ranks.

  mmselfsup counts top-5 over min(5, k) ranks: with fewer neighbours than 5 only the classes
  that could have received a vote are counted.
  """
  labels = np.asarray(labels)
  width = min(top, k_neighbours, ranked.shape[1])
  return float(np.mean(np.any(ranked[:, :width] == labels[:, None], axis=1)))


def knn_eval(train_feats, train_labels, test_feats, test_labels, num_classes: int,
             ks: Sequence[int] = (20,), temperature: float = DEFAULT_TEMPERATURE,
             **kwargs) -> Dict[str, float]:
  """Top-1/top-5 weighted-kNN accuracy (fractions in [0, 1]) for each k.

  Args:
    train_feats, train_labels, test_feats, num_classes, ks, temperature: as in `knn_sweep`.
    test_labels: int [M] true labels of the queries.
    **kwargs: chunk_size, mesh; see `knn_sweep`.

  Returns:
    {"knn_top1@k": float, "knn_top5@k": float} for every k.
  """
  test_labels = np.asarray(test_labels)
  if test_labels.shape != (np.shape(test_feats)[0],):
    raise ValueError(f"test_labels {test_labels.shape} must be [M] = [{np.shape(test_feats)[0]}].")
  ranked = knn_sweep(train_feats, train_labels, test_feats, num_classes, ks, temperature,
                     num_ranks=5, **kwargs)
  metrics = {}
  for k, r in ranked.items():
    metrics[f"knn_top1@{k}"] = topk_accuracy(r, test_labels, k, 1)
    metrics[f"knn_top5@{k}"] = topk_accuracy(r, test_labels, k, 5)
  return metrics
