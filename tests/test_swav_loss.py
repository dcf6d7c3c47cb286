"""Tests for ssl_jax.ops.swav_loss: hand-computed values and a numpy loop."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_jax.ops.swav_loss import code_entropy_stats, swapped_prediction_loss


def _reference_loss(scores, codes, crops_for_assign, temperature):
  """Transcription of the facebookresearch/swav training-loop loss, float64."""
  scores = np.asarray(scores, np.float64)
  num_crops = scores.shape[0]
  loss = 0.0
  for a, crop_id in enumerate(crops_for_assign):
    q = np.asarray(codes[a], np.float64)
    subloss = 0.0
    for v in np.delete(np.arange(num_crops), crop_id):
      x = scores[v] / temperature
      log_p = x - np.log(np.sum(np.exp(x - x.max(1, keepdims=True)), 1,
                                keepdims=True)) - x.max(1, keepdims=True)
      subloss -= np.mean(np.sum(q * log_p, axis=1))
    loss += subloss / (num_crops - 1)
  return loss / len(crops_for_assign)


def test_two_crops_one_hot_by_hand():
  # tau = 0.1 turns a score of 0.1 into logit 1. Crop 1 (logits [0, 1, 0])
  # gives crop 0's target, prototype 0, probability 1 / (2 + e); crop 0
  # (logits [1, 0, 0]) gives crop 1's target, prototype 1, the same.
  # L = (ln(2 + e) + ln(2 + e)) / 2 = ln(2 + e).
  scores = jnp.array([[[0.1, 0.0, 0.0]], [[0.0, 0.1, 0.0]]])
  codes = jnp.array([[[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]]])
  loss = swapped_prediction_loss(scores, codes, (0, 1), 0.1)
  assert loss.dtype == jnp.float32 and loss.shape == ()
  np.testing.assert_allclose(loss, math.log(2 + math.e), rtol=1e-6)
  np.testing.assert_allclose(loss, 1.5514447139320509, rtol=1e-6)


def test_two_crops_soft_codes_by_hand():
  # b = 2, K = 3, tau = 0.1.  Logits (scores / tau):
  #   crop 0: [2, 0, 0], [0, 0, 0];   crop 1: [0, 0, 0], [0, 1, 0].
  # Codes: crop 0: [.5, .5, 0], [1/3, 1/3, 1/3];  crop 1: [1, 0, 0], [0, 0, 1].
  # s = 0, predicted by crop 1:
  #   row 0: uniform p        -> -(.5 ln 1/3 + .5 ln 1/3)            = ln 3
  #   row 1: p = [1, e, 1]/(2+e) -> ln(2 + e) - 1/3
  # s = 1, predicted by crop 0:
  #   row 0: p = [e^2, 1, 1]/(e^2 + 2), target 0 -> ln(e^2 + 2) - 2
  #   row 1: uniform p, target 2              -> ln 3
  # L = mean over s of mean over rows = (sum of the four) / 4.
  e = math.e
  expected = (2 * math.log(3) + math.log(2 + e) - 1 / 3
              + math.log(e * e + 2) - 2) / 4
  assert abs(expected - 0.9137201810392053) < 1e-12
  scores = jnp.array([[[0.2, 0.0, 0.0], [0.0, 0.0, 0.0]],
                      [[0.0, 0.0, 0.0], [0.0, 0.1, 0.0]]])
  codes = jnp.array([[[0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3]],
                     [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]])
  np.testing.assert_allclose(
      swapped_prediction_loss(scores, codes, [0, 1], 0.1), expected, rtol=1e-6)


def _random_case(seed, num_crops, batch, num_prototypes, num_assign):
  rng = np.random.default_rng(seed)
  scores = rng.uniform(-1, 1, size=(num_crops, batch, num_prototypes))
  codes = rng.dirichlet(np.ones(num_prototypes), size=(num_assign, batch))
  return scores.astype(np.float32), codes.astype(np.float32)


@pytest.mark.parametrize("crops_for_assign", [(0, 1), (1, 0), (2,), (0, 3, 5)])
def test_multicrop_matches_reference_loop(crops_for_assign):
  scores, codes = _random_case(0, 6, 5, 7, len(crops_for_assign))
  np.testing.assert_allclose(
      swapped_prediction_loss(jnp.asarray(scores), jnp.asarray(codes),
                              crops_for_assign, 0.1),
      _reference_loss(scores, codes, crops_for_assign, 0.1), rtol=1e-5)


def test_assign_order_follows_codes_order():
  scores, codes = _random_case(1, 4, 3, 5, 2)
  np.testing.assert_allclose(
      swapped_prediction_loss(scores, codes, (0, 1), 0.1),
      swapped_prediction_loss(scores, codes[::-1], (1, 0), 0.1), rtol=1e-6)


def test_uniform_codes_and_predictions_give_log_k():
  num_prototypes = 3000
  scores = jnp.zeros((8, 2, num_prototypes))
  codes = jnp.full((2, 2, num_prototypes), 1.0 / num_prototypes)
  np.testing.assert_allclose(
      swapped_prediction_loss(scores, codes, (0, 1), 0.1), math.log(3000),
      rtol=1e-6)
  assert abs(math.log(3000) - 8.006) < 1e-3  # the README collapse plateau


def test_bf16_scores_computed_in_float32():
  scores, codes = _random_case(2, 3, 4, 6, 2)
  scores_bf16 = jnp.asarray(scores, jnp.bfloat16)
  loss = swapped_prediction_loss(scores_bf16, jnp.asarray(codes), (0, 1), 0.1)
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(
      loss, _reference_loss(np.asarray(scores_bf16.astype(jnp.float32)), codes,
                            (0, 1), 0.1), rtol=1e-5)


def test_gradients_flow_to_scores_only():
  scores, codes = _random_case(3, 2, 4, 5, 2)
  grad_scores, grad_codes = jax.grad(
      lambda s, q: swapped_prediction_loss(s, q, (0, 1), 0.1),
      argnums=(0, 1))(jnp.asarray(scores), jnp.asarray(codes))
  np.testing.assert_array_equal(grad_codes, np.zeros_like(codes))
  # Two crops: crop v is predicted only against the other crop's codes, so
  # dL/ds_v = (1/|A|) (1/(V-1)) (softmax(s_v / tau) - codes_other) / (tau b).
  probs = jax.nn.softmax(scores / 0.1, axis=-1)
  expected = 0.5 * (probs - codes[::-1]) / (0.1 * 4)
  np.testing.assert_allclose(grad_scores, expected, rtol=1e-5, atol=1e-6)


def test_bad_input_raises():
  scores, codes = _random_case(4, 3, 2, 4, 2)
  with pytest.raises(ValueError, match=r"\[V, b, K\]"):
    swapped_prediction_loss(scores[0], codes, (0, 1), 0.1)
  with pytest.raises(ValueError, match="crops_for_assign"):
    swapped_prediction_loss(scores, codes, (0, 3), 0.1)
  with pytest.raises(ValueError, match="crops_for_assign"):
    swapped_prediction_loss(scores, codes, (1, 1), 0.1)
  with pytest.raises(ValueError, match="codes_per_assign_crop"):
    swapped_prediction_loss(scores, codes[:1], (0, 1), 0.1)
  with pytest.raises(ValueError, match=">= 2 crops"):
    swapped_prediction_loss(scores[:1], codes[:1], (0,), 0.1)
  with pytest.raises(ValueError, match="temperature"):
    swapped_prediction_loss(scores, codes, (0, 1), 0.0)


def test_code_entropy_stats():
  k = 5
  uniform = code_entropy_stats(jnp.full((4, k), 1.0 / k))
  np.testing.assert_allclose(uniform["code_entropy"], math.log(k), rtol=1e-6)
  np.testing.assert_allclose(uniform["code_sample_entropy"], math.log(k),
                             rtol=1e-6)

  collapsed = code_entropy_stats(jax.nn.one_hot(jnp.array([2, 2, 2, 2]), k))
  assert float(collapsed["code_entropy"]) == 0.0
  assert float(collapsed["code_sample_entropy"]) == 0.0
  assert int(collapsed["code_argmax_prototypes"]) == 1

  # One-hot codes spread over prototypes {0, 1, 3}, counts 2/1/1.
  spread = code_entropy_stats(jax.nn.one_hot(jnp.array([0, 0, 1, 3]), k))
  np.testing.assert_allclose(
      spread["code_entropy"], -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)),
      rtol=1e-6)
  assert float(spread["code_sample_entropy"]) == 0.0
  assert int(spread["code_argmax_prototypes"]) == 3

  # Leading axes (assignment crops) are pooled: [2, 2, K] == [4, K].
  codes = np.random.default_rng(0).dirichlet(np.ones(k), size=(2, 2))
  pooled = code_entropy_stats(jnp.asarray(codes))
  flat = code_entropy_stats(jnp.asarray(codes.reshape(4, k)))
  for name in pooled:
    np.testing.assert_allclose(pooled[name], flat[name], rtol=1e-6)
  sample_entropy = -np.mean(np.sum(codes * np.log(codes), axis=-1))
  np.testing.assert_allclose(pooled["code_sample_entropy"], sample_entropy,
                             rtol=1e-5)
