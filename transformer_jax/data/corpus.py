"""Text sources: random-access sequences of documents (strings).

Three kinds, all returning a `Documents` (a `Sequence[str]` that reads lazily):

- `embedded_corpus()`: the running Python's own standard-library `.py` files, one
  document per file. Needs no download; the default corpus of `train.pretrain`.
- `local_corpus(paths)`: local `.txt` / `.jsonl` files, folders and globs.
- `tfds_corpus(name, data_dir=...)`: a named TFDS dataset the user prepared in
  `data_dir` (never downloads).

Random access (not just iteration) is what lets the grain pipeline shuffle, shard
by process and resume at any position.
"""

from __future__ import annotations

import glob
import json
import os
import sysconfig
from collections.abc import Callable, Iterable, Sequence
from typing import Any

_TEST_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


class LazySequence(Sequence):
    """A lazily read, random-access sequence: `len(s)`, `s[i]` reads element i; slices and
    `select` give views. Subclasses name their element (`item`) for messages."""

    item = "element"

    def __init__(self, n: int, read: Callable[[int], Any], name: str):
        self._n, self._read, self.name = n, read, name

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.select(range(self._n)[i])
        if not -self._n <= i < self._n:
            raise IndexError(f"{self.item} {i} out of range for {self._n} {self.item}s")
        return self._read(int(i) % self._n)

    def select(self, indices: Iterable[int], name: str | None = None):
        """A view on the elements at `indices` (in that order)."""
        idx = [int(i) for i in indices]
        return type(self)(len(idx), lambda i: self._read(idx[i]), name or self.name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self._n} {self.item}s)"


class Documents(LazySequence):
    """A lazily read, random-access list of documents: `len(docs)`, `docs[i] -> str`.

    `keys[i]` names where document i comes from (a file, `file:line`, `name/split[i]`).
    """

    item = "document"

    def __init__(self, n: int, read: Callable[[int], str], keys: Callable[[int], str], name: str):
        super().__init__(n, read, name)
        self._keys = keys

    def key(self, i: int) -> str:
        return self._keys(i)

    def select(self, indices: Iterable[int], name: str | None = None) -> Documents:
        """A view on the documents at `indices` (in that order)."""
        idx = [int(i) for i in indices]
        return Documents(len(idx), lambda i: self._read(idx[i]), lambda i: self._keys(idx[i]), name or self.name)


def from_strings(texts: Sequence[str], name: str = "strings") -> Documents:
    """Documents from an in-memory list of strings."""
    texts = list(texts)
    _check_not_empty(len(texts), name)
    return Documents(len(texts), texts.__getitem__, lambda i: f"{name}[{i}]", name)


def _check_not_empty(n: int, what: str) -> None:
    if n == 0:
        raise ValueError(f"corpus {what} is empty: it holds no documents")


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


# ----------------------------------------------------------------------------- embedded
def stdlib_files(stdlib_dir: str | None = None) -> list[str]:
    """Sorted paths of the standard library's `.py` files, without test folders and site-packages."""
    root = stdlib_dir or sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _TEST_DIRS and not d.startswith("test"))
        files += [os.path.join(dirpath, f) for f in filenames if f.endswith(".py")]
    return sorted(files)


def embedded_corpus(stdlib_dir: str | None = None) -> Documents:
    """The running Python's standard-library source, one document per `.py` file (sorted by path)."""
    files = stdlib_files(stdlib_dir)
    _check_not_empty(len(files), f"embedded (no .py files under {stdlib_dir or 'the stdlib'})")
    root = stdlib_dir or sysconfig.get_paths()["stdlib"]
    return Documents(
        len(files), lambda i: _read_text(files[i]), lambda i: os.path.relpath(files[i], root), "python-stdlib"
    )


