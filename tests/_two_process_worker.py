"""Subprocess entry point of test_distributed's two-process test: runs `python -m train.pretrain`
with this script's arguments (the program's own path, `cli.init_distributed` included), then prints
one line `WORKER {json}` saying what this process saw: its index, the process count, its devices."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from train import cli, pretrain  # noqa: E402


def main() -> None:
    cli.main(pretrain.main)
    import jax
    print("WORKER " + json.dumps({"process_index": jax.process_index(), "process_count": jax.process_count(),
                                  "local_devices": jax.local_device_count(), "devices": jax.device_count()}),
          flush=True)


if __name__ == "__main__":
    main()
