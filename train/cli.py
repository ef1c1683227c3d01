"""What every program shares on the command line: --config, --set key=value (repeatable),
--workdir and, where one applies, --checkpoint; checking them (config, mesh, devices) before any
expensive work; and turning a user's mistake into one line on stderr and a non-zero exit.
tests/test_contract.py holds every program in train/ to this."""

from __future__ import annotations

import argparse
import faulthandler
import os
import sys
import traceback
from collections.abc import Callable

from transformer_jax import config_parsing
from transformer_jax.config import Config, ConfigError, load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO, "configs", "gpt_tiny.yaml")


def parser(
    description: str,
    *,
    checkpoint: str | None = None,
    checkpoint_aliases: tuple[str, ...] = (),
    config: str | None = None,
    overrides: str | None = None,
    workdir: str | None = None,
) -> argparse.ArgumentParser:
    """The flags every program takes: --config, --set key=value (repeatable), --workdir, and with
    `checkpoint` (its help text) --checkpoint DIR. `config` / `overrides` / `workdir` replace the
    default help where the program gives them another meaning."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", help=config or "YAML config (see configs/)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        dest="overrides",
        help=overrides or "override a config value, e.g. --set model.num_layers=4 (repeatable)",
    )
    p.add_argument(
        "--workdir", help=workdir or "where checkpoints, metrics and the tokenizer go (default runs/<config name>)"
    )
    if checkpoint:
        p.add_argument("--checkpoint", *checkpoint_aliases, dest="checkpoint", metavar="DIR", help=checkpoint)
    return p


def config_and_workdir(args, default_config: str | None = DEFAULT_CONFIG) -> tuple[Config, str]:
    cfg = load_config(args.config or default_config, args.overrides)
    return cfg, args.workdir or os.path.join("runs", cfg.name or "default")


def raw_config(args, default_config: str | None = DEFAULT_CONFIG) -> tuple[dict, set[str]]:
    """The raw sections of --config (or the default file) with --set applied, unvalidated, and the
    dotted keys the user named: those in the --config file and in --set (not the default file's)."""
    import yaml

    check_keys(args.overrides)
    path = args.config or default_config
    data = config_parsing.read_yaml(path) if path else {}
    explicit: set[str] = set()
    if args.config:
        with open(args.config) as f:
            named = yaml.safe_load(f) or {}
        explicit |= {
            f"{section}.{key}" if isinstance(values, dict) else section
            for section, values in named.items()
            for key in (values if isinstance(values, dict) else [None])
        }
    explicit |= {config_parsing.parse_override(o)[0] for o in args.overrides}
    return config_parsing.apply_overrides(data, args.overrides), explicit


def load(
    args, default_config: str | None = DEFAULT_CONFIG, *, distributed: bool = True, devices=None
) -> tuple[Config, str]:
    """(config, workdir) of parsed arguments, then `init_devices`: every config and mesh mistake is one
    line here, before a tokenizer is trained, data is read or anything is compiled."""
    cfg, workdir = config_and_workdir(args, default_config)
    init_devices(cfg, distributed=distributed, devices=devices)
    return cfg, workdir


def init_devices(cfg: Config, *, distributed: bool = True, devices=None) -> None:
    """jax.distributed as the config says (before anything asks jax for its devices), then the mesh
    and the batch split checked against the devices (`devices`, default all of them)."""
    if distributed:
        init_distributed(cfg)
    check_mesh(cfg, devices)


def check_mesh(cfg: Config, devices=None) -> None:
    """mesh.* against the device count and train.batch_size against the mesh's data*fsdp, with the
    checks the train loop makes (sharding.make_mesh, trainer.check_batch_fits), made early."""
    from train.trainer import check_batch_fits
    from transformer_jax import sharding as sh

    check_batch_fits(cfg.train, sh.make_mesh(cfg.mesh, devices))


def check_keys(overrides) -> None:
    """Each --set key=value against the config schema alone (a known key, a value of its type), before
    any file is read: a misspelt key is one line naming it wherever it is given."""
    tree: dict = {}
    for override in overrides:
        config_parsing._set(tree, *config_parsing.parse_override(override))
    config_parsing._from_dict(Config, tree)  # the loader's own checks, without a base config to validate


FIXED_KEYS = ("data.tokenizer",)  # a checkpoint's tokenizer comes with it


def check_runtime_keys(overrides, what: str = "--checkpoint") -> None:
    """check_keys, and no key that changes the parameters (model.* but the runtime model keys) or the
    tokenizer: on a trained model --set takes runtime keys only."""
    check_keys(overrides)
    keys = [config_parsing.parse_override(o)[0] for o in overrides]
    if not any(k == "model" or k.startswith("model.") or k in FIXED_KEYS for k in keys):
        return
    from transformer_jax.tasks.init_from import RUNTIME_MODEL_KEYS

    for key in keys:
        if (
            key == "model"
            or key in FIXED_KEYS
            or (key.startswith("model.") and key[len("model.") :] not in RUNTIME_MODEL_KEYS)
        ):
            raise ConfigError(
                f"{key}: fixed by the model of {what}; --set there takes runtime keys only "
                f"(model.{', model.'.join(RUNTIME_MODEL_KEYS)}, and data.*, train.*, translate.*, "
                f"... but data.tokenizer)"
            )


def checkpoint_config(checkpoint: str | None, overrides=(), config: str | None = None) -> Config:
    """A run's config.yaml with runtime --set overrides on top. The keys are checked before the
    workdir is looked at; --config is refused (the checkpoint's config.yaml is the config)."""
    check_runtime_keys(overrides)
    if config:
        raise ValueError(
            "--config: with --checkpoint the config is the checkpoint's config.yaml; change runtime keys with --set"
        )
    if not checkpoint:
        raise ValueError("--checkpoint: required (a run's workdir)")
    from transformer_jax.runs import config_path

    return load_config(config_path(checkpoint), overrides)


def load_checkpoint(checkpoint: str | None, overrides=(), config: str | None = None, **kwargs):
    """transformer_jax.runs.load_run with `checkpoint_config`'s config: the runtime model keys set
    (model.dtype, model.attention_impl, ...) rebuild the model over the same parameters."""
    import dataclasses

    from transformer_jax.models import abstract_build
    from transformer_jax.runs import load_run

    cfg = checkpoint_config(checkpoint, overrides, config)
    assert checkpoint is not None  # checkpoint_config refuses a missing one
    run = load_run(checkpoint, **kwargs)
    if cfg == run.cfg:
        return run
    model = run.model if cfg.model == run.cfg.model else abstract_build(cfg)[0]
    return dataclasses.replace(run, cfg=cfg, model=model)


CLUSTER_NAMES = {
    "SlurmCluster": "SLURM",
    "OmpiCluster": "Open MPI",
    "GceTpuCluster": "Cloud TPU pod",
    "GkeTpuCluster": "GKE TPU",
    "K8sCluster": "Kubernetes",
}


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
    pid = (
        d.process_id
        if d.process_id >= 0
        else (int(os.environ["JAX_PROCESS_ID"]) if "JAX_PROCESS_ID" in os.environ else None)
    )
    explicit = address is not None or num is not None or pid is not None
    try:
        cluster = None if None not in (address, num, pid) else detect_cluster()
        if d.mode == "auto" and not explicit and (cluster is None or cluster.get_process_count() == 1):
            return
    except Exception as e:
        raise ConfigError(f"distributed: cluster detection failed: {first_line(e)}") from e
    if address is None and cluster is None:
        raise ConfigError(
            "distributed: no coordinator: no cluster was detected (Cloud TPU pod, SLURM, Open MPI, "
            "Kubernetes indexed Job) and neither distributed.coordinator_address nor "
            "JAX_COORDINATOR_ADDRESS is set"
        )
    if address:
        source = f"coordinator {address}"
    else:
        assert cluster is not None  # no coordinator address: a detected cluster (checked above)
        source = CLUSTER_NAMES.get(cluster.__name__, cluster.__name__)
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
    the traceback. A fatal signal (SIGSEGV, SIGABRT, ...) prints every thread's Python stack."""
    if sys.__stderr__ is not None:  # the process's own stderr: sys.stderr may be a capture without a file
        faulthandler.enable(file=sys.__stderr__, all_threads=True)
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
