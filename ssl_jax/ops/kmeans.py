"""k-means for InterCLR's pseudo labels, jitted with static shapes.

`kmeans` replaces the reference's faiss clustering (`mmselfsup@0.x:mmselfsup/utils/clustering.py`,
spec §1.5): rows are L2-normalised (+1e-10), no PCA, plain Lloyd iterations with squared L2
distance, centroids are un-normalised means. It is sized for the reference run (N = 1,281,167 rows
of 128-d, k = 10,000): the [N, k] distance matrix is never materialised, rows are visited in
chunks by a `lax.scan`.

`two_means` is the 2-means split used to re-seed empty InterCLR clusters (spec §1.8 C.3; the
reference calls sklearn `KMeans(n_clusters=2, max_iter=20)` on the largest cluster).

Everything is written on global arrays, so x may be row-sharded with a NamedSharding (each scan
chunk then spans every shard) and the result is the same as on one device.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax

# On TPU the default f32 matmul runs in bf16 passes; nearest-centroid decisions need f32 accuracy.
_PRECISION = lax.Precision.HIGHEST
# Bound on the extra re-seed + re-assign rounds run after the last Lloyd iteration (one is
# almost always enough; see `_kmeans`).
_MAX_REPAIR_ROUNDS = 8


def normalize_rows(x, eps=1e-10):
  """x / (||x|| + eps): the reference's `preprocess_features` normalisation before faiss."""
  x = x.astype(jnp.float32)
  return x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + eps)


def kmeans(key, x, k, *, num_iters=20, chunk_size=4096, init='random'):
  """Lloyd k-means on L2-normalised rows with no empty cluster in the result.

  Initialisation (`init`): 'random' draws k distinct rows uniformly (faiss's default, used by the
  reference); 'kmeans++' uses D^2 sampling (k sequential O(N D) steps: about 1.6 TFLOP for the
  ImageNet bank, seconds on an accelerator) and is much less prone to two centroids sharing one
  natural cluster. Each iteration assigns rows to the nearest centroid (squared L2), recomputes
  centroids as member means, then re-seeds every empty cluster faiss-style by splitting the
  currently largest cluster: its member farthest from the centroid it was assigned to becomes the
  empty cluster's centroid. After the last iteration the rows are assigned once more (the
  returned labels are exactly the argmin over the returned centroids); if that final assignment
  leaves a cluster empty, re-seed + re-assign repeats (at most 8 rounds). Since a re-seeded
  centroid sits on a data row, this ends with no empty cluster unless x has fewer than k
  distinct rows; `bank.init_memory` raises in that case, as the reference asserts.

  Memory: x plus about two more copies of it (normalised, chunk layout) and two
  [chunk_size, k] f32 buffers: about 1.9 GB of temporaries for 1.28M x 128 rows, k = 10,000
  (XLA memory analysis).

  Args:
    key: PRNG key for the initial centroids (the reference seeds faiss with `randint(1234)`).
    x: [N, D] features (any float dtype, need not be normalised), optionally row-sharded.
    k: number of clusters (10,000 for InterCLR), k <= N.
    num_iters: Lloyd iterations (20 in the reference).
    chunk_size: rows per distance chunk; memory is O(chunk_size * k).
    init: 'random' (reference) or 'kmeans++'.

  Returns:
    (centroids [k, D] f32 un-normalised means, labels [N] int32 nearest-centroid ids).
  """
  if x.ndim != 2:
    raise ValueError(f'kmeans expects x of shape [N, D], got {x.shape}.')
  if not 1 <= k <= x.shape[0]:
    raise ValueError(f'kmeans needs 1 <= k <= N, got k={k} for N={x.shape[0]} rows; lower k.')
  if init not in ('random', 'kmeans++'):
    raise ValueError(f"init must be 'random' or 'kmeans++', got {init!r}.")
  if num_iters < 0 or chunk_size < 1:
    raise ValueError(f'num_iters must be >= 0 and chunk_size >= 1, got {num_iters}, '
                     f'{chunk_size}.')
  return _kmeans(key, x, k=k, num_iters=num_iters, chunk_size=min(chunk_size, x.shape[0]),
                 init=init)


