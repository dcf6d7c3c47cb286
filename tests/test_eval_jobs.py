"""Eval jobs end to end (fake pretrained backbone), summary.json, VOC data from a local TFDS
stand-in of voc/2007, and the bad-input errors."""
import json
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from ssl_jax import checkpointing
from ssl_jax import config_utils as cu
from ssl_jax.data import sources
from ssl_jax.eval import jobs, voc_data
from test_eval_features import numpy_variables, tiny_backbone

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
tfds = pytest.importorskip('tensorflow_datasets')


def eval_config(job, **overrides):
  c = cu.load_config_file(os.path.join(REPO, 'configs', 'eval', f'{job}.py') + ':smoke')
  c.pretrained = '/fake/pretrain'
  c.data.image_size = 16
  c.image_size = 16
  for key, value in overrides.items():
    cu.set_path(c, key, value)
  return c


@pytest.fixture
def fake_pretrained(monkeypatch):
  """load_pretrained -> a tiny random backbone; digits cut to 320 / 160 images (CPU time)."""
  real_get_source = sources.get_source

  def small_source(data_cfg, split):
    full = real_get_source(data_cfg, split)
    n = 320 if split == 'train' else 160
    return sources.ArraySource(full.images[:n], full.labels[:n], num_classes=full.num_classes,
                               name=full.name)

  monkeypatch.setattr(sources, 'get_source', small_source)
  backbone = tiny_backbone()
  pretrained = checkpointing.Pretrained(ml_collections.ConfigDict({'method': 'fake'}), backbone,
                                        numpy_variables(backbone, 16), step=7)
  calls = []

  def load(workdir, encoder='online'):
    calls.append((workdir, encoder))
    return pretrained

  monkeypatch.setattr(checkpointing, 'load_pretrained', load)
  return calls


def _summary(workdir):
  with open(os.path.join(workdir, 'summary.json'), encoding='utf-8') as f:
    return json.load(f)


def test_write_summary_file_and_line(tmp_path, capsys):
  line = jobs.write_summary(str(tmp_path / 'w'), {'b': np.float32(0.5), 'a': np.arange(2)})
  assert capsys.readouterr().out.strip() == line
  assert _summary(str(tmp_path / 'w')) == {'a': [0, 1], 'b': 0.5}


def test_knn_and_linear_jobs(tmp_path, fake_pretrained):
  metrics = jobs.JOBS['knn'](eval_config('knn', encoder='momentum'), str(tmp_path / 'knn'))
  assert fake_pretrained[-1] == ('/fake/pretrain', 'momentum')
  assert _summary(str(tmp_path / 'knn')) == json.loads(json.dumps(metrics))
  assert {'knn_top1@10', 'knn_top5@10', 'knn_top1@20', 'knn_top5@20'} <= set(metrics)
  assert 0.2 < metrics['knn_top1@20'] <= metrics['knn_top5@20'] <= 1.0  # digits, random net
  assert metrics['pretrain_step'] == 7 and metrics['encoder'] == 'momentum'

  # SwAV-setting probe through the augmented path (crops + frozen forward every step); the
  # multi-head one below through the cached-feature fast path.
  metrics = jobs.JOBS['linear'](eval_config('linear', epochs=1, augment=True),
                                str(tmp_path / 'lin'))
  assert 0.0 <= metrics['linear_top1'] <= metrics['linear_top5'] <= 1.0
  assert 'linear_top1' in _summary(str(tmp_path / 'lin'))

  metrics = jobs.JOBS['linear_mhead'](eval_config('linear_mhead', epochs=1),
                                      str(tmp_path / 'mh'))
  for tap in ('feature1', 'feature2', 'feature3', 'feature4', 'feature5'):
    assert 0.0 <= metrics[f'linear_top1@{tap}'] <= 1.0


def test_svm_jobs_on_digits(tmp_path, fake_pretrained):
  del fake_pretrained
  costs = (0.0625, 1.0, 10.0)
  metrics = jobs.JOBS['svm_voc07'](eval_config('svm_voc07', costs=costs), str(tmp_path / 'v'))
  assert 0.3 < metrics['voc07_map'] <= 1.0 and len(metrics['voc07_ap@feature5']) == 10
  assert set(metrics['voc07_costs@feature5']) <= set(costs)
  metrics = jobs.JOBS['lowshot_svm'](eval_config('lowshot_svm', costs=costs, ks=(1,)),
                                     str(tmp_path / 'l'))
  assert 0.0 < metrics['lowshot_map@1'] <= 1.0 and metrics['lowshot_cost@1'] in costs
  assert 'lowshot_map@1' in _summary(str(tmp_path / 'l'))


