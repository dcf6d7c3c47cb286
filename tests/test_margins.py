"""Tests for ssl_jax.ops.margins against hand-computed values (spec §1.7)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_jax.ops import margins

# cos(0.5) = 0.8775826, sin(0.5) = 0.4794255, sin(0.3) = 0.2955202.


def test_cosine_margin_sign_makes_negative_m_easier():
  cos = jnp.array([0.3, -0.2, 1.0])
  # InterCLR's inter_cos_margin = -0.5 ADDS 0.5 to the positive cosine.
  np.testing.assert_allclose(margins.cosine_margin(cos, -0.5), [0.8, 0.3, 1.5], atol=1e-6)
  np.testing.assert_allclose(margins.cosine_margin(cos, 0.2), [0.1, -0.4, 0.8], atol=1e-6)


def test_arc_margin_positive_m_both_branches():
  cos = jnp.array([0.6, -0.9, 0.0, 1.0])
  out = margins.arc_margin(cos, 0.5)
  # 0.6 > cos(pi - 0.5) = -0.8776: 0.6 * 0.8775826 - 0.8 * 0.4794255 = 0.1430091.
  # -0.9 <= -0.8776 (guard): -0.9 - sin(pi - 0.5) * 0.5 = -1.1397128.
  # 0.0: -1 * sin(0.5); 1.0 (sin theta = 0): cos(0.5).
  np.testing.assert_allclose(out, [0.1430091, -1.1397128, -0.4794255, 0.8775826], atol=1e-6)
  np.testing.assert_allclose(margins.arc_margin(0.0, 0.3), -0.2955202, atol=1e-6)


def test_arc_margin_negative_m_both_branches():
  cos = jnp.array([0.6, 0.95, 1.0])
  out = margins.arc_margin(cos, -0.5)
  # 0.6 < cos(-0.5) = 0.8776: 0.6 * 0.8775826 + 0.8 * 0.4794255 = 0.9100900.
  # 0.95 >= 0.8776 (guard): 0.95 + sin(-0.5) * (-0.5) = 1.1897128; 1.0 -> 1.2397128.
  np.testing.assert_allclose(out, [0.9100900, 1.1897128, 1.2397128], atol=1e-6)


def test_arc_margin_zero_is_identity_and_gradient_finite_at_one():
  cos = jnp.array([-1.0, -0.3, 0.0, 0.7, 1.0])
  np.testing.assert_allclose(margins.arc_margin(cos, 0.0), cos, atol=1e-7)
  for m in (0.5, -0.5):
    grad = jax.grad(lambda c, m=m: margins.arc_margin(c, m).sum())(cos)
    assert np.all(np.isfinite(grad)), (m, grad)
  # d/dc cos(theta + 0.5) at c = 0.6 is cos(0.5) + c / sin(theta) * sin(0.5) = 1.2371517.
  np.testing.assert_allclose(jax.grad(lambda c: margins.arc_margin(c, 0.5))(0.6), 1.2371517,
                             atol=1e-5)


def test_apply_margin_dispatch():
  cos = jnp.array([0.6])
  np.testing.assert_array_equal(margins.apply_margin(cos, 'none', -0.5), cos)
  np.testing.assert_allclose(margins.apply_margin(cos, 'cosine', -0.5), [1.1], atol=1e-6)
  np.testing.assert_allclose(margins.apply_margin(cos, 'arc', 0.5), [0.1430091], atol=1e-6)
  with pytest.raises(ValueError, match='margin kind'):
    margins.apply_margin(cos, 'additive', 0.5)
