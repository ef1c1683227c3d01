"""Restoring a run of any program from its workdir: config.yaml, tokenizer.model and the latest
weights (a training run's checkpoints/<step>/, or params/ written by checkpoint.save_params).

    run = runs.load_run("runs/translate_tiny")     # Run(workdir, cfg, model, params, tokenizer)
    opened = runs.open_model("runs/gpt_tiny")      # or a Hugging Face directory: OpenedModel(..., eos_id, ...)
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax

from transformer_jax import config as config_lib
from transformer_jax import config_parsing
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
        os.path.abspath(path),
        args=ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True
        ),
    )
    return restored[subtree]


@dataclasses.dataclass
class Run:
    workdir: str
    cfg: Config
    model: Model
    params: Any
    tokenizer: Tokenizer | None


def config_path(workdir: str) -> str:
    """<workdir>/config.yaml of a run of ours; a missing directory or file is one line."""
    directory = os.path.expanduser(workdir)
    if not os.path.isdir(directory):
        raise ValueError(f"--checkpoint: {workdir} does not exist (or is not a directory)")
    path = os.path.join(directory, "config.yaml")
    if not os.path.isfile(path):
        raise ValueError(f"--checkpoint: {workdir} has no config.yaml (not a workdir of ours)")
    return path


def load_run(workdir: str, *, need_tokenizer: bool = True) -> Run:
    """A finished (or interrupted) run of any program: its config.yaml, tokenizer and latest weights."""
    cfg = config_lib.load_config(config_path(workdir))
    workdir = os.path.expanduser(workdir)
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


# ----------------------------------------------------------------------------- any model to generate with
HF_CONFIG_FILE = "hf_config.json"  # what a workdir keeps of an imported config.json: the special token ids
# config.json keys carried from an imported Hugging Face directory to an exported one (ours has no place for them)
HF_CARRIED_KEYS = (
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "decoder_start_token_id",
    "sep_token_id",
    "id2label",
    "label2id",
    "problem_type",
)


@dataclasses.dataclass
class OpenedModel:
    """A model to generate with, from our workdir or a Hugging Face directory (`open_model`).

    `cfg` is the workdir's config, or for a Hugging Face directory its model config (config.json
    translated) in a Config as train.convert --from-hf writes it. `tokenizer` has encode / decode / vocab_size (our
    SentencePiece Tokenizer or hf.HFTokenizer). `max_len` is the longest input the model takes
    (None: no limit known), `max_len_from` names where it comes from."""

    directory: str
    source: str  # "workdir" or "hf"
    cfg: Config
    model: Model
    params: Any
    tokenizer: Any
    eos_id: int | None  # None: generation runs to its length
    pad_id: int
    decoder_start_id: int  # encoder-decoder: the first decoder input
    max_len: int | None
    max_len_from: str


def _single_id(ids: dict, key: str, where: str) -> int | None:
    value = ids.get(key)
    if isinstance(value, list):
        if len(value) != 1:
            raise ValueError(f"{where}: {key} lists {len(value)} ids {value}; generation stops at one")
        value = value[0]
    return None if value is None else int(value)


def _hf_token_ids(ids: dict, where: str) -> tuple[int | None, int, int]:
    """(eos, pad, decoder start) from a config.json's (or hf_config.json's) token ids. pad only fills
    the rows after eos; the decoder start is T5's pad 0 unless the file says otherwise."""
    eos = _single_id(ids, "eos_token_id", where)
    pad = _single_id(ids, "pad_token_id", where)
    start = _single_id(ids, "decoder_start_token_id", where)
    return eos, 0 if pad is None else pad, (0 if pad is None else pad) if start is None else start


def _max_len(cfg: Config, source: str, hf_json: dict, overrides) -> tuple[int | None, str]:
    """Learned positions: the table size. Otherwise our config's trained length (data.seq_len; a
    --set data.seq_len moves it), or for a Hugging Face directory config.json's n_positions where
    it gives one (or a --set data.seq_len)."""
    if cfg.model.position == "learned":
        return cfg.model.max_len, "model.max_len" if source == "workdir" else "config.json's n_positions"
    if source == "workdir" or any(config_parsing.parse_override(o)[0] == "data.seq_len" for o in overrides):
        return cfg.data.seq_len, "data.seq_len"
    if hf_json.get("n_positions"):
        return int(hf_json["n_positions"]), "config.json's n_positions"
    return None, ""


