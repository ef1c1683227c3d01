"""Typed, frozen configs loaded from YAML, overridable with `section.key=value`, validated
before anything is compiled. A mistake raises `ConfigError` with one line naming the key. Reading
the YAML and the overrides into these dataclasses is transformer_jax/config_parsing.py.

One file over 400 lines on purpose: every key of every section and every check across sections
(a model key that a train key rules out) read together, as the one schema `--set` is checked against."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Literal

import yaml

from transformer_jax import tasks  # the registry alone: its objectives load when validation asks
from transformer_jax.config_parsing import (  # ConfigError: public here too, as transformer_jax.ConfigError
    ConfigError,
    _from_dict,
    apply_overrides,
    read_yaml,
)

Activation = Literal["gelu", "gelu_tanh", "relu", "gated_gelu", "gated_silu"]
ParamDtype = Literal["float32", "bfloat16"]


@dataclass(frozen=True)
class ModelConfig:
    family: Literal["encoder", "decoder", "encoder_decoder", "vision_language", "dual_encoder"] = "decoder"
    vocab_size: int = 32000
    vocab_multiple: int = 128  # embedding rows / logit columns padded up to a multiple of this
    # (tensor-parallel friendly); padded ids never win (logits masked)
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int | None = None  # grouped-query attention; None = num_heads
    head_dim: int | None = None  # None = model_dim // num_heads
    mlp_dim: int = 2048
    num_layers: int = 6
    num_decoder_layers: int | None = None  # encoder_decoder only; None = num_layers
    max_len: int = 512  # learned position table size
    type_vocab_size: int = 0  # BERT token types; 0 = none
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_position: Literal["pre", "post"] = "pre"
    norm_eps: float = 1e-5
    embed_norm: bool = False  # norm after the embeddings (BERT)
    position: Literal["learned", "sinusoidal", "relative", "rotary", "none"] = "learned"
    relative_buckets: int = 32
    relative_max_distance: int = 128
    rotary_base: float = 10000.0
    activation: Activation = "gelu"
    use_bias: bool = True
    tie_embeddings: bool = True
    embed_scale: bool = False  # multiply embeddings by sqrt(model_dim) (2017 Transformer)
    tied_logits_scale: bool = False  # scale decoder output by model_dim**-0.5 before tied logits (T5)
    scale_attention: bool = True  # 1/sqrt(head_dim) in attention; T5 folds it into its init
    pooler: bool = False  # BERT pooler on the first token
    classifier_pooling: Literal["first", "mean"] = "first"  # sequence heads read the (pooled) first token,
    # or the mean of the final states over attention_mask
    heads: tuple[str, ...] = ()  # extra heads: mlm, nsp, classification, ...
    num_labels: int = 2
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    init_std: float = 0.02
    scan_layers: bool = False
    remat: Literal["none", "dots_saveable", "full", "offload"] = "none"  # what a layer keeps for the backward
    # pass; see models/common.py REMAT_POLICIES
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    param_dtype: ParamDtype = "float32"
    attention_impl: Literal["explicit", "xla", "cudnn", "tpu_flash"] = "explicit"  # explicit: einsums (any
    # dropout, weights); xla / cudnn: jax.nn.dot_product_attention
    # (cudnn: flash attention on GPU); tpu_flash: the Pallas TPU kernel
    local_window_size: int = 0  # > 0: locally banded causal attention (GPT-3): query i sees keys
    # i - local_window_size < j <= i in the layers local_layers names
    local_layers: Literal["none", "alternate", "all"] = "none"  # banded layers: alternate = the odd ones
    # (1, 3, ...; layer 0 dense), all, or none (dense everywhere)
    # vision families (models/vision.py): square images cut into patch_size patches (ViT)
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    projection_dim: int = 0  # contrastive (ITC) embedding size; 0 = model_dim
    temperature_init: float = 0.07  # the learned contrastive temperature starts here
    itc_encoder: Literal["fusion", "dual"] = "fusion"  # vision_language: ITC from the fusion stack run on
    # each modality alone, or from a dual encoder inside the model

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.model_dim // self.num_heads

    @property
    def resolved_kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def resolved_decoder_layers(self) -> int:
        return self.num_decoder_layers or self.num_layers

    def layer_window(self, layer: int) -> int:
        """The local window of layer `layer` (0-based) of the stack: 0 = dense."""
        banded = self.local_layers == "all" or (self.local_layers == "alternate" and layer % 2 == 1)
        return self.local_window_size if banded else 0


@dataclass(frozen=True)
class DataConfig:
    source: str = "embedded"  # embedded | files | tfds | prepared (train.prepare's shards at data.path)
    paths: tuple[str, ...] = ()  # files, folders or globs when source=files
    path: str = ""  # source=prepared: the directory `python -m train.prepare` wrote
    tfds_name: str = ""
    data_dir: str = ""
    text_feature: str = "text"
    split: str = "train"
    eval_split: str = ""
    tokenizer: str = ""  # a SentencePiece model; empty = train one (model.vocab_size) into the workdir
    seq_len: int = 128  # span corruption: encoder length (targets follow T5's formula)
    max_documents: int = 0  # 0 = all
    eval_documents: int = 64
    mask_rate: float = 0.15  # mlm, mlm_nsp: share of tokens chosen for prediction (80/10/10)
    whole_word_masking: bool = False  # mlm, mlm_nsp: choose whole words, every piece of one together
    noise_density: float = 0.15  # span_corruption: share of tokens corrupted
    mean_noise_span_length: float = 3.0
    shuffle_window: int = 2048  # rows shuffled together after packing; 0 or 1 = no window shuffle
    workers: int = 0  # grain worker processes running the whole train pipeline; 0 = in process


@dataclass(frozen=True)
class TrainConfig:
    objective: str = "clm"  # a name in transformer_jax.tasks.REGISTRY
    init_from: str = ""  # continue pretraining from our workdir or a Hugging Face dir (its
    # architecture and tokenizer; train.pretrain --init_from)
    steps: int = 1000
    batch_size: int = 16  # global batch
    grad_accum: int = 1
    optimizer: Literal["adamw", "adafactor"] = "adamw"
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    warmup_ratio: float = 0.0  # > 0: warm up for this fraction of train.steps instead of warmup_steps
    schedule: Literal["constant", "linear", "cosine", "inverse_sqrt"] = "cosine"
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.98
    grad_clip: float = 1.0
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    seed: int = 0
    log_every: int = 10
    eval_every: int = 200
    eval_steps: int = 4
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    time_limit_s: float = 0.0  # stop (and checkpoint) after this long; 0 = no limit
    early_stopping_patience: int = 0  # stop after this many evals without a better best metric; 0 = never
    resume: Literal["auto", "strict"] = "auto"  # auto: an unreadable latest checkpoint falls back to the
    # newest readable one (named in one line); strict: it is an error
    stop_check_every: int = 10  # steps between the processes' agreement on stopping (signal, time limit)
    skip_spikes: bool = False  # skip an update whose loss or grad norm is a spike (MaxText / OLMo)
    spike_window: int = 50  # rolling window of recent steps the spike test compares with
    spike_threshold: float = 6.0  # a spike: above the window's mean + this many standard deviations
    prefetch: int = 2  # batches read ahead and placed on the devices while a step runs; 0 = none


@dataclass(frozen=True)
class FinetuneConfig:
    """train.finetune: the task, what is trained (strategy), extra losses and data augmentation."""

    init_from: str = ""  # our workdir (config.yaml + checkpoints/ or params/) or a Hugging Face dir
    task: str = "embedded"  # embedded | glue/<cola|sst2|mrpc|qqp|stsb|mnli|qnli|rte|wnli> | squad | local
    head: Literal["auto", "classification", "regression", "token_classification", "qa", "text_to_text"] = "auto"
    data_dir: str = ""  # TFDS data_dir (glue/*, squad); never downloaded
    train_paths: tuple[str, ...] = ()  # local: CSV / JSONL files; squad: SQuAD JSON files
    eval_paths: tuple[str, ...] = ()
    text_column: str = "text"
    text_pair_column: str = ""
    label_column: str = "label"
    labels: tuple[str, ...] = ()  # label names in id order; empty = from the data
    num_labels: int = 0  # 0 = from the task data
    max_train_examples: int = 0  # 0 = all
    max_eval_examples: int = 0
    eval_fraction: float = 0.1  # local data without eval_paths: this fraction is held out (a fixed split)
    eval_batch_size: int = 0  # 0 = train.batch_size
    metric: str = ""  # eval metric for the best checkpoint and early stopping; "" = the task's
    strategy: Literal["full", "partial", "frozen", "lora"] = "full"
    trainable: tuple[str, ...] = ()  # partial: regexes over '/'-joined parameter paths
    top_layers: int = 0  # partial: also train the top N layers of each stack
    reset_heads: bool = False  # re-initialise a head whose shape differs from the checkpoint's
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("attention/query/kernel", "attention/value/kernel")
    layer_decay: float = 1.0  # layer-wise learning-rate decay (1 = none)
    distill_from: str = ""  # teacher: a finetuned workdir (same task and tokenizer)
    distill_weight: float = 0.5  # loss = (1 - w) * hard + w * KL at distill_temperature
    distill_temperature: float = 2.0
    transfer_examples: int = 0  # distillation: + this many unlabelled inputs of the task (its pool), taught
    # by the teacher's soft labels only (DistilBERT / TinyBERT's transfer set); the embedded task has one
    contrastive_weight: float = 0.0  # + w * the contrastive loss over the pooled embeddings
    contrastive_temperature: float = 0.1
    contrastive_loss: Literal["infonce", "supcon"] = "infonce"  # infonce: between two augmented views;
    # supcon: supervised contrastive (Khosla et al.) over the batch's labels, classification only
    token_drop: float = 0.0  # augmentation: per-token probabilities
    token_replace: float = 0.0
    token_mask: float = 0.0
    sentence_shuffle: float = 0.0  # probability of reordering an example's sentences (lines for code)
    back_translate: float = 0.0  # probability of a round trip through the translator hook
    max_answer_length: int = 30  # qa (tokens)
    doc_stride: int = 32  # qa: overlap of context windows (tokens)
    target_len: int = 8  # text_to_text: decoder length
    embedded_classes: int = 6  # embedded task: number of standard-library packages to tell apart
    model_keys: tuple[str, ...] = ()  # model settings (dropout, dtype, ...) that win over a pretrained model's;
    # train.finetune adds those its config's model section or --set names


@dataclass(frozen=True)
class ItmConfig:
    """Image-text pretraining (train.objective itm: vision_language; itc: dual_encoder)."""

    itm_weight: float = 1.0  # image-text matching: binary, positives and in-batch negatives
    itc_weight: float = 1.0  # image-text contrastive: InfoNCE with the learned temperature
    mlm_weight: float = 0.0  # > 0: masked LM on the caption given the image (adds the mlm head)
    negatives: Literal["hard", "sampled", "random", "mixed"] = "sampled"  # ITM negatives from the batch:
    # the most similar by ITC, sampled by ITC similarity, uniform, or
    # sampled / uniform half and half
    mask_rate: float = 0.15  # mlm: share of caption tokens masked
    caption_negatives: float = 0.0  # > 0: ITM also pairs each image with its caption one edit away
    # (a colour, a shape, the relation, or the two colours swapped; the embedded shapes data only),
    # these pairs holding this share of the ITM negatives' weight (in [0, 1))
    itc_caption_negatives: bool = False  # the edited caption also one more text in its image's ITC
    # softmax (NegCLIP); needs caption_negatives > 0
    image_feature: str = "image"  # TFDS feature of the image
    caption_feature: str = ""  # TFDS feature of the caption(s); "" = captions/text (COCO), caption or text


@dataclass(frozen=True)
class TranslateConfig:
    """train.translate (train.objective translate): the language pair, the decoder length, and the
    beam search that gives BLEU / chrF at each eval."""

    source_lang: str = "en"  # language codes: TFDS features, <lang>.<split>.txt, gettext locales
    target_lang: str = "de"
    target_len: int = 0  # decoder length (tokens); 0 = data.seq_len
    packages: tuple[str, ...] = ()  # data.source embedded: packages whose gettext catalogs are read; () = all known
    eval_examples: int = 256  # dev pairs translated at each eval (embedded: held out by source); 0 = no BLEU
    eval_batch_size: int = 32
    beam_size: int = 4  # the paper's beam 4 and length penalty 0.6
    alpha: float = 0.6
    max_decode_len: int = 0  # new tokens at most; 0 = target_len
    eval_greedy: bool = False  # also log greedy decoding's BLEU at each eval


@dataclass(frozen=True)
class MeshConfig:
    data: int = -1  # -1 = all remaining devices
    fsdp: int = 1
    sequence: int = 1  # sequence (context) parallelism: the length split, K and V all-gathered per layer
    tensor: int = 1


@dataclass(frozen=True)
class DistributedConfig:
    mode: Literal["auto", "on", "off"] = "auto"  # auto: jax.distributed where a cluster is detected;
    # on: always (error if it cannot); off: never
    coordinator_address: str = ""  # empty = JAX_COORDINATOR_ADDRESS, else the detected cluster's (docs/pods.md)
    num_processes: int = 0
    process_id: int = -1


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    translate: TranslateConfig = field(default_factory=TranslateConfig)
    itm: ItmConfig = field(default_factory=ItmConfig)
    name: str = ""


# ----------------------------------------------------------------------------- loading
def config_from_dict(data: dict, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    data = apply_overrides(data, overrides)
    cfg = _from_dict(Config, data)
    validate(cfg)
    return cfg


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config (None = all defaults), apply `key=value` overrides, validate."""
    return config_from_dict(read_yaml(path) if path is not None else {}, overrides)


