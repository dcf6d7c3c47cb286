"""Average precision for the VOC07 SVM benchmarks (spec §5.3).

Targets use the benchmark's three-valued convention: 1 = present, 0 = absent, -1 = difficult
(ignored: dropped from the ranking before the precision/recall curve is built).

Two AP definitions are provided:
* `"envelope"` (what mmselfsup/VISSL's `svm_helper.calculate_ap` computes and the reported VOC07
  numbers use): precision is made monotone non-increasing from the right (the precision
  envelope), then summed over every step of recall: AP = sum_i (R_i - R_{i-1}) * Penv_i.
* `"11point"` (the original VOC2007 devkit): mean over t in {0, 0.1, ..., 1} of the largest
  precision reached at recall >= t (0 when recall t is never reached).

Ranking ties are broken by input order (stable descending sort): the image that comes first in
the split is ranked first. With real-valued SVM scores exact ties are rare; the rule only makes
the result deterministic.
"""
from typing import Tuple

import numpy as np

METHODS = ("envelope", "11point")


def _ranked_counts(scores: np.ndarray, targets: np.ndarray) -> Tuple[np.ndarray, np.ndarray,
                                                                     np.ndarray]:
  """Cumulative true/false positives down the ranking, per column.

  Args:
    scores: float [N, M].
    targets: int [N, M] in {1, 0, -1}.

  Returns:
    (tp [N, M], fp [N, M], num_pos [M]): cumulative counts in descending-score order. Ignored
    (-1) rows count as neither, which is the same as dropping them (see `average_precision`).
  """
  order = np.argsort(-scores, axis=0, kind="stable")
  ranked = np.take_along_axis(targets, order, axis=0)
  tp = np.cumsum(ranked == 1, axis=0, dtype=np.float64)
  fp = np.cumsum(ranked == 0, axis=0, dtype=np.float64)
  return tp, fp, tp[-1]


def average_precision(scores, targets, method: str = "envelope") -> np.ndarray:
  """VOC average precision of each column.

  Args:
    scores: float [N] or [N, M]: classifier scores (higher = more confident "present").
    targets: int [N] or [N, M] in {1, 0, -1}; -1 rows are ignored for that column.
    method: "envelope" (mmselfsup/VISSL, default) or "11point" (VOC2007 devkit).

  Returns:
    float64 scalar (1-D input) or [M]: AP in [0, 1].

  Raises:
    ValueError: on shape mismatch, labels outside {1, 0, -1}, non-finite scores, or a column
      with no positive (AP is undefined there).
  """
  if method not in METHODS:
    raise ValueError(f"method={method!r}; use one of {METHODS}.")
  scores, targets = np.asarray(scores, np.float64), np.asarray(targets)
  if scores.shape != targets.shape or scores.ndim not in (1, 2):
    raise ValueError(f"scores {scores.shape} and targets {targets.shape} must have the same "
                     "shape [N] or [N, M].")
  squeeze = scores.ndim == 1
  if squeeze:
    scores, targets = scores[:, None], targets[:, None]
  if not np.all(np.isin(targets, (-1, 0, 1))):
    raise ValueError("targets must be 1 (present), 0 (absent) or -1 (difficult/ignored).")
  if not np.all(np.isfinite(scores)):
    raise ValueError("scores contain NaN or inf; check the features and the classifier.")
  tp, fp, num_pos = _ranked_counts(scores, targets)
  if np.any(num_pos == 0):
    bad = np.flatnonzero(num_pos == 0).tolist()
    raise ValueError(f"Columns {bad} have no positive (target 1) example, so AP is undefined; "
                     "drop those classes or use a split that contains them.")
  recall = tp / num_pos
  # Leading ignored rows have tp + fp == 0; their precision never reaches the sum below (no
  # recall step happens there), 0 only keeps the arithmetic finite.
  precision = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=(tp + fp) > 0)
  if method == "envelope":
    # Envelope: running max from the bottom of the ranking upwards.
    envelope = np.maximum.accumulate(precision[::-1], axis=0)[::-1]
    steps = np.diff(recall, axis=0, prepend=0.0)
    ap = np.sum(steps * envelope, axis=0)
  else:
    points = np.linspace(0.0, 1.0, 11)
    reached = recall[None, :, :] >= points[:, None, None] - 1e-12
    best = np.max(np.where(reached, precision[None], 0.0), axis=1)
    ap = np.mean(best, axis=0)
  return ap[0] if squeeze else ap


def mean_average_precision(scores, targets, method: str = "envelope") -> Tuple[float, np.ndarray]:
  """Mean AP over classes (columns).

  Args:
    scores: float [N, C].
    targets: int [N, C] in {1, 0, -1}.
    method: see `average_precision`.

  Returns:
    (mAP in [0, 1], per-class AP [C]).
  """
  per_class = average_precision(np.asarray(scores), np.asarray(targets), method)
  return float(np.mean(per_class)), per_class
