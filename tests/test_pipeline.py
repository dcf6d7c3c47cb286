"""Tests for ssl_jax.data.pipeline: determinism, resume, sharding, eval padding."""
import gc

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ssl_jax.data import pipeline
from ssl_jax.data.sources import ArraySource, Source


def _toy_source(n=37, size=4):
  """Image i is filled with (i % 256) so a batch's images can be checked against its index."""
  images = np.broadcast_to((np.arange(n) % 256).astype(np.uint8)[:, None, None, None],
                           (n, size, size, 3)).copy()
  return ArraySource(images, np.arange(n) % 5, num_classes=5, name="toy:train")


def _mesh():
  return Mesh(np.array(jax.devices()), ("data",))


def _take(it, k):
  return [next(it) for _ in range(k)]


@pytest.mark.parametrize("prefetch", [0, 2])
def test_permutation_covers_each_index_once_per_epoch(prefetch):
  src = _toy_source(37)
  with pipeline.TrainIterator(src, global_batch_size=8, seed=3, prefetch=prefetch) as it:
    assert it.steps_per_epoch == 4  # 37 // 8, remainder dropped.
    batches = _take(it, 8)  # Two epochs.
    assert it.position == 8
  for epoch in range(2):
    idx = np.concatenate([b["index"] for b in batches[4 * epoch:4 * epoch + 4]])
    assert len(np.unique(idx)) == 32  # No repeats within an epoch.
    np.testing.assert_array_equal(idx, np.random.default_rng([3, epoch]).permutation(37)[:32])
  # Epochs are shuffled differently.
  assert not np.array_equal(batches[0]["index"], batches[4]["index"])
  b = batches[5]
  assert b["image"].dtype == np.uint8 and b["label"].dtype == np.int32
  assert b["index"].dtype == np.int32 and b["image"].shape == (8, 4, 4, 3)
  # Each image/label really belongs to its index.
  np.testing.assert_array_equal(b["image"][:, 0, 0, 0], b["index"] % 256)
  np.testing.assert_array_equal(b["label"], b["index"] % 5)


def test_with_replacement_sampler_matches_reference_draws():
  src = _toy_source(37)
  with pipeline.TrainIterator(src, global_batch_size=8, seed=5, prefetch=0,
                              sampler="with_replacement") as it:
    idx = np.concatenate([b["index"] for b in _take(it, 4)])
  np.testing.assert_array_equal(idx, np.random.default_rng([5, 0]).integers(0, 37, 37)[:32])
  assert len(np.unique(idx)) < 32  # With replacement: repeats are (almost surely) present.


def test_resume_gives_the_same_next_batches():
  src = _toy_source(37)
  with pipeline.TrainIterator(src, global_batch_size=8, seed=1) as full:
    reference = _take(full, 10)
  with pipeline.TrainIterator(src, global_batch_size=8, seed=1, start_step=6) as resumed:
    assert resumed.position == 6
    tail = _take(resumed, 4)
    assert resumed.position == 10
  for a, b in zip(reference[6:], tail):
    for key in ("image", "label", "index"):
      np.testing.assert_array_equal(a[key], b[key])
  with pipeline.TrainIterator(src, global_batch_size=8, seed=2) as other_seed:
    assert not np.array_equal(next(other_seed)["index"], reference[0]["index"])


def test_mesh_batches_equal_unsharded_and_are_sharded(n_devices):
  assert n_devices == 8
  src = _toy_source(40)
  mesh = _mesh()
  with pipeline.TrainIterator(src, global_batch_size=16, seed=0, prefetch=0) as plain, \
      pipeline.TrainIterator(src, global_batch_size=16, seed=0, mesh=mesh) as sharded:
    for _ in range(3):
      a, b = next(plain), next(sharded)
      for key in ("image", "label", "index"):
        assert isinstance(b[key], jax.Array)
        assert b[key].sharding.is_equivalent_to(NamedSharding(mesh, P("data")), b[key].ndim)
        assert b[key].shape == a[key].shape and b[key].dtype == a[key].dtype
        np.testing.assert_array_equal(np.asarray(b[key]), a[key])
      # Each device holds its contiguous 2-row slice.
      shard_rows = sorted(s.index[0].start for s in b["index"].addressable_shards)
      assert shard_rows == list(range(0, 16, 2))


