#!/usr/bin/env bash
# `python -m train.bench --acceptance` on a lent GPU, from the repository root, in one command
# (docs/bench.md, "Acceptance on a lent accelerator"). With the device tool:
#   run(command="bash scripts/device_acceptance.sh", carry=[".whl"], timeout_s=540)
# Extra arguments go to train.bench (`--items gpt2_medium.torch` reruns one item; `--tiny` here).
#
# Nothing is installed from a network (the device machine reaches none). Its image's python3 has
# jax with the CUDA plugin, flax, optax, orbax-checkpoint, chex, torch and transformers; it lacks
# grain (train.trainer imports it through transformer_jax.checkpoint) and grain's array_record and
# portpicker: scripts/device_wheels.sh downloads those wheels here into .whl/, which the call
# carries. The project itself runs from this directory (python -m puts it on the path): no install.
#
# No XLA_FLAGS are set: the ones set for GPU throughput (latency-hiding scheduler, async
# collectives) schedule communication, which one device has none of, and a flag the image's jaxlib
# does not know aborts every item. Each JAX item keeps JAX's default preallocation (75% of the
# GPU, its fastest allocator; the peak memory reported is the allocator's peak in use, not the
# pool); train/acceptance.py runs each item in a process of its own, the torch one without it.
#
# Writes $OUT/acceptance.json (rewritten after every item), acceptance.txt (the table) and
# acceptance.log (versions, progress, errors). Exit status: train.bench's (1: an item failed).
set -uo pipefail
OUT=${OUT:-runs/acceptance}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

missing=$("$PYTHON" -c 'import importlib.util as u; print(*[m for m in ("grain", "array_record", "portpicker") if u.find_spec(m) is None])')
if [ -n "$missing" ]; then
  if ! compgen -G ".whl/*.whl" >/dev/null; then
    echo "error: $PYTHON lacks $missing and there is no .whl/ to install it from: run scripts/device_wheels.sh here, then carry .whl" >&2
    exit 2
  fi
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 2
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

{
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PYTHON" -c 'import sys, jax, flax, optax, grain; print("python", sys.version.split()[0], "jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, "devices", jax.devices())'
  "$PYTHON" -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "transformers", transformers.__version__)'
} 2>&1 | tee "$OUT/acceptance.log"

"$PYTHON" -m train.bench --acceptance --out "$OUT/acceptance.json" "$@" \
  2> >(tee -a "$OUT/acceptance.log" >&2) | tee "$OUT/acceptance.txt"
status=${PIPESTATUS[0]}
wait  # the log's tee
exit "$status"
