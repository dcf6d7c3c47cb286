"""Method registry: `config.method` -> the `METHOD` object of a file in this package."""
import importlib

_MODULES = {
    'mocov1': 'moco',
    'mocov2': 'moco',
    'swav': 'swav',
    'interclr': 'interclr',
}


def get_method(name: str):
  if name not in _MODULES:
    raise ValueError(f'config.method={name!r} is unknown; choose one of {sorted(_MODULES)}.')
  return importlib.import_module(f'ssl_jax.methods.{_MODULES[name]}').METHOD
