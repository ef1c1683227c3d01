"""Import and export Hugging Face BERT, GPT-2 and T5 checkpoints: local directories only.

    model, params = from_pretrained("path/to/hf_dir", mesh=mesh)   # our Model and a plain params dict
    to_pretrained(model, params, "path/to/out_dir")               # model.safetensors + config.json
    tokenizer = load_tokenizer("path/to/hf_dir")

Supported architectures: BertModel, BertForMaskedLM, BertForPreTraining,
BertForSequenceClassification, GPT2Model, GPT2LMHeadModel, T5ForConditionalGeneration (T5 v1.0,
v1.1, mT5, Flan-T5 shapes). Weights are read tensor by tensor (safetensors through
`safetensors.safe_open(framework="numpy")`, bfloat16 included, single or sharded;
`pytorch_model.bin` through torch), converted with NumPy and placed on their sharding one at a
time, so no device ever holds a full copy of a sharded parameter. Vocabulary-sized tensors (token
embeddings, an untied LM head, BERT's MLM bias) get zero rows up to `padded_vocab_size` on import
(config.json's vocab_size stays `vocab_size`) and are cut back to `vocab_size` on export, so a
round trip is exact. torch and transformers are optional: nothing here imports them at module
level, and only `pytorch_model.bin` files need torch. Nothing is ever downloaded: a hub name
("bert-base-uncased") raises a ValueError asking for a local directory.

What lives where (imports go one way: common, weights, configs <- bert, gpt2, t5 <- pretrained <- here):
    common      the supported architectures, local-dir / JSON reading, the `Entry` layout conversions
    weights     a checkpoint directory's tensors: safetensors, pytorch_model.bin, sharded indexes
    configs     config.json <-> ModelConfig (`config_from_hf`, `config_to_hf`), exportability checks
    bert, gpt2, t5   each family's table of Hugging Face tensor <-> our parameter(s)
    pretrained  `from_pretrained`, `state_dict`, `to_pretrained`
    tokenizers  `load_tokenizer`, `HFTokenizer`, `TOKENIZER_FILES`
"""

from transformer_jax.hf.common import ARCHITECTURES, DEFAULT_ARCHITECTURE, FAMILY_OF, Entry

# _default_architecture: private, but train.bench calls it as hf._default_architecture
from transformer_jax.hf.configs import _default_architecture, config_from_hf, config_to_hf  # noqa: F401
from transformer_jax.hf.pretrained import SPECS, from_pretrained, model_config, state_dict, to_pretrained
from transformer_jax.hf.tokenizers import TOKENIZER_FILES, HFTokenizer, load_tokenizer

__all__ = [
    "ARCHITECTURES",
    "DEFAULT_ARCHITECTURE",
    "FAMILY_OF",
    "Entry",
    "SPECS",
    "TOKENIZER_FILES",
    "HFTokenizer",
    "config_from_hf",
    "config_to_hf",
    "from_pretrained",
    "load_tokenizer",
    "model_config",
    "state_dict",
    "to_pretrained",
]
