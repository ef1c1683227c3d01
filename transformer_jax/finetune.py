"""Finetuning building blocks: trainable-parameter masks (full / partial / frozen), LoRA, layer-wise
learning-rate decay, restoring a pretrained model into a finetuning model, and the finetuning objective
(`make_loss_fn`: the task losses themselves are `losses.hard_loss` / `losses.distill_term`).

Parameters are named by '/'-joined paths of the params dict ('encoder/layers/3/attention/query/kernel').

    mask = trainable_mask(params, "partial", patterns=[r"layers/1/"], head_keys=["classifier"])
    lora = lora_init(params, jax.random.key(0), targets=["attention/(query|value)/kernel"], rank=8)
    out = model.apply(lora_apply(params, lora, alpha=16.0, rank=8), input_ids=ids)   # jit this
    merged = lora_merge(params, lora, alpha=16.0, rank=8)                             # for export

Everything here is a pure function of pytrees, jittable where it computes on arrays.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from transformer_jax import losses

# the task heads of models.Encoder: model.heads name -> params key
HEAD_KEYS = {
    "classification": "classifier",
    "regression": "regressor",
    "token_classification": "token_classifier",
    "qa": "qa",
    "mlm": "mlm",
    "nsp": "nsp",
}


# ----------------------------------------------------------------------------- paths
def path_str(path) -> str:
    parts = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def flatten(tree) -> dict[str, Any]:
    """{'a/b/c': leaf} of a nested dict."""
    return {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def map_with_path(fn: Callable[[str, Any], Any], tree):
    return jax.tree_util.tree_map_with_path(lambda p, x: fn(path_str(p), x), tree)


def count(tree, mask=None) -> int:
    """Number of parameters (of the leaves where `mask` is True)."""
    leaves = jax.tree.leaves(tree)
    keep = [True] * len(leaves) if mask is None else jax.tree.leaves(mask)
    return sum(int(np.prod(x.shape)) for x, k in zip(leaves, keep) if k)


def nbytes(tree) -> int:
    """Bytes of the arrays (or ShapeDtypeStructs) in a pytree, e.g. an optimizer state."""
    return sum(
        int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
        for x in jax.tree.leaves(tree)
        if hasattr(x, "shape") and hasattr(x, "dtype")
    )


# ----------------------------------------------------------------------------- trainable masks
_LAYER = re.compile(r"(^|/)(encoder|decoder)/layers/(\d+)(/|$)")


def layer_index(path: str) -> tuple[str, int] | None:
    """('encoder', 3) for 'encoder/layers/3/...', None for parameters outside the layer stacks."""
    m = _LAYER.search(path)
    return (m.group(2), int(m.group(3))) if m else None


def trainable_mask(
    params,
    strategy: str,
    *,
    patterns: Sequence[str] = (),
    top_layers: int = 0,
    head_keys: Sequence[str] = (),
    scanned: bool = False,
):
    """A bool pytree like params. full: all; frozen: the head modules only (top-level keys in
    head_keys); partial: the heads, parameters whose path matches any regex in `patterns`
    (re.search), and with top_layers N the top N layers of each stack (with the stack's final
    norm and the pooler); lora: the heads (the LoRA factors are trainable on their own)."""
    if strategy == "full":
        return jax.tree.map(lambda _: True, params)
    if strategy not in ("frozen", "partial", "lora"):
        raise ValueError(f"finetune.strategy: unknown strategy {strategy!r}")
    compiled = [re.compile(p) for p in patterns] if strategy == "partial" else []
    if strategy == "partial" and top_layers and scanned:
        raise ValueError(
            "finetune.top_layers: needs model.scan_layers=false (scanned layers are one stacked "
            "parameter each; use finetune.trainable patterns)"
        )
    sizes: dict[str, int] = {}
    for path in flatten(params):
        where = layer_index(path)
        if where:
            sizes[where[0]] = max(sizes.get(where[0], 0), where[1] + 1)

    def keep(path: str, _) -> bool:
        if path.split("/", 1)[0] in head_keys:
            return True
        if strategy != "partial":
            return False
        if any(p.search(path) for p in compiled):
            return True
        if top_layers:
            where = layer_index(path)
            if where:
                return where[1] >= sizes[where[0]] - top_layers
            if re.match(r"(encoder|decoder)/final_norm/|pooler/", path):
                return True
        return False

    return map_with_path(keep, params)


def layer_lr_scales(params, decay: float, *, num_layers: int, num_decoder_layers: int = 0, scanned: bool = False):
    """Layer-wise learning-rate decay (ELECTRA / BEiT): depth 0 for the embeddings, i + 1 for layer
    i (decoder layers continue after the encoder's), D + 1 for everything above (final norms,
    pooler, heads), D the total number of layers; scale = decay ** (D + 1 - depth). With scanned
    layers a stacked parameter gets a [L, 1, ...] array of scales."""
    total = num_layers + num_decoder_layers

    def depth(path: str) -> int | None:
        if path.startswith("embed/"):
            return 0
        where = layer_index(path)
        if where:
            return where[1] + 1 + (num_layers if where[0] == "decoder" else 0)
        return None

    def scale(path: str, x):
        if scanned and re.match(r"(encoder|decoder)/layers/", path):
            offset = num_layers if path.startswith("decoder/") else 0
            n = x.shape[0]
            depths = np.arange(n) + 1 + offset
            return (decay ** (total + 1 - depths)).astype(np.float32).reshape((n,) + (1,) * (len(x.shape) - 1))
        d = depth(path)
        return float(decay ** (total + 1 - (total + 1 if d is None else d)))

    return map_with_path(scale, params)


# ----------------------------------------------------------------------------- LoRA
LORA_DEFAULT_TARGETS = ("attention/query/kernel", "attention/value/kernel")  # as the LoRA paper's


def _lora_dims(axes: tuple, ndim: int) -> tuple[int, int, int]:
    """(leading stacked dims, input dims, output dims) of a kernel: the inputs are its first dim,
    or all but the last for an output projection (logical axes ending with 'embed': [h, d, m])."""
    lead = 1 if axes and axes[0] == "layers" else 0
    rest = ndim - lead
    if rest < 2:
        raise ValueError("LoRA targets kernels (2 or more dims)")
    inputs = rest - 1 if axes and axes[-1] == "embed" else 1
    return lead, inputs, rest - inputs


def lora_targets(params, targets: Sequence[str]) -> list[str]:
    compiled = [re.compile(t) for t in targets]
    return [p for p, x in flatten(params).items() if any(c.search(p) for c in compiled) and len(x.shape) >= 2]


def _set(tree: dict, path: str, value) -> None:
    *parents, last = path.split("/")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[last] = value


def _get(tree, path: str):
    for p in path.split("/"):
        tree = tree[int(p)] if isinstance(tree, dict) and p not in tree and p.isdigit() and int(p) in tree else tree[p]
    return tree


def lora_init(params, rng: jax.Array, *, targets: Sequence[str], rank: int, logical_axes=None) -> dict:
    """LoRA factors for every kernel whose path matches a regex in `targets`: {path: {'a', 'b'}}
    (a nested dict keyed by the path parts). A [in..., r] ~ N(0, 1/in), B [r, out...] = 0, so the
    model starts exactly as the pretrained one. Works on arrays or ShapeDtypeStructs (eval_shape)."""
    paths = lora_targets(params, targets)
    if not paths:
        raise ValueError(f"finetune.lora_targets: {', '.join(targets)} match no kernel of the model")
    out: dict = {}
    for i, path in enumerate(paths):
        x = _get(params, path)
        lead, n_in, _ = _lora_dims(
            tuple(_axes_at(logical_axes, path)) if logical_axes is not None else (), len(x.shape)
        )
        shape = tuple(x.shape)
        fan_in = int(np.prod(shape[lead : lead + n_in]))
        a = jax.random.normal(jax.random.fold_in(rng, i), shape[: lead + n_in] + (rank,), jnp.float32) / np.sqrt(fan_in)
        b = jnp.zeros(shape[:lead] + (rank,) + shape[lead + n_in :], jnp.float32)
        _set(out, path, {"a": a.astype(x.dtype), "b": b.astype(x.dtype)})
    return out


def _axes_at(logical_axes, path: str) -> tuple:
    return tuple(_get(logical_axes, path))


def lora_logical_axes(lora: dict, logical_axes) -> dict:
    """Logical axes of the LoRA factors: A keeps the kernel's input axes, B its output axes; the rank
    axis is not split."""
    out: dict = {}
    for path in sorted({p.rsplit("/", 1)[0] for p in flatten(lora)}):
        axes = _axes_at(logical_axes, path)
        lead, n_in, _ = _lora_dims(axes, len(axes))
        _set(
            out,
            path,
            {"a": tuple(axes[: lead + n_in]) + (None,), "b": tuple(axes[:lead]) + (None,) + tuple(axes[lead + n_in :])},
        )
    return out


def lora_delta(a, b, scale: float, kernel_ndim: int):
    """scale * A @ B over the rank axis, shaped like the kernel: A [L.., in.., r], B [L.., r, out..]
    (L: the stacked layer dim of scanned layers, found from the kernel's rank)."""
    lead = a.ndim + b.ndim - kernel_ndim - 2
    letters = "abcdefghijklmnopqrstuvwxy"
    lead_s, in_s = letters[:lead], letters[lead : a.ndim - 1]
    out_s = letters[a.ndim - 1 : a.ndim - 1 + b.ndim - lead - 1]
    return jnp.einsum(f"{lead_s}{in_s}z,{lead_s}z{out_s}->{lead_s}{in_s}{out_s}", a, b) * scale


def lora_apply(params, lora: dict, *, alpha: float, rank: int):
    """The effective params: W + (alpha / rank) * A @ B on every LoRA target; the rest unchanged.
    Pure: call it inside the jitted loss so the gradient flows into A and B only."""
    factors = {p.rsplit("/", 1)[0] for p in flatten(lora)}
    scale = alpha / rank

    def effective(path: str, w):
        if path not in factors:
            return w
        f = _get(lora, path)
        delta = lora_delta(f["a"].astype(jnp.float32), f["b"].astype(jnp.float32), scale, w.ndim)
        return (w.astype(jnp.float32) + delta).astype(w.dtype)

    return map_with_path(effective, params)


lora_merge = lora_apply  # merging for export is the same computation, run once


# ----------------------------------------------------------------------------- restoring weights
@dataclasses.dataclass
class LoadReport:
    source: str
    loaded: list[str]
    new: list[str]
    unused: list[str]
    reset: list[str] = dataclasses.field(default_factory=list)

    def summary(self, max_names: int = 6) -> str:
        def names(paths):
            heads = sorted(
                {
                    p.split("/")[0]
                    if p.split("/")[0] in HEAD_KEYS.values() or p.startswith(("pooler", "lm_head"))
                    else p
                    for p in paths
                }
            )
            shown = ", ".join(heads[:max_names]) + (" ..." if len(heads) > max_names else "")
            return f"{len(paths)} ({shown})" if paths else "0"

        lines = [
            f"restored from {self.source}:",
            f"  loaded: {len(self.loaded)} parameters",
            f"  newly initialised: {names(self.new)}",
            f"  unused from the checkpoint: {names(self.unused)}",
        ]
        if self.reset:
            lines.append(f"  re-initialised (shape differs, finetune.reset_heads): {names(self.reset)}")
        return "\n".join(lines)

    def line(self) -> str:
        """One line: how many parameters were loaded, and by name what was initialised fresh (the heads
        the checkpoint lacks) or left unused."""
        fresh = sorted({p.split("/")[0] for p in self.new + self.reset})
        unused = sorted({p.split("/")[0] for p in self.unused})
        return (
            f"restored {len(self.loaded)} parameters from {self.source}; initialised fresh: "
            f"{', '.join(fresh) or 'none'}" + (f"; unused from the checkpoint: {', '.join(unused)}" if unused else "")
        )


def match_params(
    saved_shapes: dict[str, tuple],
    target: dict[str, Any],
    *,
    source: str,
    reset_heads: bool = False,
    head_keys: Sequence[str] = (),
) -> LoadReport:
    """Which target parameters come from the checkpoint ('/' paths -> shapes). A shape mismatch is
    a one-line ValueError naming the parameter, unless it is a head's and reset_heads is set."""
    loaded, new, reset = [], [], []
    for path, x in target.items():
        if path not in saved_shapes:
            new.append(path)
            continue
        want, got = tuple(x.shape), tuple(saved_shapes[path])
        if want == got:
            loaded.append(path)
        elif reset_heads and path.split("/")[0] in head_keys:
            reset.append(path)
        else:
            head = path.split("/")[0]
            hint = (
                (
                    " (the task's number of labels differs from the checkpoint's head: set finetune.reset_heads=true "
                    "to re-initialise the head)"
                )
                if head in HEAD_KEYS.values()
                else ""
            )
            raise ValueError(
                f"--init_from {source}: {path} has shape {got} in the checkpoint but the model needs {want}{hint}"
            )
    unused = sorted(set(saved_shapes) - set(target))
    return LoadReport(source, loaded, new, unused, reset)


def weights_source(directory: str) -> tuple[str, str, str | None]:
    """Where a directory's weights are: ('hf', dir, None) for a Hugging Face dir (config.json),
    ('params', dir/params, None) for weights written by `checkpoint.save_params` (train.convert,
    train.finetune's export), ('checkpoint', dir/checkpoints/<latest>/state, 'params') for a
    training run. A missing directory or one without weights is a one-line ValueError."""
    if not directory:
        raise ValueError("--init_from: no directory given")
    if not os.path.isdir(directory):
        raise ValueError(f"--init_from: {directory} does not exist (or is not a directory)")
    if os.path.isfile(os.path.join(directory, "config.json")) and not os.path.isfile(
        os.path.join(directory, "config.yaml")
    ):
        return "hf", directory, None
    if not os.path.isfile(os.path.join(directory, "config.yaml")):
        raise ValueError(
            f"--init_from: {directory} has neither config.yaml (a run of ours) nor config.json (a Hugging Face model)"
        )
    if os.path.isdir(os.path.join(directory, "params")):
        return "params", os.path.join(directory, "params"), None
    checkpoints = os.path.join(directory, "checkpoints")
    steps = sorted(int(d) for d in os.listdir(checkpoints) if d.isdigit()) if os.path.isdir(checkpoints) else []
    if not steps:
        raise ValueError(f"--init_from: {directory} has no weights (no params/ and no checkpoints/<step>/)")
    return "checkpoint", os.path.join(checkpoints, str(steps[-1]), "state"), "params"


def saved_shapes(path: str, subtree: str | None) -> dict[str, tuple]:
    """'/' paths -> shapes of the arrays in an Orbax PyTree checkpoint (its `subtree` only)."""
    import orbax.checkpoint as ocp

    meta = ocp.PyTreeCheckpointer().metadata(os.path.abspath(path))
    tree = getattr(meta, "item_metadata", None) or getattr(meta, "tree", meta)
    tree = getattr(tree, "tree", tree)
    if subtree is not None:
        if subtree not in tree:
            raise ValueError(f"--init_from: {path} holds no {subtree!r}")
        tree = tree[subtree]
    return {
        path_str(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0] if hasattr(x, "shape")
    }


def restore_subset(path: str, subtree: str | None, wanted: dict[str, jax.ShapeDtypeStruct]) -> dict[str, jax.Array]:
    """Restore only the '/' paths in `wanted` (ShapeDtypeStructs with their target shardings) from
    an Orbax PyTree checkpoint: nothing else (optimizer state, unused heads) is read."""
    import orbax.checkpoint as ocp

    if not wanted:
        return {}
    item: dict = {}
    for p, x in wanted.items():
        _set(item, p, x)
    if subtree is not None:
        item = {subtree: item}
    restore_args = ocp.checkpoint_utils.construct_restore_args(item)
    restored = ocp.PyTreeCheckpointer().restore(
        os.path.abspath(path), args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
    )
    if subtree is not None:
        restored = restored[subtree]
    return flatten(restored)


def assemble(target_abstract, loaded: dict[str, Any], fresh: dict[str, Any]):
    """A params tree shaped like target_abstract from loaded and freshly initialised leaves."""

    def pick(path, _):
        return loaded[path] if path in loaded else fresh[path]

    return map_with_path(pick, target_abstract)


# ----------------------------------------------------------------------------- the finetuning objective
def mean_pool(hidden, mask):
    """Mean of hidden [b, t, m] over the positions where mask [b, t] is 1 (float32)."""
    m = mask.astype(jnp.float32)[..., None]
    return jnp.sum(hidden.astype(jnp.float32) * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)


def task_outputs(kind: str, output) -> Any:
    """The task head's output of a ModelOutput: logits [b, n], prediction [b], token logits
    [b, s, n], {'start', 'end'} [b, s], or LM logits [b, t, v]."""
    if kind == "classification":
        return output.heads["classifier"]
    if kind == "regression":
        return output.heads["regressor"][:, 0]
    if kind == "token_classification":
        return output.heads["token_classifier"]
    if kind == "qa":
        return output.heads["qa"]
    if kind == "text_to_text":
        return output.logits
    raise ValueError(f"unknown task kind {kind!r}")


def qa_logits(qa: dict, attention_mask) -> dict:
    """Start / end logits [b, s] with padding positions at losses.MASKED_LOGIT (float32)."""
    return {k: losses.mask_padding(qa[k], attention_mask) for k in ("start", "end")}


MODEL_INPUTS = {
    "encoder": ("input_ids", "attention_mask", "token_type_ids"),
    "encoder_decoder": ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask"),
}


def model_inputs(family: str, batch: dict, suffix: str = "") -> dict:
    keys = MODEL_INPUTS[family]
    inputs = {k: batch[k + suffix] for k in keys if k + suffix in batch}
    if suffix:  # a second view changes the encoder inputs only
        inputs.update({k: batch[k] for k in keys if k not in inputs and k in batch})
    return inputs


@dataclasses.dataclass(frozen=True)
class LossConfig:
    kind: str
    label_smoothing: float = 0.0
    distill_weight: float = 0.0  # > 0 only when batches carry 'teacher' outputs
    distill_temperature: float = 2.0
    contrastive_weight: float = 0.0
    contrastive_temperature: float = 0.1
    contrastive_loss: str = "infonce"  # or 'supcon' (classification: batches carry labels)
    lora_alpha: float = 0.0  # > 0: params are {'model', 'lora'}
    lora_rank: int = 0


def effective_params(params, c: LossConfig):
    """The model's params: LoRA factors folded into their kernels when the params are LoRA's."""
    if c.lora_alpha:
        return lora_apply(params["model"], params["lora"], alpha=c.lora_alpha, rank=c.lora_rank)
    return params


def make_loss_fn(model, c: LossConfig) -> Callable:
    """loss_fn(model, params, batch, dropout_rng) -> (loss, metrics) for trainer.Task:
    hard-label loss (over the examples with hard_weight 1 when the batch has a transfer set's
    unlabelled ones), mixed with distillation ((1 - w) hard + w KL_T, over every example) when the
    batch has teacher outputs, plus contrastive_weight * a contrastive loss over the mean-pooled encoder states:
    infonce, in-batch InfoNCE between the two views when the batch has a second view (keys ending
    in '_2'); supcon, supervised contrastive over batch['labels'] (real examples only), the 2b
    rows of both views when there is a second view, else the b rows of the one view."""
    family = model.cfg.family

    def loss_fn(_model, params, batch, dropout_rng):
        p = effective_params(params, c)
        rngs = [None, None] if dropout_rng is None else list(jax.random.split(dropout_rng, 2))
        output = model.apply(p, **model_inputs(family, batch), dropout_rng=rngs[0])
        out = task_outputs(c.kind, output)
        labeled_only = (
            {**batch, "example_weight": batch["example_weight"] * batch["hard_weight"]}
            if "hard_weight" in batch
            else batch
        )
        loss, metrics = losses.hard_loss(c.kind, out, labeled_only, label_smoothing=c.label_smoothing)
        metrics = {**metrics, "task_loss": loss}
        if c.distill_weight and ("teacher" in batch or "teacher_start" in batch):
            teacher = (
                {"start": batch["teacher_start"], "end": batch["teacher_end"]} if c.kind == "qa" else batch["teacher"]
            )
            kd = losses.distill_term(c.kind, out, teacher, batch, c.distill_temperature)
            loss = (1.0 - c.distill_weight) * loss + c.distill_weight * kd
            metrics["distill_loss"] = kd
        second_view = "input_ids_2" in batch
        if c.contrastive_weight and (second_view or c.contrastive_loss == "supcon"):
            hidden = lambda o: o.encoder_hidden_states if family == "encoder_decoder" else o.hidden_states
            z = [mean_pool(hidden(output), batch["attention_mask"])]
            if second_view:
                second = model.apply(p, **model_inputs(family, batch, "_2"), dropout_rng=rngs[1])
                z.append(mean_pool(hidden(second), batch["attention_mask_2"]))
            if c.contrastive_loss == "supcon":  # every view's rows are anchors (Khosla et al.), labels repeated
                ctr = losses.supcon_loss(
                    jnp.concatenate(z),
                    jnp.tile(batch["labels"], len(z)),
                    jnp.tile(labeled_only["example_weight"], len(z)),  # a transfer set's inputs have no label
                    temperature=c.contrastive_temperature,
                )
            else:
                ctr = losses.contrastive_loss(z[0], z[1], temperature=c.contrastive_temperature)
            loss = loss + c.contrastive_weight * ctr
            metrics["contrastive_loss"] = ctr
        return loss, metrics

    return loss_fn
