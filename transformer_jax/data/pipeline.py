"""Deterministic, resumable input pipeline on grain.

    documents (random access) --shard by process--> shuffle (seeded, new order each epoch)
      --> repeat --> tokenize (+eos) --> pack into rows (concat-then-split, segment_ids and
      positions restart per document) --> window shuffle --> batch --> objective (seeded)

Same seed, same batches. `it = iter(dataset)`: `it.get_state()` is a JSON-serialisable dict;
`iter(dataset).set_state(state)` continues with exactly the batches an uninterrupted run sees.
Each process reads only its own documents (`documents[process_index::process_count]`) and
yields its per-process batch of `batch_size` rows.

    ds = make_dataset(docs, tok, objective="clm", seq_len=128, batch_size=8, seed=0)
    it = iter(ds); batch = next(it)      # dict of NumPy arrays of fixed shapes
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import grain
import numpy as np

from transformer_jax import objectives as obj


def derive_seed(seed: int, *keys: int | str) -> int:
    """A uint32 seed from a seed and keys (process index, a stage name): independent streams."""
    ints = [k if isinstance(k, int) else int.from_bytes(k.encode()[:8], "little") for k in keys]
    return int(np.random.SeedSequence([seed, *ints]).generate_state(1)[0])


def stack_pad(rows: Sequence[dict[str, np.ndarray]], batch_size: int | None = None) -> dict[str, np.ndarray]:
    """Stacks rows; a short last batch (drop_remainder=False) is padded to batch_size with all-zero
    rows (every mask and weight 0)."""
    batch = {k: np.stack([np.asarray(r[k]) for r in rows]) for k in rows[0]}
    if batch_size and len(rows) < batch_size:
        batch = {
            k: np.concatenate([v, np.zeros((batch_size - len(rows), *v.shape[1:]), v.dtype)]) for k, v in batch.items()
        }
    return batch


def process_shard(n: int, process_index: int, process_count: int, items: str) -> np.ndarray:
    """The indices of n examples that this process reads: every process_count-th, from its own."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    shard = np.arange(n)[process_index::process_count]
    if len(shard) == 0:
        raise ValueError(f"{n} {items} cannot feed {process_count} processes")
    return shard


