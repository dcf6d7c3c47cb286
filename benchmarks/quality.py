r"""Does pretraining learn? kNN top-1 of a pretrained network vs the same network at random init.

  python benchmarks/quality.py --config=configs/mocov2.py:cifar10_cpu \
      --data=../shared/data/cifar10_subset.npz [--workdir=DIR] [--override key=value ...]

Pretrains `config` on the npz's train split (through the normal trainer, so a re-run on the same
--workdir resumes), then reports weighted-kNN top-1 on its test split for the trained online
backbone and for the identical network at initialisation (same seed). Prints a table and, as the
last line, the figures as one JSON object (`knn_top1`, `knn_top1_random_init`, `gain`,
`pretrain_seconds`, ...).
"""
import argparse
import ast
import functools
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ssl_jax import config_utils, sharding, trainer  # noqa: E402
from ssl_jax.data import sources, views  # noqa: E402
from ssl_jax.methods import get_method  # noqa: E402


def random_init_knn(config, mesh):
  """kNN of the network exactly as the trainer initialises it (same seed, same init)."""
  train_source = sources.get_source(config.data, config.data.train_split)
  eval_source = sources.get_source(config.data, config.data.eval_split)
  built = trainer.build(config, get_method(config.method), mesh, train_source.image_shape,
                        len(train_source), 1, 1)
  ctx = trainer.Context(config, built.model, mesh, train_source,
                        views.eval_view_fn(config.augment))
  return trainer.knn_eval(ctx, built.state, eval_source, config.knn)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', required=True)
  parser.add_argument('--data', required=True, help='npz with x_train/y_train/x_test/y_test')
  parser.add_argument('--workdir', default=None)
  parser.add_argument('--override', nargs='*', default=[], help='key=value (python literal)')
  args = parser.parse_args()
  config = config_utils.load_config_file(args.config)
  config.data.name = 'npz'
  config.data.path = os.path.abspath(args.data)
  for item in args.override:
    key, value = item.split('=', 1)
    old = functools.reduce(lambda node, part: node[part], key.split('.'), config)
    config_utils.set_path(config, key, type(old)(ast.literal_eval(value)))
  workdir = args.workdir or tempfile.mkdtemp(prefix='quality_')
  mesh = sharding.make_mesh()
  k = config.knn.get('k', 20)

  t0 = time.time()
  random_knn = random_init_knn(config, mesh)
  t1 = time.time()
  summary = trainer.train_and_evaluate(config, workdir, mesh=mesh)
  pretrain_s = time.time() - t1
  result = {
      'config': args.config, 'method': config.method, 'steps': summary['step'],
      'knn_k': k, 'knn_top1': summary[f'knn_top1@{k}'],
      'knn_top1_random_init': random_knn[f'knn_top1@{k}'],
      'gain': summary[f'knn_top1@{k}'] - random_knn[f'knn_top1@{k}'],
      'pretrain_seconds': round(pretrain_s, 1), 'random_init_eval_seconds': round(t1 - t0, 1),
      'images_per_sec': summary.get('images_per_sec'), 'workdir': workdir,
  }
  print(f"{'network':<28}{'kNN top-1 @' + str(k):>16}")
  print(f"{'random init':<28}{100 * result['knn_top1_random_init']:>15.2f}%")
  print(f"{'pretrained (' + str(result['steps']) + ' steps)':<28}{100 * result['knn_top1']:>15.2f}%")
  print(f"gain {100 * result['gain']:.2f} points; pretraining took {pretrain_s / 60:.1f} min")
  print(json.dumps(result))


if __name__ == '__main__':
  main()
