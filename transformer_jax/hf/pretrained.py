"""The entry points that put it together: `from_pretrained` (a Hugging Face directory -> our Model
and params, placed tensor by tensor on a mesh), `state_dict` and `to_pretrained` (ours -> a
Hugging Face state dict / model.safetensors + config.json). They read the checkpoint through
`weights`, map config.json through `configs` and the tensors through the family's table
(`bert`, `gpt2`, `t5`)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable
from typing import cast

import chex
import numpy as np

from transformer_jax.config import ModelConfig, ParamDtype
from transformer_jax.hf import bert, gpt2, t5
from transformer_jax.hf.common import (
    ARCHITECTURES,
    FAMILY_OF,
    _get_path,
    _hf_shape,
    _read_json,
    _require_local_dir,
    _resize_vocab,
    _set_path,
    _Spec,
    _to_hf,
    _to_ours,
    _vocab_axis,
)
from transformer_jax.hf.configs import _architecture, _default_architecture, config_from_hf, config_to_hf
from transformer_jax.hf.weights import _alternatives, _resolve, _tied_or_equal, _Weights

log = logging.getLogger("transformer_jax.hf")

SPECS: dict[str, Callable[[ModelConfig, str], _Spec]] = {"bert": bert.spec, "gpt2": gpt2.spec, "t5": t5.spec}


# ----------------------------------------------------------------------------- import
def _param_dtype(dtype) -> ParamDtype | None:
    if dtype is None:
        return None
    import jax.numpy as jnp

    name = jnp.dtype(dtype).name
    if name not in ("float32", "bfloat16"):
        raise ValueError(f"dtype: {name} is not supported (float32 or bfloat16)")
    return cast(ParamDtype, name)


def _assert_matches_model(params, abstract, where: str) -> None:
    """chex, at the boundary: `params` holds exactly the abstract model's parameters, each with its
    shape and dtype. A failure names the parameter(s) that differ."""
    import jax

    paths = lambda tree: {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}
    differ = sorted(paths(params) ^ paths(abstract))
    chex.assert_trees_all_equal_structs(
        params,
        abstract,
        custom_message=f"{where}: parameters in only one of the loaded params and the model: "
        f"{', '.join(differ[:8]) or '(none; the containers differ)'}",
    )
    chex.assert_trees_all_equal_shapes_and_dtypes(params, abstract, custom_message=where)


def _read_config(directory: str) -> tuple[ModelConfig, str, _Weights]:
    """(our ModelConfig of config.json, the architecture, the weights) of a local Hugging Face directory.
    Whether the output embedding is tied is read from the weights (GPT-2, T5)."""
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"{directory}: no config.json (is it a Hugging Face model directory?)")
    hf = _read_json(config_path)
    architecture = _architecture(hf, config_path)
    kind = ARCHITECTURES[architecture][0]
    weights = _Weights(directory)
    tie = True
    if kind == "gpt2" and architecture == "GPT2LMHeadModel":
        tie = _tied_or_equal(weights, "lm_head.weight", "transformer.wte.weight", "transformer.")
    elif kind == "t5":
        tie = _tied_or_equal(weights, "lm_head.weight", "shared.weight", "")
    return config_from_hf(hf, architecture, tie_embeddings=tie), architecture, weights


def model_config(local_dir: str | os.PathLike) -> ModelConfig:
    """Our ModelConfig of a local Hugging Face directory, as `from_pretrained` builds it, without
    reading the weights (only which are tied)."""
    return _read_config(_require_local_dir(local_dir))[0]


def from_pretrained(local_dir: str | os.PathLike, *, mesh=None, dtype=None, scan_layers: bool = False):
    """Read a local Hugging Face BERT / GPT-2 / T5 directory: (Model, params).

    model.cfg is our ModelConfig mapped from config.json (architecture -> family and heads).
    With a mesh, every parameter lands directly on its sharding (`sharding.tree_shardings` of
    the model's logical axes): tensors are converted one at a time on the host and each device
    receives only its shard. dtype: the parameters' dtype (float32 or bfloat16; default float32),
    bfloat16 also sets the compute dtype. scan_layers: return the scanned (stacked) layout.
    """
    import jax

    import transformer_jax as tj
    from transformer_jax import sharding as shd

    directory = _require_local_dir(local_dir)
    cfg, architecture, weights = _read_config(directory)
    kind = ARCHITECTURES[architecture][0]
    name = _param_dtype(dtype)
    if name:
        cfg = dataclasses.replace(cfg, param_dtype=name, dtype=name if name == "bfloat16" else cfg.dtype)
    spec = SPECS[kind](cfg, architecture)
    if kind == "bert" and "mlm" in cfg.heads:
        for tied, main in spec.tied.items():
            if not _tied_or_equal(weights, tied, main, spec.prefix):
                raise ValueError(f"{tied}: differs from {main}; an untied BERT MLM decoder is not supported")

    model, abstract = tj.abstract_build(cfg)
    shardings = shd.tree_shardings(model.logical_axes, abstract, mesh) if mesh is not None else None
    params: dict = {}
    for entry in spec.entries:
        key = _resolve(weights, entry.hf, spec.prefix)
        if key is None:
            raise ValueError(f"{entry.hf}: missing from the checkpoint in {directory} (needed by {architecture})")
        vocab_axes = [_vocab_axis(model.logical_axes, p) for p in entry.ours]
        shapes = [tuple(_get_path(abstract, p).shape) for p in entry.ours]
        shapes = [s if a is None else s[:a] + (cfg.vocab_size,) + s[a + 1 :] for s, a in zip(shapes, vocab_axes)]
        want, got = _hf_shape(entry, shapes), weights.shape(key)
        if tuple(got) != tuple(want):
            ours = ", ".join("/".join(map(str, p)) for p in entry.ours)
            raise ValueError(
                f"{key}: shape {tuple(got)} does not match config.json (expected {tuple(want)} for our {ours})"
            )
        array = weights.get(key)
        for path, value, axis in zip(entry.ours, _to_ours(entry, array, shapes), vocab_axes):
            target = _get_path(abstract, path)
            value = _resize_vocab(np.asarray(value).astype(target.dtype), axis, cfg.padded_vocab_size)
            if shardings is None:
                placed = jax.device_put(value)
            else:
                placed = jax.make_array_from_callback(value.shape, _get_path(shardings, path), value.__getitem__)
            _set_path(params, path, placed)
        del array
    # every parameter of the model must have been filled
    filled = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    for path, _ in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        if jax.tree_util.keystr(path) not in filled:
            raise ValueError(f"{jax.tree_util.keystr(path)}: no Hugging Face tensor maps to this parameter")
    _assert_matches_model(params, abstract, f"{directory} ({architecture})")
    used = {_resolve(weights, e.hf, spec.prefix) for e in spec.entries}
    unused = [
        k
        for k in weights.keys()
        if k not in used
        and not any(k.endswith(s) for s in spec.ignored)
        and not any(k in _alternatives(t, spec.prefix) for t in spec.tied)
    ]
    if unused:
        log.info("%s: %d tensors not used by %s (e.g. %s)", directory, len(unused), architecture, unused[0])
    if scan_layers:
        cfg = dataclasses.replace(cfg, scan_layers=True)
        params = tj.scan_params(params)
        model, abstract = tj.abstract_build(cfg)
        if mesh is not None:
            shardings = shd.tree_shardings(model.logical_axes, abstract, mesh)
            params = jax.device_put(params, shardings)
        _assert_matches_model(params, abstract, f"{directory} ({architecture}, scanned)")
    return model, params


# ----------------------------------------------------------------------------- export
def _host(x) -> np.ndarray:
    import jax

    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def state_dict(model, params, architecture: str | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """(Hugging Face state dict as NumPy float32 arrays without the tied copies, config.json dict)."""
    import transformer_jax as tj

    cfg = model.cfg
    architecture = architecture or _default_architecture(cfg)
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture: {architecture!r} is not supported (supported: {', '.join(ARCHITECTURES)})")
    kind, heads = ARCHITECTURES[architecture]
    if FAMILY_OF[kind] != cfg.family:
        raise ValueError(f"architecture: {architecture} needs model.family={FAMILY_OF[kind]}, got {cfg.family}")
    for head in heads:
        if head not in cfg.heads:
            raise ValueError(f"architecture: {architecture} needs the {head} head, which model.heads lacks")
    if architecture in ("BertModel", "BertForPreTraining", "BertForSequenceClassification") and not cfg.pooler:
        raise ValueError(f"model.pooler: {architecture} needs the pooler")
    if architecture == "BertForSequenceClassification" and cfg.classifier_pooling != "first":
        raise ValueError(
            f"model.classifier_pooling: {architecture} classifies the pooled first token, "
            f"this model the {cfg.classifier_pooling} of its states"
        )
    hf_config = config_to_hf(cfg, architecture)
    # the entries of the target architecture only (e.g. GPT2Model drops the LM head, BertModel the heads)
    target = dataclasses.replace(cfg, heads=heads, pooler=architecture != "BertForMaskedLM") if kind == "bert" else cfg
    spec = SPECS[kind](target, architecture)
    if cfg.scan_layers:
        params = tj.unscan_params(params)
    tensors = {}
    for entry in spec.entries:
        try:
            arrays = [
                _resize_vocab(
                    _host(_get_path(params, p)).astype(np.float32), _vocab_axis(model.logical_axes, p), cfg.vocab_size
                )
                for p in entry.ours
            ]
        except (KeyError, TypeError):
            raise ValueError(f"{'/'.join(map(str, entry.ours[0]))}: missing from params") from None
        tensors[entry.hf] = np.ascontiguousarray(_to_hf(entry, arrays))
    return tensors, hf_config


def to_pretrained(
    model, params, out_dir: str | os.PathLike, *, architecture: str | None = None, config_overrides: dict | None = None
) -> str:
    """Write a directory that `transformers` loads: model.safetensors + config.json.

    architecture: the Hugging Face class to write (default from the family and heads:
    BertModel / BertForMaskedLM / BertForPreTraining / BertForSequenceClassification,
    GPT2LMHeadModel, T5ForConditionalGeneration). config_overrides: extra config.json keys
    (e.g. token ids, id2label) laid over the mapped config. Only process 0 writes.
    """
    import jax
    from safetensors.numpy import save_file

    tensors, hf_config = state_dict(model, params, architecture)
    hf_config.update(config_overrides or {})
    out_dir = os.fspath(out_dir)
    if jax.process_index() == 0:
        os.makedirs(out_dir, exist_ok=True)
        save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2, sort_keys=True)
    return out_dir
