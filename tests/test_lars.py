"""Tests for ssl_jax.ops.lars against float64 transcriptions of the references."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ssl_jax.ops.lars import lars


def _reference_steps(params, grads_per_step, lr_fn, *, variant, momentum,
                     weight_decay, trust_coefficient, eps):
  """Per-tensor loops of apex LARC(clip=False)+torch SGD / mmselfsup LARS.

  Args:
    params: dict name -> np array (float64 copies are updated in place).
    grads_per_step: list of dicts name -> grad.
    lr_fn: step -> lr.
    weight_decay: dict name -> wd of that tensor's param group.
  Returns:
    params after all steps.
  """
  params = {k: np.array(v, np.float64) for k, v in params.items()}
  bufs = {}
  for step, grads in enumerate(grads_per_step):
    lr = lr_fn(step)
    for name, p in params.items():
      g = np.array(grads[name], np.float64)
      wd = weight_decay[name]
      p_norm, g_norm = np.linalg.norm(p), np.linalg.norm(g)
      if variant == "larc":
        if p_norm != 0 and g_norm != 0:
          adaptive_lr = trust_coefficient * p_norm / (g_norm + p_norm * wd + eps)
          g = (g + wd * p) * adaptive_lr
        # else: grad as is, and LARC set the SGD group's weight_decay to 0.
        d = g
      else:
        if p_norm != 0 and g_norm != 0:
          local_lr = trust_coefficient * p_norm / (g_norm + wd * p_norm + eps)
        else:
          local_lr = 1.0
        d = (g + wd * p) * (local_lr * lr)
      # torch: the buffer is created as a clone of the first d.
      bufs[name] = d.copy() if name not in bufs else momentum * bufs[name] + d
      p -= lr * bufs[name] if variant == "larc" else bufs[name]
  return params


def _problem(seed=0, num_steps=4):
  rng = np.random.default_rng(seed)
  params = {
      "kernel": rng.normal(size=(3, 4)).astype(np.float32),
      "bn_scale": np.ones(4, np.float32),
      # Zero-initialised (zero_init_residual gammas, biases): ||p|| = 0 first.
      "zero_bias": np.zeros(4, np.float32),
      # Never receives a gradient: ||g|| = 0 at every step.
      "no_grad": rng.normal(size=(2,)).astype(np.float32),
  }
  grads = []
  for _ in range(num_steps):
    step_grads = {k: rng.normal(size=v.shape).astype(np.float32)
                  for k, v in params.items()}
    step_grads["no_grad"] = np.zeros(2, np.float32)
    grads.append(step_grads)
  return params, grads


def _run(tx, params, grads_per_step):
  params = jax.tree.map(jnp.asarray, params)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  for grads in grads_per_step:
    params, opt_state = step(params, opt_state, grads)
  return params


@pytest.mark.parametrize("variant", ["larc", "mmselfsup"])
@pytest.mark.parametrize("trust_coefficient,weight_decay", [
    (0.001, 1e-6),  # SwAV reference values
    (0.02, 0.05),   # large enough that the decay term is visible
])
def test_matches_reference_loop(variant, trust_coefficient, weight_decay):
  params, grads = _problem()
  schedule = lambda step: 0.6 * (1.0 - 0.2 * step)  # lr changes every step
  tx = lars(schedule, momentum=0.9, weight_decay=weight_decay,
            trust_coefficient=trust_coefficient, variant=variant)
  got = _run(tx, params, grads)
  expected = _reference_steps(
      params, grads, schedule, variant=variant, momentum=0.9,
      weight_decay={k: weight_decay for k in params},
      trust_coefficient=trust_coefficient, eps=1e-8)
  for name in params:
    np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-7,
                               err_msg=name)


def test_zero_norm_cases_by_hand():
  # lr 0.5, wd 0.1, eta 0.01, eps 0, one step.
  params = {"zero": np.zeros(2, np.float32),
            "frozen": np.array([1.0, -2.0], np.float32),
            "regular": np.array([3.0, 4.0], np.float32)}
  grads = {"zero": np.array([1.0, 2.0], np.float32),
           "frozen": np.zeros(2, np.float32),
           "regular": np.array([0.6, 0.8], np.float32)}
  kwargs = dict(momentum=0.9, weight_decay=0.1, trust_coefficient=0.01, eps=0.0)
  larc = _run(lars(0.5, variant="larc", **kwargs), params, [grads])
  mmself = _run(lars(0.5, variant="mmselfsup", **kwargs), params, [grads])
  # ||p|| = 0: plain SGD step p - lr g in both.
  np.testing.assert_allclose(larc["zero"], [-0.5, -1.0], rtol=1e-6)
  np.testing.assert_allclose(mmself["zero"], [-0.5, -1.0], rtol=1e-6)
  # ||g|| = 0: LARC leaves p alone; mmselfsup still decays: p - lr wd p.
  np.testing.assert_allclose(larc["frozen"], [1.0, -2.0], rtol=1e-6)
  np.testing.assert_allclose(mmself["frozen"], [0.95, -1.9], rtol=1e-6)
  # ||p|| = 5, ||g|| = 1: ratio 0.01 * 5 / (1 + 0.1 * 5) = 1/30,
  # step = (g + 0.1 p) / 30 = [0.03, 0.04], times lr 0.5.
  for result in (larc, mmself):
    np.testing.assert_allclose(result["regular"], [2.985, 3.98], rtol=1e-6)


def test_variants_agree_at_constant_lr_and_differ_under_schedule():
  params, grads = _problem(seed=1)
  # Without zero norms the two only differ in where lr multiplies.
  params["zero_bias"] = np.full(4, 0.5, np.float32)
  grads = [dict(g, no_grad=np.ones(2, np.float32)) for g in grads]
  for learning_rate, should_match in ((0.3, True),
                                      (lambda step: 0.3 / (1 + step), False)):
    a = _run(lars(learning_rate, weight_decay=0.01, variant="larc"),
             params, grads)
    b = _run(lars(learning_rate, weight_decay=0.01, variant="mmselfsup"),
             params, grads)
    max_diff = max(float(jnp.max(jnp.abs(a[k] - b[k]))) for k in params)
    assert (max_diff < 1e-6) == should_match, (learning_rate, max_diff)


def test_weight_decay_mask():
  params, grads = _problem(seed=2)
  mask = {"kernel": True, "bn_scale": False, "zero_bias": False,
          "no_grad": True}
  for variant in ("larc", "mmselfsup"):
    expected = _reference_steps(
        params, grads, lambda _: 0.1, variant=variant, momentum=0.9,
        weight_decay={k: 0.05 if on else 0.0 for k, on in mask.items()},
        trust_coefficient=0.01, eps=1e-8)
    for weight_decay_mask in (mask, lambda p: {k: k in ("kernel", "no_grad")
                                               for k in p}):
      got = _run(lars(0.1, weight_decay=0.05, trust_coefficient=0.01,
                      variant=variant, weight_decay_mask=weight_decay_mask),
                 params, grads)
      for name in params:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-5,
                                   atol=1e-7, err_msg=f"{variant} {name}")


def test_sharded_params_use_global_norms(n_devices):
  # Norms must be over the whole tensor even when a tensor is split across
  # devices; replicated state must give the same numbers as one device.
  mesh = Mesh(np.array(jax.devices()), ("data",))
  rng = np.random.default_rng(3)
  params = {"split": rng.normal(size=(2 * n_devices, 3)).astype(np.float32),
            "replicated": rng.normal(size=(5,)).astype(np.float32)}
  grads = [{k: rng.normal(size=v.shape).astype(np.float32)
            for k, v in params.items()} for _ in range(2)]
  shardings = {"split": NamedSharding(mesh, P("data")),
               "replicated": NamedSharding(mesh, P())}
  tx = lars(0.5, weight_decay=1e-3, trust_coefficient=0.01)
  expected = _run(tx, params, grads)
  got = _run(tx, jax.device_put(params, shardings),
             [jax.device_put(g, shardings) for g in grads])
  assert got["split"].sharding.is_equivalent_to(shardings["split"], 2)
  for name in params:
    np.testing.assert_allclose(got[name], expected[name], rtol=1e-6)


def test_state_counts_steps_and_keeps_param_structure():
  params = {"a": jnp.ones(3), "b": (jnp.zeros(2), jnp.ones((1, 2)))}
  tx = lars(optax.linear_schedule(1.0, 0.0, 10), variant="mmselfsup")
  state = tx.init(params)
  assert int(state.count) == 0
  assert jax.tree.structure(state.momentum) == jax.tree.structure(params)
  updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
  assert int(state.count) == 1
  assert jax.tree.structure(updates) == jax.tree.structure(params)


def test_bad_input_raises():
  with pytest.raises(ValueError, match="variant"):
    lars(0.1, variant="optax")
  tx = lars(0.1)
  params = {"w": jnp.ones(2)}
  with pytest.raises(ValueError, match="params"):
    tx.update(params, tx.init(params))
