"""GPT-2: which Hugging Face tensor holds which of our parameters (GPT2Model, GPT2LMHeadModel; the
packed c_attn query/key/value, Conv1D [in, out] kernels, a tied or untied LM head)."""

from __future__ import annotations

from transformer_jax.config import ModelConfig
from transformer_jax.hf.common import Entry, _dense, _norm, _Spec


def spec(cfg: ModelConfig, architecture: str) -> _Spec:
    pre = "transformer." if architecture == "GPT2LMHeadModel" else ""
    e = [
        Entry(f"{pre}wte.weight", (("embed", "token", "embedding"),)),
        Entry(f"{pre}wpe.weight", (("embed", "position", "embedding"),)),
    ]
    for i in range(cfg.num_layers):
        hf, ours = f"{pre}h.{i}.", ("decoder", "layers", i)
        qkv = tuple(ours + ("attention", n) for n in ("query", "key", "value"))
        e += [
            Entry(f"{hf}attn.c_attn.weight", tuple(p + ("kernel",) for p in qkv), "conv", 1),
            Entry(f"{hf}attn.c_attn.bias", tuple(p + ("bias",) for p in qkv), "bias"),
        ]
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
