"""Typed, frozen configs loaded from YAML, overridable with `section.key=value`, validated
before anything is compiled. A mistake raises `ConfigError` with one line naming the key."""
from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A user's config mistake: the message is one line naming the key."""


@dataclass(frozen=True)
class ModelConfig:
    family: Literal["encoder", "decoder", "encoder_decoder"] = "decoder"
    vocab_size: int = 32000
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int | None = None        # grouped-query attention; None = num_heads
    head_dim: int | None = None            # None = model_dim // num_heads
    mlp_dim: int = 2048
    num_layers: int = 6
    num_decoder_layers: int | None = None  # encoder_decoder only; None = num_layers
    max_len: int = 512                     # learned position table size
    type_vocab_size: int = 0               # BERT token types; 0 = none
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_position: Literal["pre", "post"] = "pre"
    norm_eps: float = 1e-5
    embed_norm: bool = False               # norm after the embeddings (BERT)
    position: Literal["learned", "sinusoidal", "relative", "rotary", "none"] = "learned"
    relative_buckets: int = 32
    relative_max_distance: int = 128
    rotary_base: float = 10000.0
    activation: Literal["gelu", "gelu_tanh", "relu", "gated_gelu", "gated_silu"] = "gelu"
    use_bias: bool = True
    tie_embeddings: bool = True
    embed_scale: bool = False              # multiply embeddings by sqrt(model_dim) (2017 Transformer)
    tied_logits_scale: bool = False        # scale decoder output by model_dim**-0.5 before tied logits (T5)
    scale_attention: bool = True           # 1/sqrt(head_dim) in attention; T5 folds it into its init
    pooler: bool = False                   # BERT pooler on the first token
    heads: tuple[str, ...] = ()            # extra heads: mlm, nsp, classification, ...
    num_labels: int = 2
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    init_std: float = 0.02
    scan_layers: bool = False
    remat: Literal["none", "full", "dots"] = "none"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    attention_impl: Literal["explicit", "xla", "cudnn"] = "explicit"

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.model_dim // self.num_heads

    @property
    def resolved_kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def resolved_decoder_layers(self) -> int:
        return self.num_decoder_layers or self.num_layers


@dataclass(frozen=True)
class DataConfig:
    source: str = "embedded"        # embedded | files | tfds
    paths: tuple[str, ...] = ()     # files, folders or globs when source=files
    tfds_name: str = ""
    data_dir: str = ""
    text_feature: str = "text"
    split: str = "train"
    eval_split: str = ""
    tokenizer: str = ""             # a SentencePiece model; empty = train one (model.vocab_size) into the workdir
    seq_len: int = 128              # span corruption: encoder length (targets follow T5's formula)
    max_documents: int = 0          # 0 = all
    eval_documents: int = 64


@dataclass(frozen=True)
class TrainConfig:
    objective: Literal["clm", "mlm", "mlm_nsp", "span_corruption"] = "clm"
    steps: int = 1000
    batch_size: int = 16            # global batch
    grad_accum: int = 1
    optimizer: Literal["adamw", "adafactor"] = "adamw"
    learning_rate: float = 1e-3
    warmup_steps: int = 100
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
    time_limit_s: float = 0.0       # stop (and checkpoint) after this long; 0 = no limit


@dataclass(frozen=True)
class MeshConfig:
    data: int = -1                  # -1 = all remaining devices
    fsdp: int = 1
    tensor: int = 1


@dataclass(frozen=True)
class DistributedConfig:
    coordinator_address: str = ""   # empty = single process unless JAX_COORDINATOR_ADDRESS is set
    num_processes: int = 0
    process_id: int = -1


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    name: str = ""