def process_rows(
    batches: Iterable[dict[str, np.ndarray]], process_index: int, process_count: int
) -> Iterator[dict[str, np.ndarray]]:
    """This process's rows of each global batch: process i of n keeps rows [i*B/n, (i+1)*B/n).
    Every process reads the same global batches (eval), so together they feed the mesh what one
    process would."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    iterator = iter(batches)
    try:
        for batch in iterator:
            rows = len(next(iter(batch.values())))
            if rows % process_count:
                raise ValueError(f"a batch of {rows} rows does not split over {process_count} processes")
            start, stop = process_index * rows // process_count, (process_index + 1) * rows // process_count
            yield {k: v[start:stop] for k, v in batch.items()}
    finally:  # an eval that stops early closes its reader (prefetch threads) now, not at garbage collection
        close(iterator)


def close(iterator) -> None:
    """Close an iterator that holds threads or worker processes (grain's, a generator); others have none."""
    closer = getattr(iterator, "close", None)
    if closer is not None:
        closer()


class _Flatten(grain.experimental.FlatMapTransform):
    max_fan_out = 1 << 30

    def flat_map(self, element):
        return element


def span_targets_length(seq_len: int, noise_density: float = 0.15, mean_noise_span_length: float = 3.0) -> int:
    """Decoder length for span corruption with encoder length seq_len (T5: 512 -> 114)."""
    return obj.span_corruption_lengths(seq_len, noise_density, mean_noise_span_length)[1]


Options = dict[str, Any]  # an objective's data knobs (`objective_options(cfg.data)`): mask_rate, noise_density, ...


@dataclasses.dataclass(frozen=True)
class BatchContext:
    """What an objective's batch builder may read: the tokenizer, the lengths and its options."""

    tokenizer: Any
    seq_len: int
    batch_size: int
    options: Options

    @property
    def mask_kw(self) -> dict:  # masked_lm / mlm_nsp's masking arguments
        t, o = self.tokenizer, self.options
        return dict(
            vocab_size=t.vocab_size,
            mask_id=t.mask_id,
            special_ids=t.special_ids,
            mask_rate=o["mask_rate"],
            whole_word=o["whole_word"],
            starts_word=getattr(t, "starts_word", None),
            ends_word=getattr(t, "ends_word", None),
        )


def text_objective(objective):
    """A registered text objective (`transformer_jax.tasks.text.TextObjective`), by name or itself."""
    if not isinstance(objective, str):
        return objective
    from transformer_jax import tasks  # the registry imports nothing until asked: no import circle

    found = tasks.get(objective) if objective in tasks.REGISTRY else None
    if not hasattr(found, "batch_fn"):
        text = [n for n in tasks.REGISTRY if hasattr(tasks.get(n), "batch_fn")]
        raise ValueError(f"unknown objective {objective!r}; choose one of {', '.join(text)}")
    return found


def make_dataset(
    documents: Sequence[str] | None,
    tokenizer,
    *,
    objective="clm",
    seq_len: int = 128,
    batch_size: int = 8,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    drop_remainder: bool = True,
    shuffle_window: int = 2048,
    mask_rate: float = 0.15,
    whole_word: bool = False,
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
    num_threads: int = 2,
    prefetch_buffer_size: int = 64,
    encoded: Sequence[np.ndarray] | None = None,
) -> grain.IterDataset:
    """A grain IterDataset of batches (dicts of NumPy arrays, shapes in `batch_shapes`).

    objective: a text objective's name ('clm', 'mlm', 'mlm_nsp', 'span_corruption', ...: see
    `transformer_jax.tasks`) or the objective itself.
    num_epochs None repeats forever (each epoch shuffled anew). shuffle_window: rows (pairs for
    mlm_nsp) are also shuffled within windows of this size, so consecutive rows of one long
    document spread over batches; 0 or 1 disables. drop_remainder=False pads the last batch
    with all-zero rows (every mask and weight 0): use it for eval.
    encoded: pre-tokenised documents (`encoded[i]`: the ids of document i, no eos, e.g. from
    `transformer_jax.data.prepared`); read instead of running the tokenizer (documents may be None).
    """
    spec = text_objective(objective)
    if documents is None and encoded is None:
        raise ValueError("make_dataset needs documents or encoded documents")
    if documents is not None and encoded is not None and len(documents) != len(encoded):
        raise ValueError(f"{len(documents)} documents but {len(encoded)} encoded documents")
    source = encoded if encoded is not None else documents
    assert source is not None  # one of the two: checked above
    num_documents = len(source)
    if num_documents == 0:
        raise ValueError("the corpus is empty: it holds no documents")
    shard = process_shard(num_documents, process_index, process_count, "documents")
    seeds = {k: derive_seed(seed, process_index, k) for k in ("docs", "window", "pairs", "objective")}
    read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size)
    options = dict(
        mask_rate=mask_rate,
        whole_word=whole_word,
        noise_density=noise_density,
        mean_noise_span_length=mean_noise_span_length,
    )
    build = spec.batch_fn(BatchContext(tokenizer, seq_len, batch_size, options))

    ds = grain.MapDataset.range(len(shard))  # local document index k -> shard[k]
    if shuffle:
        ds = ds.shuffle(seed=seeds["docs"])
    ds = ds.repeat(num_epochs)

    def encode(k: int, eos: bool = True) -> np.ndarray:
        if encoded is not None:
            ids = np.asarray(encoded[int(shard[k])], np.int32)
            return np.concatenate([ids, np.asarray([tokenizer.eos_id], np.int32)]) if eos else ids
        assert documents is not None  # no encoded documents: these, checked above
        ids = tokenizer.encode(documents[int(shard[k])])
        return np.asarray(ids + [tokenizer.eos_id] if eos else ids, np.int32)

    if spec.rows == "pairs":  # next-sentence prediction: (A, B, is_next) pairs, not packed rows
        # Segments are whole lines (BERT's sentences, for code and text alike); each random B is a
        # segment from a line start of its own randomly drawn other document: see `objectives.nsp_pairs`.
        line_ends = line_ending_ids(tokenizer)

        def other(k: int, rng: np.random.Generator) -> np.ndarray:  # any document but k, uniformly
            return encode((k + int(rng.integers(1, len(shard)))) % len(shard) if len(shard) > 1 else k, eos=False)

        def pairs(k: int, rng: np.random.Generator):
            return obj.nsp_pairs(
                encode(k, eos=False),
                rng,
                chunk_len=(seq_len - 3) // 2,
                random_tokens=functools.partial(other, k),
                line_ends=line_ends,
            )

        it = ds.random_map(pairs, seed=seeds["pairs"]).to_iter_dataset(read)
        it = grain.experimental.FlatMapIterDataset(it, _Flatten())
        batch_fn: Callable[[Sequence[Any]], list | dict[str, np.ndarray]] = list
    else:
        it = ds.map(lambda k: {"tokens": encode(k)}).to_iter_dataset(read)
        it = grain.experimental.ConcatThenSplitIterDataset(
            it, length_struct={"tokens": spec.row_length(seq_len, options)}
        )
        batch_fn = functools.partial(stack_pad, batch_size=batch_size)
    if shuffle and shuffle_window > 1:
        it = grain.experimental.WindowShuffleIterDataset(it, window_size=shuffle_window, seed=seeds["window"])
    it = it.batch(batch_size, drop_remainder=drop_remainder, batch_fn=batch_fn)
    if not spec.random:
        return it.map(lambda rows: build(rows, None))
    return it.random_map(build, seed=seeds["objective"])


