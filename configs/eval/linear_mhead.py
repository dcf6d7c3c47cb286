r"""Multi-head linear probe on feature1..feature5 (spec §5.2b; mmselfsup 0.x
resnet50_mhead_linear-8xb32-steplr-90e_in1k, the protocol of InterCLR's table).

Taps pooled to 9216 / 9216 / 8192 / 9216 / 8192 dims ('specified' AvgPool2d), each followed by
a non-affine BatchNorm and a Linear head; loss = sum of the five CEs. SGD nesterov lr 0.01,
momentum 0.9, wd 1e-4, batch 256, 90 epochs, x0.1 at epochs 30 and 60. Train views
RandomResizedCrop 224 + flip + ColorJitter(0.4, 0.4, 0.4, 0) + PCA lighting (0.1); val
Resize 256 + CenterCrop 224. Writes linear_top1@featureN (last epoch) and linear_top1_best@...

Variants (`--config=configs/eval/linear_mhead.py:VARIANT`):
* `imagenet` (default):
    python -m ssl_jax.main --config=configs/eval/linear_mhead.py \
        --config.pretrained=gs://BUCKET/interclr --workdir=gs://BUCKET/interclr_mhead
  Hardware: 8 accelerators, ~10-15 h (frozen R50 forward every step; the 5 heads are cheap).
  Validation features are cached on the host: 50k x 44k floats ~ 9 GB.
  Reference (InterCLR-MoCo v2 200 ep): 15.59 / 35.10 / 47.36 / 62.86 / 68.04.
* `smoke`: digits with adaptive pooling (the fixed kernels need 224 px), 2 cached epochs.
    python -m ssl_jax.main --config=configs/eval/linear_mhead.py:smoke \
        --config.pretrained=/tmp/ssl_jax_quickstart --workdir=/tmp/linear_mhead_smoke
  Measured 2026-11-24 on a 2-core CPU against the quickstart's MoCo v2 smoke workdir:
  7.7 s wall; linear_top1@feature1..5 0.947 / 0.903 / 0.911 / 0.925 / 0.861.
"""
from ssl_jax import config_utils as cu

common = cu.load_sibling(__file__, 'common')


def _imagenet():
  c = common.base('linear_mhead', common.imagenet_data(), image_size=224)
  c.taps = ('feature1', 'feature2', 'feature3', 'feature4', 'feature5')
  c.pooling = 'specified'   # or 'adaptive' (AdaptiveAvgPool to 12, 6, 4, 3, 2)
  c.epochs = 90
  c.augment = True
  c.jitter = (0.4, 0.4, 0.4, 0.0)
  c.lighting_std = 0.1
  c.optimizer = cu.sgd(0.01, weight_decay=1e-4, schedule='step')
  c.optimizer.nesterov = True
  c.optimizer.milestones = (30, 60)
  c.eval_every_epochs = 1
  return c


def _smoke():
  c = _imagenet()
  common.use_digits(c)
  c.pooling = 'adaptive'
  c.epochs = 2
  c.augment = False
  c.optimizer.milestones = (1,)
  return c


VARIANTS = {'default': _imagenet, 'imagenet': _imagenet, 'smoke': _smoke}


def get_config(arg=None):
  return VARIANTS[cu.parse_variant(arg, VARIANTS)]()
