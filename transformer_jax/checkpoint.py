"""Orbax checkpoints: async saves, keep the last K and the best by an eval metric, the input
pipeline's position saved beside the weights, restore onto any mesh, clear errors on mismatch."""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies


class CheckpointError(ValueError):
    """A checkpoint that does not fit the run: the message names the parameter."""


class Checkpointer:
    """checkpoints/<step>/{state, data}: `state` a pytree (params, optimizer state, step), `data`
    a JSON-serialisable dict (the input pipeline's position, anything small)."""

    def __init__(self, directory: str, *, keep: int = 3, best_metric: str | None = None, best_mode: str = "min",
                 async_save: bool = True):
        self.directory = os.path.abspath(directory)
        keep_policies = [policies.LatestN(n=keep)]
        if best_metric:
            keep_policies.append(policies.BestN(get_metric_fn=lambda m: m[best_metric], reverse=best_mode == "min",
                                                n=1, keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policies.AnyPreservationPolicy(keep_policies),
            enable_async_checkpointing=async_save, create=True, cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data: dict | None = None, metrics: dict | None = None, force: bool = False):
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data or {}))
        metrics = None if metrics is None else {k: float(v) for k, v in metrics.items()}
        return self.manager.save(step, args=args, metrics=metrics, force=force)

    def check_compatible(self, step: int, abstract_state: Any) -> None:
        """Raise CheckpointError naming the first parameter whose path or shape differs (the
        `params` subtree when the state has one: that is the architecture)."""
        meta = self.manager.item_metadata(step)["state"]
        meta_tree = getattr(meta, "tree", meta)
        if isinstance(abstract_state, dict) and "params" in abstract_state and "params" in meta_tree:
            meta_tree, abstract_state = meta_tree["params"], abstract_state["params"]
        _compare(meta_tree, abstract_state, f"{self.directory}/{step}")

    def restore(self, step: int | None, abstract_state: Any) -> tuple[Any, dict]:
        """Restore onto the shardings in `abstract_state` (ShapeDtypeStructs with .sharding): any
        mesh or device count. Returns (state, data)."""
        step = self.latest_step() if step is None else step
        self.check_compatible(step, abstract_state)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
        restored = self.manager.restore(step, args=args)
        return restored["state"], restored["data"] or {}

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _stringify_keys(tree):
    """Orbax stores dict keys as strings (layer 0 -> '0'); compare paths the same way."""
    if isinstance(tree, dict):
        return {str(k): _stringify_keys(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)) and not hasattr(tree, "_fields"):
        return type(tree)(_stringify_keys(v) for v in tree)
    return tree


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def save_params(directory: str, params: Any) -> None:
    """Weights alone (an imported or exported model): one Orbax PyTree checkpoint at `directory`."""
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.abspath(directory), params, force=True)
    checkpointer.wait_until_finished()


def load_params(directory: str, abstract: Any) -> Any:
    """Restore weights saved by `save_params` onto the shardings of `abstract` (ShapeDtypeStructs,
    optionally with .sharding); a different architecture raises CheckpointError naming the parameter."""
    checkpointer = ocp.StandardCheckpointer()
    directory = os.path.abspath(directory)
    meta = checkpointer.metadata(directory)
    meta_tree = getattr(meta, "item_metadata", None) or getattr(meta, "tree", meta)
    _compare(meta_tree, abstract, directory)
    return checkpointer.restore(directory, abstract)


def _compare(saved_tree, abstract: Any, where: str) -> None:
    saved = {jax.tree_util.keystr(p): tuple(getattr(x, "shape", ()) or ())
             for p, x in jax.tree_util.tree_flatten_with_path(saved_tree)[0]}
    wanted = {jax.tree_util.keystr(p): tuple(np.shape(x))
              for p, x in jax.tree_util.tree_flatten_with_path(_stringify_keys(abstract))[0]}
    for path in wanted:
        if path not in saved:
            raise CheckpointError(f"checkpoint {where} has no parameter {path}: it was written by another architecture")
        if saved[path] != wanted[path]:
            raise CheckpointError(f"checkpoint {where}: {path} has shape {saved[path]}, the model expects {wanted[path]}")
    extra = sorted(set(saved) - set(wanted))
    if extra:
        raise CheckpointError(f"checkpoint {where} has parameter {extra[0]} that the model lacks: "
                              "it was written by another architecture")
