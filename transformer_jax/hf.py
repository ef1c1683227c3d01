"""Import and export Hugging Face BERT, GPT-2 and T5 checkpoints: local directories only.

    model, params = from_pretrained("path/to/hf_dir", mesh=mesh)   # our Model and a plain params dict
    to_pretrained(model, params, "path/to/out_dir")               # model.safetensors + config.json
    tokenizer = load_tokenizer("path/to/hf_dir")

Supported architectures: BertModel, BertForMaskedLM, BertForPreTraining,
BertForSequenceClassification, GPT2Model, GPT2LMHeadModel, T5ForConditionalGeneration (T5 v1.0,
v1.1, mT5, Flan-T5 shapes). Weights are read tensor by tensor (safetensors through
`safetensors.numpy`, single or sharded; `pytorch_model.bin` through torch), converted with NumPy
and placed on their sharding one at a time, so no device ever holds a full copy of a sharded
parameter. Vocabulary-sized tensors (token embeddings, an untied LM head, BERT's MLM bias) get
zero rows up to `padded_vocab_size` on import (config.json's vocab_size stays `vocab_size`) and
are cut back to `vocab_size` on export, so a round trip is exact. torch and transformers are optional: nothing here imports them at module level, and
only `pytorch_model.bin` files need torch.

Nothing is ever downloaded: a hub name ("bert-base-uncased") raises a ValueError asking for a
local directory.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import logging
import math
import os
import struct
from typing import Any, Callable, NamedTuple

import numpy as np

from transformer_jax.config import ModelConfig

log = logging.getLogger(__name__)

ARCHITECTURES = {
    "BertModel": ("bert", ()),
    "BertForMaskedLM": ("bert", ("mlm",)),
    "BertForPreTraining": ("bert", ("mlm", "nsp")),
    "BertForSequenceClassification": ("bert", ("classification",)),
    "GPT2Model": ("gpt2", ()),
    "GPT2LMHeadModel": ("gpt2", ()),
    "T5ForConditionalGeneration": ("t5", ()),
}
DEFAULT_ARCHITECTURE = {"bert": "BertModel", "gpt2": "GPT2LMHeadModel", "t5": "T5ForConditionalGeneration"}
FAMILY_OF = {"bert": "encoder", "gpt2": "decoder", "t5": "encoder_decoder"}

# HF activation names (ACT2FN) -> ours, for BERT's hidden_act and GPT-2's activation_function
_ACT_FROM_HF = {"gelu": "gelu", "gelu_python": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                "gelu_fast": "gelu_tanh", "relu": "relu"}
_ACT_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}
# T5's feed_forward_proj -> ours (HF: "gated-gelu" uses gelu_new, the tanh approximation)
_T5_FF_FROM_HF = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gated-gelu": "gated_gelu",
                  "gated-gelu_new": "gated_gelu", "gated-silu": "gated_silu", "gated-swish": "gated_silu"}
_T5_FF_TO_HF = {"relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_new", "gated_gelu": "gated-gelu",
                "gated_silu": "gated-silu"}

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model")


# ----------------------------------------------------------------------------- directory and weights
def _require_local_dir(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(
            f"{path!r} is not a local directory: transformer_jax.hf never downloads. Download the model "
            f"yourself (e.g. `huggingface-cli download {path} --local-dir DIR`) and pass that local directory")
    return path


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


class _SafetensorsFile:
    """One .safetensors file, read lazily tensor by tensor (NumPy; bfloat16 through ml_dtypes)."""

    def __init__(self, path: str):
        from safetensors import safe_open
        self.path = path
        self.handle = safe_open(path, framework="numpy")
        self.names = list(self.handle.keys())

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.handle.get_slice(key).get_shape())

    def get(self, key: str) -> np.ndarray:
        if self.handle.get_slice(key).get_dtype() != "BF16":
            return self.handle.get_tensor(key)
        # NumPy has no bfloat16: read the raw bytes from the header's offsets (ml_dtypes ships with jax)
        import ml_dtypes
        with open(self.path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            info = json.loads(f.read(n))[key]
        begin, end = info["data_offsets"]
        raw = np.memmap(self.path, dtype=np.uint8, mode="r", offset=8 + n + begin, shape=(end - begin,))
        return np.asarray(raw).view(ml_dtypes.bfloat16).reshape(info["shape"])


class _TorchFile:
    """One pytorch_model.bin (needs torch)."""

    def __init__(self, path: str):
        try:
            import torch
        except ImportError:
            raise ValueError(f"{path}: reading pytorch_model.bin needs torch (pip install torch), "
                             "or convert the checkpoint to model.safetensors") from None
        try:
            self.tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # an old (non-zipfile) archive cannot be memory-mapped
            self.tensors = torch.load(path, map_location="cpu", weights_only=True)
        self.names = list(self.tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key].shape)

    def get(self, key: str) -> np.ndarray:
        import torch
        t = self.tensors[key].detach()
        if t.dtype == torch.bfloat16:
            import ml_dtypes
            return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()


class _Weights:
    """All tensors of a checkpoint directory: single file or sharded (`*.index.json`)."""

    def __init__(self, directory: str):
        self.directory = directory
        self.files: dict[str, Any] = {}
        self.where: dict[str, str] = {}
        candidates = [("model.safetensors", None), ("model.safetensors.index.json", "index"),
                      ("pytorch_model.bin", None), ("pytorch_model.bin.index.json", "index")]
        candidates += [(os.path.basename(p), "index") for p in sorted(glob.glob(os.path.join(directory, "*.index.json")))]
        candidates += [(os.path.basename(p), None) for p in sorted(glob.glob(os.path.join(directory, "*.safetensors")))]
        for name, kind in candidates:
            path = os.path.join(directory, name)
            if not os.path.isfile(path):
                continue
            if kind == "index":
                weight_map = _read_json(path).get("weight_map")
                if not isinstance(weight_map, dict):
                    raise ValueError(f"{path}: no weight_map")
                self.where = dict(weight_map)
            else:
                self.where = {k: name for k in self._open(name).names}
            break
        else:
            raise ValueError(f"{directory}: no weights (model.safetensors, pytorch_model.bin, or a sharded "
                             "*.index.json with its shards)")

    def _open(self, name: str):
        if name not in self.files:
            path = os.path.join(self.directory, name)
            if not os.path.isfile(path):
                raise ValueError(f"{self.directory}: shard {name} named in the index is missing")
            self.files[name] = _SafetensorsFile(path) if name.endswith(".safetensors") else _TorchFile(path)
        return self.files[name]

    def keys(self):
        return self.where.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return self._open(self.where[key]).shape(key)

    def get(self, key: str) -> np.ndarray:
        return self._open(self.where[key]).get(key)


# ----------------------------------------------------------------------------- the mapping
class Entry(NamedTuple):
    """One Hugging Face tensor and the parameter(s) of ours it holds.

    kind: 'copy' (same layout), 'linear' (torch Linear weight [out, in]), 'conv' (GPT-2 Conv1D
    weight [in, out]) or 'bias' (flat). `inputs`: how many leading dims of our kernel are its input
    (query [m, h, d]: 1; out [h, d, m]: 2). Several of ours (GPT-2's packed c_attn) are concatenated
    along the HF output axis.
    """
    hf: str
    ours: tuple[tuple, ...]
    kind: str = "copy"
    inputs: int = 1


def _hf_shape(entry: Entry, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    if entry.kind == "copy":
        return shapes[0]
    ins = math.prod(shapes[0][:entry.inputs])
    outs = sum(math.prod(s[entry.inputs:]) for s in shapes) if entry.kind != "bias" else sum(math.prod(s) for s in shapes)
    return {"linear": (outs, ins), "conv": (ins, outs), "bias": (outs,)}[entry.kind]


def _to_ours(entry: Entry, array: np.ndarray, shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    if entry.kind == "copy":
        return [array]
    axis = 1 if entry.kind == "conv" else 0
    sizes = [math.prod(s[entry.inputs:]) if entry.kind != "bias" else math.prod(s) for s in shapes]
    parts = np.split(array, np.cumsum(sizes)[:-1], axis=axis)
    out = []
    for part, shape in zip(parts, shapes):
        part = part.T if entry.kind == "linear" else part
        out.append(np.ascontiguousarray(part).reshape(shape))
    return out


def _to_hf(entry: Entry, arrays: list[np.ndarray]) -> np.ndarray:
    if entry.kind == "copy":
        return arrays[0]
    if entry.kind == "bias":
        return np.concatenate([a.reshape(-1) for a in arrays])
    flat = [a.reshape(math.prod(a.shape[:entry.inputs]), -1) for a in arrays]
    joined = np.concatenate(flat, axis=1)
    return np.ascontiguousarray(joined.T if entry.kind == "linear" else joined)


@dataclasses.dataclass
class _Spec:
    entries: list[Entry]
    tied: dict[str, str]          # HF key -> the HF key it must equal (written by neither side)
    ignored: tuple[str, ...] = ()  # HF key suffixes that carry no weights (buffers)
    prefix: str = ""               # the base-model prefix ('bert.', 'transformer.') the heads sit beside


def _norm(hf: str, ours: tuple, bias: bool = True) -> list[Entry]:
    out = [Entry(f"{hf}.weight", (ours + ("scale",),))]
    return out + [Entry(f"{hf}.bias", (ours + ("bias",),), "bias")] if bias else out


def _dense(hf: str, ours: tuple, inputs: int = 1, bias: bool = True, kind: str = "linear") -> list[Entry]:
    out = [Entry(f"{hf}.weight", (ours + ("kernel",),), kind, inputs)]
    return out + [Entry(f"{hf}.bias", (ours + ("bias",),), "bias")] if bias else out


def _bert_spec(cfg: ModelConfig, architecture: str) -> _Spec:
    pre = "" if architecture == "BertModel" else "bert."
    e = [Entry(f"{pre}embeddings.word_embeddings.weight", (("embed", "token", "embedding"),)),
         Entry(f"{pre}embeddings.position_embeddings.weight", (("embed", "position", "embedding"),)),
         Entry(f"{pre}embeddings.token_type_embeddings.weight", (("embed", "token_type", "embedding"),))]
    e += _norm(f"{pre}embeddings.LayerNorm", ("embed", "norm"))
    for i in range(cfg.num_layers):
        hf, ours = f"{pre}encoder.layer.{i}.", ("encoder", "layers", i)
        for name in ("query", "key", "value"):
            e += _dense(f"{hf}attention.self.{name}", ours + ("attention", name))
        e += _dense(f"{hf}attention.output.dense", ours + ("attention", "out"), inputs=2)
        e += _norm(f"{hf}attention.output.LayerNorm", ours + ("attention_norm",))
        e += _dense(f"{hf}intermediate.dense", ours + ("mlp", "wi"))
        e += _dense(f"{hf}output.dense", ours + ("mlp", "wo"))
        e += _norm(f"{hf}output.LayerNorm", ours + ("mlp_norm",))
    if cfg.pooler:
        e += _dense(f"{pre}pooler.dense", ("pooler", "dense"))
    tied = {}
    if "mlm" in cfg.heads:
        e += _dense("cls.predictions.transform.dense", ("mlm", "transform"))
        e += _norm("cls.predictions.transform.LayerNorm", ("mlm", "norm"))
        e += [Entry("cls.predictions.bias", (("mlm", "bias"),), "bias")]
        tied = {"cls.predictions.decoder.weight": f"{pre}embeddings.word_embeddings.weight",
                "cls.predictions.decoder.bias": "cls.predictions.bias"}
    if "nsp" in cfg.heads:
        e += _dense("cls.seq_relationship", ("nsp",))
    if "classification" in cfg.heads:
        e += _dense("classifier", ("classifier",))
    return _Spec(e, tied, ("position_ids",), "bert.")


def _gpt2_spec(cfg: ModelConfig, architecture: str) -> _Spec:
    pre = "transformer." if architecture == "GPT2LMHeadModel" else ""
    e = [Entry(f"{pre}wte.weight", (("embed", "token", "embedding"),)),
         Entry(f"{pre}wpe.weight", (("embed", "position", "embedding"),))]
    for i in range(cfg.num_layers):
        hf, ours = f"{pre}h.{i}.", ("decoder", "layers", i)
        qkv = tuple(ours + ("attention", n) for n in ("query", "key", "value"))
        e += [Entry(f"{hf}attn.c_attn.weight", tuple(p + ("kernel",) for p in qkv), "conv", 1),
              Entry(f"{hf}attn.c_attn.bias", tuple(p + ("bias",) for p in qkv), "bias")]
        e += _dense(f"{hf}attn.c_proj", ours + ("attention", "out"), inputs=2, kind="conv")
        e += _norm(f"{hf}ln_1", ours + ("attention_norm",))
        e += _dense(f"{hf}mlp.c_fc", ours + ("mlp", "wi"), kind="conv")
        e += _dense(f"{hf}mlp.c_proj", ours + ("mlp", "wo"), kind="conv")
        e += _norm(f"{hf}ln_2", ours + ("mlp_norm",))
    e += _norm(f"{pre}ln_f", ("decoder", "final_norm"))
    tied = {}
    if architecture == "GPT2LMHeadModel":
        if cfg.tie_embeddings:
            tied = {"lm_head.weight": f"{pre}wte.weight"}
        else:
            e += _dense("lm_head", ("lm_head",), bias=False)
    return _Spec(e, tied, (".attn.bias", ".attn.masked_bias"), "transformer.")


def _t5_spec(cfg: ModelConfig, architecture: str) -> _Spec:
    e = [Entry("shared.weight", (("embed", "token", "embedding"),))]
    gated = cfg.activation.startswith("gated")
    for stack, n in (("encoder", cfg.num_layers), ("decoder", cfg.resolved_decoder_layers)):
        e += [Entry(f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                    ((stack, "relative_bias", "embedding"),))]
        for i in range(n):
            hf, ours = f"{stack}.block.{i}.layer.", (stack, "layers", i)
            parts = [("SelfAttention", "attention")]
            if stack == "decoder":
                parts.append(("EncDecAttention", "cross_attention"))
            for j, (hf_name, name) in enumerate(parts):
                for hf_proj, proj in (("q", "query"), ("k", "key"), ("v", "value"), ("o", "out")):
                    e += _dense(f"{hf}{j}.{hf_name}.{hf_proj}", ours + (name, proj), bias=False,
                                inputs=2 if proj == "out" else 1)
                e += _norm(f"{hf}{j}.layer_norm", ours + (f"{name}_norm",), bias=False)
            j = len(parts)
            if gated:
                e += _dense(f"{hf}{j}.DenseReluDense.wi_0", ours + ("mlp", "wi"), bias=False)
                e += _dense(f"{hf}{j}.DenseReluDense.wi_1", ours + ("mlp", "wi_gate"), bias=False)
            else:
                e += _dense(f"{hf}{j}.DenseReluDense.wi", ours + ("mlp", "wi"), bias=False)
            e += _dense(f"{hf}{j}.DenseReluDense.wo", ours + ("mlp", "wo"), bias=False)
            e += _norm(f"{hf}{j}.layer_norm", ours + ("mlp_norm",), bias=False)
        e += _norm(f"{stack}.final_layer_norm", (stack, "final_norm"), bias=False)
    tied = {"encoder.embed_tokens.weight": "shared.weight", "decoder.embed_tokens.weight": "shared.weight"}
    if cfg.tie_embeddings:
        tied["lm_head.weight"] = "shared.weight"
    else:
        e += _dense("lm_head", ("lm_head",), bias=False)
    return _Spec(e, tied, ("EncDecAttention.relative_attention_bias.weight",), "")


SPECS: dict[str, Callable[[ModelConfig, str], _Spec]] = {"bert": _bert_spec, "gpt2": _gpt2_spec, "t5": _t5_spec}


# ----------------------------------------------------------------------------- configs
def _architecture(hf: dict, where: str) -> str:
    archs = hf.get("architectures") or []
    if not archs:
        by_type = {"bert": "BertModel", "gpt2": "GPT2LMHeadModel", "t5": "T5ForConditionalGeneration",
                   "mt5": "T5ForConditionalGeneration"}
        if hf.get("model_type") not in by_type:
            raise ValueError(f"{where}: unsupported model_type {hf.get('model_type')!r} (supported: bert, gpt2, t5)")
        return by_type[hf["model_type"]]
    arch = archs[0]
    if arch == "MT5ForConditionalGeneration":
        arch = "T5ForConditionalGeneration"
    if arch not in ARCHITECTURES:
        raise ValueError(f"{where}: unsupported architecture {arch!r} (supported: {', '.join(ARCHITECTURES)})")
    return arch


def _num_labels(hf: dict) -> int:
    if "id2label" in hf and hf["id2label"]:
        return len(hf["id2label"])
    return int(hf.get("num_labels", 2))


def _act(value: str, key: str, table: dict) -> str:
    if value not in table:
        raise ValueError(f"config.json: {key}={value!r} is not supported (supported: {', '.join(table)})")
    return table[value]


def _unsupported(hf: dict, key: str, bad: Callable[[Any], bool]) -> None:
    if key in hf and bad(hf[key]):
        raise ValueError(f"config.json: {key}={hf[key]!r} is not supported")


def config_from_hf(hf: dict, architecture: str, *, tie_embeddings: bool = True) -> ModelConfig:
    """Our ModelConfig for a Hugging Face config.json dict and architecture name."""
    kind, heads = ARCHITECTURES[architecture]
    if kind == "bert":
        _unsupported(hf, "position_embedding_type", lambda v: v not in (None, "absolute"))
        _unsupported(hf, "is_decoder", bool)
        _unsupported(hf, "add_cross_attention", bool)
        return ModelConfig(
            family="encoder", vocab_size=hf["vocab_size"], model_dim=hf["hidden_size"],
            num_heads=hf["num_attention_heads"], mlp_dim=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
            max_len=hf["max_position_embeddings"], type_vocab_size=hf.get("type_vocab_size", 2), norm="layernorm",
            norm_position="post", norm_eps=float(hf.get("layer_norm_eps", 1e-12)), embed_norm=True, position="learned",
            activation=_act(hf.get("hidden_act", "gelu"), "hidden_act", _ACT_FROM_HF), use_bias=True, tie_embeddings=True,
            pooler=architecture != "BertForMaskedLM", heads=heads, num_labels=_num_labels(hf),
            dropout_rate=float(hf.get("hidden_dropout_prob", 0.1)),
            attention_dropout_rate=float(hf.get("attention_probs_dropout_prob", 0.1)),
            init_std=float(hf.get("initializer_range", 0.02)))
    if kind == "gpt2":
        _unsupported(hf, "scale_attn_by_inverse_layer_idx", bool)
        _unsupported(hf, "scale_attn_weights", lambda v: v is False)
        _unsupported(hf, "add_cross_attention", bool)
        d = hf.get("n_embd", 768)
        return ModelConfig(
            family="decoder", vocab_size=hf["vocab_size"], model_dim=d, num_heads=hf.get("n_head", 12),
            mlp_dim=hf.get("n_inner") or 4 * d, num_layers=hf.get("n_layer", 12), max_len=hf.get("n_positions", 1024),
            norm="layernorm", norm_position="pre", norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
            position="learned", activation=_act(hf.get("activation_function", "gelu_new"), "activation_function",
                                                _ACT_FROM_HF),
            use_bias=True, tie_embeddings=tie_embeddings, dropout_rate=float(hf.get("resid_pdrop", 0.1)),
            attention_dropout_rate=float(hf.get("attn_pdrop", 0.1)), init_std=float(hf.get("initializer_range", 0.02)))
    # T5: HF >= 5 writes scale_decoder_outputs; older configs say tie_word_embeddings (False for v1.1)
    scale = hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True))
    if hf.get("model_type") == "mt5":  # mT5 never scales (its checkpoints say tie_word_embeddings=false)
        scale = False
    if scale and not tie_embeddings:
        raise ValueError("lm_head.weight: an untied T5 output layer with scaled decoder outputs "
                         "(scale_decoder_outputs=true) is not supported")
    ff = hf.get("feed_forward_proj", "relu")
    return ModelConfig(
        family="encoder_decoder", vocab_size=hf["vocab_size"], model_dim=hf["d_model"], num_heads=hf["num_heads"],
        head_dim=hf.get("d_kv", 64), mlp_dim=hf["d_ff"], num_layers=hf["num_layers"],
        num_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"], norm="rmsnorm", norm_position="pre",
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-6)), position="relative",
        relative_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_max_distance=hf.get("relative_attention_max_distance", 128),
        activation=_act(ff, "feed_forward_proj", _T5_FF_FROM_HF), use_bias=False, tie_embeddings=tie_embeddings,
        tied_logits_scale=bool(scale) and tie_embeddings, scale_attention=False,
        dropout_rate=float(hf.get("dropout_rate", 0.1)))


def _default_architecture(cfg: ModelConfig) -> str:
    if cfg.family == "decoder":
        return "GPT2LMHeadModel"
    if cfg.family == "encoder_decoder":
        return "T5ForConditionalGeneration"
    for arch in ("BertForPreTraining", "BertForMaskedLM", "BertForSequenceClassification"):
        if set(cfg.heads) == set(ARCHITECTURES[arch][1]):
            return arch
    if not cfg.heads:
        return "BertModel"
    raise ValueError(f"model.heads: {', '.join(cfg.heads)} has no Hugging Face BERT architecture "
                     "(supported heads: mlm; mlm, nsp; classification)")


def _check_exportable(cfg: ModelConfig, kind: str) -> None:
    want = {
        "bert": dict(family="encoder", norm="layernorm", norm_position="post", embed_norm=True, position="learned",
                     use_bias=True, scale_attention=True, embed_scale=False),
        "gpt2": dict(family="decoder", norm="layernorm", norm_position="pre", embed_norm=False, position="learned",
                     use_bias=True, scale_attention=True, embed_scale=False, type_vocab_size=0),
        "t5": dict(family="encoder_decoder", norm="rmsnorm", norm_position="pre", embed_norm=False, position="relative",
                   use_bias=False, scale_attention=False, embed_scale=False),
    }[kind]
    for key, value in want.items():
        if getattr(cfg, key) != value:
            raise ValueError(f"model.{key}: {getattr(cfg, key)!r} cannot be exported as {kind} (needs {value!r})")
    if cfg.resolved_kv_heads != cfg.num_heads:
        raise ValueError(f"model.num_kv_heads: {cfg.num_kv_heads} cannot be exported as {kind} (needs num_heads)")
    if kind != "t5" and cfg.resolved_head_dim * cfg.num_heads != cfg.model_dim:
        raise ValueError(f"model.head_dim: {cfg.head_dim} cannot be exported as {kind} (needs model_dim / num_heads)")
    if kind == "bert" and not cfg.type_vocab_size:
        raise ValueError("model.type_vocab_size: 0 cannot be exported as bert (needs token type embeddings)")
    if kind == "t5" and cfg.tied_logits_scale and not cfg.tie_embeddings:
        raise ValueError("model.tied_logits_scale: true with tie_embeddings false cannot be exported as t5")


def config_to_hf(cfg: ModelConfig, architecture: str) -> dict:
    """A Hugging Face config.json dict for our ModelConfig."""
    kind = ARCHITECTURES[architecture][0]
    _check_exportable(cfg, kind)
    common = {"architectures": [architecture], "model_type": kind, "dtype": "float32"}
    if kind == "bert":
        out = dict(common, vocab_size=cfg.vocab_size, hidden_size=cfg.model_dim, num_hidden_layers=cfg.num_layers,
                   num_attention_heads=cfg.num_heads, intermediate_size=cfg.mlp_dim,
                   hidden_act=_act(cfg.activation, "model.activation", _ACT_TO_HF),
                   hidden_dropout_prob=cfg.dropout_rate, attention_probs_dropout_prob=cfg.attention_dropout_rate,
                   max_position_embeddings=cfg.max_len, type_vocab_size=cfg.type_vocab_size,
                   initializer_range=cfg.init_std, layer_norm_eps=cfg.norm_eps, position_embedding_type="absolute",
                   pad_token_id=0, tie_word_embeddings=True)
        if architecture == "BertForSequenceClassification":
            out["id2label"] = {str(i): f"LABEL_{i}" for i in range(cfg.num_labels)}
            out["label2id"] = {f"LABEL_{i}": i for i in range(cfg.num_labels)}
        return out
    if kind == "gpt2":
        token = 50256 if cfg.vocab_size > 50256 else cfg.vocab_size - 1
        return dict(common, vocab_size=cfg.vocab_size, n_positions=cfg.max_len, n_embd=cfg.model_dim,
                    n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=cfg.mlp_dim,
                    activation_function=_act(cfg.activation, "model.activation", _ACT_TO_HF),
                    resid_pdrop=cfg.dropout_rate, embd_pdrop=cfg.dropout_rate, attn_pdrop=cfg.attention_dropout_rate,
                    layer_norm_epsilon=cfg.norm_eps, initializer_range=cfg.init_std, scale_attn_weights=True,
                    scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False,
                    bos_token_id=token, eos_token_id=token, tie_word_embeddings=cfg.tie_embeddings)
    return dict(common, vocab_size=cfg.vocab_size, d_model=cfg.model_dim, d_kv=cfg.resolved_head_dim,
                d_ff=cfg.mlp_dim, num_layers=cfg.num_layers, num_decoder_layers=cfg.resolved_decoder_layers,
                num_heads=cfg.num_heads, relative_attention_num_buckets=cfg.relative_buckets,
                relative_attention_max_distance=cfg.relative_max_distance, dropout_rate=cfg.dropout_rate,
                layer_norm_epsilon=cfg.norm_eps, initializer_factor=1.0,
                feed_forward_proj=_act(cfg.activation, "model.activation", _T5_FF_TO_HF), is_encoder_decoder=True,
                pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                tie_word_embeddings=cfg.tie_embeddings, scale_decoder_outputs=cfg.tied_logits_scale)


# ----------------------------------------------------------------------------- import
def _alternatives(key: str, prefix: str) -> list[str]:
    """Names a tensor may have in checkpoints written by other heads or older versions."""
    names = [key]
    if prefix and key.startswith(prefix):
        names.append(key[len(prefix):])
    elif prefix:
        names.append(prefix + key)
    legacy = []
    for n in names:
        if ".LayerNorm.weight" in n or n.endswith("LayerNorm.weight"):
            legacy.append(n[:-len("weight")] + "gamma")
        if n.endswith("LayerNorm.bias"):
            legacy.append(n[:-len("bias")] + "beta")
    return names + legacy


def _get_path(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _set_path(tree, path, value):
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _vocab_axis(logical_axes, path) -> int | None:
    """Which dimension of our parameter at `path` is the vocabulary (None: none). Ours are padded
    to `padded_vocab_size` rows / columns; Hugging Face tensors hold exactly `vocab_size`."""
    try:
        axes = _get_path(logical_axes, path)
    except (KeyError, IndexError, TypeError):  # e.g. a layer path in a scanned model's axes: no vocab there
        return None
    return axes.index("vocab") if isinstance(axes, tuple) and "vocab" in axes else None


def _resize_vocab(array: np.ndarray, axis: int | None, size: int) -> np.ndarray:
    """`array` with its vocabulary dimension cut, or padded with zeros, to `size`."""
    if axis is None or array.shape[axis] == size:
        return array
    if array.shape[axis] > size:
        return array[(slice(None),) * axis + (slice(0, size),)]
    pad = [(0, 0)] * array.ndim
    pad[axis] = (0, size - array.shape[axis])
    return np.pad(array, pad)


def _resolve(weights: _Weights, key: str, prefix: str) -> str | None:
    keys = weights.keys()
    return next((k for k in _alternatives(key, prefix) if k in keys), None)


def _tied_or_equal(weights: _Weights, key: str, main: str, prefix: str) -> bool:
    """True when `key` is absent (tied: not written) or holds the same values as `main`."""
    found, found_main = _resolve(weights, key, prefix), _resolve(weights, main, prefix)
    if found is None or found_main is None:
        return True
    if weights.shape(found) != weights.shape(found_main):
        return False
    return bool(np.array_equal(weights.get(found), weights.get(found_main)))


def _param_dtype(dtype) -> str | None:
    if dtype is None:
        return None
    import jax.numpy as jnp
    name = jnp.dtype(dtype).name
    if name not in ("float32", "bfloat16"):
        raise ValueError(f"dtype: {name} is not supported (float32 or bfloat16)")
    return name


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
    cfg = config_from_hf(hf, architecture, tie_embeddings=tie)
    name = _param_dtype(dtype)
    if name:
        cfg = dataclasses.replace(cfg, param_dtype=name, dtype=name if name == "bfloat16" else cfg.dtype)
    spec = SPECS[kind](cfg, architecture)
    if kind == "bert" and "mlm" in cfg.heads:
        for key, main in spec.tied.items():
            if not _tied_or_equal(weights, key, main, spec.prefix):
                raise ValueError(f"{key}: differs from {main}; an untied BERT MLM decoder is not supported")

    model, abstract = tj.abstract_build(cfg)
    shardings = shd.tree_shardings(model.logical_axes, abstract, mesh) if mesh is not None else None
    params: dict = {}
    for entry in spec.entries:
        key = _resolve(weights, entry.hf, spec.prefix)
        if key is None:
            raise ValueError(f"{entry.hf}: missing from the checkpoint in {directory} "
                             f"(needed by {architecture})")
        vocab_axes = [_vocab_axis(model.logical_axes, p) for p in entry.ours]
        shapes = [tuple(_get_path(abstract, p).shape) for p in entry.ours]
        shapes = [s if a is None else s[:a] + (cfg.vocab_size,) + s[a + 1:] for s, a in zip(shapes, vocab_axes)]
        want, got = _hf_shape(entry, shapes), weights.shape(key)
        if tuple(got) != tuple(want):
            ours = ", ".join("/".join(map(str, p)) for p in entry.ours)
            raise ValueError(f"{key}: shape {tuple(got)} does not match config.json (expected {tuple(want)} "
                             f"for our {ours})")
        array = weights.get(key)
        for path, value, axis in zip(entry.ours, _to_ours(entry, array, shapes), vocab_axes):
            target = _get_path(abstract, path)
            value = _resize_vocab(np.asarray(value).astype(target.dtype), axis, cfg.padded_vocab_size)
            if shardings is None:
                placed = jax.device_put(value)
            else:
                placed = jax.make_array_from_callback(value.shape, _get_path(shardings, path),
                                                      lambda index, v=value: v[index])
            _set_path(params, path, placed)
        del array
    # every parameter of the model must have been filled
    filled = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    for path, _ in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        if jax.tree_util.keystr(path) not in filled:
            raise ValueError(f"{jax.tree_util.keystr(path)}: no Hugging Face tensor maps to this parameter")
    used = {_resolve(weights, e.hf, spec.prefix) for e in spec.entries}
    unused = [k for k in weights.keys() if k not in used and not any(k.endswith(s) for s in spec.ignored)
              and not any(k in _alternatives(t, spec.prefix) for t in spec.tied)]
    if unused:
        log.info("%s: %d tensors not used by %s (e.g. %s)", directory, len(unused), architecture, unused[0])
    if scan_layers:
        cfg = dataclasses.replace(cfg, scan_layers=True)
        params = tj.scan_params(params)
        model, abstract = tj.abstract_build(cfg)
        if mesh is not None:
            shardings = shd.tree_shardings(model.logical_axes, abstract, mesh)
            params = jax.device_put(params, shardings)
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
        raise ValueError(f"model.classifier_pooling: {architecture} classifies the pooled first token, "
                         f"this model the {cfg.classifier_pooling} of its states")
    hf_config = config_to_hf(cfg, architecture)
    # the entries of the target architecture only (e.g. GPT2Model drops the LM head, BertModel the heads)
    target = dataclasses.replace(cfg, heads=heads, pooler=architecture != "BertForMaskedLM") if kind == "bert" else cfg
    spec = SPECS[kind](target, architecture)
    if cfg.scan_layers:
        params = tj.unscan_params(params)
    tensors = {}
    for entry in spec.entries:
        try:
            arrays = [_resize_vocab(_host(_get_path(params, p)).astype(np.float32),
                                    _vocab_axis(model.logical_axes, p), cfg.vocab_size) for p in entry.ours]
        except (KeyError, TypeError):
            raise ValueError(f"{'/'.join(map(str, entry.ours[0]))}: missing from params") from None
        tensors[entry.hf] = np.ascontiguousarray(_to_hf(entry, arrays))
    return tensors, hf_config


def to_pretrained(model, params, out_dir: str | os.PathLike, *, architecture: str | None = None,
                  config_overrides: dict | None = None) -> str:
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


# ----------------------------------------------------------------------------- tokenizers
class HFTokenizer:
    """A Hugging Face tokenizer behind our Tokenizer's small interface: encode / decode / vocab_size.

    `backend` is the underlying `tokenizers.Tokenizer` (or SentencePieceProcessor for spiece.model).
    encode adds no special tokens.
    """

    def __init__(self, backend, kind: str, path: str):
        self.backend, self.kind, self.path = backend, kind, path

    @property
    def vocab_size(self) -> int:
        if self.kind == "sentencepiece":
            return self.backend.get_piece_size()
        return self.backend.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        if self.kind == "sentencepiece":
            return self.backend.encode(text)
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        return self.backend.decode(ids)

    def token_to_id(self, token: str) -> int | None:
        if self.kind == "sentencepiece":
            i = self.backend.piece_to_id(token)
            return None if i == self.backend.unk_id() and token != self.backend.id_to_piece(i) else i
        return self.backend.token_to_id(token)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, {self.kind}, vocab_size={self.vocab_size})"


def load_tokenizer(local_dir: str | os.PathLike) -> HFTokenizer:
    """The tokenizer of a local Hugging Face directory: tokenizer.json, else vocab.txt (BERT
    WordPiece), vocab.json + merges.txt (GPT-2 byte-level BPE), or spiece.model (T5 SentencePiece)."""
    directory = _require_local_dir(local_dir)
    path = lambda name: os.path.join(directory, name)
    settings = _read_json(path("tokenizer_config.json")) if os.path.isfile(path("tokenizer_config.json")) else {}
    if os.path.isfile(path("tokenizer.json")):
        from tokenizers import Tokenizer
        return HFTokenizer(Tokenizer.from_file(path("tokenizer.json")), "tokenizers", path("tokenizer.json"))
    if os.path.isfile(path("vocab.txt")):
        from tokenizers import BertWordPieceTokenizer
        tok = BertWordPieceTokenizer(path("vocab.txt"), lowercase=bool(settings.get("do_lower_case", True)))
        return HFTokenizer(tok, "wordpiece", path("vocab.txt"))
    if os.path.isfile(path("vocab.json")) and os.path.isfile(path("merges.txt")):
        from tokenizers import ByteLevelBPETokenizer
        tok = ByteLevelBPETokenizer(path("vocab.json"), path("merges.txt"))
        return HFTokenizer(tok, "bpe", path("vocab.json"))
    for name in ("spiece.model", "sentencepiece.bpe.model"):
        if os.path.isfile(path(name)):
            import sentencepiece as spm
            return HFTokenizer(spm.SentencePieceProcessor(model_file=path(name)), "sentencepiece", path(name))
    raise ValueError(f"{directory}: no tokenizer (tokenizer.json, vocab.txt, vocab.json + merges.txt, or spiece.model)")
