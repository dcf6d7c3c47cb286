"""Batched squared-hinge SVMs on device: every (class, fold, cost) of the VOC07 protocols at once.

Each problem is liblinear's L2-regularised squared-hinge SVM as LinearSVC runs it (spec §5.3;
intercept_scaling=1 means the bias is an ordinary, regularised weight on a constant feature 1):

    min_w  1/2 ||w||^2 + sum_i c_i max(0, 1 - y_i <w, x_i~>)^2,   x_i~ = [x_i, 1],
    c_i = C * class_weight(y_i) * [row i is in this problem's training set].

Method (the finite Newton method of Keerthi & DeCoste 2005 / Chapelle 2007, in kernel form):
* K = X~ X~^T = A A^T with A = U diag(sqrt(lambda)) from the eigendecomposition of K. Every w
  in the span of the x_i~ is w = Q z with ||w|| = ||z|| and X~ w = A z, so the problem is the
  same SVM on the n x n "features" A: there are fewer rows than feature dimensions (5k vs 8k)
  and all problems share one A, so the work is a few [n, n] x [n, problems] matmuls.
* Newton step on the active set S = {i: y_i f_i < 1}: H = I + 2 A^T diag(c_S) A, direction by
  preconditioned conjugate gradients, exact line search on the piecewise-quadratic objective.
* Preconditioner: in the eigenbasis A^T A = diag(lambda), so diag(H) (Jacobi) already carries
  most of the spectrum; the top `block_rank` eigen-directions (led by the mean direction of the
  non-negative features and the bias) get their exact r x r block.
* The cost grid is swept in ascending order, each cost warm-started from the previous one.
* Decision weights come from the optimality condition w = X~^T beta with
  beta_i = 2 c_i y_i max(0, 1 - y_i f_i) (liblinear's dual alpha_i y_i), never from
  diag(lambda)^-1/2, which is ill-conditioned for the small eigenvalues.
Problems whose gradient is below `tol` relative to ||w|| stop; the batch runs until all stop.
"""
import dataclasses
import functools
from typing import Dict, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from ssl_jax.eval import svm

_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass
class Prepared:
  """Training features with the bias column, their Gram matrix and its eigen factor."""
  features: np.ndarray   # [n, D + 1] float32: normalised features and a constant 1
  factor: jax.Array      # [n, n] float32, A A^T = K, columns by decreasing eigenvalue
  gram: jax.Array        # [n, n] float32

  @property
  def num_rows(self) -> int:
    return self.features.shape[0]

  def subset(self, rows: np.ndarray) -> "Prepared":
    """The same for a subset of rows (a smaller, cheaper problem when few rows are used)."""
    rows = jnp.asarray(rows)
    gram = self.gram[rows][:, rows]
    return Prepared(self.features[np.asarray(rows)], _eigen_factor(gram), gram)


@jax.jit
def _eigen_factor(gram: jax.Array) -> jax.Array:
  lam, vecs = jnp.linalg.eigh(gram)
  lam, vecs = lam[::-1], vecs[:, ::-1]  # descending: the block preconditioner takes the head
  return vecs * jnp.sqrt(jnp.maximum(lam, 0.0))[None, :]


def prepare(features) -> Prepared:
  """Adds the bias column, computes the Gram matrix and its factor on device.

  Args:
    features: [n, D] training features, already normalised (`svm.normalize_features`).
  """
  features = np.asarray(features, np.float32)
  augmented = np.concatenate([features, np.ones((len(features), 1), np.float32)], axis=1)
  x = jnp.asarray(augmented)
  gram = jnp.matmul(x, x.T, precision=_HIGHEST)
  return Prepared(augmented, _eigen_factor(gram), gram)


@dataclasses.dataclass
class SolveResult:
  z: np.ndarray          # [m, P] coordinates in the factor basis
  f: np.ndarray          # [n, P] decision values of every row
  beta: np.ndarray       # [n, P] w = X~^T beta
  newton_iters: int      # summed over the device calls
  cg_iters: int
  converged: np.ndarray  # [P] bool


