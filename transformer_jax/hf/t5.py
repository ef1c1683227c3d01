"""T5: which Hugging Face tensor holds which of our parameters (T5ForConditionalGeneration: T5 v1.0,
v1.1, mT5, Flan-T5 shapes; relative position biases, gated or plain MLPs, a tied or untied LM head)."""

from __future__ import annotations

from transformer_jax.config import ModelConfig
from transformer_jax.hf.common import Entry, _dense, _norm, _Spec


def spec(cfg: ModelConfig, architecture: str) -> _Spec:
    e = [Entry("shared.weight", (("embed", "token", "embedding"),))]
    gated = cfg.activation.startswith("gated")
    for stack, n in (("encoder", cfg.num_layers), ("decoder", cfg.resolved_decoder_layers)):
        e += [
            Entry(
                f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                ((stack, "relative_bias", "embedding"),),
            )
        ]
        for i in range(n):
            hf, ours = f"{stack}.block.{i}.layer.", (stack, "layers", i)
            parts = [("SelfAttention", "attention")]
            if stack == "decoder":
                parts.append(("EncDecAttention", "cross_attention"))
            for j, (hf_name, name) in enumerate(parts):
                for hf_proj, proj in (("q", "query"), ("k", "key"), ("v", "value"), ("o", "out")):
                    e += _dense(
                        f"{hf}{j}.{hf_name}.{hf_proj}",
                        ours + (name, proj),
                        bias=False,
                        inputs=2 if proj == "out" else 1,
                    )
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
