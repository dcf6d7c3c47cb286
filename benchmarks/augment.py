r"""Throughput of the on-device augmentation recipes (ssl_jax.data.views), in input images/s.

  python benchmarks/augment.py [--batch=256] [--repeats=5] [--repeats_224=2] [--input_224=256]

Each row compiles `build_view_fn(recipe)` ahead of time and times it on a fixed random uint8
batch already on device (compilation excluded; median of the timed calls). The 224 px recipes
read --input_224 px square images (a host pipeline that stores images with a 256 px side);
the 32 px recipe reads 32 px CIFAR-size images. One input image gives `views` output crops.
Prints a table, then as its LAST line the img/s figures as one JSON object.

`measure_recipe` is importable, e.g. to report the augmentation share of a training step.
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import ml_collections  # noqa: E402

from ssl_jax.data import views  # noqa: E402


def measure_recipe(aug_cfg: ml_collections.ConfigDict, batch: int, image_size: int,
                   repeats: int) -> float:
  """Median input images per second of the jitted view function of `aug_cfg`.

  Args:
    aug_cfg: a recipe ConfigDict (e.g. `views.mocov2_config(224)`).
    batch: images per call.
    image_size: side of the square uint8 input images.
    repeats: timed calls (compilation excluded).

  Returns:
    batch / median seconds per call.
  """
  images = jnp.asarray(np.random.RandomState(0).randint(
      0, 256, (batch, image_size, image_size, 3), dtype=np.uint8))
  key = jax.random.key(0)
  # Compile ahead of time instead of an untimed warm-up call: a 224 px call takes ~20 s on a
  # shared 2-core CPU, and on CPU the first call of a compiled program is not slower.
  fn = jax.jit(views.build_view_fn(aug_cfg)).lower(key, images).compile()
  seconds = []
  for i in range(repeats):
    step_key = jax.random.fold_in(key, i + 1)  # new randomness each call, same program
    start = time.perf_counter()
    jax.block_until_ready(fn(step_key, images))
    seconds.append(time.perf_counter() - start)
  return batch / statistics.median(seconds)


def _recipes(input_224: int):
  """(name, config, input side, number of output views) for every benchmarked recipe."""
  return [
      ("two_crops_32", views.mocov2_config(32), 32, 2),
      ("two_crops_224", views.mocov2_config(224), input_224, 2),
      ("multi_crop_2x224_6x96", views.swav_config((224, 96), (2, 6)), input_224, 8),
      ("asymmetric_224", views.byol_config(224), input_224, 2),
      ("eval_224", views.eval_config(224), input_224, 1),
  ]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=5, help="timed calls for 32 px / eval")
  parser.add_argument("--repeats_224", type=int, default=2,
                      help="timed calls for the 224 px training recipes")
  parser.add_argument("--input_224", type=int, default=256,
                      help="side of the input images of the 224 px recipes")
  parser.add_argument("--step_config", default="configs/mocov2.py:cifar10",
                      help="config whose train step the augmentation share is measured against "
                           "('' to skip)")
  parser.add_argument("--step_repeats", type=int, default=1, help="timed train steps")
  args = parser.parse_args(argv)

  print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}; batch {args.batch}")
  header = f"{'recipe':<24}{'input px':>9}{'views':>7}{'img/s':>10}{'ms/batch':>11}"
  print(header)
  print("-" * len(header))
  results = {}
  for name, cfg, side, num_views in _recipes(args.input_224):
    repeats = args.repeats if (side == 32 or cfg.recipe == "eval") else args.repeats_224
    img_per_s = measure_recipe(cfg, args.batch, side, repeats)
    results[name] = round(img_per_s, 1)
    print(f"{name:<24}{side:>9}{num_views:>7}{img_per_s:>10.1f}"
          f"{1000 * args.batch / img_per_s:>11.0f}", flush=True)
  if args.step_config:
    results.update(_augment_share(args.step_config, args.batch, args.step_repeats))
  print(json.dumps(results))


def _augment_share(spec, batch, repeats):
  """Share of a full MoCo v2 train step (which augments inside the step) spent augmenting."""
  import step_time  # pylint: disable=g-import-not-at-top  (benchmarks/step_time.py)
  from ssl_jax import config_utils, sharding  # pylint: disable=g-import-not-at-top
  from ssl_jax.methods import get_method  # pylint: disable=g-import-not-at-top
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  config = config_utils.load_config_file(os.path.join(repo, spec))
  config.batch_size = batch
  size = config.data.image_size
  mesh = sharding.make_mesh()
  rng = np.random.RandomState(0)
  host = {"image": rng.randint(0, 256, (batch, size, size, 3)).astype(np.uint8),
          "label": np.zeros(batch, np.int32), "index": np.arange(batch, dtype=np.int32)}
  step_s = step_time.time_method(get_method(config.method), config, mesh,
                                 jax.device_put(host, sharding.batch_sharded(mesh)), repeats)
  aug_s = batch / measure_recipe(config.augment, batch, size, max(repeats, 3))
  share = aug_s / step_s
  print(f"\n{spec} train step at batch {batch}: {1000 * step_s:.0f} ms; its augmentation "
        f"{1000 * aug_s:.0f} ms = {100 * share:.1f}% of the step (target <= 15%)")
  return {"step_config": spec, "step_ms": round(1000 * step_s, 1),
          "augment_ms": round(1000 * aug_s, 1), "augment_share_of_step": round(share, 4)}


if __name__ == "__main__":
  main()
