#!/usr/bin/env bash
# Launch an ssl_jax run on every host of a Cloud TPU VM pod slice.
#
#   launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [extra --config.* flags]
#   e.g. launch/tpu_pod.sh my-v4-32 us-central2-b configs/interclr.py:imagenet \
#          gs://my-bucket/interclr --config.data.data_dir=gs://my-bucket/tfds
#
# Copies the repo to every worker, installs it, and starts the same command on all hosts;
# SSL_JAX_DISTRIBUTED=1 makes ssl_jax.main call jax.distributed.initialize(). WORKDIR must be
# shared storage (GCS): re-running the same command after a preemption resumes automatically.
set -euo pipefail
TPU=$1; ZONE=$2; CONFIG=$3; WORKDIR=$4; shift 4
REPO=$(cd "$(dirname "$0")/.." && pwd)
tar -C "$REPO" --exclude=.git -czf /tmp/ssl_jax.tgz .
gcloud compute tpus tpu-vm scp /tmp/ssl_jax.tgz "$TPU":/tmp/ --zone "$ZONE" --worker=all
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "
  set -e; mkdir -p ~/ssl_jax && tar -C ~/ssl_jax -xzf /tmp/ssl_jax.tgz && cd ~/ssl_jax &&
  pip install -q -e . 'jax[tpu]' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html &&
  SSL_JAX_DISTRIBUTED=1 nohup python3 -m ssl_jax.main --config=$CONFIG --workdir=$WORKDIR $* \
    > ~/ssl_jax_run.log 2>&1 &"
echo "Started on all workers of $TPU; logs: gcloud compute tpus tpu-vm ssh $TPU --zone $ZONE --worker=0 --command 'tail -f ~/ssl_jax_run.log'"
