"""VOC07 SVM and low-shot SVM benchmarks with scikit-learn's LinearSVC (spec §5.3).

This is the reference protocol of mmselfsup 0.x `tools/benchmarks/classification/svm_voc07`
(itself VISSL's / fair_self_supervision_benchmark's), run in parallel over (class, cost) with
joblib. `svm_jax.py` solves the same problems batched on device; `solver="jax"` selects it.

Conventions:
* targets are int [N, 20] with 1 = present, 0 = absent, -1 = difficult. For training, every
  non-positive (0 or -1) is the negative class -1; at test time -1 rows are dropped per class.
* features are made float64 and row-normalised f / (||f|| + 1e-5) before anything else.
* metrics are fractions in [0, 1] (the papers report them x100).
"""
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from ssl_jax.eval import voc_ap

# The reference builds the list as "1.0,10.0,100.0" + [0.5**n for n in 4..19]. The order
# matters only for ties in the CV score: np.argmax keeps the first, as the reference does.
COSTS = (1.0, 10.0, 100.0) + tuple(0.5**n for n in range(4, 20))
CLASS_WEIGHT = {1: 2, -1: 1}   # positives count twice (reference `class_weight`)
NUM_FOLDS = 3
LOWSHOT_KS = (1, 2, 4, 8, 16, 32, 64, 96)
LOWSHOT_NUM_SAMPLES = 5
LOWSHOT_NEG_PER_POS = 19       # k positives and 19 k negatives per class
SOLVERS = ("sklearn", "jax")


