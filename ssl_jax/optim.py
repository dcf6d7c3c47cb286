"""Optimisers and learning-rate schedules built from `config.optimizer`.

Reference optimisers: SGD(momentum 0.9) with weight decay on all parameters for MoCo/InterCLR
(torch semantics: g += wd * p, then momentum), LARS/LARC for SwAV, AdamW for ViTs.
"""
import math

import jax
import jax.numpy as jnp
import optax


def lr_schedule(opt_cfg, total_steps: int, steps_per_epoch: int):
  """Returns an optax schedule (step -> lr).

  `schedule`: 'cosine' (per step, to `final_lr`), 'cosine_epoch' (per epoch, as mmselfsup 0.x and
  the MoCo repos step the cosine once per epoch), 'step' (x0.1 at `milestones` epochs), 'constant'.
  `warmup_epochs` of linear warm-up from `warmup_start_lr`.
  """
  base = opt_cfg.lr
  final = opt_cfg.get('final_lr', 0.0)
  warmup = int(round(opt_cfg.get('warmup_epochs', 0) * steps_per_epoch))
  warmup_start = opt_cfg.get('warmup_start_lr', 0.0)
  kind = opt_cfg.get('schedule', 'cosine')
  decay_steps = max(total_steps - warmup, 1)

  def after_warmup(t):
    if kind == 'cosine':
      frac = jnp.clip(t / decay_steps, 0.0, 1.0)
      return final + 0.5 * (base - final) * (1 + jnp.cos(math.pi * frac))
    if kind == 'cosine_epoch':
      total_epochs = max(decay_steps // max(steps_per_epoch, 1), 1)
      epoch = jnp.floor(t / steps_per_epoch)
      frac = jnp.clip(epoch / total_epochs, 0.0, 1.0)
      return final + 0.5 * (base - final) * (1 + jnp.cos(math.pi * frac))
    if kind == 'step':
      epoch = jnp.floor((t + warmup) / steps_per_epoch)
      drops = sum((epoch >= m).astype(jnp.float32) for m in opt_cfg.get('milestones', ()))
      return base * 0.1**drops
    if kind == 'constant':
      return jnp.asarray(base, jnp.float32)
    raise ValueError(f"config.optimizer.schedule={kind!r}; use cosine, cosine_epoch, step, constant.")

  def schedule(step):
    t = jnp.asarray(step, jnp.float32)
    if warmup:
      ramp = warmup_start + (base - warmup_start) * t / warmup
      return jnp.where(t < warmup, ramp, after_warmup(t - warmup))
    return after_warmup(t)

  return schedule


def _decay_mask(opt_cfg):
  """Weight decay on every parameter (reference MoCo/InterCLR/SwAV), or not on BN/bias if asked."""
  if not opt_cfg.get('exclude_bias_and_norm', False):
    return None
  return lambda params: jax.tree_util.tree_map_with_path(
      lambda path, p: p.ndim > 1, params)


def make_optimizer(opt_cfg, schedule) -> optax.GradientTransformation:
  name = opt_cfg.get('name', 'sgd')
  wd = opt_cfg.get('weight_decay', 0.0)
  if name == 'sgd':
    return optax.chain(
        optax.add_decayed_weights(wd, mask=_decay_mask(opt_cfg)),
        optax.sgd(schedule, momentum=opt_cfg.get('momentum', 0.9),
                  nesterov=opt_cfg.get('nesterov', False)))
  if name == 'lars':
    from ssl_jax.ops import lars  # pylint: disable=g-import-not-at-top
    return lars.lars(schedule, momentum=opt_cfg.get('momentum', 0.9), weight_decay=wd,
                     trust_coefficient=opt_cfg.get('trust_coefficient', 0.001),
                     variant=opt_cfg.get('lars_variant', 'larc'))
  if name == 'adamw':
    return optax.adamw(schedule, b1=opt_cfg.get('b1', 0.9), b2=opt_cfg.get('b2', 0.999),
                       weight_decay=wd, mask=_decay_mask(opt_cfg))
  raise ValueError(f"config.optimizer.name={name!r}; use 'sgd', 'lars' or 'adamw'.")
