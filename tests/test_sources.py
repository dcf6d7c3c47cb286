"""Tests for ssl_jax.data.sources and tfds_source: shapes, determinism, validation."""
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from ssl_jax.data import sources
from ssl_jax.data.sources import get_source


def cfg(**kwargs):
  return ml_collections.ConfigDict(kwargs)


# ---------------------------------------------------------------------------- digits


def test_digits_shapes_dtypes_and_split():
  train = get_source(cfg(name="digits", image_size=16), "train")
  test = get_source(cfg(name="digits", image_size=16), "test")
  assert (len(train), len(test)) == (1437, 360)
  assert train.num_classes == test.num_classes == 10
  assert train.image_shape == (16, 16, 3) and train.name == "digits:train"
  batch = train.get_batch(np.array([5, 0, 1436]))
  assert batch["image"].dtype == np.uint8 and batch["image"].shape == (3, 16, 16, 3)
  assert batch["label"].dtype == np.int32 and batch["index"].dtype == np.int32
  np.testing.assert_array_equal(batch["index"], [5, 0, 1436])
  # Stratified: every class appears in test with 36 +- 1 images.
  counts = np.bincount(test.labels, minlength=10)
  assert counts.min() >= 35 and counts.max() <= 37
  # 0..16 -> 0..255 and grey replicated to RGB.
  assert batch["image"].max() == 255 and batch["image"].min() == 0
  np.testing.assert_array_equal(batch["image"][..., 0], batch["image"][..., 2])


def test_digits_matches_sklearn_with_nearest_upsampling():
  from sklearn.datasets import load_digits
  raw = load_digits()
  train = get_source(cfg(name="digits", image_size=16), "train")
  test = get_source(cfg(name="digits", image_size=16), "test")
  # The two splits partition the 1797 images: match every image back to sklearn's.
  ref = np.round(raw.images * 255 / 16).astype(np.uint8)
  lookup = {r.tobytes(): i for i, r in enumerate(ref)}
  seen = []
  for src in (train, test):
    for i in (0, len(src) - 1):
      rec = src[i]
      small = rec["image"][::2, ::2, 0]  # Nearest x2 upsampling -> every 2nd pixel is exact.
      np.testing.assert_array_equal(rec["image"][1::2, 1::2, 0], small)
      j = lookup[small.tobytes()]
      assert rec["label"] == raw.target[j] and rec["index"] == i
      seen.append(j)
  assert len(set(seen)) == 4


def test_digits_deterministic_and_index_is_position():
  a = get_source(cfg(name="digits", image_size=8), "train")
  b = sources.DigitsSource("train", image_size=8)
  np.testing.assert_array_equal(a.images, b.images)
  np.testing.assert_array_equal(a.labels, b.labels)
  for i in (0, 17, 1436):
    assert a[i]["index"] == i
    np.testing.assert_array_equal(a[i]["image"], a.get_batch(np.array([i]))["image"][0])
  with pytest.raises(IndexError):
    a[1437]
  with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
    get_source(cfg(name="digits"), "validation")


def test_unknown_source_name():
  with pytest.raises(ValueError, match="Unknown data.name 'imagenet'"):
    get_source(cfg(name="imagenet"), "train")


# ---------------------------------------------------------------------------- npz


def _write_npz(path, **overrides):
  rng = np.random.default_rng(0)
  arrays = {
      "x_train": rng.integers(0, 256, (12, 6, 6, 3), dtype=np.uint8),
      "y_train": np.arange(12) % 4,
      "x_test": rng.integers(0, 256, (5, 6, 6, 3), dtype=np.uint8),
      "y_test": np.arange(5) % 4,
  }
  arrays.update(overrides)
  arrays = {k: v for k, v in arrays.items() if v is not None}
  np.savez(path, **arrays)
  return arrays


