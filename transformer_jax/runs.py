"""Restoring a run of any program from its workdir: config.yaml, tokenizer.model and the latest
weights (a training run's checkpoints/<step>/, or params/ written by checkpoint.save_params).

    run = runs.load_run("runs/translate_tiny")     # Run(workdir, cfg, model, params, tokenizer)
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax

from transformer_jax import config as config_lib
from transformer_jax.config import Config
from transformer_jax.data.tokenizer import Tokenizer
from transformer_jax.models import Model, abstract_build


def latest_params_path(workdir: str) -> tuple[str, str | None]:
    """Where a workdir's weights are: (<workdir>/checkpoints/<latest>/state, 'params') for a
    training run, (<workdir>/params, None) for weights saved by checkpoint.save_params."""
    checkpoints = os.path.join(workdir, "checkpoints")
    steps = sorted(int(s) for s in os.listdir(checkpoints) if s.isdigit()) if os.path.isdir(checkpoints) else []
    if steps:
        return os.path.join(checkpoints, str(steps[-1]), "state"), "params"
    if os.path.isdir(os.path.join(workdir, "params")):
        return os.path.join(workdir, "params"), None
    raise ValueError(f"--checkpoint: {workdir} has no checkpoints/<step>/ and no params/")


def restore_params(workdir: str, abstract_params) -> Any:
    """The latest checkpoint's parameters (only they are read: not the optimizer state) on one device."""
    import orbax.checkpoint as ocp

    from transformer_jax.checkpoint import _compare, load_params

    path, subtree = latest_params_path(workdir)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract_params)
    if subtree is None:
        return load_params(path, abstract)
    meta = ocp.PyTreeCheckpointer().metadata(os.path.abspath(path))
    tree = getattr(meta, "item_metadata", None) or getattr(meta, "tree", meta)
    tree = getattr(tree, "tree", tree)
    _compare(tree[subtree], abstract, path)  # a mismatch names the parameter
    item = {subtree: abstract}
    restored = ocp.PyTreeCheckpointer().restore(
        os.path.abspath(path), args=ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True))
    return restored[subtree]


@dataclasses.dataclass
class Run:
    workdir: str
    cfg: Config
    model: Model
    params: Any
    tokenizer: Tokenizer | None


def load_run(workdir: str, *, need_tokenizer: bool = True) -> Run:
    """A finished (or interrupted) run of any program: its config.yaml, tokenizer and latest weights."""
    workdir = os.path.expanduser(workdir)
    if not os.path.isdir(workdir):
        raise ValueError(f"--checkpoint: {workdir} does not exist (or is not a directory)")
    config_path = os.path.join(workdir, "config.yaml")
    if not os.path.isfile(config_path):
        raise ValueError(f"--checkpoint: {workdir} has no config.yaml (not a workdir of ours)")
    cfg = config_lib.load_config(config_path)
    model, abstract = abstract_build(cfg)
    params = restore_params(workdir, abstract)
    tokenizer = None
    for path in (os.path.join(workdir, "tokenizer.model"), cfg.data.tokenizer):
        if path and os.path.isfile(path):
            tokenizer = Tokenizer(path)
            break
    if tokenizer is None and need_tokenizer:
        raise ValueError(f"--checkpoint: {workdir} has no tokenizer.model")
    return Run(workdir, cfg, model, params, tokenizer)
