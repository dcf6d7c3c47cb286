r"""VOC07 SVM benchmark (spec §5.3; mmselfsup 0.x tools/benchmarks/classification/svm_voc07).

Frozen backbone on VOC2007 (images squashed to 224x224), tap pooled as in §5.2b (feature5 =
2048x2x2 = 8192), row-normalised; per class a squared-hinge linear SVM (class weight 2 on
positives) with the cost chosen by 3-fold CV AP over {1, 10, 100} + {0.5^n: n = 4..19};
test AP with difficult images dropped. Writes voc07_map (of the last layer in `layers`) and
voc07_map@layer, per-class APs and chosen costs.

`solver`: 'jax' (default: every class x fold x cost solved batched on device, matches sklearn
to < 0.1 mAP point, see benchmarks/eval_speed.py) or 'sklearn' (the reference LinearSVC loop,
parallel over n_jobs processes).

Variants (`--config=configs/eval/svm_voc07.py:VARIANT`):
* `voc` (default): TFDS voc/2007 (train+validation / test), prepared once with TensorFlow:
  `tfds build voc/2007 --data_dir=DIR --file_format=array_record`.
    python -m ssl_jax.main --config=configs/eval/svm_voc07.py \
        --config.pretrained=/ckpt/interclr --workdir=/tmp/voc07 --config.data.data_dir=DIR
  Hardware: 1 accelerator for ~10k R50 forwards (~1 min), then the SVMs (~1-2 min with the
  jax solver on a GPU; hours with solver=sklearn on a few cores).
  Reference: InterCLR-MoCo v2 200 ep feature5 85.24; MoCo v2 ~84.
* `smoke`: digits (one-vs-rest targets), adaptive pooling.
    python -m ssl_jax.main --config=configs/eval/svm_voc07.py:smoke \
        --config.pretrained=/tmp/ssl_jax_quickstart --workdir=/tmp/svm_voc07_smoke
  Measured 2026-11-24 on a 2-core CPU against the quickstart's MoCo v2 smoke workdir:
  9.3 s wall; voc07_map 0.957 (10 digit classes).
"""
from ssl_jax import config_utils as cu
from ssl_jax.eval import svm

common = cu.load_sibling(__file__, 'common')


def _voc():
  c = common.base('svm_voc07', common.voc_data(), image_size=224)
  c.layers = ('feature5',)   # any of feature1..feature5 / pooled; the last one is voc07_map
  c.pooling = 'specified'
  c.costs = svm.COSTS
  c.solver = 'jax'
  c.n_jobs = -1              # sklearn solver: worker processes
  return c


def _smoke():
  c = _voc()
  common.use_digits(c)
  c.pooling = 'adaptive'
  return c


VARIANTS = {'default': _voc, 'voc': _voc, 'smoke': _smoke}


def get_config(arg=None):
  return VARIANTS[cu.parse_variant(arg, VARIANTS)]()
