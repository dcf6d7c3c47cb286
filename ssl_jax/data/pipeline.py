"""Host input pipeline: deterministic, resumable global batches for jit + NamedSharding.

The batch at global step s is a pure function of (seed, s): epoch e = s // steps_per_epoch
draws its order from `np.random.default_rng([seed, e])`, so resuming from a checkpointed
`position` replays exactly the batches an uninterrupted run would have seen, on any number
of hosts. Every process computes the same global index list and reads only its own
contiguous slice; `jax.make_array_from_process_local_data` assembles the global array
sharded P("data") along the batch.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ssl_jax.data.sources import Source

SAMPLERS = ("permutation", "with_replacement")
_BATCH_DTYPES = {"image": np.uint8, "label": np.int32, "index": np.int32}


def _local_batch_size(global_batch_size: int, mesh, what: str) -> int:
  """Validates the global batch against hosts and mesh devices; returns the host share."""
  if not isinstance(global_batch_size, (int, np.integer)) or global_batch_size < 1:
    raise ValueError(f"{what}: global_batch_size must be a positive int, got "
                     f"{global_batch_size!r}.")
  num_processes = jax.process_count()
  if global_batch_size % num_processes:
    raise ValueError(f"{what}: global_batch_size {global_batch_size} is not divisible by the "
                     f"number of processes ({num_processes}); pick a multiple of it.")
  if mesh is not None and global_batch_size % mesh.devices.size:
    raise ValueError(
        f"{what}: global_batch_size {global_batch_size} is not divisible by the "
        f"{mesh.devices.size} devices of the mesh, so the batch cannot be sharded "
        f"P('data'); use a multiple of {mesh.devices.size}.")
  return global_batch_size // num_processes


def _to_global(batch: dict[str, np.ndarray], mesh, global_batch_size: int):
  """Host-local numpy batch -> global jax.Arrays sharded along the batch (no-op w/o mesh)."""
  if mesh is None:
    return batch
  sharding = NamedSharding(mesh, P("data"))
  return {k: jax.make_array_from_process_local_data(
      sharding, v, (global_batch_size, *v.shape[1:])) for k, v in batch.items()}


def _cast(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  out = dict(batch)
  for key, dtype in _BATCH_DTYPES.items():
    out[key] = np.asarray(batch[key]).astype(dtype, copy=False)
  return out


class _Prefetcher:
  """Runs `produce(i)` for i = 0, 1, ... in a daemon thread, `depth` results ahead.

  Exceptions raised by `produce` are re-raised by `get`, in order. With depth 0 the
  producer runs synchronously in the caller's thread.
  """

  _DONE = object()

  def __init__(self, produce, depth: int, num_items: int | None = None):
    self._produce = produce
    self._depth = int(depth)
    self._num_items = num_items
    self._next = 0
    self._stop = threading.Event()
    self._thread = None
    if self._depth > 0:
      self._queue = queue.Queue(maxsize=self._depth)
      self._thread = threading.Thread(target=self._run, daemon=True, name="ssl_jax-prefetch")
      self._thread.start()

  def _run(self):
    i = 0
    while not self._stop.is_set():
      if self._num_items is not None and i >= self._num_items:
        item = (self._DONE, None)
      else:
        try:
          item = (True, self._produce(i))
        except BaseException as e:  # pylint: disable=broad-except  # Re-raised in get().
          item = (False, e)
      while not self._stop.is_set():
        try:
          self._queue.put(item, timeout=0.05)
          break
        except queue.Full:
          continue
      if item[0] is not True:
        return
      i += 1

  def get(self):
    """Returns the next item; raises StopIteration at the end, or the producer's error."""
    if self._stop.is_set():
      raise RuntimeError("The input iterator was closed.")
    if self._thread is None:
      if self._num_items is not None and self._next >= self._num_items:
        raise StopIteration
      self._next += 1
      return self._produce(self._next - 1)
    ok, value = self._queue.get()
    if ok is self._DONE:
      raise StopIteration
    if not ok:
      self.close()
      raise value
    return value

  def close(self):
    self._stop.set()
    if self._thread is not None:
      # Drain so a producer blocked on put() notices the stop flag promptly.
      while True:
        try:
          self._queue.get_nowait()
        except queue.Empty:
          break
      self._thread.join(timeout=10.0)


class _Schedule:
  """Which dataset indices make up the global batch at each step; pure in (seed, step)."""

  def __init__(self, seed, sampler, num_examples, global_batch_size, steps_per_epoch,
               local_batch):
    self.seed, self.sampler, self.num_examples = seed, sampler, num_examples
    self.global_batch_size, self.steps_per_epoch = global_batch_size, steps_per_epoch
    self.local_batch = local_batch
    self._cache: tuple[int, np.ndarray] | None = None
    self._lock = threading.Lock()  # The prefetch thread and the caller may both ask.

  def epoch_order(self, epoch: int) -> np.ndarray:
    with self._lock:
      if self._cache is None or self._cache[0] != epoch:
        rng = np.random.default_rng([self.seed, epoch])
        if self.sampler == "permutation":
          order = rng.permutation(self.num_examples)
        else:
          order = rng.integers(0, self.num_examples, self.num_examples)
        self._cache = (epoch, order)
      return self._cache[1]

  def global_indices(self, step: int) -> np.ndarray:
    epoch, within = divmod(int(step), self.steps_per_epoch)
    start = within * self.global_batch_size
    return self.epoch_order(epoch)[start:start + self.global_batch_size]

  def local_indices(self, step: int) -> np.ndarray:
    start = jax.process_index() * self.local_batch
    return self.global_indices(step)[start:start + self.local_batch]


