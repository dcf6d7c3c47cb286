"""ssl_jax: self-supervised visual representation learning in JAX/Flax."""
import jax

# Random bits must not depend on how an array is sharded: the same key gives the same
# augmentations and samples on 1 chip and on a pod slice.
jax.config.update("jax_threefry_partitionable", True)

__version__ = "0.1.0"
