"""Starting a run from trained weights (ours or a Hugging Face directory): what finetuning
(finetune.init_from) and continued pretraining (train.init_from) share.

    source = open_source("runs/bert_tiny", mesh)       # Source: kind, weights, architecture, tokenizer
    cfg = continued_config(cfg, source, explicit)      # continued pretraining: the checkpoint's architecture
    params, report = initial_params(cfg, model, abstract, source, mesh, head_keys=("mlm",))
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Any

import jax

from transformer_jax import checkpoint as ckpt
from transformer_jax import config as config_lib
from transformer_jax import config_parsing
from transformer_jax import finetune as ft
from transformer_jax import sharding as sh
from transformer_jax.config import Config, ConfigError, ModelConfig
from transformer_jax.models import Model, build

# model settings a config may set on top of a pretrained architecture (they leave the parameters as they are)
RUNTIME_MODEL_KEYS = (
    "dropout_rate",
    "attention_dropout_rate",
    "dtype",
    "remat",
    "attention_impl",
    "classifier_pooling",
)


@dataclasses.dataclass
class Source:
    """Where the pretrained model comes from: kind 'ours' | 'hf' | 'scratch'."""

    kind: str
    directory: str = ""
    weights: tuple[str, str, str | None] | None = None
    model_cfg: ModelConfig | None = None
    hf_params: Any = None
    tokenizer: str = ""  # ours: the pretraining run's data.tokenizer (when it named one)
    objective: str = ""  # ours: the run's train.objective


def open_source(init_from: str, mesh, *, default_model: ModelConfig | None = None, weights: bool = True) -> Source:
    """The weights, architecture and tokenizer of `init_from`: our workdir or a local Hugging Face
    directory (its weights placed on `mesh`; `weights=False`: only its architecture is read); '' is a
    run from scratch with `default_model`."""
    if not init_from:
        return Source("scratch", model_cfg=default_model)
    init_from = os.path.expanduser(init_from)
    where = ft.weights_source(init_from)
    if where[0] == "hf":
        from transformer_jax import hf

        if not weights:
            return Source("hf", init_from, where, hf.model_config(init_from))
        model, params = hf.from_pretrained(init_from, mesh=mesh)
        return Source("hf", init_from, where, model.cfg, params)
    try:
        base = config_lib.load_config(os.path.join(init_from, "config.yaml"))
    except ConfigError as e:
        raise ValueError(f"--init_from: {init_from}/config.yaml: {e}") from None
    return Source("ours", init_from, where, base.model, tokenizer=base.data.tokenizer, objective=base.train.objective)


def source_tokenizer(source: Source):
    """The tokenizer that comes with the weights: our run's tokenizer.model (or the one its config
    named), or the Hugging Face directory's files (`hf.load_tokenizer`); a one-line error if none."""
    from transformer_jax.data.tokenizer import Tokenizer

    own = os.path.join(source.directory, "tokenizer.model")
    if os.path.isfile(own):
        return Tokenizer(own)
    if source.tokenizer and os.path.isfile(source.tokenizer):
        return Tokenizer(source.tokenizer)
    from transformer_jax import hf

    try:
        return hf.load_tokenizer(source.directory)
    except ValueError:
        raise ValueError(
            f"--init_from: {source.directory} has no tokenizer (tokenizer.model or Hugging Face "
            "tokenizer files); set data.tokenizer"
        ) from None


def keep_tokenizer(tokenizer, workdir: str, source: Source | None = None) -> None:
    """Process 0 copies the run's tokenizer into its workdir (a SentencePiece model as tokenizer.model;
    a Hugging Face tokenizer's files, with the special token ids of config.json in hf_config.json), so
    the workdir is a complete model for --init_from, train.generate and train.convert --to-hf."""
    if jax.process_index() != 0:
        return
    os.makedirs(workdir, exist_ok=True)
    path = getattr(tokenizer, "path", "")
    own = os.path.join(workdir, "tokenizer.model")
    if (
        path.endswith(".model")
        and os.path.isfile(path)
        and os.path.abspath(path) != os.path.abspath(own)
        and not (source and source.kind == "hf")
    ):
        shutil.copyfile(path, own)
    if source is not None and source.kind == "hf":
        from transformer_jax import hf
        from transformer_jax.hf.common import _read_json
        from transformer_jax.runs import HF_CARRIED_KEYS, HF_CONFIG_FILE

        for name in hf.TOKENIZER_FILES:
            if os.path.isfile(os.path.join(source.directory, name)):
                shutil.copy2(os.path.join(source.directory, name), os.path.join(workdir, name))
        original = _read_json(os.path.join(source.directory, "config.json"))
        with open(os.path.join(workdir, HF_CONFIG_FILE), "w") as f:
            import json

            json.dump({k: original[k] for k in HF_CARRIED_KEYS if k in original}, f, indent=2)


def default_objective(model: ModelConfig) -> str:
    """The objective a model family was pretrained with: MLM (+NSP where it has the head), causal LM,
    span corruption."""
    if model.family == "encoder":
        return "mlm_nsp" if "nsp" in model.heads else "mlm"
    return {"decoder": "clm", "encoder_decoder": "span_corruption"}.get(model.family, "")