def _assign_pass(x_chunks, weight_chunks, centroids):
  """One pass over the rows: nearest centroid, its squared distance, per-cluster sums and counts.

  Args:
    x_chunks: [num_chunks, chunk, D] unit rows (zero padding rows allowed).
    weight_chunks: [num_chunks, chunk] 1 for real rows, 0 for padding.
    centroids: [k, D].

  Returns:
    labels [num_chunks, chunk], sq_dist [num_chunks, chunk], sums [k, D], counts [k] int32.
  """
  k, dim = centroids.shape
  c_sq = jnp.sum(centroids * centroids, axis=-1)

  def step(carry, chunk):
    sums, counts = carry
    xc, wc = chunk
    # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2; ||x||^2 does not change the argmin.
    partial_dist = c_sq[None, :] - 2.0 * jnp.dot(xc, centroids.T, precision=_PRECISION)
    labels = jnp.argmin(partial_dist, axis=1).astype(jnp.int32)
    sq_dist = jnp.min(partial_dist, axis=1) + jnp.sum(xc * xc, axis=-1)
    # Per-cluster sums as a one-hot matmul: MXU friendly, and with row-sharded chunks the
    # contraction over rows becomes local partial sums plus one all-reduce.
    one_hot = (labels[:, None] == jnp.arange(k)[None, :]).astype(jnp.float32) * wc[:, None]
    sums = sums + jnp.dot(one_hot.T, xc, precision=_PRECISION)
    counts = counts + jnp.sum(one_hot, axis=0)
    return (sums, counts), (labels, sq_dist)

  zeros = (jnp.zeros((k, dim), jnp.float32), jnp.zeros((k,), jnp.float32))
  (sums, counts), (labels, sq_dist) = lax.scan(step, zeros, (x_chunks, weight_chunks))
  # Float counts are exact below 2**24 rows per cluster.
  return labels, sq_dist, sums, jnp.round(counts).astype(jnp.int32)


def _sq_dist_to_point(x, x_sq, point):
  """||x_i - point||^2 for every row as a matvec (no [N, D] temporary), clipped at 0."""
  dots = jnp.dot(x, point, precision=_PRECISION)
  return jnp.maximum(x_sq - 2.0 * dots + jnp.dot(point, point, precision=_PRECISION), 0.0)


def _masked_mean(x, mask, fallback):
  """Mean of the rows where mask is True (a matvec), or `fallback` if there are none."""
  count = jnp.sum(mask)
  total = jnp.dot(mask.astype(x.dtype), x, precision=_PRECISION)
  return jnp.where(count > 0, total / jnp.maximum(count, 1), fallback)


def _reseed_empty_clusters(x, centroids, labels, sq_dist, counts):
  """Gives every empty cluster a centroid taken from the largest cluster (faiss-style split).

  Empty clusters are handled one after another (lowest id first); each time the currently
  largest cluster (lowest id on ties) donates its member with the largest `sq_dist`, whose row
  becomes the empty cluster's centroid; `sq_dist` then drops to the distance to that new seed
  where smaller. The donor's centroid is left as is; the next assignment pass settles both.
  Cost per empty cluster: O(N D).

  Args:
    x: [N, D] unit rows.
    centroids: [k, D].
    labels: [N] current assignment.
    sq_dist: [N] squared distance of each row to the centroid it was assigned to.
    counts: [k] cluster sizes of `labels`.

  Returns:
    centroids [k, D] with the empty clusters re-seeded.
  """
  x_sq = jnp.sum(x * x, axis=-1)

  def has_empty(state):
    return jnp.any(state[3] == 0)

  def reseed_one(state):
    centroids, labels, sq_dist, counts = state
    empty = jnp.argmax(counts == 0)
    largest = jnp.argmax(counts)
    donor = jnp.argmax(jnp.where(labels == largest, sq_dist, -jnp.inf))
    centroids = centroids.at[empty].set(x[donor])
    labels = labels.at[donor].set(empty.astype(labels.dtype))
    # Rows now as close to the new seed as to their centroid (the donor and any duplicate of it,
    # e.g. identical images) should not be picked again for the next empty cluster.
    sq_dist = jnp.minimum(sq_dist, _sq_dist_to_point(x, x_sq, x[donor]))
    counts = counts.at[empty].set(1).at[largest].add(-1)
    return centroids, labels, sq_dist, counts

  # Terminates: with N >= k rows, an empty cluster implies a cluster of >= 2 rows to split.
  return lax.while_loop(has_empty, reseed_one, (centroids, labels, sq_dist, counts))[0]


