r"""Train-step throughput of each method against a supervised step on the same backbone and batch.

  python benchmarks/step_time.py [--config=configs/mocov2.py:cifar10_cpu] [--batch=128]
      [--steps=5] [--methods=supervised,mocov2,swav,swav_2crop,interclr,interclr_ref]

Every row runs the real trainer step (`trainer.make_train_step`: on-device augmentation, forward,
backward, optimiser, method state update) on a fixed synthetic uint8 batch already on device, so
input loading is excluded. The backbone (`config.model`) and batch are taken from --config and
forced onto every method's own config. Reports median img/s over --steps after two warm-up steps
and the step-time ratio to the supervised step. The FLOP model for MoCo v2 is ~1.33x (query
forward+backward = 3 units, key forward = 1 unit, vs 3 for supervised). Last line: JSON.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from ssl_jax import config_utils, models, sharding, trainer  # noqa: E402
from ssl_jax.data import views  # noqa: E402
from ssl_jax.methods import base, get_method  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# row name -> (method, config whose method settings and views are timed). `swav` is the
# multi-crop recipe (2 x 32 + 6 x 16 px, configs/swav.py:cifar10); `swav_2crop` the two-crop
# recipe of the CPU quality run. `interclr` is the CPU quality recipe (pool 500, 128 negatives);
# `interclr_ref` the cifar10 variant (the reference's ratios: pool 5,000, 640 negatives).
METHOD_CONFIGS = {'mocov2': ('mocov2', 'configs/mocov2.py:cifar10_cpu'),
                  'swav': ('swav', 'configs/swav.py:cifar10'),
                  'swav_2crop': ('swav', 'configs/swav.py:cifar10_cpu'),
                  'interclr': ('interclr', 'configs/interclr.py:cifar10_cpu'),
                  'interclr_ref': ('interclr', 'configs/interclr.py:cifar10')}


class Classifier(nn.Module):
  backbone: nn.Module
  num_classes: int

  @nn.compact
  def __call__(self, x, train=True):
    out = dict(self.backbone(x, train))
    out['logits'] = nn.Dense(self.num_classes)(out['pooled'])
    out['embedding'] = out['pooled']
    return out


def supervised_method(num_classes=10):
  """Plain cross-entropy on one augmented view: the baseline every SSL step is compared with."""
  def loss_fn(config, model, params, state, crops, batch, rng):
    del rng
    out, upd = model.apply({'params': params, 'batch_stats': state.batch_stats}, crops[0][0],
                           train=True, mutable=['batch_stats'])
    loss = optax.softmax_cross_entropy_with_integer_labels(out['logits'], batch['label']).mean()
    return loss, {'batch_stats': upd['batch_stats'], 'metrics': {}}

  return base.Method(
      name='supervised',
      create_model=lambda c: Classifier(models.build_backbone(c.model), num_classes),
      init_method_state=lambda c, rng, n: {}, loss_fn=loss_fn,
      update_state=lambda c, state, aux: state)


def time_method(method, config, mesh, batch, steps, num_train=50_000):
  built = trainer.build(config, method, mesh, batch['image'].shape[1:], num_train, 1000, 100)
  state, step = built.state, built.train_step
  times = []
  for i in range(steps + 2):
    t = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics['loss'])
    if i >= 2:
      times.append(time.perf_counter() - t)
  return float(np.median(times))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--config', default='configs/mocov2.py:cifar10_cpu')
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--methods', default='supervised,mocov2,swav,swav_2crop,interclr')
  parser.add_argument('--interclr_bank', type=int, default=50_000)
  args = parser.parse_args()
  base_cfg = config_utils.load_config_file(os.path.join(REPO, args.config))
  mesh = sharding.make_mesh()
  size = base_cfg.data.image_size
  rng = np.random.RandomState(0)
  host = {'image': rng.randint(0, 256, (args.batch, size, size, 3)).astype(np.uint8),
          'label': rng.randint(0, 10, args.batch).astype(np.int32),
          'index': rng.choice(args.interclr_bank, args.batch, replace=False).astype(np.int32)}
  batch = jax.device_put(host, sharding.batch_sharded(mesh))
  rows = []
  for name in args.methods.split(','):
    if name == 'supervised':
      config, method = base_cfg.copy_and_resolve_references(), supervised_method()
      config.augment = views.mocov2_config(size=size, small_image=size <= 64)
    else:
      if name not in METHOD_CONFIGS:
        parser.error(f'--methods: unknown {name!r}; choose from supervised, '
                     f"{', '.join(METHOD_CONFIGS)}")
      method_name, spec = METHOD_CONFIGS[name]
      config = config_utils.load_config_file(os.path.join(REPO, spec))
      method = get_method(method_name)
    config.model = base_cfg.model
    config.batch_size = args.batch
    config.num_steps = 1000
    num_train = args.interclr_bank if name.startswith('interclr') else 50_000
    seconds = time_method(method, config, mesh, batch, args.steps, num_train)
    rows.append({'method': name, 'step_ms': 1000 * seconds, 'img_per_s': args.batch / seconds})
  sup = next((r for r in rows if r['method'] == 'supervised'), None)
  moco = next((r for r in rows if r['method'] == 'mocov2'), None)
  for r in rows:
    r['ratio_to_supervised'] = r['step_ms'] / sup['step_ms'] if sup else None
    r['ratio_to_mocov2'] = r['step_ms'] / moco['step_ms'] if moco else None
  print(f"backbone {base_cfg.model.name} width {base_cfg.model.width}, {size}px, batch "
        f"{args.batch}, {jax.device_count()} x {jax.devices()[0].platform}")
  print(f"{'method':<12}{'step ms':>10}{'img/s':>10}{'x supervised':>14}{'x mocov2':>10}")
  for r in rows:
    fmt = lambda v: f'{v:.2f}' if v is not None else '-'
    print(f"{r['method']:<12}{r['step_ms']:>10.1f}{r['img_per_s']:>10.1f}"
          f"{fmt(r['ratio_to_supervised']):>14}{fmt(r['ratio_to_mocov2']):>10}")
  print(json.dumps({'backbone': base_cfg.model.name, 'batch': args.batch, 'rows': rows}))


if __name__ == '__main__':
  main()
