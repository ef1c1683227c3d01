"""What every program shares on the command line: --config, --set key=value, --workdir, and
turning a user's mistake into one line on stderr and a non-zero exit."""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Callable

from transformer_jax.config import Config, ConfigError, load_config

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


CLUSTER_NAMES = {"SlurmCluster": "SLURM", "OmpiCluster": "Open MPI", "GceTpuCluster": "Cloud TPU pod",
                 "GkeTpuCluster": "GKE TPU", "K8sCluster": "Kubernetes"}


def detect_cluster():
    """The cluster environment jax.distributed.initialize() would bootstrap from, or None.

    jax has no public API for its detection, so this reads jax._src.clusters, and picks as
    ClusterEnv.auto_detect_unset_distributed_params does (the first one present, opt-in ones skipped).
    Only environment variables are read, except on a Cloud TPU VM (its metadata server) and in a
    Kubernetes indexed Job (the API server, with the `kubernetes` package). Kubernetes needs
    JOB_COMPLETION_INDEX: every pod has KUBERNETES_SERVICE_HOST, and only an indexed Job can bootstrap."""
    from jax._src import clusters
    for env in clusters.ClusterEnv._cluster_types:
        if env.opt_in_only_method or (env.__name__ == "K8sCluster" and "JOB_COMPLETION_INDEX" not in os.environ):
            continue
        if env.is_env_present():
            return env
    return None


def init_distributed(cfg: Config) -> None:
    """jax.distributed across hosts, as distributed.mode says. auto: where an explicit coordinator
    (distributed.* keys, JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID) or a cluster
    jax detects (Cloud TPU pod, SLURM, Open MPI, Kubernetes) has more than one process; on: always;
    off: never. Explicit values win over the detected ones."""
    import jax
    d = cfg.distributed
    if d.mode == "off":
        return
    address = d.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    num = d.num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "0")) or None
    pid = d.process_id if d.process_id >= 0 else \
        (int(os.environ["JAX_PROCESS_ID"]) if "JAX_PROCESS_ID" in os.environ else None)
    explicit = address is not None or num is not None or pid is not None
    try:
        cluster = None if None not in (address, num, pid) else detect_cluster()
        if d.mode == "auto" and not explicit and (cluster is None or cluster.get_process_count() == 1):
            return
    except Exception as e:
        raise ConfigError(f"distributed: cluster detection failed: {first_line(e)}") from e
    if address is None and cluster is None:
        raise ConfigError("distributed: no coordinator: no cluster was detected (Cloud TPU pod, SLURM, Open MPI, "
                          "Kubernetes indexed Job) and neither distributed.coordinator_address nor "
                          "JAX_COORDINATOR_ADDRESS is set")
    source = f"coordinator {address}" if address else CLUSTER_NAMES.get(cluster.__name__, cluster.__name__)
    # gloo for CPU collectives across processes (it only affects the CPU client). Not conditional
    # on jax.default_backend(): that initialises the backends, after which initialize() refuses.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid)
    except Exception as e:
        raise ConfigError(f"distributed: initialization via {source} failed: {first_line(e)}") from e
    if jax.process_index() == 0:
        count = jax.process_count()
        print(f"distributed: {source}, {count} process{'es' if count != 1 else ''}", flush=True)


def first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


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
        print(f"error: {first_line(e)}", file=sys.stderr)
        sys.exit(2)
    except RuntimeError as e:
        from train.trainer import TrainingError
        if not isinstance(e, TrainingError):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