# ----------------------------------------------------------------------------- parsing
def _check_value(key: str, tp: Any, value: Any) -> Any:
    """Coerce `value` to the annotated type `tp` or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _check_value(key, next(a for a in args if a is not type(None)), value)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_check_value(key, args[0], v) for v in value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} for {key}")


def _from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise ConfigError(f"{path}: unknown key{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: expected a section (mapping), got {value!r}")
            kwargs[key] = _from_dict(tp, value, path + ".")
        else:
            kwargs[key] = _check_value(path, tp, value)
    return cls(**kwargs)


def _set(tree: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        node = tree.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {p} is not a section")
        tree = node
    tree[last] = value


def parse_override(override: str) -> tuple[str, Any]:
    """'model.num_layers=4' -> ('model.num_layers', 4); the value is parsed as YAML."""
    if "=" not in override:
        raise ConfigError(f"{override}: an override is key=value, e.g. model.num_layers=4")
    key, raw = override.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def config_from_dict(data: dict, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    data = dict(data or {})
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for override in overrides:
        _set(data, *parse_override(override))
    cfg = _from_dict(Config, data)
    validate(cfg)
    return cfg


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config (None = all defaults), apply `key=value` overrides, validate."""
    data: dict = {}
    if path is not None:
        if not os.path.exists(path):
            raise ConfigError(f"--config: no such file {path}")
        with open(path) as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        data.setdefault("name", os.path.splitext(os.path.basename(path))[0])
    return config_from_dict(data, overrides)


def to_dict(cfg: Config) -> dict:
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


def validate(cfg: Config) -> None:
    m, t, d = cfg.model, cfg.train, cfg.data
    for key in ("vocab_size", "model_dim", "num_heads", "mlp_dim", "num_layers", "max_len"):
        _require(getattr(m, key) > 0, f"model.{key}: must be positive, got {getattr(m, key)}")
    if m.head_dim is None:
        _require(m.model_dim % m.num_heads == 0,
                 f"model.num_heads: {m.num_heads} heads do not divide model.model_dim={m.model_dim}")
    _require(m.num_heads % m.resolved_kv_heads == 0,
             f"model.num_kv_heads: {m.resolved_kv_heads} does not divide model.num_heads={m.num_heads}")
    _require(m.position != "rotary" or m.resolved_head_dim % 2 == 0,
             f"model.head_dim: rotary positions need an even head dim, got {m.resolved_head_dim}")
    _require(m.type_vocab_size == 0 or m.family == "encoder",
             "model.type_vocab_size: token types belong to the encoder family")
    _require(m.num_decoder_layers is None or m.family == "encoder_decoder",
             "model.num_decoder_layers: only for family encoder_decoder")
    for rate in ("dropout_rate", "attention_dropout_rate"):
        _require(0.0 <= getattr(m, rate) < 1.0, f"model.{rate}: must be in [0, 1), got {getattr(m, rate)}")
    known_heads = {"mlm", "nsp", "classification", "regression", "token_classification", "qa"}
    for h in m.heads:
        _require(h in known_heads, f"model.heads: unknown head {h!r} (known: {', '.join(sorted(known_heads))})")
    _require(not m.heads or m.family == "encoder" or set(m.heads) <= {"classification", "regression"},
             f"model.heads: {', '.join(m.heads)} need family encoder")
    needs = {"clm": "decoder", "mlm": "encoder", "mlm_nsp": "encoder", "span_corruption": "encoder_decoder"}
    _require(needs[t.objective] == m.family,
             f"train.objective: {t.objective} needs model.family={needs[t.objective]}, got {m.family}")
    _require(t.steps > 0, f"train.steps: must be positive, got {t.steps}")
    _require(t.batch_size > 0, f"train.batch_size: must be positive, got {t.batch_size}")
    _require(t.grad_accum > 0 and t.batch_size % t.grad_accum == 0,
             f"train.grad_accum: {t.grad_accum} does not divide train.batch_size={t.batch_size}")
    _require(t.learning_rate > 0, f"train.learning_rate: must be positive, got {t.learning_rate}")
    _require(0 <= t.label_smoothing < 1, f"train.label_smoothing: must be in [0, 1), got {t.label_smoothing}")
    _require(d.seq_len > 1, f"data.seq_len: must be at least 2, got {d.seq_len}")
    _require(m.position != "learned" or d.seq_len <= m.max_len,
             f"data.seq_len: {d.seq_len} exceeds model.max_len={m.max_len} (learned positions)")
    _require(d.source in ("embedded", "files", "tfds"), f"data.source: {d.source!r} is not one of embedded, files, tfds")
    _require(d.source != "files" or bool(d.paths), "data.paths: data.source=files needs at least one path")
    _require(d.source != "tfds" or bool(d.tfds_name), "data.tfds_name: data.source=tfds needs a dataset name")
    for axis in ("data", "fsdp", "tensor"):
        size = getattr(cfg.mesh, axis)
        _require(size == -1 or size > 0, f"mesh.{axis}: must be positive or -1, got {size}")
    _require([cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor].count(-1) <= 1, "mesh: at most one axis may be -1")
