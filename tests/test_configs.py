"""Every config file and variant builds, and documents how to run it."""
import glob
import importlib.util
import os

import pytest

from ssl_jax import config_utils

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = sorted(glob.glob(os.path.join(REPO, 'configs', '*.py')) +
               [p for p in glob.glob(os.path.join(REPO, 'configs', 'eval', '*.py'))
                if not p.endswith('common.py')])


def _module(path):
  spec = importlib.util.spec_from_file_location('cfg_under_test', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize('path', FILES, ids=lambda p: os.path.relpath(p, REPO))
def test_config_builds_and_has_docstring(path):
  module = _module(path)
  assert module.__doc__ and 'python' in module.__doc__, 'docstring must give the command'
  variants = getattr(module, 'VARIANTS', {None: None})
  for variant in variants:
    config = config_utils.load_config_file(path + (f':{variant}' if variant else ''))
    assert config.get('job', 'pretrain')
    if config.get('job', 'pretrain') == 'pretrain':
      assert config.batch_size % config.model.get('bn_groups', 1) == 0
