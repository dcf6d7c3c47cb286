"""Decision-boundary margins on the positive logit (spec §1.7).

Mirrors the cosine / arc margins of `mmselfsup@0.x:mmselfsup/models/algorithms/interclr_moco.py`,
sign conventions included: the margin is SUBTRACTED, so InterCLR's `inter_cos_margin = -0.5`
makes the positive EASIER (cosine + 0.5), the paper's "less stringent boundary". Getting this
sign wrong flips the paper's finding (spec §1.12). Both act on the cosine before the
temperature, and only on the positive logit.
"""
import math

import jax.numpy as jnp

KINDS = ('none', 'cosine', 'arc')


def cosine_margin(cosine, m):
  """phi = cosine - m (m = -0.5 gives cosine + 0.5)."""
  return cosine - m


def arc_margin(cosine, m):
  """phi = cos(theta + m) with the reference's guards.

  phi = cosine * cos(m) - sin(theta) * sin(m), sin(theta) = sqrt(clip(1 - cosine^2, 0, 1)).
  Guards (keep phi monotone where theta + m leaves [0, pi]):
    m < 0:  phi where cosine < cos(m), else cosine + sin(m) * m;
    m >= 0: phi where cosine > cos(pi - m), else cosine - sin(pi - m) * m.

  Args:
    cosine: array of cosines.
    m: margin in radians (python float or scalar array).

  Returns:
    Array like `cosine`.
  """
  cosine = jnp.asarray(cosine, jnp.float32)
  m = jnp.asarray(m, jnp.float32)
  sine_sq = jnp.clip(1.0 - cosine * cosine, 0.0, 1.0)
  # sqrt has an infinite slope at 0 (|cosine| = 1); the double where keeps gradients finite
  # (0 instead of NaN) without changing any value.
  positive = sine_sq > 0
  sine = jnp.where(positive, jnp.sqrt(jnp.where(positive, sine_sq, 1.0)), 0.0)
  phi = cosine * jnp.cos(m) - sine * jnp.sin(m)
  negative_margin = jnp.where(cosine < jnp.cos(m), phi, cosine + jnp.sin(m) * m)
  positive_margin = jnp.where(cosine > jnp.cos(math.pi - m), phi,
                              cosine - jnp.sin(math.pi - m) * m)
  return jnp.where(m < 0, negative_margin, positive_margin)


def apply_margin(l_pos, kind, m):
  """Applies the margin `kind` ('none', 'cosine' or 'arc') with value m to positive cosines.

  InterCLR's inter branch uses ('cosine', -0.5); the intra branch uses no margin.
  """
  if kind == 'none':
    return l_pos
  if kind == 'cosine':
    return cosine_margin(l_pos, m)
  if kind == 'arc':
    return arc_margin(l_pos, m)
  raise ValueError(f'Unknown margin kind {kind!r}; use one of {KINDS}.')