def _model_for(cfg: Config, model: Model, params, directory: str) -> Model:
    """`model`, or rebuilt for a config whose model keys were overridden (runtime keys such as dtype or
    attention_impl) when its parameters are the same; anything else is refused."""
    if cfg.model == model.cfg:
        return model
    rebuilt, abstract = abstract_build(cfg)
    same = jax.tree.structure(abstract) == jax.tree.structure(params) and all(  # type: ignore[operator]
        a.shape == p.shape and a.dtype == p.dtype for a, p in zip(jax.tree.leaves(abstract), jax.tree.leaves(params))
    )
    if not same:
        raise ValueError(
            f"--set: the model keys set change the parameters of {directory}; only runtime keys "
            "(model.dtype, model.attention_impl, ...) can be set on a trained model"
        )
    return rebuilt


def _hf_config(mcfg, directory: str, overrides) -> Config:
    """A Config around a Hugging Face model's ModelConfig (as train.convert writes it: the family's
    objective, data.seq_len within learned positions), with the --set overrides, validated."""
    objective = {"decoder": "clm", "encoder_decoder": "span_corruption"}.get(mcfg.family, "mlm")
    data = {"seq_len": min(128, mcfg.max_len)} if mcfg.position == "learned" else {}
    base = {
        "model": config_lib.to_dict(mcfg),
        "train": {"objective": objective},
        "data": data,
        "name": os.path.basename(os.path.normpath(directory)),
    }
    return config_lib.config_from_dict(base, overrides)


def open_model(directory: str, overrides=()) -> OpenedModel:
    """A model, its weights, tokenizer and special token ids from either our workdir (config.yaml;
    checkpoints/<step>/ or params/; tokenizer.model, or the Hugging Face tokenizer files and
    hf_config.json that train.convert --from-hf writes) or a local Hugging Face directory
    (config.json, weights, tokenizer files). `overrides` (key=value) apply to the config; model
    keys only where the parameters stay the same (runtime keys: dtype, attention_impl, ...)."""
    from transformer_jax import hf
    from transformer_jax.hf.common import _read_json

    directory = os.path.expanduser(os.fspath(directory))
    if not os.path.isdir(directory):
        raise ValueError(f"--checkpoint: {directory} does not exist (or is not a directory)")
    if os.path.isfile(os.path.join(directory, "config.yaml")):
        run = load_run(directory, need_tokenizer=False)
        cfg = config_lib.load_config(os.path.join(directory, "config.yaml"), overrides) if overrides else run.cfg
        model = _model_for(cfg, run.model, run.params, directory)
        ids_path = os.path.join(directory, HF_CONFIG_FILE)
        ids = _read_json(ids_path) if os.path.isfile(ids_path) else {}
        tokenizer: Tokenizer | hf.HFTokenizer | None = run.tokenizer
        if tokenizer is None and any(os.path.isfile(os.path.join(directory, n)) for n in hf.TOKENIZER_FILES):
            tokenizer = hf.load_tokenizer(directory)
        if tokenizer is None:
            raise ValueError(f"--checkpoint: {directory} has no tokenizer.model (nor Hugging Face tokenizer files)")
        if isinstance(tokenizer, Tokenizer):
            eos, pad, start = (tokenizer.eos_id if tokenizer.eos_id >= 0 else None), max(tokenizer.pad_id, 0), 0
        else:
            eos, pad, start = _hf_token_ids(ids, ids_path)
        max_len, max_len_from = _max_len(cfg, "workdir", {}, overrides)
        return OpenedModel(
            directory, "workdir", cfg, model, run.params, tokenizer, eos, pad, start, max_len, max_len_from
        )
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(
            f"--checkpoint: {directory} has neither config.yaml (our workdir) nor config.json "
            "(a Hugging Face directory)"
        )
    model, params = hf.from_pretrained(directory)
    hf_json = _read_json(config_path)
    cfg = _hf_config(model.cfg, directory, overrides)
    model = _model_for(cfg, model, params, directory)
    eos, pad, start = _hf_token_ids(hf_json, config_path)
    max_len, max_len_from = _max_len(cfg, "hf", hf_json, overrides)
    return OpenedModel(
        directory, "hf", cfg, model, params, hf.load_tokenizer(directory), eos, pad, start, max_len, max_len_from
    )
