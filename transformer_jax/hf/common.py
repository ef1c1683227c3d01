"""What every part of `transformer_jax.hf` shares: the supported architectures, local-directory and
JSON reading, and the tensor layout conversions a family's mapping table is written in (`Entry`,
`Spec`, and the helpers that walk our parameter tree and pad / cut its vocabulary dimension)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import NamedTuple

import numpy as np

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


# ----------------------------------------------------------------------------- directories and JSON
def _require_local_dir(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(
            f"{path!r} is not a local directory: transformer_jax.hf never downloads. Download the model "
            f"yourself (e.g. `huggingface-cli download {path} --local-dir DIR`) and pass that local directory"
        )
    return path


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


# ----------------------------------------------------------------------------- the mapping's vocabulary
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


@dataclasses.dataclass
class _Spec:
    entries: list[Entry]
    tied: dict[str, str]  # HF key -> the HF key it must equal (written by neither side)
    ignored: tuple[str, ...] = ()  # HF key suffixes that carry no weights (buffers)
    prefix: str = ""  # the base-model prefix ('bert.', 'transformer.') the heads sit beside


def _norm(hf: str, ours: tuple, bias: bool = True) -> list[Entry]:
    out = [Entry(f"{hf}.weight", (ours + ("scale",),))]
    return out + [Entry(f"{hf}.bias", (ours + ("bias",),), "bias")] if bias else out


def _dense(hf: str, ours: tuple, inputs: int = 1, bias: bool = True, kind: str = "linear") -> list[Entry]:
    out = [Entry(f"{hf}.weight", (ours + ("kernel",),), kind, inputs)]
    return out + [Entry(f"{hf}.bias", (ours + ("bias",),), "bias")] if bias else out


# ----------------------------------------------------------------------------- layout conversions
def _hf_shape(entry: Entry, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    if entry.kind == "copy":
        return shapes[0]
    ins = math.prod(shapes[0][: entry.inputs])
    outs = (
        sum(math.prod(s[entry.inputs :]) for s in shapes) if entry.kind != "bias" else sum(math.prod(s) for s in shapes)
    )
    return {"linear": (outs, ins), "conv": (ins, outs), "bias": (outs,)}[entry.kind]


def _to_ours(entry: Entry, array: np.ndarray, shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    if entry.kind == "copy":
        return [array]
    axis = 1 if entry.kind == "conv" else 0
    sizes = [math.prod(s[entry.inputs :]) if entry.kind != "bias" else math.prod(s) for s in shapes]
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
    flat = [a.reshape(math.prod(a.shape[: entry.inputs]), -1) for a in arrays]
    joined = np.concatenate(flat, axis=1)
    return np.ascontiguousarray(joined.T if entry.kind == "linear" else joined)


# ----------------------------------------------------------------------------- our parameter tree
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