class TrainIterator:
  """Endless iterator of global training batches, resumable at any step.

  Args:
    source: a `Source`.
    global_batch_size: images per step over all hosts (the remainder of an epoch is
      dropped, as the references' `drop_last=True`).
    seed: data-order seed; the order depends only on (seed, step).
    mesh: optional `Mesh` with axis "data". With it, batches are global jax.Arrays sharded
      NamedSharding(mesh, P("data")); without it, host-local numpy arrays.
    start_step: global step of the first batch returned (the checkpointed `position`).
    sampler: "permutation" (every record once per epoch) or "with_replacement" (N uniform
      draws per epoch, InterCLR's `DistributedSampler(replace=True)`).
    prefetch: number of batches prepared ahead in a background thread (0 = synchronous).

  Each batch is {"image": uint8 [B, H, W, 3], "label": int32 [B], "index": int32 [B]}.
  """

  def __init__(self, source: Source, *, global_batch_size: int, seed: int, mesh=None,
               start_step: int = 0, sampler: str = "permutation", prefetch: int = 2):
    what = f"TrainIterator({getattr(source, 'name', 'source')})"
    if sampler not in SAMPLERS:
      raise ValueError(f"{what}: sampler must be one of {SAMPLERS}, got {sampler!r}.")
    if start_step < 0:
      raise ValueError(f"{what}: start_step must be >= 0, got {start_step}.")
    if prefetch < 0:
      raise ValueError(f"{what}: prefetch must be >= 0, got {prefetch}.")
    self._local_batch = _local_batch_size(global_batch_size, mesh, what)
    self.num_examples = len(source)
    self.steps_per_epoch = self.num_examples // global_batch_size
    if self.steps_per_epoch == 0:
      raise ValueError(f"{what}: global_batch_size {global_batch_size} exceeds the "
                       f"{self.num_examples} records of the split, so an epoch has 0 steps; "
                       "lower the batch size or use a larger split.")
    self.source = source
    self.global_batch_size = int(global_batch_size)
    self.seed = int(seed)
    self.mesh = mesh
    self.sampler = sampler
    self.start_step = int(start_step)
    self.position = int(start_step)
    self._schedule = _Schedule(self.seed, sampler, self.num_examples, self.global_batch_size,
                               self.steps_per_epoch, self._local_batch)
    # The producer must not reference `self`, or the thread would keep the iterator alive
    # and __del__ (which stops the thread) would never run.
    schedule, start = self._schedule, self.start_step

    def produce(i: int):
      batch = _cast(source.get_batch(schedule.local_indices(start + i)))
      return _to_global(batch, mesh, schedule.global_batch_size)

    self._prefetcher = _Prefetcher(produce, prefetch)

  def epoch_order(self, epoch: int) -> np.ndarray:
    """The sample order of one epoch: N indices (a permutation, or uniform draws)."""
    return self._schedule.epoch_order(epoch)

  def global_indices(self, step: int) -> np.ndarray:
    """Dataset indices of the whole global batch at `step` (the same on every host)."""
    return self._schedule.global_indices(step)

  def local_indices(self, step: int) -> np.ndarray:
    """This process's contiguous slice of `global_indices(step)`."""
    return self._schedule.local_indices(step)

  def __iter__(self) -> Iterator[dict]:
    return self

  def __next__(self) -> dict:
    batch = self._prefetcher.get()
    self.position += 1
    return batch

  def close(self):
    """Stops the prefetch thread; the iterator cannot be used afterwards."""
    self._prefetcher.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except  # Interpreter shutdown.
      pass


def eval_batches(source: Source, global_batch_size: int, mesh=None, *,
                 prefetch: int = 2) -> Iterator[dict]:
  """One in-order pass over `source` in global batches.

  The last batch is padded to the full size so every batch has a static shape (one jit
  compilation). Pad rows hold a zero image, label 0, index 0 and mask False: consumers
  must drop them with the mask (e.g. before scattering features by "index").

  Args:
    source: a `Source`.
    global_batch_size: images per batch over all hosts.
    mesh: optional `Mesh`; as for `TrainIterator`.
    prefetch: batches prepared ahead in a background thread (0 = synchronous).

  Yields:
    {"image": uint8 [B, H, W, 3], "label": int32 [B], "index": int32 [B], "mask": bool [B]}.
  """
  what = f"eval_batches({getattr(source, 'name', 'source')})"
  local = _local_batch_size(global_batch_size, mesh, what)
  num_examples = len(source)
  if num_examples == 0:
    raise ValueError(f"{what}: the split is empty.")
  num_batches = -(-num_examples // global_batch_size)
  offset = jax.process_index() * local

  def produce(b: int):
    positions = b * global_batch_size + offset + np.arange(local)
    mask = positions < num_examples
    real = source.get_batch(positions[mask])
    batch = {"image": np.zeros((local, *source.image_shape), np.uint8),
             "label": np.zeros((local,), np.int32), "index": np.zeros((local,), np.int32)}
    for key in batch:
      batch[key][mask] = real[key]
    batch["mask"] = mask
    return _to_global(batch, mesh, global_batch_size)

  prefetcher = _Prefetcher(produce, prefetch, num_items=num_batches)
  try:
    while True:
      try:
        batch = prefetcher.get()
      except StopIteration:
        return
      yield batch
  finally:
    prefetcher.close()
