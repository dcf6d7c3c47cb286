"""Evaluation jobs run by `python -m ssl_jax.main --config=configs/eval/<job>.py`.

Every job restores the backbone of a pretraining workdir (`config.pretrained`, online or
momentum encoder), runs one protocol and writes `<workdir>/summary.json` (also printed as one
line). Metrics are fractions in [0, 1] (the papers' tables are x100).

JOBS maps `config.job` to fn(config, workdir) -> metrics dict.
"""
import json
import os
import time
from typing import Dict, Tuple

import jax
import numpy as np

from ssl_jax import checkpointing, metric_writers, sharding
from ssl_jax.data import pipeline, sources, views
from ssl_jax.eval import features, knn, linear_probe, svm, voc_data


def write_summary(workdir: str, metrics: Dict) -> str:
  """Writes `metrics` to workdir/summary.json and prints the same JSON on one line."""
  line = json.dumps(metrics, sort_keys=True, default=_jsonable)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "summary.json"), "w", encoding="utf-8") as f:
      f.write(line + "\n")
  metric_writers.log(line)
  return line


def _jsonable(x):
  if isinstance(x, np.ndarray):
    return x.tolist()
  if isinstance(x, np.generic):
    return x.item()
  raise TypeError(f"{type(x).__name__} is not JSON serialisable")


def _load(config):
  """Checks the shared fields and restores the pretrained backbone."""
  if not config.get("pretrained"):
    raise ValueError("config.pretrained is empty: pass --config.pretrained=PRETRAIN_WORKDIR (the "
                     "--workdir of a pretraining run).")
  return checkpointing.load_pretrained(config.pretrained, config.get("encoder", "online"))


def _base_metrics(config, pretrained, start) -> Dict:
  return {"job": config.job, "pretrained": str(config.pretrained),
          "encoder": config.get("encoder", "online"), "pretrain_step": int(pretrained.step),
          "method": pretrained.config.get("method", ""), "seconds": round(time.time() - start, 1)}


def _eval_view(config):
  return views.eval_view_fn(views.eval_config(size=config.image_size,
                                              crop_fraction=config.get("crop_fraction", 0.875)))


def _extract_splits(config, pretrained, splits, taps, pooling, mesh, view_fn=None):
  """[(features, labels)] for each source, with one compiled extractor."""
  extractor = features.Extractor(pretrained.backbone, view_fn=view_fn or _eval_view(config),
                                 taps=taps, pooling=pooling, mesh=mesh)
  return [extractor(pretrained.variables, source, config.batch_size) for source in splits]


# ------------------------------------------------------------------------------------------------
# kNN.
# ------------------------------------------------------------------------------------------------
def run_knn(config, workdir: str) -> Dict:
  start, mesh = time.time(), sharding.make_mesh()
  pretrained = _load(config)
  train = sources.get_source(config.data, config.data.train_split)
  test = sources.get_source(config.data, config.data.eval_split)
  (train_f, train_y), (test_f, test_y) = _extract_splits(config, pretrained, (train, test),
                                                         ("pooled",), "specified", mesh)
  metrics = knn.knn_eval(train_f["pooled"], train_y, test_f["pooled"], test_y, train.num_classes,
                         ks=tuple(config.ks), temperature=config.temperature,
                         chunk_size=config.get("chunk_size", 256), mesh=mesh)
  metrics.update(_base_metrics(config, pretrained, start))
  write_summary(workdir, metrics)
  return metrics


# ------------------------------------------------------------------------------------------------
# Linear probes.
# ------------------------------------------------------------------------------------------------
def _probe(config, taps, channels_for_bn: bool, view_kwargs) -> Tuple[Dict, object]:
  """Shared body of the SwAV-setting and the multi-head linear jobs."""
  start, mesh = time.time(), sharding.make_mesh()
  pretrained = _load(config)
  sharding.check_batch_size(config.batch_size, mesh)
  train = sources.get_source(config.data, config.data.train_split)
  test = sources.get_source(config.data, config.data.eval_split)
  pooling = config.get("pooling", "specified")
  shapes = features.output_shapes(pretrained.backbone, pretrained.variables, config.image_size)
  channels = features.tap_channels(shapes, taps) if channels_for_bn else {}
  dims = features.feature_dims(pretrained.backbone, pretrained.variables, config.image_size, taps,
                               pooling)
  splits = (test,) if config.augment else (test, train)
  extracted = _extract_splits(config, pretrained, splits, taps, pooling, mesh)
  eval_f, eval_y = extracted[0]
  steps_per_epoch = len(train) // config.batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"config.batch_size={config.batch_size} exceeds the {len(train)} training "
                     "images.")
  common = dict(num_classes=train.num_classes, feature_dims=dims, channels=channels,
                opt_cfg=config.optimizer, epochs=config.epochs, steps_per_epoch=steps_per_epoch,
                batch_size=config.batch_size, seed=config.seed, mesh=mesh, eval_feats=eval_f,
                eval_labels=eval_y, eval_every_epochs=config.get("eval_every_epochs", 1),
                log=metric_writers.log)
  if config.augment:
    train_view = linear_probe.make_train_view(config.image_size, **view_kwargs)
    backbone = pretrained.backbone

    def features_fn(key, batch, frozen):
      outputs = backbone.apply(frozen, train_view(key, batch["image"]), train=False)
      return features.tap_features(outputs, taps, pooling)

    iterator = pipeline.TrainIterator(train, global_batch_size=config.batch_size,
                                      seed=config.seed, mesh=mesh)

    def epoch_batches(_):
      for _ in range(steps_per_epoch):
        batch = next(iterator)
        yield {"image": batch["image"], "label": batch["label"]}

    try:
      result = linear_probe.train_probe(epoch_batches=epoch_batches, features_fn=features_fn,
                                        frozen=pretrained.variables, **common)
    finally:
      iterator.close()
  else:
    train_f, train_y = extracted[1]
    result = linear_probe.train_probe(
        epoch_batches=lambda e: linear_probe.cached_batches(train_f, train_y, config.batch_size,
                                                            config.seed, e, mesh), **common)
  return result, (pretrained, start)


