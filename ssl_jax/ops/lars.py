"""Layer-wise adaptive SGD used by SwAV: apex LARC + SGD, and mmselfsup LARS.

Two reference optimisers, selected by `variant` (per parameter tensor p with
gradient g, weight decay wd, trust coefficient eta):

* "larc": facebookresearch/swav wraps `torch.optim.SGD(momentum=0.9, wd)` in
  apex `LARC(trust_coefficient=0.001, clip=False)` and applies it to *every*
  parameter (BN and biases included):
      if ||p|| > 0 and ||g|| > 0:
        g <- (g + wd p) * eta ||p|| / (||g|| + wd ||p|| + eps)
      else:
        g unchanged, and no weight decay (LARC zeroes the SGD group's wd)
      buf <- momentum buf + g;   p <- p - lr buf
* "mmselfsup": `mmselfsup/engine/optimizers/lars.py`, learning rate folded into
  the momentum buffer, and weight decay applied even when a norm is zero:
      local = eta ||p|| / (||g|| + wd ||p|| + eps)  (1 if ||p|| or ||g|| is 0)
      d = (g + wd p) * local * lr;   buf <- momentum buf + d;   p <- p - buf
  With a constant lr and nonzero norms both variants give the same steps; they
  differ when the lr changes (schedule) and at zero norms, e.g. zero-init BN
  gammas/biases or frozen parameters.

optax.lars is a third variant: its trust ratio is eta ||p|| / ||g + wd p||
(norm of the decayed update, not ||g|| + wd ||p||), the zero-norm test looks at
||g + wd p||, and the lr is folded into the momentum trace like mmselfsup. We
therefore write the transform by hand.

A zero gradient is not the same as torch's `grad is None`: the reference skips
such a parameter entirely, here the momentum buffer still decays it (LARC) and
weight decay still moves it (mmselfsup). Freeze parameters (SwAV prototypes) by
masking the *update*, e.g. with optax.multi_transform / a step-dependent mask.
"""
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

_VARIANTS = ("larc", "mmselfsup")


class LarsState(NamedTuple):
  """Optimiser state: step counter (for the lr schedule) and momentum."""
  count: jax.Array  # int32 scalar, number of updates done so far.
  momentum: optax.Updates  # one buffer per parameter, like torch's.


def _norm(x: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32))))


def lars(
    learning_rate: optax.ScalarOrSchedule,
    *,
    momentum: float = 0.9,
    weight_decay: float = 1e-6,
    trust_coefficient: float = 0.001,
    eps: float = 1e-8,
    variant: str = "larc",
    weight_decay_mask: Optional[Union[Any, Callable[[optax.Params], Any]]] = None,
) -> optax.GradientTransformation:
  """LARS/LARC momentum SGD matching the SwAV references.

  Args:
    learning_rate: float, or an optax schedule called with the number of
      updates done so far (0 for the first update), i.e. a per-iteration
      schedule as in the references.
    momentum: heavy-ball momentum (torch SGD convention, no dampening).
    weight_decay: L2 weight decay coefficient (reference 1e-6).
    trust_coefficient: eta of the trust ratio (reference 0.001).
    eps: added to the trust-ratio denominator (reference 1e-8).
    variant: "larc" (facebookresearch apex LARC + SGD) or "mmselfsup"; see the
      module docstring for the exact update rules.
    weight_decay_mask: None (decay every parameter, as both references do for
      SwAV), or a pytree of bools with the params' structure, or a callable
      params -> such a pytree. Where False the parameter uses wd = 0, both in
      the decay term and in the trust ratio (as a torch param group with
      weight_decay=0 would).

  Returns:
    An optax.GradientTransformation whose update needs `params`.

  Raises:
    ValueError: unknown variant (at construction) or params missing (update).
  """
  if variant not in _VARIANTS:
    raise ValueError(f"variant must be one of {_VARIANTS}, got {variant!r}.")

  def init_fn(params):
    return LarsState(count=jnp.zeros([], jnp.int32),
                     momentum=optax.tree_utils.tree_zeros_like(params))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(
          "lars needs the current params to compute trust ratios: call "
          "tx.update(grads, opt_state, params).")
    lr = (learning_rate(state.count) if callable(learning_rate)
          else learning_rate)
    lr = jnp.asarray(lr, jnp.float32)
    mask = (weight_decay_mask(params) if callable(weight_decay_mask)
            else weight_decay_mask)
    if mask is None:
      mask = jax.tree.map(lambda _: True, params)

    def leaf_update(grad, param, buf, decay_on):
      wd = jnp.where(decay_on, weight_decay, 0.0).astype(jnp.float32)
      g = grad.astype(jnp.float32)
      p = param.astype(jnp.float32)
      param_norm, grad_norm = _norm(p), _norm(g)
      trust_ratio = trust_coefficient * param_norm / (
          grad_norm + wd * param_norm + eps)
      both_nonzero = jnp.logical_and(param_norm > 0, grad_norm > 0)
      if variant == "larc":
        # apex LARC: both decay and scaling are skipped at a zero norm.
        step = jnp.where(both_nonzero, (g + wd * p) * trust_ratio, g)
        new_buf = momentum * buf.astype(jnp.float32) + step
        update = -lr * new_buf
      else:
        # mmselfsup LARS: local lr 1 at a zero norm, weight decay always.
        local_lr = jnp.where(both_nonzero, trust_ratio, 1.0)
        step = (g + wd * p) * (local_lr * lr)
        new_buf = momentum * buf.astype(jnp.float32) + step
        update = -new_buf
      return update.astype(param.dtype), new_buf.astype(buf.dtype)

    # params, buffers and mask all share the gradients' structure.
    treedef = jax.tree.structure(updates)
    pairs = treedef.flatten_up_to(
        jax.tree.map(leaf_update, updates, params, state.momentum, mask))
    new_updates = treedef.unflatten([update for update, _ in pairs])
    new_momentum = treedef.unflatten([buf for _, buf in pairs])
    return new_updates, LarsState(
        count=optax.safe_int32_increment(state.count), momentum=new_momentum)

  return optax.GradientTransformation(init_fn, update_fn)
