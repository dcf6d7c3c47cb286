r"""MoCo v1 (He et al. 2020): linear head, T 0.07, v1 augmentations (no blur), queue 65536.

* `smoke`: offline, digits, tiny ResNet, ~1 min on CPU.
    python -m ssl_jax.main --config=configs/mocov1.py:smoke --workdir=/tmp/mocov1_smoke
* `imagenet` (default): ResNet-50, batch 256, lr 0.03, 200 epochs, cosine, m 0.999.
  Hardware: 8xV100 ~53 h in the reference. Expected: 60.6 linear top-1 (moco README; 60.8 +- 0.2).
"""
from ssl_jax import config_utils as cu
from ssl_jax.data import views

_v2 = cu.load_sibling(__file__, 'mocov2')


def get_config(arg=None):
  variant = cu.parse_variant(arg, {'default': 0, 'imagenet': 0, 'smoke': 0})
  c = _v2.get_config('smoke' if variant == 'smoke' else 'imagenet')
  c.method = 'mocov1'
  c.variant = variant
  c.moco.head = 'linear'
  c.moco.temperature = 0.07
  size = 32 if variant == 'smoke' else 224
  c.augment = views.mocov1_config(size=size)
  return c
