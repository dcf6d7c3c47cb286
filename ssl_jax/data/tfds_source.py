"""TFDS datasets read TF-free through `tfds.data_source` (array_record random access).

Preparing stock datasets (cifar10, imagenet2012, ...) needs TensorFlow once
(`pip install -e .[tf]` then `tfds build NAME --data_dir=DIR`); reading them does not.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from ssl_jax.data.sources import (Source, default_num_threads, resize_short_side_center_crop,
                                  validate_images)


def _default_data_dir() -> str:
  return os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))


def _not_prepared_error(tfds_name: str, split: str, data_dir: str | None,
                        builder_dir: str | None) -> FileNotFoundError:
  searched = data_dir or _default_data_dir()
  build = (f"pip install -e .[tf] && tfds build {tfds_name} --data_dir={searched} "
           "--file_format=array_record")
  if tfds_name.split("/")[0].split(":")[0] == "imagenet2012":
    build = ("put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar into "
             f"{searched}/downloads/manual/ (imagenet2012 needs a manual download), then "
             + build)
  looked = f" (looked for {builder_dir})" if builder_dir else ""
  return FileNotFoundError(
      f"tfds:{tfds_name}:{split}: the dataset is not prepared in data_dir {searched!r}"
      f"{looked}. Fix, one of:\n"
      f"  1. {build}\n"
      "  2. point data.data_dir at the folder that already holds it\n"
      "  3. use an in-memory copy instead: --config.data.name=npz "
      "--config.data.path=/path/to/data.npz")


def open_data_source(tfds_name: str, split: str, data_dir: str | None = None):
  """Opens a prepared TFDS split for random access, with actionable errors.

  Args:
    tfds_name: registered dataset name ("cifar10", "imagenet2012:5.1.0", ...) or a name
      whose files live under `data_dir` (built by an unregistered builder).
    split: TFDS split string, slicing allowed ("train[:10%]").
    data_dir: TFDS data_dir; None means $TFDS_DATA_DIR or ~/tensorflow_datasets.

  Returns:
    The tfds random-access data source (len, __getitem__, __getitems__, dataset_info).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  what = f"tfds:{tfds_name}:{split}"
  try:
    # download=False: an unprepared dataset must fail fast; an offline download retries
    # for minutes before giving up.
    return tfds.data_source(tfds_name, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # pylint: disable=broad-except  # Re-raised with context below.
    error = e
  try:
    builder = tfds.builder(tfds_name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise ValueError(
        f"{what}: unknown dataset {tfds_name!r} and no prepared copy under "
        f"{data_dir or _default_data_dir()!r}. Check data.tfds_name / data.data_dir "
        "(see https://www.tensorflow.org/datasets/catalog).") from error
  except Exception:  # pylint: disable=broad-except  # Fall through to the original error.
    raise error  # pylint: disable=raise-missing-from
  if not builder.is_prepared():
    raise _not_prepared_error(tfds_name, split, data_dir, str(builder.data_dir)) from error
  if isinstance(error, NotImplementedError):
    raise ValueError(
        f"{what}: the copy in {builder.data_dir} is not in a random-access format "
        "(it was built as tfrecord). Rebuild it with --file_format=array_record "
        f"(tfds build {tfds_name} --data_dir=DIR --file_format=array_record).") from error
  if isinstance(error, (ValueError, KeyError)) and "split" in str(error).lower():
    raise ValueError(f"{what}: bad split {split!r}; available splits: "
                     f"{sorted(builder.info.splits.keys())}. ({error})") from error
  raise error


class DataSourceRecords(Source):
  """A Source over a `tfds.data_source` in `self._ds`; subclasses define `_to_record(raw, i)`."""

  def __len__(self) -> int:
    return len(self._ds)

  def __getitem__(self, i: int) -> dict[str, Any]:
    i = self._checked_index(i)
    return self._to_record(self._ds[i], i)

  def _to_record(self, raw: dict, i: int) -> dict[str, Any]:
    raise NotImplementedError

  def _read_raw(self, keys: list[int]) -> list[dict]:
    try:
      return self._ds.__getitems__(keys)  # One batched array_record read.
    except TypeError:
      # tfds.testing.mock_data's stand-in source lacks a working __getitems__.
      return [self._ds[k] for k in keys]

  def _read_records(self, indices: np.ndarray) -> list[dict[str, Any]]:
    keys = [int(i) for i in indices]
    return [self._to_record(r, k) for r, k in zip(self._read_raw(keys), keys)]


class TfdsSource(DataSourceRecords):
  """One split of a TFDS dataset, decoded on the host (PIL when TF is absent).

  Images with one channel (e.g. mnist) are replicated to RGB. With `image_size` set, images
  of another size are resized short-side and center-cropped to it; without it the dataset
  must declare a fixed (H, W, C) image shape.
  """

  def __init__(self, tfds_name: str, split: str, *, data_dir: str | None = None,
               image_size: int | None = None, image_key: str = "image",
               label_key: str = "label", num_threads: int | None = None):
    if not tfds_name:
      raise ValueError("tfds source needs data.tfds_name (e.g. 'cifar10', 'imagenet2012').")
    self.name = f"tfds:{tfds_name}:{split}"
    self.image_key, self.label_key = image_key, label_key
    self.image_size = None if image_size is None else int(image_size)
    self.num_threads = default_num_threads() if num_threads is None else int(num_threads)
    self._ds = open_data_source(tfds_name, split, data_dir)
    features = self._ds.dataset_info.features
    for key in (image_key, label_key):
      if key not in features:
        raise ValueError(f"{self.name}: no feature {key!r}; available features: "
                         f"{sorted(features.keys())}. Set data.image_key / data.label_key.")
    self.num_classes = int(getattr(features[label_key], "num_classes", 0) or 0)
    if self.num_classes <= 0:
      raise ValueError(f"{self.name}: feature {label_key!r} is not a ClassLabel, so the number "
                       "of classes is unknown. Set data.label_key to a ClassLabel feature.")
    if len(self._ds) == 0:
      raise ValueError(f"{self.name}: the split is empty (0 records).")
    if self.image_size is not None:
      self.image_shape = (self.image_size, self.image_size, 3)
    else:
      shape = tuple(getattr(features[image_key], "shape", ()) or ())
      if len(shape) != 3 or None in shape[:2]:
        raise ValueError(f"{self.name}: images have no fixed size (feature shape {shape}); set "
                         "data.image_size so they are resized on the host.")
      self.image_shape = (int(shape[0]), int(shape[1]), 3)

  def _to_record(self, raw: dict, i: int) -> dict[str, Any]:
    image = np.asarray(raw[self.image_key])
    if image.ndim == 2:
      image = image[..., None]
    if image.ndim == 3 and image.shape[-1] == 1:
      image = np.repeat(image, 3, axis=-1)  # Grayscale datasets (mnist) -> RGB.
    validate_images(image, self.name, batched=False)
    if self.image_size is not None:
      image = resize_short_side_center_crop(image, self.image_size)
    elif image.shape != self.image_shape:
      raise ValueError(f"{self.name}: record {i} has image shape {image.shape}, expected "
                       f"{self.image_shape}; set data.image_size to resize on the host.")
    label = int(np.asarray(raw[self.label_key]))
    if not 0 <= label < self.num_classes:
      raise ValueError(f"{self.name}: record {i} has label {label} outside "
                       f"[0, {self.num_classes}).")
    return {"image": image, "label": label, "index": i}