def line_ending_ids(tokenizer) -> np.ndarray | None:
    """bool [vocab_size]: the ids whose piece holds a newline (they end a line); None for a
    tokenizer without `id_to_piece` (NSP then cuts fixed windows)."""
    if not hasattr(tokenizer, "id_to_piece"):
        return None
    return np.array(["\n" in tokenizer.id_to_piece(i) for i in range(tokenizer.vocab_size)], bool)


def in_workers(dataset: grain.IterDataset, workers: int) -> grain.IterDataset:
    """The whole pipeline (reading, tokenising, packing, the objective) run in `workers` grain
    worker processes (`mp_prefetch`); 0 = in this process. Batches are deterministic for a given
    worker count (not across counts: each worker packs its own documents), and the iterator's
    state holds every worker's position, so a checkpoint resumes exactly. Worker processes are
    spawned: a script that calls this needs the `if __name__ == "__main__":` guard."""
    if workers == 0:
        return dataset
    from absl import flags

    if not flags.FLAGS.is_parsed():  # grain reads absl flags in its workers; programs here parse none
        flags.FLAGS.mark_as_parsed()
    return dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))


def make_eval_dataset(documents: Sequence[str] | None, tokenizer, *, seed: int = 0, **kw) -> grain.IterDataset:
    """One pass in order, last batch padded (all-zero rows): the same eval batches every time."""
    return make_dataset(documents, tokenizer, seed=seed, shuffle=False, num_epochs=1, drop_remainder=False, **kw)


def objective_options(data_cfg) -> dict:
    """The objective's knobs from a DataConfig, as `make_dataset` and `batch_shapes` take them."""
    return dict(
        mask_rate=data_cfg.mask_rate,
        whole_word=data_cfg.whole_word_masking,
        noise_density=data_cfg.noise_density,
        mean_noise_span_length=data_cfg.mean_noise_span_length,
    )


def batch_shapes(
    objective,
    *,
    seq_len: int,
    batch_size: int,
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
    mask_rate: float = 0.15,
    whole_word: bool = False,
) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{key: (shape, dtype)} of the batches `make_dataset` yields (for abstract inputs / shardings);
    the same make_dataset options give the same shapes (whole_word changes none)."""
    options = dict(
        mask_rate=mask_rate,
        whole_word=whole_word,
        noise_density=noise_density,
        mean_noise_span_length=mean_noise_span_length,
    )
    return text_objective(objective).shapes(batch_size, seq_len, options)


def get_state(iterator) -> dict[str, Any]:
    """The iterator's position: a JSON-serialisable dict (save it with each checkpoint)."""
    return iterator.get_state()


def restore(dataset: grain.IterDataset, state: dict[str, Any] | None):
    """A fresh iterator over `dataset`, moved to `state` (None: the beginning)."""
    it = iter(dataset)
    if state is not None:
        it.set_state(state)
    return it


def _to_json(x):
    """grain states hold tuples, which JSON would turn into lists (and grain then misreads)."""
    if isinstance(x, tuple):
        return {"__tuple__": [_to_json(v) for v in x]}
    if isinstance(x, dict):
        return {k: _to_json(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_to_json(v) for v in x]
    return x


def _from_json(x):
    if isinstance(x, dict):
        if set(x) == {"__tuple__"}:
            return tuple(_from_json(v) for v in x["__tuple__"])
        return {k: _from_json(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_from_json(v) for v in x]
    return x


class ResumableIterator:
    """A dataset's iterator whose position survives a JSON checkpoint: iter / get_state / set_state."""

    def __init__(self, dataset):
        self.iterator = iter(dataset)

    def __iter__(self):
        return self.iterator

    def __next__(self):
        return next(self.iterator)

    def get_state(self) -> dict[str, Any]:
        return _to_json(self.iterator.get_state())

    def set_state(self, state: dict[str, Any]) -> None:
        self.iterator.set_state(_from_json(state))

    def close(self) -> None:
        """Stop the prefetch threads and worker processes (idempotent)."""
        self.iterator.close()