def _kmeans_plus_plus_init(key, x, k):
  """k-means++ seeding (D^2 sampling), k sequential steps.

  Each next centroid is a row drawn with probability proportional to its squared distance to the
  nearest centroid chosen so far.
  """
  x_sq = jnp.sum(x * x, axis=-1)
  first = x[jax.random.randint(jax.random.fold_in(key, 0), (), 0, x.shape[0])]
  centroids = jnp.zeros((k, x.shape[1]), jnp.float32).at[0].set(first)
  min_sq_dist = _sq_dist_to_point(x, x_sq, first)

  def add_centroid(i, state):
    centroids, min_sq_dist = state
    # Rows already chosen have distance 0, i.e. log-probability -inf.
    row = jax.random.categorical(jax.random.fold_in(key, i), jnp.log(min_sq_dist))
    centroids = centroids.at[i].set(x[row])
    return centroids, jnp.minimum(min_sq_dist, _sq_dist_to_point(x, x_sq, x[row]))

  return lax.fori_loop(1, k, add_centroid, (centroids, min_sq_dist))[0]


@functools.partial(jax.jit, static_argnames=('k', 'num_iters', 'chunk_size', 'init'))
def _kmeans(key, x, *, k, num_iters, chunk_size, init):
  n = x.shape[0]
  x = normalize_rows(x)
  num_chunks = -(-n // chunk_size)
  pad = num_chunks * chunk_size - n
  weights = jnp.pad(jnp.ones((n,), jnp.float32), (0, pad))

  # Strided chunks: chunk j holds rows j, j + num_chunks, ... so that with row-sharded x every
  # chunk spans all shards and each scan step keeps every device busy.
  def to_chunks(a):
    return a.reshape((chunk_size, num_chunks) + a.shape[1:]).swapaxes(0, 1)

  def from_chunks(a):
    return a.swapaxes(0, 1).reshape(-1)[:n]

  x_chunks = to_chunks(jnp.pad(x, ((0, pad), (0, 0))))
  weight_chunks = to_chunks(weights)

  def assign(centroids):
    labels, sq_dist, sums, counts = _assign_pass(x_chunks, weight_chunks, centroids)
    return from_chunks(labels), from_chunks(sq_dist), sums, counts

  if init == 'kmeans++':
    centroids = _kmeans_plus_plus_init(key, x, k)
  else:
    centroids = x[jax.random.choice(key, n, (k,), replace=False)]

  def lloyd_iteration(_, centroids):
    labels, sq_dist, sums, counts = assign(centroids)
    means = jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1)[:, None], centroids)
    return _reseed_empty_clusters(x, means, labels, sq_dist, counts)

  centroids = lax.fori_loop(0, num_iters, lloyd_iteration, centroids)
  labels, sq_dist, _, counts = assign(centroids)

  # The final assignment can still empty a cluster whose members all moved to a freshly
  # re-seeded centroid; re-seed and re-assign until none is empty.
  def needs_repair(state):
    rounds, _, _, _, counts = state
    return (rounds < _MAX_REPAIR_ROUNDS) & jnp.any(counts == 0)

  def repair(state):
    rounds, centroids, labels, sq_dist, counts = state
    centroids = _reseed_empty_clusters(x, centroids, labels, sq_dist, counts)
    labels, sq_dist, _, counts = assign(centroids)
    return rounds + 1, centroids, labels, sq_dist, counts

  state = (jnp.int32(0), centroids, labels, sq_dist, counts)
  _, centroids, labels, _, _ = lax.while_loop(needs_repair, repair, state)
  return centroids, labels


