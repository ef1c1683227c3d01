"""Orbax checkpoints: async saves, keep the last K and the best by an eval metric, each process's
input-pipeline position saved beside the weights (grain's handler: one file per process), restore
onto any mesh, fall back past an unreadable latest step, clear errors on mismatch or a failed write."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from typing import Any

import grain.checkpoint
import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from transformer_jax.sharding import any_process


class CheckpointError(ValueError):
    """A checkpoint that does not fit the run: the message names the parameter."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, permissions): the message names the path."""


class UnreadableCheckpoint(Exception):
    """A step on disk that cannot be restored (truncated array, missing metadata)."""


class _Position:
    """One process's input-pipeline position in the shape grain's checkpoint handler writes:
    `process_<i>-of-<n>.json` per process, so every process restores its own."""

    def __init__(self, state: Any = None):
        self.state = state

    def get_state(self) -> bytes:
        return json.dumps(self.state).encode()

    def set_state(self, raw: bytes) -> None:
        self.state = json.loads(raw)

    def start_prefetch(self) -> None:
        pass


class Checkpointer:
    """checkpoints/<step>/{state, data, loop}: `state` a pytree (params, optimizer state, step);
    `data` each process's input-pipeline position (a JSON-serialisable value, one file per
    process); `loop` a small JSON dict that is the same on every process (early-stopping state)."""

    def __init__(
        self,
        directory: str,
        *,
        keep: int = 3,
        best_metric: str | None = None,
        best_mode: str = "min",
        async_save: bool = True,
    ):
        self.directory = os.path.abspath(directory)
        keep_policies = [policies.LatestN(n=keep)]
        if best_metric:
            keep_policies.append(
                policies.BestN(
                    get_metric_fn=lambda m: m[best_metric],
                    reverse=best_mode == "min",
                    n=1,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policies.AnyPreservationPolicy(keep_policies),
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
                "loop": ocp.JsonCheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(
        self,
        step: int,
        state: Any,
        position: Any = None,
        loop: dict | None = None,
        metrics: dict | None = None,
        force: bool = False,
    ):
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(_Position(position)),
            loop=ocp.args.JsonSave(loop or {}),
        )
        metrics = None if metrics is None else {k: float(v) for k, v in metrics.items()}
        with self._writing(step):
            return self.manager.save(step, args=args, metrics=metrics, force=force)

    @contextlib.contextmanager
    def _writing(self, step: int | None):
        """An OSError while writing (here or from an earlier async save) becomes one line naming the path."""
        try:
            yield
        except Exception as e:  # orbax re-raises async failures wrapped; find the OSError under it
            cause: BaseException | None = e
            while cause is not None and not isinstance(cause, OSError):
                cause = cause.__cause__ or cause.__context__
            if cause is None:
                raise
            path = cause.filename or (os.path.join(self.directory, str(step)) if step is not None else self.directory)
            raise CheckpointWriteError(
                f"cannot write checkpoint to {path}: {cause.strerror or cause}; "
                f"the checkpoints already written are intact"
            ) from e

    def check_compatible(self, step: int, abstract_state: Any) -> None:
        """Raise CheckpointError naming the first parameter whose path or shape differs (the
        `params` subtree when the state has one: that is the architecture)."""
        meta = self.manager.item_metadata(step)["state"]
        meta_tree = getattr(meta, "tree", meta)
        if isinstance(abstract_state, dict) and "params" in abstract_state and "params" in meta_tree:
            meta_tree, abstract_state = meta_tree["params"], abstract_state["params"]
        _compare(meta_tree, abstract_state, f"{self.directory}/{step}")

    def saved_process_count(self, step: int) -> int | None:
        names = (
            os.listdir(os.path.join(self.directory, str(step), "data"))
            if os.path.isdir(os.path.join(self.directory, str(step), "data"))
            else []
        )
        counts = {int(m.group(1)) for m in map(re.compile(r"process_\d+-of-(\d+)\.json$").match, names) if m}
        return counts.pop() if len(counts) == 1 else None

    def restore(self, step: int | None, abstract_state: Any) -> tuple[Any, Any, dict]:
        """Restore onto the shardings in `abstract_state` (ShapeDtypeStructs with .sharding): any
        mesh or device count. Returns (state, this process's data position, loop). The data
        positions need the process count that wrote them: another count is a CheckpointError."""
        step = self.latest_step() if step is None else step
        assert step is not None, f"no checkpoint in {self.directory} to restore"
        saved = self.saved_process_count(step)
        if saved is not None and saved != jax.process_count():
            raise CheckpointError(
                f"checkpoint {self.directory}/{step} holds the input positions of {saved} processes, this run has "
                f"{jax.process_count()}: each process reads its own documents, so resume with {saved} processes "
                f"(or start a new --workdir)"
            )
        try:
            meta = self.manager.item_metadata(step)
            if meta is None or meta.get("state") is None:
                raise UnreadableCheckpoint("no state metadata")
            self.check_compatible(step, abstract_state)
            args = ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=grain.checkpoint.CheckpointRestore(_Position()),
                loop=ocp.args.JsonRestore(),
            )
            restored = self.manager.restore(step, args=args)
        except CheckpointError:
            raise
        except Exception as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UnreadableCheckpoint(reason[:300]) from e
        return restored["state"], restored["data"].state, restored["loop"] or {}

    def restore_newest_readable(
        self, abstract_state: Any, strict: bool = False, warn: Callable[[str], None] = print
    ) -> tuple[int, Any, Any, dict] | None:
        """Restore the latest step; if it cannot be read, fall back to the newest one that can, saying
        so in one line and moving the broken step to <checkpoints>.broken/ (never deleting it).
        `strict` makes an unreadable latest step an error. All processes take the same decision.
        Returns (step, state, position, loop), or None when there is no checkpoint."""
        broken = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                error = None
                restored = self.restore(step, abstract_state)
            except UnreadableCheckpoint as e:
                error = str(e)
            if any_process([error is not None])[0]:
                error = error or "another process could not read it"
                if strict:
                    raise CheckpointError(
                        f"checkpoint {self.directory}/{step} cannot be read ({error}); train.resume=strict: stopping"
                    )
                warn(
                    f"warning: checkpoint {self.directory}/{step} cannot be read ({error}): "
                    f"falling back to an earlier step; it is moved to {self.directory}.broken/{step}"
                )
                broken.append(step)
                continue
            self._set_aside(broken)
            return (step, *restored)
        if broken:
            raise CheckpointError(f"no checkpoint in {self.directory} can be read (steps {sorted(broken)})")
        return None

    def _set_aside(self, steps: list[int]) -> None:
        if not steps:
            return
        if jax.process_index() == 0:
            os.makedirs(f"{self.directory}.broken", exist_ok=True)
            for step in steps:
                target = os.path.join(f"{self.directory}.broken", str(step))
                if os.path.exists(target):
                    target = f"{target}.{int(time.time())}"
                shutil.move(os.path.join(self.directory, str(step)), target)
        any_process([False])  # a barrier: nobody lists the steps before they are moved
        self.manager.reload()

    def wait(self) -> None:
        with self._writing(None):
            self.manager.wait_until_finished()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            with contextlib.suppress(Exception):  # a failed write was reported by wait()
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
    saved = {
        jax.tree_util.keystr(p): tuple(getattr(x, "shape", ()) or ())
        for p, x in jax.tree_util.tree_flatten_with_path(saved_tree)[0]
    }
    wanted = {
        jax.tree_util.keystr(p): tuple(np.shape(x))
        for p, x in jax.tree_util.tree_flatten_with_path(_stringify_keys(abstract))[0]
    }
    for path in wanted:
        if path not in saved:
            raise CheckpointError(f"checkpoint {where} has no parameter {path}: it was written by another architecture")
        if saved[path] != wanted[path]:
            raise CheckpointError(
                f"checkpoint {where}: {path} has shape {saved[path]}, the model expects {wanted[path]}"
            )
    extra = sorted(set(saved) - set(wanted))
    if extra:
        raise CheckpointError(
            f"checkpoint {where} has parameter {extra[0]} that the model lacks: it was written by another architecture"
        )
