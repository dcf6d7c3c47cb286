"""Fields shared by the configs/eval/*.py job configs (loaded with config_utils.load_sibling)."""
import ml_collections

from ssl_jax import config_utils as cu


def base(job, data, image_size, batch_size=256):
  """The fields every eval job reads.

  Args:
    job: key of ssl_jax.eval.jobs.JOBS.
    data: a ConfigDict for ssl_jax.data.sources.get_source (or name='voc' for the SVM jobs).
    image_size: side of the images the backbone sees (the eval centre crop).
    batch_size: global batch for feature extraction / probe training (multiple of #devices).
  """
  c = ml_collections.ConfigDict()
  c.job = job
  c.pretrained = ''          # required: the --workdir of a pretraining run
  c.encoder = 'online'       # or 'momentum' (EMA encoder, what PatchMix evaluates)
  c.data = data
  c.image_size = image_size
  c.crop_fraction = 0.875    # Resize(size / 0.875) + CenterCrop(size): 256 -> 224
  c.batch_size = batch_size
  c.seed = 0
  return c


def tfds_data(tfds_name, image_size, eval_split='test'):
  d = cu.data('tfds', image_size=image_size)
  d.tfds_name = tfds_name
  d.eval_split = eval_split
  return d


def imagenet_data():
  # Host: short side 256 + centre crop 256; device: the eval view crops 224.
  return tfds_data('imagenet2012', 256, eval_split='validation')


def cifar10_data():
  return tfds_data('cifar10', 32)


def use_digits(c):
  """Smoke variants: scikit-learn digits at 32 px (offline), small batches."""
  c.data = cu.data('digits', image_size=32)
  c.image_size = 32
  c.batch_size = 64
  return c


def voc_data():
  return ml_collections.ConfigDict(dict(
      name='voc', tfds_name='voc/2007', path='',
      data_dir=ml_collections.FieldReference(None, str), image_size=224,
      train_split='train+validation', eval_split='test'))