def to_dict(cfg: Config | ModelConfig) -> dict:
    def plain(x):
        if isinstance(x, tuple):
            return [plain(v) for v in x]
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return x

    return plain(dataclasses.asdict(cfg))


def save_config(cfg: Config, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)


def replace(cfg: Config, **sections) -> Config:
    """dataclasses.replace one level down: replace(cfg, model=dict(num_layers=2))."""
    new = {k: dataclasses.replace(getattr(cfg, k), **v) if isinstance(v, dict) else v for k, v in sections.items()}
    out = dataclasses.replace(cfg, **new)
    validate(out)
    return out


# ----------------------------------------------------------------------------- validation
def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def is_text_objective(name: str) -> bool:
    """Whether train.pretrain's text pipeline (transformer_jax.tasks.text) feeds the objective."""
    return hasattr(tasks.get(name), "batch_fn")


def validate(cfg: Config) -> None:
    m, t, d = cfg.model, cfg.train, cfg.data
    for key in ("vocab_size", "vocab_multiple", "model_dim", "num_heads", "mlp_dim", "num_layers", "max_len"):
        _require(getattr(m, key) > 0, f"model.{key}: must be positive, got {getattr(m, key)}")
    if m.head_dim is None:
        _require(
            m.model_dim % m.num_heads == 0,
            f"model.num_heads: {m.num_heads} heads do not divide model.model_dim={m.model_dim}",
        )
    _require(
        m.num_heads % m.resolved_kv_heads == 0,
        f"model.num_kv_heads: {m.resolved_kv_heads} does not divide model.num_heads={m.num_heads}",
    )
    _require(
        m.position != "rotary" or m.resolved_head_dim % 2 == 0,
        f"model.head_dim: rotary positions need an even head dim, got {m.resolved_head_dim}",
    )
    _require(
        m.type_vocab_size == 0 or m.family == "encoder",
        "model.type_vocab_size: token types belong to the encoder family",
    )
    _require(
        m.num_decoder_layers is None or m.family == "encoder_decoder",
        "model.num_decoder_layers: only for family encoder_decoder",
    )
    for rate in ("dropout_rate", "attention_dropout_rate"):
        _require(0.0 <= getattr(m, rate) < 1.0, f"model.{rate}: must be in [0, 1), got {getattr(m, rate)}")
    _require(
        m.attention_impl == "explicit" or m.attention_dropout_rate == 0.0,
        f"model.attention_dropout_rate: {m.attention_dropout_rate} needs attention_impl explicit; the "
        f"{m.attention_impl} kernel has no attention dropout (set it to 0 for the fused kernel)",
    )
    validate_band(m)
    known_heads = {"mlm", "nsp", "classification", "regression", "token_classification", "qa"}
    for h in m.heads:
        _require(h in known_heads, f"model.heads: unknown head {h!r} (known: {', '.join(sorted(known_heads))})")
    _require(
        not m.heads
        or m.family == "encoder"
        or set(m.heads) <= {"classification", "regression"}
        or (m.family == "vision_language" and set(m.heads) <= {"mlm"}),
        f"model.heads: {', '.join(m.heads)} need family encoder",
    )
    _require(
        t.objective in tasks.REGISTRY,
        f"train.objective: unknown objective {t.objective!r}; registered: {', '.join(tasks.REGISTRY)}",
    )
    family = tasks.get(t.objective).family
    _require(family in (None, m.family), f"train.objective: {t.objective} needs model.family={family}, got {m.family}")
    if m.family in ("vision_language", "dual_encoder"):
        validate_vision(cfg)
    _require(t.steps > 0, f"train.steps: must be positive, got {t.steps}")
    _require(t.batch_size > 0, f"train.batch_size: must be positive, got {t.batch_size}")
    _require(
        t.grad_accum > 0 and t.batch_size % t.grad_accum == 0,
        f"train.grad_accum: {t.grad_accum} does not divide train.batch_size={t.batch_size}",
    )
    _require(t.learning_rate > 0, f"train.learning_rate: must be positive, got {t.learning_rate}")
    _require(0 <= t.label_smoothing < 1, f"train.label_smoothing: must be in [0, 1), got {t.label_smoothing}")
    _require(0 <= t.warmup_ratio < 1, f"train.warmup_ratio: must be in [0, 1), got {t.warmup_ratio}")
    _require(
        t.early_stopping_patience >= 0, f"train.early_stopping_patience: must be >= 0, got {t.early_stopping_patience}"
    )
    for key in ("log_every", "checkpoint_every", "keep_checkpoints", "eval_steps", "stop_check_every"):
        _require(getattr(t, key) > 0, f"train.{key}: must be positive, got {getattr(t, key)}")
    for key in ("eval_every", "warmup_steps", "grad_clip", "weight_decay", "time_limit_s", "z_loss", "prefetch"):
        _require(getattr(t, key) >= 0, f"train.{key}: must be >= 0, got {getattr(t, key)}")
    _require(0 <= t.b1 < 1 and 0 <= t.b2 < 1, f"train.b1: b1 and b2 must be in [0, 1), got {t.b1} and {t.b2}")
    _require(t.spike_window >= 2, f"train.spike_window: must be at least 2, got {t.spike_window}")
    _require(t.spike_threshold > 0, f"train.spike_threshold: must be positive, got {t.spike_threshold}")
    _require(d.shuffle_window >= 0, f"data.shuffle_window: must be >= 0, got {d.shuffle_window}")
    _require(d.workers >= 0, f"data.workers: must be >= 0, got {d.workers}")
    _require(
        d.workers == 0 or is_text_objective(t.objective),
        f"data.workers: {d.workers} worker processes feed train.pretrain's text objectives; "
        f"train.objective {t.objective} reads its data in process (set data.workers=0)",
    )
    _require(d.seq_len > 1, f"data.seq_len: must be at least 2, got {d.seq_len}")
    _require(
        m.position != "learned" or d.seq_len <= m.max_len,
        f"data.seq_len: {d.seq_len} exceeds model.max_len={m.max_len} (learned positions)",
    )
    _require(0 < d.mask_rate < 1, f"data.mask_rate: must be in (0, 1), got {d.mask_rate}")
    _require(0 < d.noise_density < 1, f"data.noise_density: must be in (0, 1), got {d.noise_density}")
    _require(
        d.mean_noise_span_length >= 1,
        f"data.mean_noise_span_length: must be at least 1, got {d.mean_noise_span_length}",
    )
    _require(
        d.source in ("embedded", "files", "tfds", "prepared"),
        f"data.source: {d.source!r} is not one of embedded, files, tfds, prepared",
    )
    _require(
        d.source != "prepared" or bool(d.path),
        "data.path: data.source=prepared needs the directory train.prepare wrote",
    )
    _require(d.source != "files" or bool(d.paths), "data.paths: data.source=files needs at least one path")
    _require(d.source != "tfds" or bool(d.tfds_name), "data.tfds_name: data.source=tfds needs a dataset name")
    validate_finetune(cfg.finetune)
    validate_translate(cfg.translate)
    sizes = dataclasses.asdict(cfg.mesh)
    for axis, size in sizes.items():
        _require(size == -1 or size > 0, f"mesh.{axis}: must be positive or -1, got {size}")
    _require(list(sizes.values()).count(-1) <= 1, "mesh: at most one axis may be -1")
    _require(
        cfg.mesh.sequence < 2 or d.seq_len % cfg.mesh.sequence == 0,
        f"mesh.sequence: {cfg.mesh.sequence} does not divide data.seq_len={d.seq_len} (sequence parallelism "
        "splits the length evenly)",
    )


