#!/usr/bin/env bash
# Install bge_ray from a checkout into the current Python (the cluster image and `ray up` nodes).
#   cluster/docker/install_bge_ray.sh [CHECKOUT]     GPU=1 forces, GPU=0 skips the faiss GPU build
# faiss-cpu (a base dependency) and faiss-gpu-cu12 (the `gpu` extra) ship the same `faiss` module:
# on GPU nodes the CPU build is removed and the GPU build reinstalled over it.
set -euo pipefail
SRC=${1:-$(cd "$(dirname "$0")/../.." && pwd)}
PIP="python -m pip"
$PIP install --no-cache-dir "$SRC" "smart_open[s3,gcs]" boto3
GPU=${GPU:-auto}
if [ "$GPU" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1; then GPU=1; else GPU=0; fi
fi
if [ "$GPU" = 1 ]; then
  $PIP install --no-cache-dir "$SRC[gpu]"
  $PIP uninstall -y faiss-cpu
  $PIP install --no-cache-dir --force-reinstall --no-deps faiss-gpu-cu12
fi
python -c "import bge_ray, faiss, ray; print('bge_ray installed; ray', ray.__version__, '; faiss GPUs', faiss.get_num_gpus() if hasattr(faiss, 'get_num_gpus') else 0)"
