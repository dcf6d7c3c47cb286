"""Random-access image sources: digits, npz, image folders and TFDS.

Every source yields records {"image": uint8 [H, W, 3], "label": int, "index": int} where
"index" is the position of the record inside its split (0..len-1); InterCLR's memory bank
is indexed by it. All images of a source share one `image_shape`, so batches stack.

`get_source(data_cfg, split)` is the single entry point the trainer and evaluators use.
"""
from __future__ import annotations

import concurrent.futures
import functools
import os
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
SOURCE_NAMES = ("digits", "npz", "folder", "tfds")
_MIN_CHUNK = 4  # Fewer records per thread are not worth the hand-off.
_EXECUTOR_LOCK = threading.Lock()


def default_num_threads() -> int:
  return max(1, min(16, os.cpu_count() or 1))


class Source:
  """Base class: a finite, random-access, deterministic sequence of image records.

  Subclasses set `name`, `num_classes`, `image_shape` and implement `__len__` and
  `__getitem__`. In-memory sources override `get_batch` with fancy indexing; sources with
  a batched reader override `_read_records` (called per thread chunk by `get_batch`).
  """

  name: str = "source"
  num_classes: int = 0
  image_shape: tuple[int, int, int] = (0, 0, 3)
  # Decoding sources read a batch in this many contiguous chunks on a thread pool; PIL
  # decoding and resizing release the GIL, so threads scale on the host's cores.
  num_threads: int = 1
  _executor: concurrent.futures.ThreadPoolExecutor | None = None

  def __len__(self) -> int:
    raise NotImplementedError

  def __getitem__(self, i: int) -> dict[str, Any]:
    raise NotImplementedError

  def _checked_index(self, i) -> int:
    """`i` as an int, or IndexError naming the source when it is outside [0, len)."""
    i = int(i)
    if not 0 <= i < len(self):
      raise IndexError(f"{self.name}: index {i} out of range [0, {len(self)}).")
    return i

  def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Reads the records at `indices` (any order, repeats allowed).

    Args:
      indices: int array [n] of positions in 0..len-1.

    Returns:
      {"image": uint8 [n, H, W, 3], "label": int32 [n], "index": int32 [n]}.
    """
    indices = self._check_indices(indices)
    num_chunks = min(self.num_threads, len(indices) // _MIN_CHUNK)
    if num_chunks <= 1:
      records = self._read_records(indices)
    else:
      with _EXECUTOR_LOCK:  # The prefetch thread and the caller may race here.
        if self._executor is None:
          self._executor = concurrent.futures.ThreadPoolExecutor(
              self.num_threads, thread_name_prefix="ssl_jax-read")
      chunks = np.array_split(indices, num_chunks)
      records = [r for chunk in self._executor.map(self._read_records, chunks) for r in chunk]
    return _stack_records(records, self.image_shape)

  def _read_records(self, indices: np.ndarray) -> list[dict[str, Any]]:
    """Reads a chunk of records; decoding sources override this with a batched read."""
    return [self[int(i)] for i in indices]

  def _check_indices(self, indices) -> np.ndarray:
    indices = np.asarray(indices)
    if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
      raise ValueError(f"{self.name}: indices must be a 1-D integer array, got dtype "
                       f"{indices.dtype} shape {indices.shape}.")
    if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
      raise IndexError(f"{self.name}: indices must lie in [0, {len(self)}), got "
                       f"[{indices.min()}, {indices.max()}].")
    return indices

  def __repr__(self) -> str:
    return (f"{type(self).__name__}(name={self.name!r}, len={len(self)}, "
            f"num_classes={self.num_classes}, image_shape={self.image_shape})")


def _stack_records(records: Sequence[dict], image_shape) -> dict[str, np.ndarray]:
  """Stacks per-record dicts into one batch dict with the fixed dtypes."""
  if not records:
    return {"image": np.zeros((0, *image_shape), np.uint8),
            "label": np.zeros((0,), np.int32), "index": np.zeros((0,), np.int32)}
  return {
      "image": np.stack([r["image"] for r in records]).astype(np.uint8, copy=False),
      "label": np.asarray([r["label"] for r in records], np.int32),
      "index": np.asarray([r["index"] for r in records], np.int32),
  }


# --------------------------------------------------------------------------------------
# Validation and host-side resizing shared by all sources.
# --------------------------------------------------------------------------------------


def validate_images(images: np.ndarray, source_name: str, *, batched: bool = True) -> None:
  """Raises ValueError unless `images` is uint8 [(N,) H, W, 3]."""
  want_rank = 4 if batched else 3
  layout = "[N, H, W, 3]" if batched else "[H, W, 3]"
  images = np.asarray(images)
  if images.dtype != np.uint8:
    raise ValueError(
        f"{source_name}: images must be uint8 {layout} with values 0..255, got dtype "
        f"{images.dtype}. If they are floats in [0, 1], store "
        "(x * 255).round().astype(np.uint8) instead.")
  if images.ndim != want_rank:
    hint = (" Grayscale images must be stored with 3 channels: "
            "np.repeat(x[..., None], 3, axis=-1)." if images.ndim == want_rank - 1 else "")
    raise ValueError(f"{source_name}: images must have layout {layout} (channels last), got "
                     f"shape {images.shape}.{hint}")
  if images.shape[-1] != 3:
    raise ValueError(
        f"{source_name}: images must have 3 (RGB) channels in the last axis, got shape "
        f"{images.shape}. Convert grayscale with np.repeat(x, 3, axis=-1), drop alpha with "
        "x[..., :3], and transpose NCHW data to NHWC.")


def validate_labels(labels: np.ndarray, num_classes: int, source_name: str) -> np.ndarray:
  """Checks labels are integers in [0, num_classes); returns them as int32."""
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"{source_name}: labels must be 1-D [N], got shape {labels.shape}.")
  if not np.issubdtype(labels.dtype, np.integer):
    if np.issubdtype(labels.dtype, np.floating) and np.all(labels == np.round(labels)):
      labels = labels.astype(np.int64)
    else:
      raise ValueError(f"{source_name}: labels must be integer class ids, got dtype "
                       f"{labels.dtype}.")
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(
        f"{source_name}: labels must lie in [0, {num_classes}) but range over "
        f"[{labels.min()}, {labels.max()}]. Remap them to 0..num_classes-1 (or set "
        "data.num_classes to the true number of classes).")
  return labels.astype(np.int32)


def resize_short_side_center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """Resizes so the short side equals `size` (bilinear, PIL) and center-crops to size^2.

  Matches the Resize(short side) -> CenterCrop evaluation transform of the references, but
  with a single size because the training crops happen later, on device.

  Args:
    image: uint8 [H, W, 3].
    size: output side length.

  Returns:
    uint8 [size, size, 3]; `image` itself when it already has that shape.
  """
  h, w = image.shape[:2]
  if (h, w) == (size, size):
    return image
  scale = size / min(h, w)
  # round() keeps the short side at exactly `size` and the long side >= size.
  new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
  pil = Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR)
  left, top = (new_w - size) // 2, (new_h - size) // 2
  return np.asarray(pil.crop((left, top, left + size, top + size)), np.uint8)


def _resize_all(images: np.ndarray, size: int | None) -> np.ndarray:
  if size is None or images.shape[1:3] == (size, size):
    return images
  return np.stack([resize_short_side_center_crop(x, size) for x in images])


def _check_split(split: str, source_name: str) -> str:
  if split not in ("train", "test"):
    raise ValueError(f"{source_name}: split must be 'train' or 'test', got {split!r} "
                     "(slicing like 'train[:10%]' is only supported by data.name='tfds').")
  return split


# --------------------------------------------------------------------------------------
# In-memory sources.
# --------------------------------------------------------------------------------------


class ArraySource(Source):
  """A source backed by in-memory numpy arrays (vectorised `get_batch`)."""

  def __init__(self, images: np.ndarray, labels: np.ndarray, *, num_classes: int, name: str):
    validate_images(images, name)
    if len(images) == 0:
      raise ValueError(f"{name}: the split is empty (0 images).")
    if len(labels) != len(images):
      raise ValueError(f"{name}: {len(images)} images but {len(labels)} labels.")
    self.name = name
    self.num_classes = int(num_classes)
    self.images = images
    self.labels = validate_labels(labels, self.num_classes, name)
    self.image_shape = tuple(int(d) for d in images.shape[1:])

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, i: int) -> dict[str, Any]:
    i = self._checked_index(i)
    return {"image": self.images[i], "label": int(self.labels[i]), "index": i}

  def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    indices = self._check_indices(indices)
    return {"image": self.images[indices], "label": self.labels[indices],
            "index": indices.astype(np.int32)}


DIGITS_NUM_TEST = 360  # 1797 = 1437 train + 360 test.
DIGITS_SPLIT_SEED = 0


@functools.lru_cache(maxsize=8)
def _digits_arrays(image_size: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Loads sklearn digits once per image size; returns {split: (images, labels)}."""
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  digits = load_digits()
  # Pixel values are 0..16; map 16 -> 255 exactly.
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # [N, 8, 8]
  # Nearest-neighbour upsampling: keeps the crisp 8x8 blocks and is exact/fast.
  src = (np.arange(image_size) * 8) // image_size
  images = images[:, src][:, :, src]
  images = np.repeat(images[..., None], 3, axis=-1)
  labels = digits.target.astype(np.int32)
  idx_train, idx_test = train_test_split(
      np.arange(len(labels)), test_size=DIGITS_NUM_TEST, stratify=labels,
      random_state=DIGITS_SPLIT_SEED)
  idx_train, idx_test = np.sort(idx_train), np.sort(idx_test)
  out = {}
  for split, idx in (("train", idx_train), ("test", idx_test)):
    split_images = np.ascontiguousarray(images[idx])
    split_images.setflags(write=False)  # Shared by every source through the cache.
    out[split] = (split_images, labels[idx])
  return out


