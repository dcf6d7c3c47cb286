"""The contract between the single trainer and a method file.

A method is a set of pure functions plus its extra state (a `flax.struct.dataclass`). The trainer
owns the loop, sharding, optimiser, checkpoints and logging; the method owns the model, the loss and
what happens to its state after each step.

  create_model(config) -> flax Module (its backbone submodule is named 'backbone')
  init_variables(config, model, rng, views) -> {'params', 'batch_stats'}
  init_method_state(config, rng, num_train_examples) -> pytree (queue, bank, ...)
  loss_fn(config, model, params, state, views, batch, rng) -> (loss, aux)
      aux['batch_stats'] (new online BN stats), aux['metrics'] (dict of scalars), anything else
      the method's update_state needs.
  update_state(config, state, aux) -> state          (after the optimiser step, inside jit)
  prepare(config, ctx, state) -> state               (host, once, before step 0 of a fresh run)
  after_step(config, ctx, state) -> state            (host, after every step; keep it cheap)
  frozen_params(config, step) -> {top-level param name: bool}   (skip their update entirely)
  prepare_params(config, params) -> params           (inside jit, before the forward; the
      optimiser then updates the returned params, as SwAV's in-place prototype normalisation)
"""
import dataclasses
from typing import Any, Callable, Optional

import jax


def default_init_variables(config, model, rng, views):
  del config
  variables = model.init(rng, views[0][0], train=True)
  return {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}


def ema_update(ema_tree, online_tree, momentum):
  """θ_k ← m θ_k + (1 - m) θ_q on every leaf (the momentum encoder update, exact)."""
  return jax.tree.map(lambda k, q: momentum * k + (1.0 - momentum) * jax.lax.stop_gradient(q),
                      ema_tree, online_tree)


@dataclasses.dataclass(frozen=True)
class Method:
  name: str
  create_model: Callable[..., Any]
  init_method_state: Callable[..., Any]
  loss_fn: Callable[..., Any]
  update_state: Callable[..., Any]
  init_variables: Callable[..., Any] = default_init_variables
  uses_ema: bool = False
  prepare: Optional[Callable[..., Any]] = None
  after_step: Optional[Callable[..., Any]] = None
  frozen_params: Optional[Callable[..., Any]] = None
  prepare_params: Optional[Callable[..., Any]] = None