def run_linear(config, workdir: str) -> Dict:
  result, (pretrained, start) = _probe(config, ("pooled",), False, {})
  metrics = {"linear_top1": result["top1/pooled"], "linear_top5": result["top5/pooled"],
             "linear_top1_best": result["best_top1/pooled"], "linear_loss": result["loss"]}
  metrics.update(_base_metrics(config, pretrained, start))
  write_summary(workdir, metrics)
  return metrics


def run_linear_mhead(config, workdir: str) -> Dict:
  taps = tuple(config.get("taps", features.TAPS))
  view_kwargs = {"jitter": tuple(config.get("jitter", (0.4, 0.4, 0.4, 0.0))),
                 "lighting_std": config.get("lighting_std", 0.1)}
  result, (pretrained, start) = _probe(config, taps, True, view_kwargs)
  metrics = {"linear_loss": result["loss"]}
  for tap in taps:
    metrics[f"linear_top1@{tap}"] = result[f"top1/{tap}"]
    metrics[f"linear_top5@{tap}"] = result[f"top5/{tap}"]
    metrics[f"linear_top1_best@{tap}"] = result[f"best_top1/{tap}"]
  metrics.update(_base_metrics(config, pretrained, start))
  write_summary(workdir, metrics)
  return metrics


# ------------------------------------------------------------------------------------------------
# VOC07 SVMs.
# ------------------------------------------------------------------------------------------------
def _svm_data(config, pretrained, layers, mesh):
  """Per-layer features and {1, 0, -1} targets of trainval and test."""
  data = config.data
  pooling = config.get("pooling", "specified")
  if data.name == "voc":
    splits = [voc_data.VocSource(split, tfds_name=data.get("tfds_name") or voc_data.TFDS_NAME,
                                 data_dir=data.get("data_dir"), image_size=config.image_size)
              for split in (data.train_split, data.eval_split)]
    extracted = _extract_splits(config, pretrained, splits, layers, pooling, mesh,
                                view_fn=features.normalize_view())
    targets = [source.targets for source in splits]
  else:  # single-label sources (digits, CIFAR): one-vs-rest targets, for smoke runs
    splits = [sources.get_source(data, split) for split in (data.train_split, data.eval_split)]
    extracted = _extract_splits(config, pretrained, splits, layers, pooling, mesh)
    targets = [voc_data.one_hot_targets(y, s.num_classes) for (_, y), s in zip(extracted, splits)]
  out = [(f, t) for (f, _), t in zip(extracted, targets)]
  return out


def _svm_options(config):
  return dict(solver=config.get("solver", "jax"), n_jobs=config.get("n_jobs", -1))


def run_svm_voc07(config, workdir: str) -> Dict:
  start, mesh = time.time(), sharding.make_mesh()
  pretrained = _load(config)
  layers = tuple(config.layers)
  (train_f, train_t), (test_f, test_t) = _svm_data(config, pretrained, layers, mesh)
  metrics = {}
  for layer in layers:
    result = svm.voc07_svm(train_f[layer], train_t, test_f[layer], test_t,
                           costs=tuple(config.costs), **_svm_options(config))
    metrics[f"voc07_map@{layer}"] = result["map"]
    metrics[f"voc07_ap@{layer}"] = result["ap"].tolist()
    metrics[f"voc07_costs@{layer}"] = result["chosen_costs"].tolist()
  metrics["voc07_map"] = metrics[f"voc07_map@{layers[-1]}"]
  metrics.update(_base_metrics(config, pretrained, start))
  write_summary(workdir, metrics)
  return metrics


def run_lowshot_svm(config, workdir: str) -> Dict:
  start, mesh = time.time(), sharding.make_mesh()
  pretrained = _load(config)
  layer = config.layers[-1]
  (train_f, train_t), (test_f, test_t) = _svm_data(config, pretrained, (layer,), mesh)
  results = svm.lowshot_svm(train_f[layer], train_t, test_f[layer], test_t, ks=tuple(config.ks),
                            num_samples=config.num_samples, costs=tuple(config.costs),
                            seed=config.seed, **_svm_options(config))
  metrics = {"layer": layer}
  for k, r in results.items():
    metrics[f"lowshot_map@{k}"] = r["mean"]
    metrics[f"lowshot_std@{k}"] = r["std"]
    metrics[f"lowshot_min@{k}"] = r["min"]
    metrics[f"lowshot_max@{k}"] = r["max"]
    metrics[f"lowshot_cost@{k}"] = r["cost"]
  metrics.update(_base_metrics(config, pretrained, start))
  write_summary(workdir, metrics)
  return metrics


JOBS = {"knn": run_knn, "linear": run_linear, "linear_mhead": run_linear_mhead,
        "svm_voc07": run_svm_voc07, "lowshot_svm": run_lowshot_svm}
