"""Entry point: python -m ssl_jax.main --config=configs/<name>.py[:variant] --workdir=DIR.

Kept short on purpose: the work is in ssl_jax.trainer and ssl_jax.eval.jobs, which are importable
from notebooks. `config.job` selects the job: `pretrain` (default) or an evaluation job.
"""
import os

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Config file (path[:variant]).', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and summary.json.')
flags.mark_flags_as_required(['config', 'workdir'])


def run(config, workdir):
  """Runs `config.job` and returns its summary dict."""
  job = config.get('job', 'pretrain')
  if job == 'pretrain':
    from ssl_jax import trainer  # pylint: disable=g-import-not-at-top
    return trainer.train_and_evaluate(config, workdir)
  from ssl_jax.eval import jobs  # pylint: disable=g-import-not-at-top
  if job not in jobs.JOBS:
    raise ValueError(f"config.job={job!r}; use 'pretrain' or one of {sorted(jobs.JOBS)}.")
  return jobs.JOBS[job](config, workdir)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if os.environ.get('SSL_JAX_DISTRIBUTED') == '1':  # set by launch/ scripts on multi-host pods
    import jax  # pylint: disable=g-import-not-at-top
    jax.distributed.initialize()
  logging.set_verbosity(logging.WARNING)
  run(FLAGS.config, FLAGS.workdir)


if __name__ == '__main__':
  import sys  # pylint: disable=g-import-not-at-top
  from ssl_jax import config_utils  # pylint: disable=g-import-not-at-top
  try:
    config_utils.check_overrides(sys.argv[1:])
  except (ValueError, FileNotFoundError) as e:
    raise SystemExit(f'Bad --config: {e}') from None
  app.run(main)