def test_npz_roundtrip(tmp_path):
  path = tmp_path / "tiny.npz"
  arrays = _write_npz(path)
  train = get_source(cfg(name="npz", path=str(path)), "train")
  test = get_source(cfg(name="npz", path=str(path)), "test")
  assert (len(train), len(test), train.num_classes, train.image_shape) == (12, 5, 4, (6, 6, 3))
  batch = train.get_batch(np.array([3, 11, 3]))
  np.testing.assert_array_equal(batch["image"], arrays["x_train"][[3, 11, 3]])
  np.testing.assert_array_equal(batch["label"], [3, 3, 3])
  np.testing.assert_array_equal(batch["index"], [3, 11, 3])
  assert batch["label"].dtype == np.int32
  np.testing.assert_array_equal(test[4]["image"], arrays["x_test"][4])


def test_npz_resizes_to_image_size(tmp_path):
  path = tmp_path / "tiny.npz"
  x = np.zeros((12, 6, 6, 3), np.uint8)
  x[:, :, 3:] = 200  # Right half bright: survives resizing as a left/right split.
  _write_npz(path, x_train=x)
  train = get_source(cfg(name="npz", path=str(path), image_size=12), "train")
  assert train.image_shape == (12, 12, 3)
  img = train[0]["image"]
  assert img[:, :5].max() == 0 and img[:, 7:].min() == 200


@pytest.mark.parametrize("override, message", [
    (dict(x_train=np.zeros((12, 6, 6, 3), np.float32)), "must be uint8"),
    (dict(x_train=np.zeros((12, 6, 6), np.uint8)), "Grayscale images must be stored with 3"),
    (dict(x_train=np.zeros((12, 3, 6, 6), np.uint8)), "3 \\(RGB\\) channels"),
    (dict(y_train=np.arange(12) - 1), "labels must lie in \\[0, 11\\) but range over \\[-1"),
    (dict(y_train=np.arange(11)), "12 images but 11 labels"),
    (dict(x_train=np.zeros((0, 6, 6, 3), np.uint8), y_train=np.zeros((0,), np.int64)),
     "the split is empty"),
    (dict(y_test=None), "missing keys \\['y_test'\\]"),
])
def test_npz_validation_errors(tmp_path, override, message):
  path = tmp_path / "bad.npz"
  _write_npz(path, **override)
  with pytest.raises(ValueError, match=message) as err:
    get_source(cfg(name="npz", path=str(path)), "train")
  assert "npz:bad.npz:train" in str(err.value)  # Names the source.


def test_npz_labels_beyond_num_classes(tmp_path):
  path = tmp_path / "tiny.npz"
  _write_npz(path)
  with pytest.raises(ValueError, match="labels must lie in \\[0, 3\\)"):
    get_source(cfg(name="npz", path=str(path), num_classes=3), "train")


def test_npz_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="no such file .*nope.npz.*x_train"):
    get_source(cfg(name="npz", path=str(tmp_path / "nope.npz")), "train")
  with pytest.raises(ValueError, match="needs data.path"):
    get_source(cfg(name="npz", path=None), "train")


# ---------------------------------------------------------------------------- folder


