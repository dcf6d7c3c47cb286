"""Device mesh and shardings: data parallel, batch sharded on `data`, state replicated."""
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh over `devices` (default: all) with an Auto `data` axis.

  `jax.make_mesh` now defaults to Explicit axes, under which an unannotated linen step fails with
  "contracting dimensions are sharded"; a plain Mesh has Auto axes.
  """
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), ('data',))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P('data'))


def check_batch_size(global_batch_size: int, mesh: Mesh, what: str = 'config.batch_size'):
  n = mesh.devices.size
  if global_batch_size % n:
    raise ValueError(f'{what}={global_batch_size} is not divisible by the {n} devices of the mesh; '
                     f'use a multiple of {n}.')