def normalize_features(features) -> np.ndarray:
  """float64 rows f / (||f||_2 + 1e-5), as the reference SVM scripts do."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2:
    raise ValueError(f"features must be [N, D], got shape {features.shape}.")
  if not np.all(np.isfinite(features)):
    raise ValueError("features contain NaN or inf (the checkpoint or the extraction diverged); "
                     "the SVM benchmark cannot use them.")
  return features / (np.linalg.norm(features, axis=1, keepdims=True) + 1e-5)


def check_targets(targets, num_rows: int, name: str, *, need_positives: bool = True):
  """Validates a {1, 0, -1} label matrix; returns it as int32 [N, C]."""
  targets = np.asarray(targets)
  if targets.ndim != 2 or targets.shape[0] != num_rows:
    raise ValueError(f"{name} must be [N, C] with N = {num_rows} rows, got {targets.shape}.")
  if not np.all(np.isin(targets, (-1, 0, 1))):
    raise ValueError(f"{name} must hold 1 (present), 0 (absent) or -1 (difficult).")
  if need_positives:
    missing = np.flatnonzero(~np.any(targets == 1, axis=0)).tolist()
    if missing:
      raise ValueError(f"{name}: classes {missing} have no positive example; an SVM (and its "
                       "AP) is undefined for them. Use a split that contains every class.")
  return targets.astype(np.int32)


def binary_labels(targets_column) -> np.ndarray:
  """Training labels of one class: 1 stays 1, absent (0) and difficult (-1) become -1."""
  return np.where(np.asarray(targets_column) == 1, 1, -1).astype(np.int32)


def make_svc(cost: float, random_state: int = 0):
  """The reference LinearSVC (liblinear dual coordinate descent, squared hinge, L2)."""
  from sklearn.svm import LinearSVC  # pylint: disable=g-import-not-at-top
  # random_state only fixes liblinear's coordinate order; the reference leaves it unseeded.
  return LinearSVC(C=cost, class_weight=CLASS_WEIGHT, intercept_scaling=1.0, penalty="l2",
                   loss="squared_hinge", tol=1e-4, dual=True, max_iter=2000,
                   random_state=random_state)


def _fit_class_cost(features, labels, cost, num_folds, random_state):
  """CV average precisions and the model fit on all rows, for one (class, cost)."""
  import warnings  # pylint: disable=g-import-not-at-top
  from sklearn.exceptions import ConvergenceWarning  # pylint: disable=g-import-not-at-top
  from sklearn.model_selection import cross_val_score  # pylint: disable=g-import-not-at-top
  with warnings.catch_warnings():
    # The reference also hits max_iter for the largest costs; its result is still used.
    warnings.simplefilter("ignore", ConvergenceWarning)
    cv_ap = cross_val_score(make_svc(cost, random_state), features, labels, cv=num_folds,
                            scoring="average_precision")
    clf = make_svc(cost, random_state).fit(features, labels)
  return cv_ap, clf.coef_[0].copy(), float(clf.intercept_[0])


def _parallel(n_jobs):
  from joblib import Parallel  # pylint: disable=g-import-not-at-top
  # Processes (loky), not threads: liblinear keeps one global RNG, shared threads would race
  # on it and make results depend on scheduling. joblib memory-maps the big feature array.
  return Parallel(n_jobs=n_jobs, backend="loky")


def train_voc07_sklearn(train_feats, train_targets, costs: Sequence[float] = COSTS,
                        num_folds: int = NUM_FOLDS, n_jobs: int = -1,
                        random_state: int = 0) -> Dict[str, np.ndarray]:
  """Full protocol, training side: k-fold CV AP for every (class, cost), chosen costs, models.

  Args:
    train_feats: float [N, D], already `normalize_features`-ed.
    train_targets: int [N, C] in {1, 0, -1}.
    costs: SVM costs C.
    num_folds: stratified folds of `cross_val_score` (3 in the reference).
    n_jobs: joblib workers (-1 = all cores).
    random_state: liblinear seed.

  Returns:
    {"cv_ap": [C, len(costs)] mean CV AP, "chosen": [C] index into costs,
     "coef": [C, D], "intercept": [C]} (the models fit on all rows at the chosen cost).
  """
  from joblib import delayed  # pylint: disable=g-import-not-at-top
  num_classes = train_targets.shape[1]
  jobs = [(c, j) for c in range(num_classes) for j in range(len(costs))]
  results = _parallel(n_jobs)(
      delayed(_fit_class_cost)(train_feats, binary_labels(train_targets[:, c]), costs[j],
                               num_folds, random_state) for c, j in jobs)
  cv_ap = np.zeros((num_classes, len(costs)))
  models = {}
  for (c, j), (ap, coef, intercept) in zip(jobs, results):
    cv_ap[c, j] = np.mean(ap)
    models[c, j] = (coef, intercept)
  chosen = np.argmax(cv_ap, axis=1)
  coef = np.stack([models[c, chosen[c]][0] for c in range(num_classes)])
  intercept = np.array([models[c, chosen[c]][1] for c in range(num_classes)])
  return {"cv_ap": cv_ap, "chosen": chosen, "coef": coef, "intercept": intercept}


def voc07_svm(train_feats, train_targets, test_feats, test_targets,
              costs: Sequence[float] = COSTS, *, solver: str = "sklearn", n_jobs: int = -1,
              num_folds: int = NUM_FOLDS, random_state: int = 0,
              solver_options: Optional[dict] = None) -> Dict:
  """VOC07 SVM benchmark: per-class cost by k-fold CV AP on trainval, AP on test.

  Args:
    train_feats: [N, D] trainval features (raw; normalised here).
    train_targets: int [N, C] in {1, 0, -1}.
    test_feats: [M, D] test features.
    test_targets: int [M, C] in {1, 0, -1} (-1 = difficult, dropped per class).
    costs: SVM cost grid.
    solver: "sklearn" (reference LinearSVC, joblib-parallel) or "jax" (batched on device).
    n_jobs: joblib workers for the sklearn solver.
    num_folds: CV folds.
    random_state: liblinear seed (sklearn solver).
    solver_options: extra keyword arguments of `svm_jax.voc07_train` (jax solver).

  Returns:
    {"map": float, "ap": [C], "chosen_costs": [C], "cv_ap": [C, len(costs)],
     "test_scores": [M, C]}.
  """
  if solver not in SOLVERS:
    raise ValueError(f"solver={solver!r}; use one of {SOLVERS}.")
  train_feats, test_feats = normalize_features(train_feats), normalize_features(test_feats)
  if train_feats.shape[1] != test_feats.shape[1]:
    raise ValueError(f"train features have D={train_feats.shape[1]}, test D="
                     f"{test_feats.shape[1]}; extract both with the same layer.")
  train_targets = check_targets(train_targets, len(train_feats), "train_targets")
  test_targets = check_targets(test_targets, len(test_feats), "test_targets")
  if train_targets.shape[1] != test_targets.shape[1]:
    raise ValueError(f"train_targets have {train_targets.shape[1]} classes, test_targets "
                     f"{test_targets.shape[1]}.")
  costs = tuple(float(c) for c in costs)
  if solver == "sklearn":
    trained = train_voc07_sklearn(train_feats, train_targets, costs, num_folds, n_jobs,
                                  random_state)
  else:
    from ssl_jax.eval import svm_jax  # pylint: disable=g-import-not-at-top
    trained = svm_jax.voc07_train(svm_jax.prepare(train_feats), train_targets, costs, num_folds,
                                  **(solver_options or {}))
  scores = test_feats @ trained["coef"].T + trained["intercept"][None, :]
  mean_ap, per_class = voc_ap.mean_average_precision(scores, test_targets)
  return {"map": mean_ap, "ap": per_class, "chosen_costs": np.array(costs)[trained["chosen"]],
          "cv_ap": trained["cv_ap"], "test_scores": scores}


# ------------------------------------------------------------------------------------------------
# Low-shot.
# ------------------------------------------------------------------------------------------------
def lowshot_targets(train_targets, k: int, sample: int, seed: int = 0) -> np.ndarray:
  """One low-shot training label matrix (the reference's "sample file" for (sample, k)).

  For each class independently: k random positives (target 1) -> 1, 19 k random negatives
  (target 0) -> 0, everything else -1 (ignored). Difficult (-1) images are never picked.
  The reference draws these once with unseeded `random`; here they are a pure function of
  (seed, sample, k, class). A class with fewer than k positives (or 19 k negatives) uses all
  it has.

  Args:
    train_targets: int [N, C] in {1, 0, -1}.
    k: positives per class.
    sample: sample id (0..4 in the reference).
    seed: base seed.

  Returns:
    int32 [N, C] in {1, 0, -1}.
  """
  train_targets = np.asarray(train_targets)
  out = np.full(train_targets.shape, -1, np.int32)
  for c in range(train_targets.shape[1]):
    rng = np.random.default_rng([seed, sample, k, c])
    pos = np.flatnonzero(train_targets[:, c] == 1)
    neg = np.flatnonzero(train_targets[:, c] == 0)
    if pos.size == 0:
      raise ValueError(f"Class {c} has no positive training image; low-shot SVMs need one.")
    out[rng.choice(pos, min(k, pos.size), replace=False), c] = 1
    out[rng.choice(neg, min(LOWSHOT_NEG_PER_POS * k, neg.size), replace=False), c] = 0
  return out


def _fit_lowshot(features, targets_column, cost, random_state):
  import warnings  # pylint: disable=g-import-not-at-top
  from sklearn.exceptions import ConvergenceWarning  # pylint: disable=g-import-not-at-top
  keep = targets_column >= 0
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", ConvergenceWarning)
    clf = make_svc(cost, random_state).fit(features[keep], binary_labels(targets_column[keep]))
  return clf.coef_[0].copy(), float(clf.intercept_[0])


def lowshot_svm(train_feats, train_targets, test_feats, test_targets,
                ks: Sequence[int] = LOWSHOT_KS, num_samples: int = LOWSHOT_NUM_SAMPLES,
                costs: Sequence[float] = COSTS, *, solver: str = "sklearn", n_jobs: int = -1,
                seed: int = 0, random_state: int = 0,
                solver_options: Optional[dict] = None) -> Dict:
  """Low-shot VOC07 SVM: per k, mAP over samples at the cost with the best mean test mAP.

  As in the reference, the cost is selected on the test set (no cross-validation).

  Args:
    train_feats, train_targets, test_feats, test_targets: as in `voc07_svm`.
    ks: positives per class.
    num_samples: independent samples per k.
    costs: SVM cost grid.
    solver: "sklearn" or "jax".
    n_jobs: joblib workers (sklearn solver).
    seed: sampling seed (`lowshot_targets`).
    random_state: liblinear seed.
    solver_options: extra keyword arguments of `svm_jax.lowshot_train` (jax solver).

  Returns:
    {k: {"mean", "min", "max", "std": fractions, "cost": chosen cost,
         "map": [num_samples, len(costs)] test mAP of every run}}.
  """
  if solver not in SOLVERS:
    raise ValueError(f"solver={solver!r}; use one of {SOLVERS}.")
  train_feats, test_feats = normalize_features(train_feats), normalize_features(test_feats)
  train_targets = check_targets(train_targets, len(train_feats), "train_targets")
  test_targets = check_targets(test_targets, len(test_feats), "test_targets")
  costs = tuple(float(c) for c in costs)
  prepared = None
  if solver == "jax":
    from ssl_jax.eval import svm_jax  # pylint: disable=g-import-not-at-top
    prepared = svm_jax.prepare(train_feats)  # one Gram factor serves every k
  results = {}
  num_classes = train_targets.shape[1]
  for k in ks:
    samples = np.stack([lowshot_targets(train_targets, k, s, seed) for s in range(num_samples)])
    if solver == "jax":
      coef, intercept = svm_jax.lowshot_train(prepared, samples, costs,
                                              **(solver_options or {}))
    else:
      coef, intercept = _lowshot_sklearn(train_feats, samples, costs, n_jobs, random_state)
    # One matmul and one batched AP for every (sample, cost, class) model.
    scores = test_feats @ coef.reshape(-1, coef.shape[-1]).T + intercept.reshape(-1)
    ap = voc_ap.average_precision(scores, np.tile(test_targets, num_samples * len(costs)))
    maps = ap.reshape(num_samples, len(costs), num_classes).mean(axis=2)
    best = int(np.argmax(maps.mean(axis=0)))
    results[int(k)] = {"mean": float(maps[:, best].mean()), "min": float(maps[:, best].min()),
                       "max": float(maps[:, best].max()), "std": float(maps[:, best].std()),
                       "cost": costs[best], "map": maps}
  return results


def _lowshot_sklearn(train_feats, samples, costs, n_jobs,
                     random_state) -> Tuple[np.ndarray, np.ndarray]:
  """LinearSVC for every (sample, cost, class); coef [S, J, C, D], intercept [S, J, C]."""
  from joblib import delayed  # pylint: disable=g-import-not-at-top
  num_samples, _, num_classes = samples.shape
  jobs = [(s, j, c) for s in range(num_samples) for j in range(len(costs))
          for c in range(num_classes)]
  fits = _parallel(n_jobs)(delayed(_fit_lowshot)(train_feats, samples[s][:, c], costs[j],
                                                 random_state) for s, j, c in jobs)
  coef = np.zeros((num_samples, len(costs), num_classes, train_feats.shape[1]))
  intercept = np.zeros((num_samples, len(costs), num_classes))
  for (s, j, c), (w, b) in zip(jobs, fits):
    coef[s, j, c], intercept[s, j, c] = w, b
  return coef, intercept
