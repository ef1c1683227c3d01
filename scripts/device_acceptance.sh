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
# carries, with flax's (installed only if the image's is older than the 0.12.8 this project needs).
# The project itself runs from this directory (python -m puts it on the path): no install.
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
wheels=()
OUT=${OUT:-runs/acceptance}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

# the packages the image lacks, or has older than this project needs, from the carried wheels
needed=$("$PYTHON" - <<'PY'
import importlib.metadata as md
from packaging.version import Version
least = {"grain": "0.2.10", "array_record": "0", "portpicker": "0", "flax": "0.12.8"}
def have(name):
    try:
        return Version(md.version(name))
    except md.PackageNotFoundError:
        return None
print(*[n for n, v in least.items() if have(n) is None or have(n) < Version(v)])
PY
)
for name in $needed; do
  if ! compgen -G ".whl/$name-*.whl" >/dev/null; then
    echo "error: $PYTHON lacks $name (or has it too old) and .whl/ has no wheel of it: run scripts/device_wheels.sh here, then carry .whl" >&2
    exit 2
  fi
  wheels+=(.whl/"$name"-*.whl)
done
if [ -n "$needed" ]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "${wheels[@]}" || exit 2
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

{
  echo "installed from .whl: ${needed:-nothing}"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PYTHON" - <<'PY'
import importlib, sys
print("python", sys.version.split()[0])
for name in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "chex", "grain", "torch", "transformers"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as e:  # said here, before the items fail on it
        print(name, "cannot be imported:", type(e).__name__, str(e).splitlines()[0] if str(e) else "")
import torch
print("torch cuda", torch.cuda.is_available())
PY
} 2>&1 | tee "$OUT/acceptance.log"

"$PYTHON" -m train.bench --acceptance --out "$OUT/acceptance.json" "$@" \
  2> >(tee -a "$OUT/acceptance.log" >&2) | tee "$OUT/acceptance.txt"
status=${PIPESTATUS[0]}
wait  # the log's tee
exit "$status"
