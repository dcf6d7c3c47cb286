"""Helpers shared by the config files in configs/ (variant parsing, common blocks)."""
import ml_collections


def parse_variant(arg, variants):
  """`arg` is the text after ':' in --config=file.py:ARG; returns the variant name."""
  name = arg or 'default'
  if name not in variants:
    raise ValueError(f'Unknown config variant {name!r}; choose one of {sorted(variants)}.')
  return name


def build(method, variants, arg):
  """A pretraining config: `base(method)` passed through the variant named by `arg`."""
  variant = parse_variant(arg, variants)
  c = base(method)
  c.variant = variant
  return variants[variant](c)


def data(name='digits', image_size=32, **kw):
  fields = dict(name=name, path='', tfds_name='', data_dir=ml_collections.FieldReference(None, str),
                image_size=image_size, train_split='train', eval_split='test',
                sampler='permutation')
  fields.update(kw)
  return ml_collections.ConfigDict(fields)


def model(name='resnet18', stem='cifar', width=64, bn_groups=8, dtype='float32'):
  return ml_collections.ConfigDict(dict(name=name, stem=stem, width=width, bn_groups=bn_groups,
                                        dtype=dtype, zero_init_residual=False))


def sgd(lr, weight_decay=1e-4, schedule='cosine', warmup_epochs=0.0, final_lr=0.0):
  return ml_collections.ConfigDict(dict(
      name='sgd', lr=lr, momentum=0.9, nesterov=False, weight_decay=weight_decay,
      schedule=schedule, warmup_epochs=warmup_epochs, warmup_start_lr=0.0, final_lr=final_lr,
      milestones=(), exclude_bias_and_norm=False))


def base(method):
  c = ml_collections.ConfigDict()
  c.job = 'pretrain'
  c.method = method
  c.seed = 0
  c.batch_size = 256
  c.eval_batch_size = 256
  c.num_epochs = 200.0
  c.num_steps = 0            # > 0 overrides num_epochs
  c.stop_at_step = 0         # > 0: checkpoint and exit there (split a run into wall-time-limited jobs)
  c.log_every_steps = 50
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 2
  c.eval_every_steps = 0     # online kNN cadence; kNN always runs at the end
  c.knn = ml_collections.ConfigDict(dict(k=20, ks=(20,), temperature=0.07))
  return c


def load_sibling(this_file, name):
  """Imports configs/<name>.py next to `this_file` (config files are loaded by path, not package)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(os.path.abspath(this_file)), f'{name}.py')
  spec = importlib.util.spec_from_file_location(f'ssl_jax_configs_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config_file(spec):
  """Loads `path[:arg]` the way --config does; returns the ConfigDict."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'--config={spec}: no config file at {path!r} (run from the repo root, '
                            'e.g. --config=configs/mocov2.py:smoke).')
  module_spec = importlib.util.spec_from_file_location('ssl_jax_user_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def set_path(config, key, value):
  """config.a.b = value for key 'a.b' (scripts' and tests' overrides of nested fields)."""
  *parents, leaf = key.split('.')
  node = config
  for part in parents:
    node = node[part]
  node[leaf] = value


def check_overrides(argv):
  """Validates --config and every --config.a.b=value override before absl parses them.

  absl/ml_collections report an unknown key as a bare KeyError traceback; this says which key is
  wrong, in which config, and what the close matches are.
  """
  import difflib  # pylint: disable=g-import-not-at-top
  spec = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
  if spec is None:
    return
  config = load_config_file(spec)
  for arg in argv:
    if not arg.startswith('--config.'):
      continue
    path = arg[len('--config.'):].split('=', 1)[0]
    node = config
    parts = path.split('.')
    for i, part in enumerate(parts):
      keys = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      if part not in keys:
        where = '.'.join(['config'] + parts[:i]) or 'config'
        hint = difflib.get_close_matches(part, keys, n=3)
        raise SystemExit(
            f'Unknown config key --config.{path}: {where} has no field {part!r}'
            + (f' (did you mean {", ".join(hint)}?)' if hint else '')
            + f'. Fields of {where}: {", ".join(sorted(keys))}.')
      node = node[part]