def test_bad_pretrained_workdir(tmp_path):
  with pytest.raises(FileNotFoundError, match='No checkpoint'):
    jobs.JOBS['knn'](eval_config('knn', pretrained=str(tmp_path)), str(tmp_path / 'out'))
  with pytest.raises(ValueError, match='config.pretrained is empty'):
    jobs.JOBS['knn'](eval_config('knn', pretrained=''), str(tmp_path / 'out'))


# ------------------------------------------------------------------------- VOC stand-in
CLASSES = ('cat', 'dog', 'bird')
# (labels of all objects, of non-difficult objects) per image: one difficult-only cat in 3.
VOC_LABELS = [((0,), (0,)), ((1,), (1,)), ((0, 2), (2,)), ((2,), (2,)), ((0, 1), (0, 1)),
              ((1, 2), (1, 2))]


class SslJaxTestVoc(tfds.core.GeneratorBasedBuilder):
  """voc/2007's feature layout with a handful of synthetic images (built without TF)."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    label = tfds.features.ClassLabel(names=CLASSES)
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(),
        'objects': tfds.features.Sequence({'label': label, 'is_difficult': np.bool_}),
        'labels': tfds.features.Sequence(label),
        'labels_no_difficult': tfds.features.Sequence(label),
    }))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples(0, 12), 'validation': self._generate_examples(12, 6),
            'test': self._generate_examples(18, 12)}

  def _generate_examples(self, start, n):
    for i in range(start, start + n):
      every, easy = VOC_LABELS[i % len(VOC_LABELS)]
      rng = np.random.default_rng(i)
      # Class-dependent colours so a random network still separates them a little.
      image = rng.integers(0, 60, (20 + i, 30, 3)).astype(np.uint8)
      for c in easy:
        image[..., c] += 120
      objects = [{'label': c, 'is_difficult': c not in easy} for c in every]
      yield i, {'image': Image.fromarray(image), 'objects': objects, 'labels': list(every),
                'labels_no_difficult': list(easy)}


@pytest.fixture(scope='module')
def voc_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  SslJaxTestVoc(data_dir=data_dir, file_format='array_record').download_and_prepare()
  return data_dir


def test_label_matrix_and_squash():
  targets = voc_data.label_matrix([[0, 2], [1], []], [[2], [1], []], 3)
  np.testing.assert_array_equal(targets, [[-1, 0, 1], [0, 1, 0], [0, 0, 0]])
  with pytest.raises(ValueError, match='not a subset'):
    voc_data.label_matrix([[0]], [[1]], 3)
  image = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
  want = Image.fromarray(image).resize((384, 256), Image.BILINEAR).resize((224, 224),
                                                                          Image.BILINEAR)
  np.testing.assert_array_equal(voc_data.squash_resize(image), np.asarray(want))


def test_voc_source_and_svm_job(voc_dir, tmp_path, fake_pretrained):
  del fake_pretrained
  source = voc_data.VocSource('train+validation', tfds_name='ssl_jax_test_voc',
                              data_dir=voc_dir, image_size=16)
  assert len(source) == 18 and source.targets.shape == (18, 3)
  batch = source.get_batch(np.arange(18))
  assert batch['image'].shape == (18, 16, 16, 3) and batch['image'].dtype == np.uint8
  # Recover each record's generator id from its size-independent colour pattern is not
  # possible after the squash, so check the label matrix as a multiset of the known rows.
  rows = {tuple(r) for r in source.targets.tolist()}
  assert (-1, 0, 1) in rows and (1, 1, 0) in rows
  assert sorted(map(tuple, source.targets.tolist())) == sorted(
      tuple(voc_data.label_matrix([e], [d], 3)[0]) for e, d in
      [VOC_LABELS[i % 6] for i in range(18)])
  config = eval_config('svm_voc07', costs=(0.0625, 1.0), layers=('pooled',))
  config.data = ml_collections.ConfigDict(dict(
      name='voc', tfds_name='ssl_jax_test_voc', data_dir=voc_dir,
      train_split='train+validation', eval_split='test'))
  config.batch_size = 8
  metrics = jobs.JOBS['svm_voc07'](config, str(tmp_path / 'voc'))
  assert 0.0 < metrics['voc07_map'] <= 1.0 and len(metrics['voc07_ap@pooled']) == 3
  with pytest.raises(FileNotFoundError, match='not prepared'):
    voc_data.VocSource('test', data_dir=str(tmp_path / 'empty'))
