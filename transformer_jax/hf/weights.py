"""Reading a Hugging Face checkpoint directory's tensors, one at a time: model.safetensors (through
the `safetensors` library's NumPy loader, bfloat16 included), pytorch_model.bin (through torch), or
either sharded behind a `*.index.json`; and finding a tensor under the names other heads or older
versions wrote it with."""

from __future__ import annotations

import glob
import os
from typing import Any

import numpy as np

from transformer_jax.hf.common import _read_json


class _SafetensorsFile:
    """One .safetensors file, read lazily tensor by tensor with `safetensors.safe_open(framework="numpy")`,
    which gives bfloat16 tensors as NumPy arrays of `ml_dtypes.bfloat16` (exact: the stored bits)."""

    def __init__(self, path: str):
        from safetensors import safe_open

        self.path = path
        self.handle = safe_open(path, framework="numpy")
        self.names = list(self.handle.keys())

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.handle.get_slice(key).get_shape())

    def get(self, key: str) -> np.ndarray:
        try:
            return self.handle.get_tensor(key)
        except (TypeError, ValueError) as e:  # an old safetensors without NumPy bfloat16 (ml_dtypes)
            dtype = self.handle.get_slice(key).get_dtype()
            if dtype != "BF16":
                raise
            import safetensors

            raise ValueError(
                f"{self.path}: {key}: safetensors {safetensors.__version__} cannot read this {dtype} "
                f"tensor into NumPy ({e}); upgrade safetensors"
            ) from None


class _TorchFile:
    """One pytorch_model.bin (needs torch)."""

    def __init__(self, path: str):
        try:
            import torch
        except ImportError:
            raise ValueError(
                f"{path}: reading pytorch_model.bin needs torch (pip install torch), "
                "or convert the checkpoint to model.safetensors"
            ) from None
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
        candidates = [
            ("model.safetensors", None),
            ("model.safetensors.index.json", "index"),
            ("pytorch_model.bin", None),
            ("pytorch_model.bin.index.json", "index"),
        ]
        candidates += [
            (os.path.basename(p), "index") for p in sorted(glob.glob(os.path.join(directory, "*.index.json")))
        ]
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
            raise ValueError(
                f"{directory}: no weights (model.safetensors, pytorch_model.bin, or a sharded "
                "*.index.json with its shards)"
            )

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


# ----------------------------------------------------------------------------- finding a tensor
def _alternatives(key: str, prefix: str) -> list[str]:
    """Names a tensor may have in checkpoints written by other heads or older versions."""
    names = [key]
    if prefix and key.startswith(prefix):
        names.append(key[len(prefix) :])
    elif prefix:
        names.append(prefix + key)
    legacy = []
    for n in names:
        if ".LayerNorm.weight" in n or n.endswith("LayerNorm.weight"):
            legacy.append(n[: -len("weight")] + "gamma")
        if n.endswith("LayerNorm.bias"):
            legacy.append(n[: -len("bias")] + "beta")
    return names + legacy


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
