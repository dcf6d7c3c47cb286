"""MoCo v1 / v2 (He et al. 2020; Chen et al. 2020): query encoder, EMA key encoder, FIFO queue.

Matches facebookresearch/moco and mmselfsup: the key encoder is updated *before* the key forward
(θ_k ← m θ_k + (1-m) θ_q, params only; BN statistics of the key net are its own), keys are unit
vectors, the loss is CE over [q·k+, q·queue] / T with the positive first, and the gathered keys
are enqueued after the loss. ShuffleBN: BatchNorm statistics are computed per group of
`config.model.bn_groups` samples (the reference's per-GPU BN) and the key batch is permuted across
the whole global batch before the key forward and un-permuted after, so a key's BN group differs
from its query's group. With bn_groups=8 one chip reproduces the 8-GPU reference and N chips give
the same numbers as one.

`config.moco`: queue_size, dim, temperature, momentum, head ('mlp' v2 | 'linear' v1), hidden_dim,
shuffle_bn.
"""
import flax
import jax
import jax.numpy as jnp

from ssl_jax import models
from ssl_jax.methods.base import Method, ema_update
from ssl_jax.ops import infonce


@flax.struct.dataclass
class MoCoState:
  queue: jax.Array   # [K, D] unit rows; the reference stores the transpose
  queue_ptr: jax.Array   # int32 scalar


def create_encoder(config, out_dim, head_cfg):
  model_cfg = config.model
  dtype = models.compute_dtype(model_cfg)
  num_layers = 2 if head_cfg.get('head', 'mlp') == 'mlp' else 1
  head = models.MLPHead(hidden_dim=head_cfg.get('hidden_dim', 2048), out_dim=out_dim,
                        num_layers=num_layers, use_bn=head_cfg.get('head_bn', False),
                        bn_groups=model_cfg.get('bn_groups', 1), dtype=dtype)
  return models.Encoder(backbone=models.build_backbone(model_cfg), head=head)


def create_model(config):
  return create_encoder(config, config.moco.dim, config.moco)


def init_method_state(config, rng, num_train_examples):
  del num_train_examples
  size, dim = config.moco.queue_size, config.moco.dim
  if size % config.batch_size:
    raise ValueError(f'config.moco.queue_size={size} must be a multiple of config.batch_size='
                     f'{config.batch_size} (the FIFO writes whole batches).')
  queue = infonce.l2_normalize(jax.random.normal(rng, (size, dim), jnp.float32))
  return MoCoState(queue=queue, queue_ptr=jnp.zeros((), jnp.int32))


def encode_keys(config, model, state, ema_params, x, rng):
  """Key embeddings from the momentum encoder with ShuffleBN; returns (unit keys, new key stats)."""
  variables = {'params': jax.lax.stop_gradient(ema_params), 'batch_stats': state.ema_batch_stats}
  shuffle = config.moco.get('shuffle_bn', True) and config.model.get('bn_groups', 1) > 1
  if shuffle:
    perm = jax.random.permutation(rng, x.shape[0])
    x = x[perm]
  out, updates = model.apply(variables, x, train=True, mutable=['batch_stats'])
  k = out['embedding']
  if shuffle:
    k = k[jnp.argsort(perm)]
  return jax.lax.stop_gradient(infonce.l2_normalize(k)), updates['batch_stats']


def loss_fn(config, model, params, state, views, batch, rng):
  del batch
  x_q, x_k = views[0][0], views[0][1]
  ema_params = ema_update(state.ema_params, params, config.moco.momentum)
  out, updates = model.apply({'params': params, 'batch_stats': state.batch_stats}, x_q, train=True,
                             mutable=['batch_stats'])
  q = infonce.l2_normalize(out['embedding'])
  k, ema_batch_stats = encode_keys(config, model, state, ema_params, x_k, rng)
  l_pos, l_neg = infonce.queue_logits(q, k, state.method_state.queue)
  loss, metrics = infonce.contrastive_loss(l_pos, l_neg, config.moco.temperature)
  aux = {'batch_stats': updates['batch_stats'], 'ema_params': ema_params,
         'ema_batch_stats': ema_batch_stats, 'keys': k, 'metrics': metrics}
  return loss, aux


def update_state(config, state, aux):
  del config
  queue, ptr = infonce.enqueue(state.method_state.queue, state.method_state.queue_ptr, aux['keys'])
  return state.replace(ema_params=aux['ema_params'], ema_batch_stats=aux['ema_batch_stats'],
                       method_state=MoCoState(queue=queue, queue_ptr=ptr))


METHOD = Method(name='moco', create_model=create_model, init_method_state=init_method_state,
                loss_fn=loss_fn, update_state=update_state, uses_ema=True)