# ----------------------------------------------------------------------------- local files
def expand_paths(paths: str | Sequence[str], extensions: Sequence[str] = (".txt", ".jsonl")) -> list[str]:
    """Files named by `paths`: files, folders (searched recursively) and globs; sorted, deduplicated."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    out: list[str] = []
    for p in map(os.fspath, paths):
        p = os.path.expanduser(p)
        if glob.has_magic(p):
            matches = sorted(glob.glob(p, recursive=True))
            if not matches:
                raise ValueError(f"no files match the glob {p!r}")
            out += [m for m in matches if os.path.isfile(m)]
        elif os.path.isdir(p):
            found = sorted(os.path.join(d, f) for d, _, fs in os.walk(p) for f in fs if f.endswith(tuple(extensions)))
            if not found:
                raise ValueError(f"folder {p!r} holds no {'/'.join(extensions)} files")
            out += found
        elif os.path.isfile(p):
            out.append(p)
        else:
            raise ValueError(f"no such file or folder: {p!r}")
    return sorted(dict.fromkeys(out))


def _jsonl_offsets(path: str) -> list[int]:
    offsets, pos = [], 0
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                offsets.append(pos)
            pos += len(line)
    return offsets


def _get_field(example: Any, field: str) -> Any:
    for part in field.split("/"):
        example = example[part]
    return example


def local_corpus(
    paths: str | Sequence[str], *, text_field: str = "text", txt_unit: str = "file", min_chars: int = 1
) -> Documents:
    """Documents from local `.txt` and `.jsonl` files, folders and globs.

    `.txt`: `txt_unit` 'file' (one document per file), 'paragraph' (split at blank lines)
    or 'line'. `.jsonl`: one document per non-empty line, its `text_field` (a '/' path
    reaches nested fields). Other files are read as '.txt'. Documents shorter than
    `min_chars` are dropped.
    """
    if txt_unit not in ("file", "paragraph", "line"):
        raise ValueError(f"txt_unit must be 'file', 'paragraph' or 'line', got {txt_unit!r}")
    files = expand_paths(paths)
    # Each entry: (file, byte offset for jsonl | None, in-memory text | None).
    entries: list[tuple[str, int | None, str | None]] = []
    for path in files:
        if path.endswith(".jsonl"):
            entries += [(path, off, None) for off in _jsonl_offsets(path)]
        elif txt_unit == "file":
            if os.path.getsize(path) >= min_chars:
                entries.append((path, None, None))
        else:
            text = _read_text(path)
            parts = text.split("\n\n") if txt_unit == "paragraph" else text.splitlines()
            entries += [(path, None, p.strip("\n")) for p in parts if len(p.strip()) >= min_chars]

    def read(i: int) -> str:
        path, off, text = entries[i]
        if text is not None:
            return text
        if off is None:
            return _read_text(path)
        with open(path, "rb") as f:
            f.seek(off)
            line = f.readline()
        try:
            return str(_get_field(json.loads(line), text_field))
        except (KeyError, TypeError) as e:
            raise ValueError(f"{path} at byte {off}: no text field {text_field!r}") from e

    def key(i: int) -> str:
        path, off, _ = entries[i]
        return path if off is None else f"{path}@{off}"

    _check_not_empty(len(entries), f"from {paths!r}")
    return Documents(len(entries), read, key, f"local:{files[0]}" if len(files) == 1 else "local")


# ----------------------------------------------------------------------------- TFDS
def _decode(x: Any) -> str:
    if isinstance(x, bytes):
        return x.decode("utf-8", errors="replace")
    if hasattr(x, "item"):  # numpy scalar / 0-d array
        return _decode(x.item())
    return str(x)


def open_tfds(name: str, *, data_dir: str | None, split: str):
    """A TFDS split prepared under `data_dir`, never downloaded: a random-access data source
    (ArrayRecord) or, for a dataset prepared as TFRecord, a `tf.data.Dataset` the caller reads
    once. Missing data_dir, unknown or unprepared dataset, bad split: a one-line ValueError."""
    import tensorflow_datasets as tfds  # lazy: heavy import
    from etils import epath

    if not data_dir:
        raise ValueError(
            f"TFDS dataset {name!r} needs data_dir: the folder where it was prepared (this program never downloads)"
        )
    if not epath.Path(data_dir).exists():
        raise ValueError(
            f"TFDS data_dir {data_dir!r} does not exist (dataset {name!r} must be "
            "prepared there beforehand; nothing is downloaded)"
        )
    kw = dict(split=split, data_dir=os.fspath(data_dir), download=False, try_gcs=False)
    try:
        try:
            return tfds.data_source(name, **kw)
        except NotImplementedError:  # prepared as TFRecord: no random access
            return tfds.load(name, **kw)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(f"TFDS has no dataset named {name!r}") from None
    except AssertionError:  # TFDS's 'could not find data in <dir>'
        raise ValueError(
            f"TFDS dataset {name!r} is not prepared in data_dir {data_dir!r} (nothing is "
            f"downloaded; prepare it first, e.g. `tfds build {name} --data_dir {data_dir}`)"
        ) from None
    except (KeyError, ValueError) as e:  # e.g. unknown split or config
        raise ValueError(
            f"TFDS dataset {name!r} split {split!r} in {data_dir!r}: {(str(e).splitlines() or [type(e).__name__])[0]}"
        ) from None


def tfds_corpus(
    name: str,
    *,
    data_dir: str | None,
    split: str = "train",
    text_feature: str = "text",
    max_documents: int | None = None,
) -> Documents:
    """Documents from a named TFDS dataset (e.g. 'lm1b', 'c4/en', 'wikipedia/20230601.en')
    already prepared under `data_dir`. Never downloads.

    Random access through `tfds.data_source` (ArrayRecord files). Datasets prepared as
    TFRecord are read once through `tfds.load` into memory (bounded by `max_documents`).
    `text_feature` names the feature holding the text ('/' reaches nested ones, e.g.
    'translation/en'). Missing data_dir, unknown or unprepared dataset: a one-line ValueError.
    """
    import tensorflow_datasets as tfds  # lazy: heavy import

    source = open_tfds(name, data_dir=data_dir, split=split)
    if hasattr(source, "as_numpy_iterator"):  # a tf.data.Dataset: read once into memory
        if max_documents is not None:
            source = source.take(max_documents)
        try:
            source = [_decode(_get_field(ex, text_feature)) for ex in tfds.as_numpy(source)]
        except KeyError:
            raise ValueError(f"TFDS dataset {name!r} has no text feature {text_feature!r}") from None

    n = len(source) if max_documents is None else min(len(source), max_documents)
    _check_not_empty(n, f"TFDS {name}/{split} in {data_dir}")
    if not isinstance(source, list):
        try:
            _get_field(source[0], text_feature)
        except (KeyError, TypeError):
            raise ValueError(
                f"TFDS dataset {name!r} has no text feature {text_feature!r} (its features: {sorted(source[0])})"
            ) from None

    def read(i: int) -> str:
        ex = source[i]
        return ex if isinstance(ex, str) else _decode(_get_field(ex, text_feature))

    return Documents(n, read, lambda i: f"{name}/{split}[{i}]", f"tfds:{name}/{split}")


# ----------------------------------------------------------------------------- dispatch
def get_corpus(
    source: str = "embedded",
    *,
    data_dir: str | None = None,
    split: str = "train",
    text_feature: str = "text",
    max_documents: int | None = None,
    **kw,
) -> Documents:
    """One entry point for configs: 'embedded' | 'tfds:<name>' | local paths/globs (',' separated)."""
    if source in ("embedded", "python-stdlib"):
        docs = embedded_corpus()
    elif source.startswith("tfds:"):
        return tfds_corpus(
            source[len("tfds:") :],
            data_dir=data_dir,
            split=split,
            text_feature=text_feature,
            max_documents=max_documents,
        )
    else:
        docs = local_corpus([p for p in source.split(",") if p], text_field=text_feature, **kw)
    if max_documents is not None and max_documents < len(docs):
        docs = docs.select(range(max_documents))
    return docs


def train_eval_split(
    docs: Documents, *, num_eval: int | None = None, eval_fraction: float = 0.01, seed: int = 0
) -> tuple[Documents, Documents]:
    """Hold out documents for eval: a seeded random choice of `num_eval` (default: `eval_fraction`
    of them, at least 1) documents. Deterministic given the seed and the number of documents."""
    import numpy as np

    n = len(docs)
    held = np.zeros(n, bool)
    held[eval_indices(n, num_eval=num_eval, eval_fraction=eval_fraction, seed=seed)] = True
    return (
        docs.select(np.flatnonzero(~held), docs.name + ":train"),
        docs.select(np.flatnonzero(held), docs.name + ":eval"),
    )


def eval_indices(n: int, *, num_eval: int | None = None, eval_fraction: float = 0.01, seed: int = 0):
    """The sorted indices of the documents `train_eval_split` holds out of n for eval."""
    import numpy as np

    k = max(1, round(n * eval_fraction)) if num_eval is None else num_eval
    if not 0 < k < n:
        raise ValueError(f"cannot hold out {k} of {n} documents for eval")
    return np.sort(np.random.default_rng(seed).permutation(n)[:k])
