#!/usr/bin/env bash
# Run on a single-host Cloud TPU VM (v3-8, v4-8, v5e-8) or a GPU box from the repo root:
#   launch/tpu_vm_single.sh configs/mocov2.py:imagenet gs://bucket/mocov2 [--config.* ...]
# Re-running the same command resumes from the last checkpoint in WORKDIR.
set -euo pipefail
CONFIG=$1; WORKDIR=$2; shift 2
cd "$(dirname "$0")/.."
exec python3 -m ssl_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