def validate_band(m: ModelConfig) -> None:
    """Locally banded attention (model.local_window_size, model.local_layers): both keys or neither,
    causal self-attention of the decoder family, a kernel that takes a window, whole scanned pairs."""
    w = m.local_window_size
    _require(w >= 0, f"model.local_window_size: must be >= 0 (0 = dense), got {w}")
    _require(
        w == 0 or m.local_layers != "none",
        f"model.local_layers: none, but model.local_window_size={w} asks for a band (set local_layers "
        "alternate or all, or local_window_size 0)",
    )
    _require(
        w > 0 or m.local_layers == "none",
        f"model.local_window_size: 0, but model.local_layers={m.local_layers} asks for banded layers "
        "(set a window > 0, or local_layers none)",
    )
    if w == 0:
        return
    _require(
        m.family == "decoder",
        f"model.local_window_size: banded attention is causal self-attention of family "
        f"decoder only, got family {m.family}",
    )
    _require(
        m.attention_impl != "tpu_flash",
        "model.local_window_size: the tpu_flash kernel takes no local window; "
        "use attention_impl cudnn, xla or explicit",
    )
    _require(
        not (m.scan_layers and m.local_layers == "alternate" and m.num_layers % 2),
        f"model.num_layers: {m.num_layers} with local_layers alternate and scan_layers true: the scan runs "
        "over (dense, banded) pairs, so it needs an even number of layers (or scan_layers false)",
    )


