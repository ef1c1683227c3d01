"""Config translation: a Hugging Face config.json dict <-> our ModelConfig (`config_from_hf`,
`config_to_hf`), the architecture a config.json names or a ModelConfig exports as, and the checks
that a model can be written as BERT / GPT-2 / T5 at all."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from transformer_jax.config import Activation, ModelConfig
from transformer_jax.hf.common import ARCHITECTURES

# HF activation names (ACT2FN) -> ours, for BERT's hidden_act and GPT-2's activation_function
_ACT_FROM_HF: dict[str, Activation] = {
    "gelu": "gelu",
    "gelu_python": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "relu": "relu",
}
_ACT_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}
# T5's feed_forward_proj -> ours (HF: "gated-gelu" uses gelu_new, the tanh approximation)
_T5_FF_FROM_HF: dict[str, Activation] = {
    "relu": "relu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gated-gelu": "gated_gelu",
    "gated-gelu_new": "gated_gelu",
    "gated-silu": "gated_silu",
    "gated-swish": "gated_silu",
}
_T5_FF_TO_HF = {
    "relu": "relu",
    "gelu": "gelu",
    "gelu_tanh": "gelu_new",
    "gated_gelu": "gated-gelu",
    "gated_silu": "gated-silu",
}


def _architecture(hf: dict, where: str) -> str:
    archs = hf.get("architectures") or []
    if not archs:
        by_type = {
            "bert": "BertModel",
            "gpt2": "GPT2LMHeadModel",
            "t5": "T5ForConditionalGeneration",
            "mt5": "T5ForConditionalGeneration",
        }
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


_T = TypeVar("_T")


def _act(value: str, key: str, table: dict[str, _T]) -> _T:
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
            family="encoder",
            vocab_size=hf["vocab_size"],
            model_dim=hf["hidden_size"],
            num_heads=hf["num_attention_heads"],
            mlp_dim=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            max_len=hf["max_position_embeddings"],
            type_vocab_size=hf.get("type_vocab_size", 2),
            norm="layernorm",
            norm_position="post",
            norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
            embed_norm=True,
            position="learned",
            activation=_act(hf.get("hidden_act", "gelu"), "hidden_act", _ACT_FROM_HF),
            use_bias=True,
            tie_embeddings=True,
            pooler=architecture != "BertForMaskedLM",
            heads=heads,
            num_labels=_num_labels(hf),
            dropout_rate=float(hf.get("hidden_dropout_prob", 0.1)),
            attention_dropout_rate=float(hf.get("attention_probs_dropout_prob", 0.1)),
            init_std=float(hf.get("initializer_range", 0.02)),
        )
    if kind == "gpt2":
        _unsupported(hf, "scale_attn_by_inverse_layer_idx", bool)
        _unsupported(hf, "scale_attn_weights", lambda v: v is False)
        _unsupported(hf, "add_cross_attention", bool)
        d = hf.get("n_embd", 768)
        return ModelConfig(
            family="decoder",
            vocab_size=hf["vocab_size"],
            model_dim=d,
            num_heads=hf.get("n_head", 12),
            mlp_dim=hf.get("n_inner") or 4 * d,
            num_layers=hf.get("n_layer", 12),
            max_len=hf.get("n_positions", 1024),
            norm="layernorm",
            norm_position="pre",
            norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
            position="learned",
            activation=_act(hf.get("activation_function", "gelu_new"), "activation_function", _ACT_FROM_HF),
            use_bias=True,
            tie_embeddings=tie_embeddings,
            dropout_rate=float(hf.get("resid_pdrop", 0.1)),
            attention_dropout_rate=float(hf.get("attn_pdrop", 0.1)),
            init_std=float(hf.get("initializer_range", 0.02)),
        )
    # T5: HF >= 5 writes scale_decoder_outputs; older configs say tie_word_embeddings (False for v1.1)
    scale = hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True))
    if hf.get("model_type") == "mt5":  # mT5 never scales (its checkpoints say tie_word_embeddings=false)
        scale = False
    if scale and not tie_embeddings:
        raise ValueError(
            "lm_head.weight: an untied T5 output layer with scaled decoder outputs "
            "(scale_decoder_outputs=true) is not supported"
        )
    ff = hf.get("feed_forward_proj", "relu")
    return ModelConfig(
        family="encoder_decoder",
        vocab_size=hf["vocab_size"],
        model_dim=hf["d_model"],
        num_heads=hf["num_heads"],
        head_dim=hf.get("d_kv", 64),
        mlp_dim=hf["d_ff"],
        num_layers=hf["num_layers"],
        num_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"],
        norm="rmsnorm",
        norm_position="pre",
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-6)),
        position="relative",
        relative_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_max_distance=hf.get("relative_attention_max_distance", 128),
        activation=_act(ff, "feed_forward_proj", _T5_FF_FROM_HF),
        use_bias=False,
        tie_embeddings=tie_embeddings,
        tied_logits_scale=bool(scale) and tie_embeddings,
        scale_attention=False,
        dropout_rate=float(hf.get("dropout_rate", 0.1)),
    )


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
    raise ValueError(
        f"model.heads: {', '.join(cfg.heads)} has no Hugging Face BERT architecture "
        "(supported heads: mlm; mlm, nsp; classification)"
    )


def _check_exportable(cfg: ModelConfig, kind: str) -> None:
    want = {
        "bert": dict(
            family="encoder",
            norm="layernorm",
            norm_position="post",
            embed_norm=True,
            position="learned",
            use_bias=True,
            scale_attention=True,
            embed_scale=False,
        ),
        "gpt2": dict(
            family="decoder",
            norm="layernorm",
            norm_position="pre",
            embed_norm=False,
            position="learned",
            use_bias=True,
            scale_attention=True,
            embed_scale=False,
            type_vocab_size=0,
        ),
        "t5": dict(
            family="encoder_decoder",
            norm="rmsnorm",
            norm_position="pre",
            embed_norm=False,
            position="relative",
            use_bias=False,
            scale_attention=False,
            embed_scale=False,
        ),
    }[kind]
    for key, value in want.items():
        if getattr(cfg, key) != value:
            raise ValueError(f"model.{key}: {getattr(cfg, key)!r} cannot be exported as {kind} (needs {value!r})")
    if cfg.local_window_size:
        raise ValueError(
            f"model.local_window_size: {cfg.local_window_size} (banded attention) cannot be exported as "
            f"{kind}, whose attention is dense (needs 0)"
        )
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
        out = dict(
            common,
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.model_dim,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            intermediate_size=cfg.mlp_dim,
            hidden_act=_act(cfg.activation, "model.activation", _ACT_TO_HF),
            hidden_dropout_prob=cfg.dropout_rate,
            attention_probs_dropout_prob=cfg.attention_dropout_rate,
            max_position_embeddings=cfg.max_len,
            type_vocab_size=cfg.type_vocab_size,
            initializer_range=cfg.init_std,
            layer_norm_eps=cfg.norm_eps,
            position_embedding_type="absolute",
            pad_token_id=0,
            tie_word_embeddings=True,
        )
        if architecture == "BertForSequenceClassification":
            out["id2label"] = {str(i): f"LABEL_{i}" for i in range(cfg.num_labels)}
            out["label2id"] = {f"LABEL_{i}": i for i in range(cfg.num_labels)}
        return out
    if kind == "gpt2":
        token = 50256 if cfg.vocab_size > 50256 else cfg.vocab_size - 1
        return dict(
            common,
            vocab_size=cfg.vocab_size,
            n_positions=cfg.max_len,
            n_embd=cfg.model_dim,
            n_layer=cfg.num_layers,
            n_head=cfg.num_heads,
            n_inner=cfg.mlp_dim,
            activation_function=_act(cfg.activation, "model.activation", _ACT_TO_HF),
            resid_pdrop=cfg.dropout_rate,
            embd_pdrop=cfg.dropout_rate,
            attn_pdrop=cfg.attention_dropout_rate,
            layer_norm_epsilon=cfg.norm_eps,
            initializer_range=cfg.init_std,
            scale_attn_weights=True,
            scale_attn_by_inverse_layer_idx=False,
            reorder_and_upcast_attn=False,
            bos_token_id=token,
            eos_token_id=token,
            tie_word_embeddings=cfg.tie_embeddings,
        )
    return dict(
        common,
        vocab_size=cfg.vocab_size,
        d_model=cfg.model_dim,
        d_kv=cfg.resolved_head_dim,
        d_ff=cfg.mlp_dim,
        num_layers=cfg.num_layers,
        num_decoder_layers=cfg.resolved_decoder_layers,
        num_heads=cfg.num_heads,
        relative_attention_num_buckets=cfg.relative_buckets,
        relative_attention_max_distance=cfg.relative_max_distance,
        dropout_rate=cfg.dropout_rate,
        layer_norm_epsilon=cfg.norm_eps,
        initializer_factor=1.0,
        feed_forward_proj=_act(cfg.activation, "model.activation", _T5_FF_TO_HF),
        is_encoder_decoder=True,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        tie_word_embeddings=cfg.tie_embeddings,
        scale_decoder_outputs=cfg.tied_logits_scale,
    )