def _write_png(path, value, size=(5, 7), mode="RGB"):
  """Writes a constant image of colour `value` (H, W = size)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  arr = np.full((*size, 3), value, np.uint8)
  Image.fromarray(arr).convert(mode).save(path)


def test_folder_reads_classes_in_sorted_order(tmp_path):
  # Class folders created out of order; labels must follow sorted names.
  for cls, value in (("zebra", 30), ("ant", 10), ("cat", 20)):
    for k in range(2):
      _write_png(tmp_path / "train" / cls / f"{k}.png", value + k)
  _write_png(tmp_path / "test" / "ant" / "a.png", 99)
  _write_png(tmp_path / "test" / "zebra" / "z.jpg", 0)
  (tmp_path / "train" / "ant" / "notes.txt").write_text("not an image")
  train = get_source(cfg(name="folder", path=str(tmp_path)), "train")
  assert train.classes == ["ant", "cat", "zebra"] and train.num_classes == 3
  assert len(train) == 6 and train.image_shape == (5, 7, 3)
  batch = train.get_batch(np.array([5, 0, 2]))
  np.testing.assert_array_equal(batch["label"], [2, 0, 1])
  np.testing.assert_array_equal(batch["index"], [5, 0, 2])
  np.testing.assert_array_equal(batch["image"][:, 0, 0, 0], [31, 10, 20])
  assert batch["image"].dtype == np.uint8 and batch["label"].dtype == np.int32
  test = get_source(cfg(name="folder", path=str(tmp_path)), "test")
  assert len(test) == 2 and test[0]["image"][0, 0, 0] == 99
  # Threaded chunked reads return the same batch, in order, as a sequential read.
  order = np.array([5, 1, 3, 0, 2, 4, 4, 1, 0, 5, 2, 3])
  serial = get_source(cfg(name="folder", path=str(tmp_path), num_threads=1), "train")
  threaded = get_source(cfg(name="folder", path=str(tmp_path), num_threads=3), "train")
  a, b = serial.get_batch(order), threaded.get_batch(order)
  assert threaded._executor is not None and serial._executor is None
  for key in ("image", "label", "index"):
    np.testing.assert_array_equal(a[key], b[key])
  np.testing.assert_array_equal(a["index"], order)


def test_folder_resizes_and_converts_to_rgb(tmp_path):
  # A wide grayscale image with a dark left third, a bright centre and a dark right third.
  arr = np.zeros((10, 30), np.uint8)
  arr[:, 8:22] = 200
  os.makedirs(tmp_path / "a")
  Image.fromarray(arr, mode="L").save(tmp_path / "a" / "wide.png")
  _write_png(tmp_path / "b" / "tall.png", 50, size=(40, 8))
  src = get_source(cfg(name="folder", path=str(tmp_path), image_size=6), "train")  # Flat.
  assert src.image_shape == (6, 6, 3) and src.classes == ["a", "b"]
  wide = src[0]["image"]
  assert wide.shape == (6, 6, 3)
  # Short side 10 -> 6 (width 18), then the centre 6 columns: only the bright band remains.
  assert (wide == 200).all()
  assert (src[1]["image"] == 50).all()
  np.testing.assert_array_equal(
      sources.resize_short_side_center_crop(np.dstack([arr] * 3), 6), wide)


def test_folder_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    get_source(cfg(name="folder", path=str(tmp_path / "missing")), "train")
  (tmp_path / "train" / "a").mkdir(parents=True)
  with pytest.raises(ValueError, match="the split is empty"):
    get_source(cfg(name="folder", path=str(tmp_path)), "train")
  with pytest.raises(FileNotFoundError, match="no test/ folder"):
    get_source(cfg(name="folder", path=str(tmp_path)), "test")
  _write_png(tmp_path / "train" / "a" / "0.png", 1, size=(4, 4))
  _write_png(tmp_path / "train" / "a" / "1.png", 1, size=(5, 5))
  src = get_source(cfg(name="folder", path=str(tmp_path)), "train")
  with pytest.raises(ValueError, match="set data.image_size"):
    src.get_batch(np.array([0, 1]))


# ---------------------------------------------------------------------------- tfds

tfds = pytest.importorskip("tensorflow_datasets")


class SslJaxTestTinyImages(tfds.core.GeneratorBasedBuilder):
  """A 10/4-image dataset with varying image sizes, built offline without TensorFlow."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),
        "label": tfds.features.ClassLabel(num_classes=3),
        "id": tfds.features.Scalar(np.int64),
    }))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(10), "test": self._generate_examples(4)}

  def _generate_examples(self, n):
    for i in range(n):
      # Without TF, Image features must be fed PIL images (tfds encodes them with PIL).
      image = Image.fromarray(np.full((6 + i, 8, 3), 10 * i, np.uint8))
      yield i, {"image": image, "label": i % 3, "id": i}


@pytest.fixture(scope="module")
def tiny_tfds_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  SslJaxTestTinyImages(data_dir=data_dir, file_format="array_record").download_and_prepare()
  return data_dir