class DigitsSource(ArraySource):
  """sklearn's 8x8 digits, nearest-upsampled to `image_size` and made RGB.

  A deterministic stratified split (seed 0): 1437 train / 360 test images, 10 classes.
  Tiny and always available offline, so it backs smoke tests and tutorials.
  """

  def __init__(self, split: str, image_size: int = 32):
    name = f"digits:{split}"
    _check_split(split, name)
    if int(image_size) < 1:
      raise ValueError(f"{name}: image_size must be a positive int, got {image_size}.")
    images, labels = _digits_arrays(int(image_size))[split]
    super().__init__(images, labels, num_classes=10, name=name)


NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


@functools.lru_cache(maxsize=4)
def _load_npz(path: str, stamp: tuple[int, int]) -> dict[str, np.ndarray]:
  """Loads every array of an npz file into memory once (keyed by path, mtime and size)."""
  del stamp  # Only part of the cache key: a rewritten file is re-read.
  with np.load(path, allow_pickle=False) as f:
    return {k: f[k] for k in f.files}


class NpzSource(ArraySource):
  """Images from an .npz with keys x_train/y_train/x_test/y_test (uint8 NHWC).

  `num_classes` defaults to 1 + the largest label over both splits, so train and test
  agree; pass it explicitly when a split might miss the last classes.
  """

  def __init__(self, path: str, split: str, *, image_size: int | None = None,
               num_classes: int | None = None):
    name = f"npz:{os.path.basename(str(path))}:{split}"
    _check_split(split, name)
    if not path:
      raise ValueError("npz source needs data.path pointing to an .npz file "
                       "(e.g. --config.data.path=/work/shared/data/cifar10_subset.npz).")
    path = os.path.abspath(os.path.expanduser(str(path)))
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{name}: no such file {path!r}. Set data.path to an .npz with "
                              f"keys {', '.join(NPZ_KEYS)}.")
    stat = os.stat(path)
    arrays = _load_npz(path, (stat.st_mtime_ns, stat.st_size))
    missing = [k for k in NPZ_KEYS if k not in arrays]
    if missing:
      raise ValueError(f"{name}: {path} is missing keys {missing}; found {sorted(arrays)}. "
                       f"Expected {', '.join(NPZ_KEYS)} (uint8 images NHWC, int labels).")
    images, labels = arrays[f"x_{split}"], arrays[f"y_{split}"]
    validate_images(images, name)
    if num_classes is None:
      all_labels = [np.asarray(arrays[k]).reshape(-1) for k in ("y_train", "y_test")]
      num_classes = max((int(y.max()) for y in all_labels if y.size), default=-1) + 1
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:  # Keras-style [N, 1] labels.
      labels = labels[:, 0]
    images = _resize_all(images, image_size)
    super().__init__(images, labels, num_classes=num_classes, name=name)