def validate_vision(cfg: Config) -> None:
    m, i = cfg.model, cfg.itm
    for key in ("image_size", "patch_size", "num_channels"):
        _require(getattr(m, key) > 0, f"model.{key}: must be positive, got {getattr(m, key)}")
    _require(
        m.image_size % m.patch_size == 0,
        f"model.patch_size: {m.patch_size} does not divide model.image_size={m.image_size}",
    )
    _require(m.position == "learned", f"model.position: vision families use learned positions, got {m.position}")
    _require(m.projection_dim >= 0, f"model.projection_dim: must be >= 0, got {m.projection_dim}")
    _require(m.temperature_init > 0, f"model.temperature_init: must be positive, got {m.temperature_init}")
    for key in ("itm_weight", "itc_weight", "mlm_weight"):
        _require(getattr(i, key) >= 0, f"itm.{key}: must be >= 0, got {getattr(i, key)}")
    _require(
        i.mlm_weight == 0 or m.family == "vision_language",
        "itm.mlm_weight: masked LM needs model.family=vision_language",
    )
    weights = (i.itm_weight, i.itc_weight, i.mlm_weight) if m.family == "vision_language" else (i.itc_weight,)
    _require(sum(weights) > 0, "itm.itc_weight: the objective's loss weights are all 0")
    _require(0 < i.mask_rate < 1, f"itm.mask_rate: must be in (0, 1), got {i.mask_rate}")
    _require(0 <= i.caption_negatives < 1, f"itm.caption_negatives: must be in [0, 1), got {i.caption_negatives}")
    _require(
        i.caption_negatives == 0 or (m.family == "vision_language" and cfg.data.source == "embedded"),
        "itm.caption_negatives: caption negatives need model.family=vision_language and the embedded shapes "
        f"data (data.source embedded), got {m.family} on {cfg.data.source}",
    )
    _require(
        not i.itc_caption_negatives or (i.caption_negatives > 0 and i.itc_weight > 0),
        "itm.itc_caption_negatives: needs itm.caption_negatives > 0 (the edited captions) and itm.itc_weight > 0",
    )


