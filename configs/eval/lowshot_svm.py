r"""Low-shot VOC07 SVM (spec §5.3): k positives + 19 k negatives per class, k in
{1, 2, 4, 8, 16, 32, 64, 96}, 5 seeded samples each, no CV; for each k the cost with the best
mean test mAP over the samples is reported (as the reference does). Writes lowshot_map@k
(mean), lowshot_std@k, lowshot_min@k, lowshot_max@k, lowshot_cost@k.

Variants (`--config=configs/eval/lowshot_svm.py:VARIANT`):
* `voc` (default): TFDS voc/2007, feature5 (8192-d).
    python -m ssl_jax.main --config=configs/eval/lowshot_svm.py \
        --config.pretrained=/ckpt/interclr --workdir=/tmp/lowshot --config.data.data_dir=DIR
  Hardware: 1 accelerator; 8 k x 5 samples x 19 costs x 20 classes = 15 200 SVMs (minutes
  with solver=jax on a GPU). Reference (InterCLR-MoCo v2): 45.08 / 59.25 / 65.99 / 74.31 /
  77.95 / 80.68 / 82.7 / 83.49.
* `smoke`: digits, k in {1, 2}, 2 samples.
    python -m ssl_jax.main --config=configs/eval/lowshot_svm.py:smoke \
        --config.pretrained=/tmp/ssl_jax_quickstart --workdir=/tmp/lowshot_svm_smoke
  Measured 2026-11-24 on a 2-core CPU against the quickstart's MoCo v2 smoke workdir:
  9.5 s wall; lowshot_map@1 0.520, lowshot_map@2 0.565.
"""
from ssl_jax import config_utils as cu
from ssl_jax.eval import svm

common = cu.load_sibling(__file__, 'common')


def _voc():
  c = common.base('lowshot_svm', common.voc_data(), image_size=224)
  c.layers = ('feature5',)
  c.pooling = 'specified'
  c.ks = svm.LOWSHOT_KS
  c.num_samples = svm.LOWSHOT_NUM_SAMPLES
  c.costs = svm.COSTS
  c.solver = 'jax'
  c.n_jobs = -1
  return c


def _smoke():
  c = _voc()
  common.use_digits(c)
  c.pooling = 'adaptive'
  c.ks = (1, 2)
  c.num_samples = 2
  return c


VARIANTS = {'default': _voc, 'voc': _voc, 'smoke': _smoke}


def get_config(arg=None):
  return VARIANTS[cu.parse_variant(arg, VARIANTS)]()