@functools.partial(jax.jit, static_argnames=("max_cg", "block_rank"))
def _solve(factor, y, c, z0, tol, cg_rtol, max_newton, min_live, *, max_cg, block_rank):
  """Truncated Newton for P problems sharing `factor`; see the module docstring.

  Returns to the host after `max_newton` steps, when every problem has converged, or when at
  most `min_live` problems are left (the host then continues with a narrower batch).
  """
  a = factor
  rank = min(block_rank, a.shape[1])
  a_sq = a * a
  a_head = a[:, :rank]
  # Row-wise outer products of the head columns: the P head blocks A_r^T diag(s_p) A_r are then
  # one [r*r, n] x [n, P] matmul (an einsum over (n, p, r, r) is ~5x slower on CPU).
  head_pairs = (a_head[:, :, None] * a_head[:, None, :]).reshape(a.shape[0], rank * rank)
  dot = lambda u, v: jnp.sum(u * v, axis=0)

  def gradient(z, f):
    r = 1.0 - y * f
    s = jnp.where(r > 0, c, 0.0)  # c on the active set, 0 elsewhere
    g = z - 2.0 * jnp.matmul(a.T, s * y * r, precision=_HIGHEST)
    return g, s, r

  def converged(z, g):
    return jnp.sqrt(dot(g, g)) <= tol * jnp.sqrt(dot(z, z))

  def newton_step(state):
    z, f, g, s, r, it, cg_total = state
    todo = ~converged(z, g)
    jacobi = 1.0 + 2.0 * jnp.matmul(a_sq.T, s, precision=_HIGHEST)
    head = jnp.eye(rank) + 2.0 * jnp.matmul(head_pairs.T, s, precision=_HIGHEST).T.reshape(
        -1, rank, rank)
    head_chol = jnp.linalg.cholesky(head)

    def precondition(v):
      out = v / jacobi
      head_v = jax.scipy.linalg.cho_solve((head_chol, True), v[:rank].T[..., None])[..., 0].T
      return out.at[:rank].set(head_v)

    def hessian(v, av):  # H v, given A v
      return v + 2.0 * jnp.matmul(a.T, s * av, precision=_HIGHEST)

    res = jnp.where(todo, -g, 0.0)
    pres = precondition(res)
    rz = dot(res, pres)
    rz_stop = cg_rtol**2 * rz

    def cg_cond(cg):
      *_, rz, k = cg
      return (k < max_cg) & jnp.any(rz > rz_stop)

    def cg_step(cg):
      d, ad, res, p, ap, rz, k = cg
      hp = hessian(p, ap)
      php = dot(p, hp)
      alpha = jnp.where(php > 0, rz / jnp.where(php > 0, php, 1.0), 0.0)
      d, ad, res = d + alpha * p, ad + alpha * ap, res - alpha * hp
      pres = precondition(res)
      rz_new = dot(res, pres)
      beta = jnp.where(rz > 0, rz_new / jnp.where(rz > 0, rz, 1.0), 0.0)
      p = pres + beta * p
      return d, ad, res, p, jnp.matmul(a, p, precision=_HIGHEST), rz_new, k + 1

    zeros_z, zeros_f = jnp.zeros_like(z), jnp.zeros_like(f)
    d, ad, *_, k = jax.lax.while_loop(
        cg_cond, cg_step,
        (zeros_z, zeros_f, res, pres, jnp.matmul(a, pres, precision=_HIGHEST), rz, 0))
    t = _line_search(z, d, ad, y, r, c)
    z, f = z + t * d, f + t * ad
    g, s, r = gradient(z, f)
    return z, f, g, s, r, it + 1, cg_total + k

  def newton_cond(state):
    z, _, g, *_, it, _ = state
    live = jnp.sum(~converged(z, g))
    return (it < max_newton) & (live > 0) & ((live > min_live) | (it == 0))

  f0 = jnp.matmul(a, z0, precision=_HIGHEST)
  g0, s0, r0 = gradient(z0, f0)
  z, f, g, s, r, it, cg_total = jax.lax.while_loop(newton_cond, newton_step,
                                                   (z0, f0, g0, s0, r0, 0, 0))
  beta = 2.0 * s * y * r
  return z, f, beta, it, cg_total, converged(z, g)


