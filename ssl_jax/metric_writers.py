"""Metric writing without TensorFlow: TensorBoard event files (tensorboardX) + console + JSONL.

`clu.metric_writers` imports TensorFlow at package import; when TF is installed (`pip install
.[tf]`) its default writer is used instead, so both paths write the same TensorBoard events.
"""
import json
import logging
import os
import time


class MetricWriter:
  """The subset of clu's MetricWriter interface the trainer uses."""

  def __init__(self, workdir: str, is_main: bool = True):
    self.is_main = is_main
    self._tb = None
    self._clu = None
    self._jsonl = None
    if not is_main:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a', encoding='utf-8')
    try:
      from clu import metric_writers  # pylint: disable=g-import-not-at-top
      self._clu = metric_writers.create_default_writer(workdir, just_logging=False, asynchronous=False)
    except Exception:  # pylint: disable=broad-except  (TF absent: the expected, TF-free path)
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(logdir=workdir, flush_secs=30)

  def write_scalars(self, step: int, scalars: dict):
    if not self.is_main:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    if self._clu is not None:
      self._clu.write_scalars(step, scalars)
    else:
      for k, v in scalars.items():
        self._tb.add_scalar(k, v, step)
    self._jsonl.write(json.dumps({'step': step, 'time': time.time(), **scalars}) + '\n')
    self._jsonl.flush()

  def write_hparams(self, hparams: dict):
    if self.is_main and self._tb is not None:
      self._tb.add_text('config', '```\n' + json.dumps(hparams, indent=1, default=str) + '\n```', 0)

  def flush(self):
    if self._clu is not None:
      self._clu.flush()
    if self._tb is not None:
      self._tb.flush()

  def close(self):
    self.flush()
    for w in (self._clu, self._tb, self._jsonl):
      if w is not None:
        w.close()


class Progress:
  """A one-line progress report with rate and ETA (works in logs, not only in terminals)."""

  def __init__(self, total_steps: int, start_step: int):
    self.total, self.start = total_steps, start_step
    self.t0 = None

  def line(self, step: int, scalars: dict) -> str:
    now = time.time()
    if self.t0 is None:
      self.t0 = (now, step)
    t0, s0 = self.t0
    rate = (step - s0) / (now - t0) if now > t0 and step > s0 else 0.0
    eta = (self.total - step) / rate if rate else float('nan')
    pct = 100.0 * step / max(self.total, 1)
    shown = ' '.join(f'{k}={v:.4g}' for k, v in scalars.items())
    eta_s = time.strftime('%H:%M:%S', time.gmtime(eta)) if eta == eta else '--:--:--'
    return f'[{step}/{self.total} {pct:5.1f}%] {shown} | ETA {eta_s}'


def log(msg: str):
  logging.info(msg)
  print(msg, flush=True)
