r"""Weighted kNN on frozen pooled features (spec §5.1; mmselfsup knn_imagenet = DINO's recipe).

Train split = bank, eval split = queries; cosine similarity, top-k neighbours vote with
exp(sim / 0.07); top-1 / top-5 for k in {10, 20, 100, 200}. Writes DIR/summary.json with
knn_top1@k / knn_top5@k (fractions).

Variants (`--config=configs/eval/knn.py:VARIANT`):
* `imagenet` (default): ResNet-50 features of ImageNet train (bank) / validation.
    python -m ssl_jax.main --config=configs/eval/knn.py \
        --config.pretrained=gs://BUCKET/swav --workdir=gs://BUCKET/swav_knn \
        --config.data.data_dir=gs://BUCKET/tfds
  Hardware: 1 accelerator host; extraction of 1.33M images dominates (~15 min on 8 GPUs);
  the sweep itself takes about a minute. Reference (SwAV 200 ep, mmselfsup):
  top-1 60.5 / 60.6 / 59.0 / 57.6 for k = 10 / 20 / 100 / 200.
* `cifar10`: TFDS cifar10, k in {20, 200}. Minutes on one GPU.
* `smoke`: digits (needs a pretraining workdir, e.g. the README quickstart's).
    python -m ssl_jax.main --config=configs/eval/knn.py:smoke \
        --config.pretrained=/tmp/ssl_jax_quickstart --workdir=/tmp/knn_smoke
  Measured 2026-11-24 on a 2-core CPU against the quickstart's MoCo v2 smoke workdir:
  4.3 s wall; knn_top1@10 0.825, knn_top1@20 0.811 on the 360 held-out digits.
"""
from ssl_jax import config_utils as cu

common = cu.load_sibling(__file__, 'common')


def _imagenet():
  c = common.base('knn', common.imagenet_data(), image_size=224)
  c.ks = (10, 20, 100, 200)
  c.temperature = 0.07
  c.chunk_size = 256     # queries per device call; memory ~ chunk x N / devices floats
  return c


def _cifar10():
  c = _imagenet()
  c.data = common.cifar10_data()
  c.image_size = 32
  c.ks = (20, 200)
  return c


def _smoke():
  c = _imagenet()
  common.use_digits(c)
  c.ks = (10, 20)
  return c


VARIANTS = {'default': _imagenet, 'imagenet': _imagenet, 'cifar10': _cifar10, 'smoke': _smoke}


def get_config(arg=None):
  return VARIANTS[cu.parse_variant(arg, VARIANTS)]()
