"""BERT: which Hugging Face tensor holds which of our parameters (BertModel, BertForMaskedLM,
BertForPreTraining, BertForSequenceClassification; encoder, pooler, MLM / NSP / classifier heads)."""

from __future__ import annotations

from transformer_jax.config import ModelConfig
from transformer_jax.hf.common import Entry, _dense, _norm, _Spec


def spec(cfg: ModelConfig, architecture: str) -> _Spec:
    pre = "" if architecture == "BertModel" else "bert."
    e = [
        Entry(f"{pre}embeddings.word_embeddings.weight", (("embed", "token", "embedding"),)),
        Entry(f"{pre}embeddings.position_embeddings.weight", (("embed", "position", "embedding"),)),
        Entry(f"{pre}embeddings.token_type_embeddings.weight", (("embed", "token_type", "embedding"),)),
    ]
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
        tied = {
            "cls.predictions.decoder.weight": f"{pre}embeddings.word_embeddings.weight",
            "cls.predictions.decoder.bias": "cls.predictions.bias",
        }
    if "nsp" in cfg.heads:
        e += _dense("cls.seq_relationship", ("nsp",))
    if "classification" in cfg.heads:
        e += _dense("classifier", ("classifier",))
    return _Spec(e, tied, ("position_ids",), "bert.")