def continued_config(data: dict, source: Source, explicit: set[str]) -> Config:
    """The config of a run continuing `source`'s pretraining, from the raw config sections `data` (a
    --config file, or the default, with --set applied) and the dotted keys the user named (`explicit`):
    the checkpoint's architecture with the runtime model keys set on top; an architecture key set to
    another value than the checkpoint's is one line naming it. The objective is the user's if named,
    else the run's own (ours) or the family's (`default_objective`); the run is named after the source."""
    base = source.model_cfg
    assert base is not None, "continued pretraining starts from a checkpoint's architecture"
    mine = config_parsing._from_dict(ModelConfig, dict(data.get("model") or {}), "model.")
    runtime = {}
    for key in sorted(k for k in explicit if k.startswith("model.")):
        name = key[len("model.") :]
        if name in RUNTIME_MODEL_KEYS:
            runtime[name] = getattr(mine, name)
        elif getattr(mine, name) != getattr(base, name):
            hint = " (train.objective adds the heads it needs)" if name in ("heads", "pooler") else ""
            raise ConfigError(
                f"model.{name}: {getattr(mine, name)!r} in the config, but --init_from "
                f"{source.directory} has {getattr(base, name)!r}; continued pretraining keeps the "
                f"checkpoint's architecture (drop the key){hint}"
            )
    if "data.tokenizer" in explicit and (data.get("data") or {}).get("tokenizer"):
        raise ConfigError(
            f"data.tokenizer: continued pretraining uses the tokenizer of --init_from "
            f"{source.directory} unchanged (drop the key)"
        )
    train, run_data = dict(data.get("train") or {}), dict(data.get("data") or {})
    if "train.objective" not in explicit:
        from transformer_jax import tasks

        own = source.objective if source.objective in tasks.REGISTRY else ""
        train["objective"] = own if own and hasattr(tasks.get(own), "batch_fn") else default_objective(base)
    train["init_from"] = source.directory
    model = config_lib.to_dict(dataclasses.replace(base, **runtime))
    if base.position == "learned" and "data.seq_len" not in explicit:  # the default length fits the table
        run_data["seq_len"] = min(int(run_data.get("seq_len", 128)), base.max_len)
    run_name = (
        data.get("name") if "name" in explicit else f"{os.path.basename(os.path.normpath(source.directory))}_continued"
    )
    return config_lib.config_from_dict({**data, "name": run_name, "model": model, "train": train, "data": run_data})


def check_architecture(model: ModelConfig, source: Source) -> None:
    """A run's model against its --init_from checkpoint's: only the runtime keys, and the heads an
    objective adds, may differ (one line naming the first key that does)."""
    for field in dataclasses.fields(ModelConfig):
        name = field.name
        if name in RUNTIME_MODEL_KEYS or name in ("heads", "pooler"):
            continue
        if getattr(model, name) != getattr(source.model_cfg, name):
            raise ConfigError(
                f"model.{name}: {getattr(model, name)!r}, but train.init_from {source.directory} has "
                f"{getattr(source.model_cfg, name)!r}; continued pretraining keeps the checkpoint's "
                "architecture"
            )


def resuming(workdir: str) -> bool:
    """Whether the workdir holds a checkpoint the train loop resumes from (then no weights are loaded)."""
    checkpoints = os.path.join(workdir, "checkpoints")
    return os.path.isdir(checkpoints) and any(d.isdigit() for d in os.listdir(checkpoints))


def initial_params(
    cfg: Config,
    model: Model,
    abstract,
    source: Source,
    mesh,
    *,
    head_keys=(),
    reset_heads: bool = False,
    scratch: bool = False,
) -> tuple[Any, ft.LoadReport]:
    """The source's weights placed on their shardings; parameters it lacks (new heads) freshly
    initialised with train.seed. The report names what was loaded, initialised and left unused."""
    shardings = sh.tree_shardings(model.logical_axes, abstract, mesh)
    target = ft.flatten(ckpt.abstract_with_shardings(abstract, shardings))
    if scratch or source.kind == "scratch":
        report = ft.LoadReport("nothing (from scratch)", [], sorted(target), [])
        loaded = {}
    elif source.kind == "hf":
        hf_flat = ft.flatten(source.hf_params)
        report = ft.match_params(
            {p: tuple(x.shape) for p, x in hf_flat.items()},
            target,
            source=source.directory,
            reset_heads=reset_heads,
            head_keys=head_keys,
        )
        loaded = {p: jax.device_put(hf_flat[p].astype(target[p].dtype), target[p].sharding) for p in report.loaded}
    else:
        assert source.weights is not None  # ours: open_source found the checkpoint
        _, path, subtree = source.weights
        saved = ft.saved_shapes(path, subtree)
        if set(saved) and all(p.split("/")[0] in ("model", "lora") for p in saved):
            raise ValueError(f"--init_from: {path} holds LoRA training state; use the run's exported params/ instead")
        shown = os.path.relpath(path, source.directory)
        report = ft.match_params(
            saved, target, source=f"{source.directory} ({shown})", reset_heads=reset_heads, head_keys=head_keys
        )
        loaded = ft.restore_subset(path, subtree, {p: target[p] for p in report.loaded})
    need = sorted(set(target) - set(report.loaded))
    fresh = {}
    if need:
        make = jax.jit(
            lambda key: {p: ft.flatten(build(cfg, key)[1])[p] for p in need},
            out_shardings={p: target[p].sharding for p in need},
        )
        fresh = make(jax.random.key(cfg.train.seed))
    return ft.assemble(abstract, loaded, fresh), report
