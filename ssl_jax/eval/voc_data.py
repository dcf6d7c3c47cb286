"""PASCAL VOC2007 classification data for the SVM benchmarks, read TF-free from TFDS.

TFDS `voc/2007` (features image, labels, labels_no_difficult, objects/{label, is_difficult}):
trainval = "train+validation" (5 011 images), test = "test" (4 952). The benchmark's label
matrix (spec §5.3, mmselfsup `prepare_voc07_cls.sh` + `create_voc_data_files.py`):
  1 = the image has a non-difficult object of the class,
  -1 = it has objects of the class but all are difficult (VOC's "0", ignored),
  0 = no object of the class (VOC's "-1").
Images: Resize(short side 256) then Resize((224, 224)) -- a squash, no crop (the reference's
extraction pipeline); both bilinear as torchvision on PIL images.
"""
from __future__ import annotations

import io
from typing import Any, Sequence

import numpy as np
from PIL import Image

from ssl_jax.data import sources, tfds_source

TFDS_NAME = "voc/2007"
TRAINVAL_SPLIT = "train+validation"
TEST_SPLIT = "test"
NUM_CLASSES = 20


def label_matrix(labels: Sequence[Sequence[int]], labels_no_difficult: Sequence[Sequence[int]],
                 num_classes: int = NUM_CLASSES) -> np.ndarray:
  """{1, 0, -1} targets from TFDS's per-image label sets.

  Args:
    labels: per image, the classes of all its objects.
    labels_no_difficult: per image, the classes of its non-difficult objects.
    num_classes: number of classes.

  Returns:
    int32 [N, num_classes].
  """
  out = np.zeros((len(labels), num_classes), np.int32)
  for i, (every, easy) in enumerate(zip(labels, labels_no_difficult)):
    every, easy = np.asarray(every, np.int64), np.asarray(easy, np.int64)
    if not np.all(np.isin(easy, every)):
      raise ValueError(f"Image {i}: labels_no_difficult {easy} is not a subset of labels {every}.")
    out[i, every] = -1
    out[i, easy] = 1
  return out


def squash_resize(image: np.ndarray, size: int = 224, short_side: int = 256) -> np.ndarray:
  """Resize(short_side) then Resize((size, size)), bilinear (torchvision on PIL images)."""
  pil = Image.fromarray(image)
  w, h = pil.size
  if w <= h:
    new_w, new_h = short_side, int(short_side * h / w)
  else:
    new_w, new_h = int(short_side * w / h), short_side
  pil = pil.resize((new_w, new_h), Image.BILINEAR).resize((size, size), Image.BILINEAR)
  return np.asarray(pil, np.uint8)


class VocSource(tfds_source.DataSourceRecords):
  """One VOC split: records {"image": uint8 [size, size, 3], "label": 0, "index": i}.

  The multi-label targets are `self.targets` (int32 [N, 20], index order); the per-record
  "label" is a placeholder because the shared pipeline carries one int per image.
  """

  def __init__(self, split: str, *, tfds_name: str = TFDS_NAME, data_dir: str | None = None,
               image_size: int = 224, short_side: int = 256, num_threads: int | None = None):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    self.name = f"voc:{tfds_name}:{split}"
    try:
      # Images stay encoded (fast label scan); they are decoded with PIL when read.
      self._ds = tfds.data_source(tfds_name, split=split, data_dir=data_dir, download=False,
                                  decoders={"image": tfds.decode.SkipDecoding()})
    except Exception:  # pylint: disable=broad-except  # re-raised with an actionable message
      tfds_source.open_data_source(tfds_name, split, data_dir)
      raise
    features = self._ds.dataset_info.features
    missing = [k for k in ("image", "labels", "labels_no_difficult") if k not in features]
    if missing:
      raise ValueError(f"{self.name}: features {missing} are missing (found "
                       f"{sorted(features.keys())}); expected TFDS voc/2007's image, labels, "
                       "labels_no_difficult.")
    self.num_classes = int(features["labels"].feature.num_classes)
    self.image_size, self.short_side = int(image_size), int(short_side)
    self.image_shape = (self.image_size, self.image_size, 3)
    self.num_threads = sources.default_num_threads() if num_threads is None else int(num_threads)
    if len(self._ds) == 0:
      raise ValueError(f"{self.name}: the split is empty.")
    raws = self._read_raw(list(range(len(self._ds))))
    self.targets = label_matrix([r["labels"] for r in raws],
                                [r["labels_no_difficult"] for r in raws], self.num_classes)

  def _to_record(self, raw: dict, i: int) -> dict[str, Any]:
    image = raw["image"]
    if isinstance(image, (bytes, np.bytes_)) or getattr(image, "dtype", None) == object:
      with Image.open(io.BytesIO(bytes(image))) as pil:  # encoded (SkipDecoding)
        image = np.asarray(pil.convert("RGB"), np.uint8)
    image = np.asarray(image, np.uint8)
    return {"image": squash_resize(image, self.image_size, self.short_side), "label": 0,
            "index": i}


def one_hot_targets(labels: np.ndarray, num_classes: int) -> np.ndarray:
  """Single-label datasets (digits, CIFAR) as a {1, 0} target matrix for SVM smoke runs."""
  labels = np.asarray(labels)
  return (labels[:, None] == np.arange(num_classes)[None, :]).astype(np.int32)