def test_tfds_local_builder(tiny_tfds_dir):
  c = cfg(name="tfds", tfds_name="ssl_jax_test_tiny_images", data_dir=tiny_tfds_dir,
          image_size=4)
  train = get_source(c, "train")
  assert (len(train), train.num_classes, train.image_shape) == (10, 3, (4, 4, 3))
  batch = train.get_batch(np.arange(10))
  assert batch["image"].dtype == np.uint8 and batch["image"].shape == (10, 4, 4, 3)
  np.testing.assert_array_equal(batch["index"], np.arange(10))
  # The record order is tfds's (shuffled at build); recover each record's id from its
  # constant colour and check the label that came with it.
  ids = batch["image"][:, 0, 0, 0] // 10
  assert sorted(ids) == list(range(10))
  np.testing.assert_array_equal(batch["label"], ids % 3)
  np.testing.assert_array_equal(train[3]["image"], batch["image"][3])
  c_threads = cfg(**c.to_dict(), num_threads=2)
  order = np.array([9, 0, 4, 4, 7, 1, 2, 8])
  threaded = get_source(c_threads, "train").get_batch(order)
  np.testing.assert_array_equal(threaded["image"], batch["image"][order])
  np.testing.assert_array_equal(threaded["label"], batch["label"][order])
  sliced = get_source(c, "train[:30%]")
  assert len(sliced) == 3
  np.testing.assert_array_equal(sliced.get_batch(np.arange(3))["image"], batch["image"][:3])
  with pytest.raises(ValueError, match="bad split 'validation'.*'test', 'train'"):
    get_source(c, "validation")
  with pytest.raises(ValueError, match="set data.image_size"):
    get_source(cfg(name="tfds", tfds_name="ssl_jax_test_tiny_images",
                   data_dir=tiny_tfds_dir), "train")
  with pytest.raises(ValueError, match="no feature 'img'.*data.image_key"):
    get_source(cfg(name="tfds", tfds_name="ssl_jax_test_tiny_images", data_dir=tiny_tfds_dir,
                   image_size=4, image_key="img"), "train")
  with pytest.raises(ValueError, match="not a ClassLabel"):
    get_source(cfg(name="tfds", tfds_name="ssl_jax_test_tiny_images", data_dir=tiny_tfds_dir,
                   image_size=4, label_key="id"), "train")


def test_tfds_mock_data_cifar10():
  with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
    src = get_source(cfg(name="tfds", tfds_name="cifar10"), "train")
    assert (len(src), src.num_classes, src.image_shape) == (6, 10, (32, 32, 3))
    batch = src.get_batch(np.array([4, 1]))
    assert batch["image"].shape == (2, 32, 32, 3) and batch["image"].dtype == np.uint8
    assert ((batch["label"] >= 0) & (batch["label"] < 10)).all()
    np.testing.assert_array_equal(batch["image"][0], src[4]["image"])


def test_tfds_mock_imagenet_resizes_variable_sizes_and_feeds_the_pipeline():
  from ssl_jax.data import pipeline
  with tfds.testing.mock_data(num_examples=5, policy=tfds.testing.MockPolicy.USE_CODE):
    with pytest.raises(ValueError, match="no fixed size"):
      get_source(cfg(name="tfds", tfds_name="imagenet2012"), "train")
    src = get_source(cfg(name="tfds", tfds_name="imagenet2012", image_size=16), "train")
    assert (src.num_classes, src.image_shape) == (1000, (16, 16, 3))
    batches = list(pipeline.eval_batches(src, 4, prefetch=0))
  assert [b["mask"].sum() for b in batches] == [4, 1]
  assert batches[0]["image"].shape == (4, 16, 16, 3)
  np.testing.assert_array_equal(batches[1]["index"], [4, 0, 0, 0])


def test_tfds_not_prepared_names_dataset_dir_and_fix(tmp_path):
  with pytest.raises(FileNotFoundError) as err:
    get_source(cfg(name="tfds", tfds_name="imagenet2012", data_dir=str(tmp_path)), "train")
  message = str(err.value)
  assert "imagenet2012" in message and str(tmp_path) in message
  assert f"tfds build imagenet2012 --data_dir={tmp_path}" in message
  assert "pip install -e .[tf]" in message and "downloads/manual" in message
  assert "--config.data.name=npz" in message
  with pytest.raises(ValueError, match="unknown dataset 'no_such_dataset_xyz'"):
    get_source(cfg(name="tfds", tfds_name="no_such_dataset_xyz", data_dir=str(tmp_path)),
               "train")
  with pytest.raises(ValueError, match="needs data.tfds_name"):
    get_source(cfg(name="tfds", tfds_name=None), "train")