def validate_translate(tr: TranslateConfig) -> None:
    _require(
        bool(tr.source_lang) and bool(tr.target_lang) and tr.source_lang != tr.target_lang,
        f"translate.target_lang: source and target languages must be two different codes, got "
        f"{tr.source_lang!r} and {tr.target_lang!r}",
    )
    for key in ("target_len", "eval_examples", "max_decode_len"):
        _require(getattr(tr, key) >= 0, f"translate.{key}: must be >= 0, got {getattr(tr, key)}")
    _require(tr.target_len != 1, "translate.target_len: must be at least 2 (or 0 = data.seq_len)")
    _require(tr.eval_batch_size > 0, f"translate.eval_batch_size: must be positive, got {tr.eval_batch_size}")
    _require(tr.beam_size > 0, f"translate.beam_size: must be positive, got {tr.beam_size}")
    _require(tr.alpha >= 0, f"translate.alpha: must be >= 0, got {tr.alpha}")


def validate_finetune(f: FinetuneConfig) -> None:
    glue = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli")
    _require(
        f.task in ("embedded", "squad", "local") or (f.task.startswith("glue/") and f.task[5:] in glue),
        f"finetune.task: {f.task!r} is not one of embedded, squad, local, glue/<{'|'.join(glue)}>",
    )
    _require(
        f.task != "local" or bool(f.train_paths), "finetune.train_paths: finetune.task=local needs a CSV or JSONL file"
    )
    _require(f.num_labels >= 0, f"finetune.num_labels: must be >= 0, got {f.num_labels}")
    _require(f.lora_rank > 0, f"finetune.lora_rank: must be positive, got {f.lora_rank}")
    _require(f.top_layers >= 0, f"finetune.top_layers: must be >= 0, got {f.top_layers}")
    _require(
        f.strategy != "partial" or bool(f.trainable) or f.top_layers > 0,
        "finetune.strategy: partial needs finetune.trainable patterns or finetune.top_layers",
    )
    _require(0 < f.layer_decay <= 1, f"finetune.layer_decay: must be in (0, 1], got {f.layer_decay}")
    _require(0 <= f.distill_weight <= 1, f"finetune.distill_weight: must be in [0, 1], got {f.distill_weight}")
    _require(f.distill_temperature > 0, f"finetune.distill_temperature: must be positive, got {f.distill_temperature}")
    _require(f.transfer_examples >= 0, f"finetune.transfer_examples: must be >= 0, got {f.transfer_examples}")
    _require(
        not f.transfer_examples or bool(f.distill_from),
        "finetune.transfer_examples: unlabelled examples need a teacher (finetune.distill_from)",
    )
    _require(f.contrastive_weight >= 0, f"finetune.contrastive_weight: must be >= 0, got {f.contrastive_weight}")
    _require(
        f.contrastive_temperature > 0,
        f"finetune.contrastive_temperature: must be positive, got {f.contrastive_temperature}",
    )
    _require(
        f.contrastive_loss in ("infonce", "supcon"),
        f"finetune.contrastive_loss: {f.contrastive_loss!r} is not one of 'infonce', 'supcon'",
    )
    for key in ("token_drop", "token_replace", "token_mask", "sentence_shuffle", "back_translate"):
        _require(0 <= getattr(f, key) <= 1, f"finetune.{key}: must be in [0, 1], got {getattr(f, key)}")
    _require(
        f.token_drop + f.token_replace + f.token_mask <= 1,
        "finetune.token_drop: token_drop + token_replace + token_mask must not exceed 1",
    )
    _require(0 < f.eval_fraction < 1, f"finetune.eval_fraction: must be in (0, 1), got {f.eval_fraction}")
    for key in ("max_answer_length", "doc_stride", "target_len", "embedded_classes"):
        _require(getattr(f, key) > 0, f"finetune.{key}: must be positive, got {getattr(f, key)}")
    _require(f.embedded_classes >= 2, f"finetune.embedded_classes: must be at least 2, got {f.embedded_classes}")