def _line_search(z, d, ad, y, r, c, iters: int = 12):
  """argmin_t phi(t) = 1/2||z + t d||^2 + sum_i c_i max(0, r_i - t y_i (A d)_i)^2, per column.

  phi is convex and piecewise quadratic with phi'' >= ||d||^2, so the root of phi' lies in
  [0, -phi'(0) / ||d||^2]; safeguarded Newton (bisection when a step leaves the bracket).
  """
  zd, dd = jnp.sum(z * d, 0), jnp.sum(d * d, 0)
  yq = y * ad
  safe_dd = jnp.where(dd > 0, dd, 1.0)

  def derivatives(t):
    rt = r - t * yq
    on = rt > 0
    d1 = zd + t * dd - 2.0 * jnp.sum(jnp.where(on, c * yq * rt, 0.0), 0)
    d2 = dd + 2.0 * jnp.sum(jnp.where(on, c * yq * yq, 0.0), 0)
    return d1, d2

  d1_zero, _ = derivatives(jnp.zeros_like(dd))
  lo = jnp.zeros_like(dd)
  hi = jnp.maximum(-d1_zero / safe_dd, 0.0)

  def step(_, state):
    t, lo, hi = state
    d1, d2 = derivatives(t)
    lo = jnp.where(d1 < 0, t, lo)
    hi = jnp.where(d1 >= 0, t, hi)
    newton = t - d1 / d2
    inside = (newton > lo) & (newton < hi)
    return jnp.where(inside, newton, 0.5 * (lo + hi)), lo, hi

  t0 = jnp.clip(jnp.ones_like(dd), lo, hi)
  t, _, _ = jax.lax.fori_loop(0, iters, step, (t0, lo, hi))
  return jnp.where(dd > 0, t, 0.0)