# --------------------------------------------------------------------------------------
# Image folder (decoded lazily with PIL).
# --------------------------------------------------------------------------------------


class FolderSource(Source):
  """root/<split>/<class>/*.{jpg,jpeg,png}; classes are the sorted subfolder names.

  For split "train" a flat root/<class>/* tree is accepted when root/train/ is absent.
  Images are decoded to RGB with PIL and, when `image_size` is set, resized short-side and
  center-cropped to it. Without `image_size` every image must have the size of the first.
  """

  def __init__(self, root: str, split: str, *, image_size: int | None = None,
               num_threads: int | None = None):
    name = f"folder:{os.path.basename(os.path.normpath(str(root)))}:{split}"
    _check_split(split, name)
    if not root:
      raise ValueError("folder source needs data.path pointing to the dataset root.")
    root = os.path.abspath(os.path.expanduser(str(root)))
    if not os.path.isdir(root):
      raise FileNotFoundError(f"{name}: dataset root {root!r} does not exist. Set data.path "
                              "to a folder holding train/<class>/*.jpg and test/<class>/*.jpg.")
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
      if split == "train" and not os.path.isdir(os.path.join(root, "test")):
        split_dir = root  # Flat root/<class>/* layout.
      else:
        raise FileNotFoundError(f"{name}: no {split}/ folder under {root!r}; expected "
                                f"{root}/{split}/<class>/*.jpg.")
    classes = sorted(d for d in os.listdir(split_dir)
                     if os.path.isdir(os.path.join(split_dir, d)) and not d.startswith("."))
    if not classes:
      raise FileNotFoundError(f"{name}: no class subfolders in {split_dir!r}; expected "
                              f"{split_dir}/<class>/*.jpg.")
    files, labels = [], []
    for label, cls in enumerate(classes):
      cls_dir = os.path.join(split_dir, cls)
      for fname in sorted(os.listdir(cls_dir)):
        if fname.lower().endswith(IMAGE_EXTENSIONS):
          files.append(os.path.join(cls_dir, fname))
          labels.append(label)
    if not files:
      raise ValueError(f"{name}: the split is empty: no {'/'.join(IMAGE_EXTENSIONS)} files "
                       f"under {split_dir}/<class>/.")
    self.name = name
    self.root = split_dir
    self.classes = classes
    self.files = files
    self.labels = np.asarray(labels, np.int32)
    self.num_classes = len(classes)
    self.image_size = None if image_size is None else int(image_size)
    self.num_threads = default_num_threads() if num_threads is None else int(num_threads)
    if self.image_size is None:
      first = self._decode(0)
      self.image_shape = tuple(int(d) for d in first.shape)
    else:
      self.image_shape = (self.image_size, self.image_size, 3)

  def __len__(self) -> int:
    return len(self.files)

  def _decode(self, i: int) -> np.ndarray:
    try:
      with Image.open(self.files[i]) as pil:
        image = np.asarray(pil.convert("RGB"), np.uint8)
    except OSError as e:
      raise ValueError(f"{self.name}: cannot decode image {self.files[i]!r}: {e}") from e
    if self.image_size is not None:
      return resize_short_side_center_crop(image, self.image_size)
    return image

  def __getitem__(self, i: int) -> dict[str, Any]:
    i = self._checked_index(i)
    image = self._decode(i)
    if image.shape != self.image_shape:
      raise ValueError(f"{self.name}: image {self.files[i]!r} has shape {image.shape} but "
                       f"the first image has {self.image_shape}; set data.image_size to "
                       "resize all images on the host.")
    return {"image": image, "label": int(self.labels[i]), "index": i}