def test_batch_size_not_divisible_by_devices_raises():
  with pytest.raises(ValueError, match="not divisible by the 8 devices"):
    pipeline.TrainIterator(_toy_source(), global_batch_size=12, seed=0, mesh=_mesh())
  with pytest.raises(ValueError, match="not divisible by the 8 devices"):
    list(pipeline.eval_batches(_toy_source(), 12, mesh=_mesh()))


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="0 steps"):
    pipeline.TrainIterator(_toy_source(5), global_batch_size=8, seed=0)
  with pytest.raises(ValueError, match="sampler"):
    pipeline.TrainIterator(_toy_source(), global_batch_size=8, seed=0, sampler="random")


class _FailingSource(Source):
  name = "failing"
  num_classes = 2
  image_shape = (2, 2, 3)

  def __len__(self):
    return 16

  def __getitem__(self, i):
    raise OSError(f"disk gone at {i}")


def test_prefetch_thread_errors_are_reraised():
  it = pipeline.TrainIterator(_FailingSource(), global_batch_size=4, seed=0, prefetch=2)
  with pytest.raises(OSError, match="disk gone"):
    next(it)
  it.close()


def test_close_stops_the_thread():
  it = pipeline.TrainIterator(_toy_source(), global_batch_size=8, seed=0, prefetch=2)
  next(it)
  it.close()
  assert not it._prefetcher._thread.is_alive()
  with pytest.raises(RuntimeError, match="closed"):
    next(it)
  # An iterator dropped without close() is collected and stops its thread (the producer
  # holds no reference back to it).
  dropped = pipeline.TrainIterator(_toy_source(), global_batch_size=8, seed=0, prefetch=2)
  next(dropped)
  thread = dropped._prefetcher._thread
  del dropped
  gc.collect()
  thread.join(timeout=5)
  assert not thread.is_alive()


@pytest.mark.parametrize("use_mesh", [False, True])
def test_eval_batches_cover_everything_once_with_mask(use_mesh):
  src = _toy_source(37)
  mesh = _mesh() if use_mesh else None
  batches = list(pipeline.eval_batches(src, 16, mesh=mesh))
  assert len(batches) == 3
  for b in batches:
    assert b["image"].shape == (16, 4, 4, 3) and b["mask"].dtype == bool
    if use_mesh:
      assert b["image"].sharding.is_equivalent_to(NamedSharding(mesh, P("data")), 4)
  mask = np.concatenate([np.asarray(b["mask"]) for b in batches])
  index = np.concatenate([np.asarray(b["index"]) for b in batches])
  label = np.concatenate([np.asarray(b["label"]) for b in batches])
  image = np.concatenate([np.asarray(b["image"]) for b in batches])
  assert mask.sum() == 37 and not mask[37:].any()
  np.testing.assert_array_equal(index[mask], np.arange(37))  # In order.
  np.testing.assert_array_equal(label[mask], np.arange(37) % 5)
  np.testing.assert_array_equal(image[mask][:, 0, 0, 0], np.arange(37))
  assert (image[~mask] == 0).all()


def test_multi_host_slices_concatenate_to_the_global_batch(monkeypatch):
  """Each of 2 simulated processes reads its contiguous half of the same global batch."""
  src = _toy_source(37)
  with pipeline.TrainIterator(src, global_batch_size=8, seed=4, prefetch=0) as single:
    reference = _take(single, 5)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  halves = []
  for pid in range(2):
    monkeypatch.setattr(jax, "process_index", lambda pid=pid: pid)
    with pipeline.TrainIterator(src, global_batch_size=8, seed=4, prefetch=0,
                                start_step=2) as it:
      halves.append(_take(it, 3))
    evals = list(pipeline.eval_batches(src, 16, prefetch=0))
    assert all(b["index"].shape == (8,) for b in evals)
    # Process pid holds rows [8 pid, 8 pid + 8) of each global eval batch.
    np.testing.assert_array_equal(evals[0]["index"], np.arange(8) + 8 * pid)
    assert evals[2]["mask"].sum() == (5 if pid == 0 else 0)
  for k in range(3):
    joined = np.concatenate([halves[0][k]["index"], halves[1][k]["index"]])
    np.testing.assert_array_equal(joined, reference[2 + k]["index"])
  with pytest.raises(ValueError, match="not divisible by the number of processes \\(2\\)"):
    pipeline.TrainIterator(src, global_batch_size=7, seed=0)