def _widths(num_problems: int) -> Tuple[int, ...]:
  """Batch widths used as problems converge: P, ~P/2, ~P/4, ~P/16 (multiples of 8)."""
  shrunk = {max(8, -(-num_problems // d // 8) * 8) for d in (2, 4, 16)}
  return tuple(sorted({num_problems} | {w for w in shrunk if w < num_problems}))


def solve(prepared: Prepared, y, c, z0=None, *, tol: float = 1e-3, cg_rtol: float = 0.1,
          max_newton: int = 100, max_cg: int = 200,
          block_rank: int = 64) -> SolveResult:
  """Solves P squared-hinge SVMs that share the training rows of `prepared`.

  Problems converge at different Newton iterations (the large costs take longest), and a
  batched step costs the same for a converged column as for a live one. So the device stops
  as soon as the live problems fit a narrower batch, and the host continues with only those:
  ~P/2, ~P/4 and ~P/16 columns (`_widths`: one compilation each).

  Args:
    prepared: from `prepare` (or `Prepared.subset`).
    y: [n, P] labels +-1.
    c: [n, P] per-row cost C * class_weight, 0 for rows outside a problem's training set.
    z0: optional [n, P] warm start (a previous `SolveResult.z`).
    tol: stop a problem when ||grad|| <= tol * ||w||.
    cg_rtol: relative residual at which each inner CG solve stops.
    max_newton, max_cg: iteration caps (outer per problem, and inner per Newton step).
    block_rank: eigen-directions preconditioned with their exact block.

  Returns:
    SolveResult; decision values of row i for problem p are f[i, p].
  """
  y = np.asarray(y, np.float32)
  c = np.asarray(c, np.float32)
  num_rows, num_problems = y.shape
  m = prepared.factor.shape[1]
  z = np.zeros((m, num_problems), np.float32) if z0 is None else np.array(z0, np.float32)
  f = np.zeros((num_rows, num_problems), np.float32)
  beta = np.zeros_like(f)
  done = np.zeros(num_problems, bool)
  widths = _widths(num_problems)
  live = np.arange(num_problems)
  newton_total = cg_total = 0
  while live.size:
    width = min(w for w in widths if w >= live.size)
    narrower = max([w for w in widths if w < width], default=0)
    # Padding columns have no training row (c = 0): converged on arrival, results ignored.
    cols = np.concatenate([live, np.full(width - live.size, live[0])])
    real = np.arange(width) < live.size
    out = _solve(prepared.factor, y[:, cols], np.where(real, c[:, cols], 0.0),
                 np.where(real, z[:, cols], 0.0), jnp.float32(tol), jnp.float32(cg_rtol),
                 jnp.int32(max_newton - newton_total), jnp.int32(narrower), max_cg=max_cg,
                 block_rank=block_rank)
    out_z, out_f, out_beta, it, cg, ok = jax.device_get(out)
    k = live.size
    z[:, live], f[:, live], beta[:, live] = out_z[:, :k], out_f[:, :k], out_beta[:, :k]
    done[live] = ok[:k]
    newton_total += int(it)
    cg_total += int(cg)
    live = live[~ok[:k]]
    if newton_total >= max_newton or int(it) == 0:
      break
  return SolveResult(z, f, beta, newton_total, cg_total, done)


def solve_path(prepared: Prepared, y, weight, costs: Sequence[float],
               **options) -> Tuple[np.ndarray, np.ndarray, np.ndarray, Dict]:
  """Solves every problem at every cost, sweeping costs upwards with warm starts.

  Args:
    prepared: from `prepare`.
    y: [n, P] labels +-1.
    weight: [n, P] class weight of each row, 0 for rows outside the training set.
    costs: the cost grid (any order).
    **options: forwarded to `solve`.

  Returns:
    (f [len(costs), n, P] decision values of every row, beta [len(costs), n, P],
     z [len(costs), m, P], {"newton_iters", "cg_iters", "unconverged"} summed over costs).
  """
  weight = np.asarray(weight, np.float32)
  fs, betas, zs = [None] * len(costs), [None] * len(costs), [None] * len(costs)
  info = {"newton_iters": 0, "cg_iters": 0, "unconverged": 0}
  z = None
  for j in np.argsort(costs, kind="stable"):
    result = solve(prepared, y, float(costs[j]) * weight, z, **options)
    z = result.z
    fs[j], betas[j], zs[j] = result.f, result.beta, result.z
    _accumulate(info, result)
  return np.stack(fs), np.stack(betas), np.stack(zs), info


def _accumulate(info: Dict, result: SolveResult):
  info["newton_iters"] += result.newton_iters
  info["cg_iters"] += result.cg_iters
  info["unconverged"] += int(np.sum(~result.converged))


def _class_weights(y: np.ndarray) -> np.ndarray:
  return np.where(y > 0, svm.CLASS_WEIGHT[1], svm.CLASS_WEIGHT[-1]).astype(np.float32)


def voc07_train(prepared: Prepared, train_targets, costs: Sequence[float] = svm.COSTS,
                num_folds: int = svm.NUM_FOLDS, **options) -> Dict:
  """Training side of the full VOC07 protocol; same outputs as `svm.train_voc07_sklearn`.

  The k-fold split is sklearn's StratifiedKFold (what `cross_val_score(cv=3)` uses) and the CV
  score its `average_precision_score`, so only the solver differs from the reference. All
  (class, fold) problems are solved in one batch along the cost path; then only the model the
  protocol keeps, all rows at the chosen cost, is fit per class (warm-started from the mean of
  its fold solutions: the same basis, nearly the same model).

  Args:
    prepared: `prepare(normalised trainval features)`.
    train_targets: int [n, C] in {1, 0, -1}.
    costs: cost grid.
    num_folds: CV folds.
    **options: forwarded to `solve`.

  Returns:
    {"cv_ap": [C, len(costs)], "chosen": [C], "coef": [C, D], "intercept": [C], "info": dict}.
  """
  from sklearn.metrics import average_precision_score  # pylint: disable=g-import-not-at-top
  from sklearn.model_selection import StratifiedKFold  # pylint: disable=g-import-not-at-top
  n, num_classes = train_targets.shape
  labels = np.stack([svm.binary_labels(train_targets[:, c]) for c in range(num_classes)], 1)
  weights = np.stack([_class_weights(labels[:, c]) for c in range(num_classes)], 1)
  held_out, cv_y, cv_weight = [], [], []   # one entry per (class, fold) problem
  for c in range(num_classes):
    for _, test_rows in StratifiedKFold(n_splits=num_folds).split(np.zeros(n), labels[:, c]):
      mask = np.ones(n, np.float32)
      mask[test_rows] = 0.0
      held_out.append((c, test_rows))
      cv_y.append(labels[:, c])
      cv_weight.append(weights[:, c] * mask)
  f, _, z, info = solve_path(prepared, np.stack(cv_y, 1), np.stack(cv_weight, 1), costs,
                             **options)
  cv_ap = np.zeros((num_classes, len(costs)))
  for p, (c, rows) in enumerate(held_out):
    for j in range(len(costs)):
      cv_ap[c, j] += average_precision_score(labels[rows, c] == 1, f[j, rows, p]) / num_folds
  chosen = np.argmax(cv_ap, axis=1)
  costs = np.asarray(costs, np.float32)
  start = np.stack([z[chosen[c], :, c * num_folds:(c + 1) * num_folds].mean(axis=1)
                    for c in range(num_classes)], 1)
  final = solve(prepared, labels, weights * costs[chosen][None, :], start, **options)
  _accumulate(info, final)
  w = prepared.features.T.astype(np.float64) @ final.beta.astype(np.float64)   # [D + 1, C]
  return {"cv_ap": cv_ap, "chosen": chosen, "coef": w[:-1].T, "intercept": w[-1],
          "info": info}


def lowshot_train(prepared: Prepared, samples, costs: Sequence[float] = svm.COSTS,
                  **options) -> Tuple[np.ndarray, np.ndarray]:
  """SVMs for every (sample, cost, class) of one low-shot k; as `svm._lowshot_sklearn`.

  Args:
    prepared: `prepare(normalised trainval features)`.
    samples: int [S, n, C] low-shot label matrices (`svm.lowshot_targets`).
    costs: cost grid.
    **options: forwarded to `solve`.

  Returns:
    (coef [S, len(costs), C, D], intercept [S, len(costs), C]).
  """
  samples = np.asarray(samples)
  num_samples, _, num_classes = samples.shape
  used = np.flatnonzero(np.any(samples >= 0, axis=(0, 2)))
  # Small k touches few rows: solve on their own (much smaller) factor.
  sub = prepared.subset(used) if len(used) < 0.7 * prepared.num_rows else None
  rows = used if sub is not None else np.arange(prepared.num_rows)
  target = sub if sub is not None else prepared
  picked = samples[:, rows, :]                                      # [S, m, C]
  y = np.where(picked == 1, 1.0, -1.0).transpose(1, 0, 2).reshape(len(rows), -1)
  weight = (_class_weights(y) * (picked >= 0).transpose(1, 0, 2).reshape(len(rows), -1))
  _, beta, _, _ = solve_path(target, y, weight, costs, **options)   # beta [J, m, S*C]
  w = np.einsum("md,jmp->jpd", target.features.astype(np.float64), beta)
  w = w.reshape(len(costs), num_samples, num_classes, -1).transpose(1, 0, 2, 3)
  return w[..., :-1], w[..., -1]