# --------------------------------------------------------------------------------------
# Factory.
# --------------------------------------------------------------------------------------


def get_source(data_cfg, split: str) -> Source:
  """Builds the source described by a data ConfigDict for one split.

  Args:
    data_cfg: ConfigDict with `name` in {"digits", "npz", "folder", "tfds"} and, as the
      source needs, `path`, `tfds_name`, `data_dir`, `image_size`, `image_key`,
      `label_key`, `num_classes` (npz only, optional), `num_threads` (folder/tfds decode
      threads; default min(16, cpu count)).
    split: "train"/"test" (digits, npz, folder) or any TFDS split string ("train[:10%]").

  Returns:
    A `Source`.
  """
  name = data_cfg.get("name", None)
  image_size = data_cfg.get("image_size", None)
  num_threads = data_cfg.get("num_threads", None)
  if name == "digits":
    return DigitsSource(split, image_size=32 if image_size is None else image_size)
  if name == "npz":
    return NpzSource(data_cfg.get("path", None), split, image_size=image_size,
                     num_classes=data_cfg.get("num_classes", None))
  if name == "folder":
    return FolderSource(data_cfg.get("path", None), split, image_size=image_size,
                        num_threads=num_threads)
  if name == "tfds":
    from ssl_jax.data import tfds_source  # Lazy: importing tfds costs ~0.3 s.
    return tfds_source.TfdsSource(
        data_cfg.get("tfds_name", None), split, data_dir=data_cfg.get("data_dir", None),
        image_size=image_size, image_key=data_cfg.get("image_key", "image"),
        label_key=data_cfg.get("label_key", "label"), num_threads=num_threads)
  raise ValueError(f"Unknown data.name {name!r}; choose one of {SOURCE_NAMES}.")