@functools.partial(jax.jit, static_argnames=('num_iters', 'max_rows'))
def two_means(key, x, mask, num_iters=20, max_rows=None):
  """Splits the rows selected by `mask` into two groups with 2-means (static shape N).

  Stands in for the reference's sklearn `KMeans(n_clusters=2, random_state=0, max_iter=20)`
  (spec §1.8 C.3). The members are gathered into a fixed [max_rows, D] buffer (so the
  iterations cost O(max_rows D), not O(N D), on a 1.28M-row bank); init: a uniformly random
  member and the member farthest from it; then `num_iters` Lloyd steps (no normalisation, like
  the reference); finally every member is assigned to the nearer final centre. With more than
  `max_rows` members the centres are fitted on a uniformly random subset of `max_rows` of them
  [an approximation; exact whenever the cluster fits]. Which half is returned as True is an
  artefact of sklearn's init in the reference; here it is fixed: the half holding the
  lowest-index member is False. If 2-means leaves one side empty (e.g. all members identical),
  falls back to a random split with floor(n/2) members True, as the reference does.

  Args:
    key: PRNG key (first centre, subset, random-split fallback).
    x: [N, D] rows (bank features).
    mask: [N] bool, the rows to split (at least 2 for a non-trivial result).
    num_iters: Lloyd iterations (sklearn's max_iter = 20 in the reference).
    max_rows: static buffer size (default N: always exact).

  Returns:
    assign: [N] bool, True for members of the second sub-cluster; always False outside mask.
  """
  x = x.astype(jnp.float32)
  n_rows = x.shape[0]
  max_rows = n_rows if max_rows is None else min(max_rows, n_rows)
  first_key, split_key = jax.random.split(key)
  n = jnp.sum(mask)
  priority = jnp.where(mask, jax.random.uniform(first_key, mask.shape), -1.0)

  # Buffer of members: all of them (in index order) if they fit, else a random subset.
  def all_members():
    return jnp.nonzero(mask, size=max_rows, fill_value=0)[0]

  def random_members():
    return lax.top_k(priority, max_rows)[1]

  if max_rows == n_rows:
    buffer = all_members()
  else:
    buffer = lax.cond(n <= max_rows, all_members, random_members)
  rows, valid = x[buffer], jnp.arange(max_rows) < n
  rows_sq = jnp.sum(rows * rows, axis=-1)

  centre0 = rows[jnp.argmax(jnp.where(valid, priority[buffer], -2.0))]
  centre1 = rows[jnp.argmax(jnp.where(valid, _sq_dist_to_point(rows, rows_sq, centre0), -1.0))]

  def nearer_second(points, point_mask, centres):
    # ||p - c||^2 ordering == ordering of ||c||^2 / 2 - p.c; ties go to the first centre.
    dots = jnp.dot(points, jnp.stack(centres, axis=1), precision=_PRECISION)  # [M, 2]
    half_sq_norms = 0.5 * jnp.sum(jnp.stack(centres) ** 2, axis=-1)
    return point_mask & (half_sq_norms[1] - dots[:, 1] < half_sq_norms[0] - dots[:, 0])

  def lloyd_step(_, centres):
    second = nearer_second(rows, valid, centres)
    return (_masked_mean(rows, valid & ~second, centres[0]), _masked_mean(rows, second, centres[1]))

  centres = lax.fori_loop(0, num_iters, lloyd_step, (centre0, centre1))
  second = nearer_second(x, mask, centres)  # one matvec over all N rows
  lowest_member = jnp.argmax(mask)
  second = jnp.where(second[lowest_member], mask & ~second, second)

  def random_half():
    rank = jnp.argsort(jnp.argsort(
        jnp.where(mask, jax.random.uniform(split_key, mask.shape), 2.0)))
    return mask & (rank < n // 2)

  n_second = jnp.sum(second)
  return lax.cond((n_second == 0) | (n_second == n), random_half, lambda: second)
