"""What every program shares on the command line: --config, --set key=value, --workdir, and
turning a user's mistake into one line on stderr and a non-zero exit."""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Callable

from transformer_jax.config import Config, load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO, "configs", "gpt_tiny.yaml")


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", help="YAML config (see configs/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a config value, e.g. --set model.num_layers=4 (repeatable)")
    p.add_argument("--workdir", help="where checkpoints, metrics and the tokenizer go (default runs/<config name>)")
    return p


def config_and_workdir(args, default_config: str | None = DEFAULT_CONFIG) -> tuple[Config, str]:
    cfg = load_config(args.config or default_config, args.overrides)
    return cfg, args.workdir or os.path.join("runs", cfg.name or "default")


def init_distributed(cfg: Config) -> None:
    """jax.distributed across hosts when configured (or JAX_COORDINATOR_ADDRESS is set)."""
    import jax
    d = cfg.distributed
    address = d.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    if not address:
        return
    num = d.num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "0")) or None
    pid = d.process_id if d.process_id >= 0 else (int(os.environ["JAX_PROCESS_ID"]) if "JAX_PROCESS_ID" in os.environ else None)
    # gloo for CPU collectives across processes (it only affects the CPU client). Not conditional
    # on jax.default_backend(): that initialises the backends, after which initialize() refuses.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid)


USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError)


def main(fn: Callable[[], object]) -> None:
    """Run a program; a user's mistake prints `error: ...` (one line) and exits 2. TJ_DEBUG=1 shows
    the traceback."""
    if not os.environ.get("TJ_DEBUG"):  # library chatter (absl warnings, TF's C++ logs) stays quiet
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        from absl import logging as absl_logging
        absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        fn()
    except USER_ERRORS as e:
        if os.environ.get("TJ_DEBUG"):
            traceback.print_exc()
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except RuntimeError as e:
        from train.trainer import TrainingError
        if not isinstance(e, TrainingError):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
