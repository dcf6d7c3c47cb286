r"""Linear probe, SwAV setting (spec §5.2a; mmselfsup resnet50_linear-8xb32-coslr-100e_in1k).

Frozen backbone (eval-mode BN), global-average-pooled feature -> Linear(2048, classes) with
N(0, 0.01) init; SGD lr 0.3, momentum 0.9, wd 1e-6, batch 256, 100 epochs, cosine per epoch to
0; train views RandomResizedCrop(224, (0.08, 1)) + flip; val Resize 256 + CenterCrop 224.
With `augment=False` the train features are extracted once and the head trains on them (fast
path). Writes linear_top1 / linear_top5 (last epoch) and linear_top1_best.

Variants (`--config=configs/eval/linear.py:VARIANT`):
* `imagenet` (default):
    python -m ssl_jax.main --config=configs/eval/linear.py \
        --config.pretrained=gs://BUCKET/swav --workdir=gs://BUCKET/swav_linear
  Hardware: 8 accelerators; 100 epochs of frozen R50 forwards (~1/3 of a training epoch each):
  roughly 10-15 h on 8 V100-class GPUs. Reference: SwAV 200 ep 71.9-72.7 (mmselfsup / FB),
  MoCo v2 200 ep 67.5, InterCLR 68.0 (mhead feat5).
* `cifar10`: ResNet-18 CIFAR features, 100 epochs, batch 256, cached (no augmentation).
* `smoke`: digits, 3 epochs on cached features.
    python -m ssl_jax.main --config=configs/eval/linear.py:smoke \
        --config.pretrained=/tmp/ssl_jax_quickstart --workdir=/tmp/linear_smoke
  Measured 2026-11-24 on a 2-core CPU against the quickstart's MoCo v2 smoke workdir:
  5.1 s wall; linear_top1 0.675 (3 epochs only).
"""
from ssl_jax import config_utils as cu

common = cu.load_sibling(__file__, 'common')


def _imagenet():
  c = common.base('linear', common.imagenet_data(), image_size=224)
  c.epochs = 100
  c.augment = True          # False: cached-feature fast path (no RandomResizedCrop/flip)
  c.optimizer = cu.sgd(0.3, weight_decay=1e-6, schedule='cosine_epoch')
  c.eval_every_epochs = 1
  return c


def _cifar10():
  c = _imagenet()
  c.data = common.cifar10_data()
  c.image_size = 32
  c.augment = False
  return c


def _smoke():
  c = _imagenet()
  common.use_digits(c)
  c.epochs = 3
  c.augment = False
  return c


VARIANTS = {'default': _imagenet, 'imagenet': _imagenet, 'cifar10': _cifar10, 'smoke': _smoke}


def get_config(arg=None):
  return VARIANTS[cu.parse_variant(arg, VARIANTS)]()
