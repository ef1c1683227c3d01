"""Parallel text for translation: sources, splits, and the packed input pipeline.

Sources, each a `Pairs` (a random-access sequence of (source, target) strings):

- `gettext_pairs(src, tgt)`: the embedded default, needing no download. Message catalogs
  (`locale/<lang>/LC_MESSAGES/*.po`, or `.mo` where a package ships only those) of installed
  PyPI packages (Django, django-allauth, Sphinx, ... : `GETTEXT_PACKAGES`); the English msgid
  is the source and the msgstr the target. Between two languages other than English the
  pairs pivot through the shared msgid.
- `tfds_pairs(name, data_dir=...)`: a TFDS translation dataset the user prepared
  (`wmt14_translate/de-en`, `wmt17_translate/de-en`, `wmt_t2t_translate/de-en`, ...; never
  downloads). Random access through `tfds.data_source` where the dataset is ArrayRecord.
- `local_pairs(paths)`: a folder in TFDS's `TranslateFolder` layout (`<lang>.<split>.txt`,
  line-aligned; read through `tfds.folder_dataset.TranslateFolder`), TSV files (`source<TAB>
  target` per line), or line-aligned plain files `<prefix>.<lang>` (give the prefix or both).

Pipeline (`make_dataset`): pairs --shard by process--> shuffle (seeded, anew each epoch)
--> repeat --> tokenize (+eos; pairs longer than the row are dropped) --> first-fit packing of
several pairs per row (grain's `FirstFitPackIterDataset`: segment ids and positions restart
per pair, on both sides) --> batch --> decoder inputs (targets shifted right per segment,
starting with the pad id 0). Deterministic; `ResumableIterator` gives its JSON-safe position.

Catalogs are read by libraries: `.po` with Babel (`babel.messages.pofile`), `.mo` with the standard
library's `gettext`. Translating and scoring with a trained model is `transformer_jax.translation`.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import importlib.util
import io
import os
import re
from collections.abc import Sequence

import numpy as np

from transformer_jax.data.corpus import LazySequence
from transformer_jax.data.pipeline import derive_seed, process_shard, stack_pad

# Packages whose gettext catalogs make the embedded corpus (those installed are used:
# pip install django django-allauth humanize). English msgids are the common source side.
GETTEXT_PACKAGES = ("django", "allauth", "sphinx", "rest_framework", "humanize")
MAX_MESSAGE_CHARS = 200


class Pairs(LazySequence):
    """A lazily read, random-access list of (source, target) pairs: `len(p)`, `p[i]`."""

    item = "pair"
    # the dev side of a split made here (split_by_source): its rule and counts (None otherwise)
    split_info: dict | None = None

    @property
    def sources(self) -> list[str]:
        return [self[i][0] for i in range(len(self))]

    @property
    def targets(self) -> list[str]:
        return [self[i][1] for i in range(len(self))]


def from_lists(sources: Sequence[str], targets: Sequence[str], name: str = "pairs") -> Pairs:
    sources, targets = list(sources), list(targets)
    if len(sources) != len(targets):
        raise ValueError(f"{name}: {len(sources)} source lines but {len(targets)} target lines")
    if not sources:
        raise ValueError(f"{name}: no sentence pairs")
    return Pairs(len(sources), lambda i: (sources[i], targets[i]), name)


def clean(text: str) -> str:
    """One line: newlines and runs of whitespace become one space; stripped."""
    return " ".join(text.split())


# ----------------------------------------------------------------------------- gettext catalogs
def read_po(path: str) -> list[tuple[str, str]]:
    """(msgid, msgstr) of a .po file's translated, non-fuzzy entries, parsed by Babel (plural forms:
    the singular with msgstr[0] and the plural with msgstr[1]; a msgctxt is dropped); the header
    (msgid "") and obsolete (#~) entries are skipped."""
    try:
        from babel.messages.pofile import read_po as babel_read_po
    except ImportError:
        raise ImportError(
            f"reading the gettext catalog {path} needs Babel: pip install babel (or transformer-jax[mt])"
        ) from None

    # Babel prints a warning for each malformed line (and skips it): keep stdout for the program's output
    with open(path, "rb") as f, contextlib.redirect_stdout(io.StringIO()):
        catalog = babel_read_po(f, ignore_obsolete=True)
    out: list[tuple[str, str]] = []
    for message in catalog:
        singular = message.id[0] if isinstance(message.id, tuple) else message.id
        if not singular or message.fuzzy:
            continue
        if isinstance(message.id, tuple):  # (singular, plural) -> (msgstr[0], msgstr[1], ...)
            strings = message.string
            assert isinstance(strings, (tuple, list))  # read_po: a plural message's msgstr[n] come as a tuple
            for msgid, msgstr in zip(message.id[:2], strings[:2]):
                if msgid and msgstr:
                    out.append((msgid, msgstr))
        elif message.string:
            assert isinstance(message.id, str) and isinstance(message.string, str)  # read_po: a singular's are str
            out.append((message.id, message.string))
    return out


def read_mo(path: str) -> list[tuple[str, str]]:
    """(msgid, msgstr) of a compiled .mo catalog, through the standard library's gettext (plural
    forms: the singular with msgstr[0], as a .mo does not store the plural msgid; a msgctxt is dropped)."""
    import gettext

    with open(path, "rb") as f:
        catalog = gettext.GNUTranslations(f)._catalog  # type: ignore[attr-defined]  # noqa: SLF001 (the parsed catalog)
    out = []
    for key, value in catalog.items():
        if isinstance(key, tuple):  # (msgid, n) -> plural form n; the plural msgid is not stored
            if key[1] == 0 and key[0]:
                out.append((key[0], value))
        elif key:
            out.append((key.split("\x04")[-1], value))  # drop a msgctxt prefix
    return out


def package_dir(name: str) -> str | None:
    """An installed package's folder, without importing it (None when it is not installed)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def catalog_files(lang: str, packages: Sequence[str] = GETTEXT_PACKAGES) -> dict[tuple[str, str], str]:
    """{(package-relative catalog folder, domain): path} of `lang`'s catalogs in the installed
    packages: `.po`, or `.mo` where a domain has no `.po`."""
    found: dict[tuple[str, str], str] = {}
    for package in packages:
        root = package_dir(package)
        if root is None:
            continue
        # 'de' also finds a package's de_DE when it has no plain de (humanize names them so)
        for pattern in (lang, f"{lang}_*"):
            paths = sorted(
                glob.glob(os.path.join(root, "**", "locale", pattern, "LC_MESSAGES", "*.[mp]o"), recursive=True)
            )
            for path in paths:
                rel = os.path.relpath(path, root).split(os.sep)
                domain = os.path.splitext(rel[-1])[0]
                key = (package + "/" + "/".join(rel[: rel.index("locale")]), domain)
                if key in found and (pattern != lang or found[key].endswith(".po")):
                    continue  # the plain language first; .po over .mo
                found[key] = path
    return found


def _catalog(path: str) -> dict[str, str]:
    pairs = read_po(path) if path.endswith(".po") else read_mo(path)
    return {clean(k): clean(v) for k, v in pairs}


def gettext_pairs(
    source_lang: str = "en",
    target_lang: str = "de",
    *,
    packages: Sequence[str] = GETTEXT_PACKAGES,
    max_chars: int = MAX_MESSAGE_CHARS,
) -> Pairs:
    """Translation pairs from installed packages' gettext catalogs, deduplicated, sorted by
    source. 'en' is the msgid side; two other languages pair up through their shared msgid.
    Messages longer than `max_chars` (either side) are left out."""
    if source_lang == target_lang:
        raise ValueError(f"source and target language are both {source_lang!r}")
    langs = [l for l in (source_lang, target_lang) if l != "en"]
    files = {lang: catalog_files(lang, packages) for lang in langs}
    common = set.intersection(*(set(f) for f in files.values()))
    pairs: set[tuple[str, str]] = set()
    for key in sorted(common):
        catalogs = {lang: _catalog(files[lang][key]) for lang in langs}
        for msgid in set.intersection(*(set(c) for c in catalogs.values())):
            text = {"en": msgid, **{lang: catalogs[lang][msgid] for lang in langs}}
            src, tgt = text[source_lang], text[target_lang]
            if src and tgt and len(src) <= max_chars and len(tgt) <= max_chars:
                pairs.add((src, tgt))
    if not pairs:
        installed = [p for p in packages if package_dir(p) is not None]
        raise ValueError(
            f"no gettext catalogs for {source_lang}->{target_lang} in the installed packages "
            f"({', '.join(installed) or 'none of ' + ', '.join(packages)}); install "
            "django, django-allauth and humanize (pip), or choose another language pair"
        )
    ordered = sorted(pairs)
    return Pairs(len(ordered), ordered.__getitem__, f"gettext:{source_lang}-{target_lang}")


# ----------------------------------------------------------------------------- TFDS
def tfds_pairs(
    name: str,
    *,
    data_dir: str | None,
    split: str = "train",
    source_lang: str = "en",
    target_lang: str = "de",
    max_examples: int | None = None,
) -> Pairs:
    """(source, target) pairs of a TFDS translation dataset prepared under `data_dir`: its
    features are language codes ('de', 'en'), e.g. `wmt14_translate/de-en`. Never downloads."""
    from transformer_jax.data import corpus

    def field(lang):
        return lambda ex: corpus._decode(ex[lang])  # noqa: SLF001

    try:
        src_docs = corpus.tfds_corpus(
            name, data_dir=data_dir, split=split, text_feature=source_lang, max_documents=max_examples
        )
    except ValueError as e:
        raise ValueError(str(e).replace("text feature", "language")) from None
    # the same source again for the target language (random access: one more view, no copy)
    tgt_docs = corpus.tfds_corpus(
        name, data_dir=data_dir, split=split, text_feature=target_lang, max_documents=max_examples
    )
    return Pairs(len(src_docs), lambda i: (clean(src_docs[i]), clean(tgt_docs[i])), f"tfds:{name}/{split}")


# ----------------------------------------------------------------------------- local files
def _read_lines(path: str) -> list[str]:
    with open(path, encoding="utf-8", errors="replace") as f:
        return [line.rstrip("\n").rstrip("\r") for line in f]


def is_translate_folder(path: str) -> bool:
    """A folder in TFDS's TranslateFolder layout: files named <lang>.<split>.txt."""
    return os.path.isdir(path) and any(re.fullmatch(r"[^.]+\.[^.]+\.txt", f) for f in os.listdir(path))


def translate_folder_pairs(root: str, *, split: str, source_lang: str, target_lang: str) -> Pairs:
    """A split of a TranslateFolder (`<lang>.<split>.txt`, one sentence per line) through TFDS's
    folder builder."""
    import tensorflow_datasets as tfds

    try:
        builder = tfds.folder_dataset.TranslateFolder(root_dir=root)
    except ValueError as e:  # line counts differ between languages
        raise ValueError(f"{root}: {str(e).splitlines()[0]}") from None
    splits = sorted(builder.info.splits.keys())
    if split not in splits:
        raise ValueError(f"{root} has no split {split!r} (it has {', '.join(splits)}; files <lang>.<split>.txt)")
    languages = list(builder.info.features.keys())
    for lang in (source_lang, target_lang):
        if lang not in languages:
            raise ValueError(f"{root} has no language {lang!r} (it has {', '.join(languages)})")
    examples = list(tfds.as_numpy(builder.as_dataset(split=split)))
    return from_lists(
        [clean(ex[source_lang].decode("utf-8")) for ex in examples],
        [clean(ex[target_lang].decode("utf-8")) for ex in examples],
        f"folder:{root}/{split}",
    )


def local_pairs(
    paths: str | Sequence[str], *, source_lang: str = "en", target_lang: str = "de", split: str = "train"
) -> Pairs:
    """Pairs from local files: a TranslateFolder (the `split` is read), `.tsv` files (source TAB
    target; more columns are ignored), or line-aligned files given as `<prefix>` (reads
    `<prefix>.<source_lang>` and `<prefix>.<target_lang>`) or as the two files themselves."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else [os.fspath(p) for p in paths]
    paths = [os.path.expanduser(p) for p in paths]
    if len(paths) == 1 and is_translate_folder(paths[0]):
        return translate_folder_pairs(paths[0], split=split, source_lang=source_lang, target_lang=target_lang)
    if len(paths) == 2 and all(os.path.isfile(p) and not p.endswith(".tsv") for p in paths):
        return from_lists(
            [clean(s) for s in _read_lines(paths[0])], [clean(t) for t in _read_lines(paths[1])], f"files:{paths[0]}"
        )
    sources: list[str] = []
    targets: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            raise ValueError(
                f"{p}: a folder of parallel text must hold <lang>.<split>.txt files (TFDS TranslateFolder layout)"
            )
        if p.endswith(".tsv") and os.path.isfile(p):
            for n, line in enumerate(_read_lines(p), 1):
                if not line.strip():
                    continue
                cols = line.split("\t")
                if len(cols) < 2:
                    raise ValueError(f"{p}:{n}: a TSV line needs source<TAB>target")
                sources.append(clean(cols[0]))
                targets.append(clean(cols[1]))
        elif os.path.isfile(f"{p}.{source_lang}") and os.path.isfile(f"{p}.{target_lang}"):
            src, tgt = _read_lines(f"{p}.{source_lang}"), _read_lines(f"{p}.{target_lang}")
            if len(src) != len(tgt):
                raise ValueError(f"{p}.{source_lang} has {len(src)} lines but {p}.{target_lang} has {len(tgt)}")
            sources += [clean(s) for s in src]
            targets += [clean(t) for t in tgt]
        else:
            raise ValueError(
                f"no parallel text at {p!r}: expected a <lang>.<split>.txt folder, a .tsv file, "
                f"or {p}.{source_lang} with {p}.{target_lang}"
            )
    keep = [i for i, (s, t) in enumerate(zip(sources, targets)) if s and t]
    return from_lists([sources[i] for i in keep], [targets[i] for i in keep], f"files:{paths[0]}")


# ----------------------------------------------------------------------------- splits
# A dev source this close to a training source (Levenshtein: character insertions, deletions and
# substitutions) is a near duplicate: gettext catalogs repeat messages with small changes across
# packages ("%(num)d hour" / "%(num)d hours", "Action" / "Action:"), and BLEU on them is flattered.
NEAR_DUPLICATE_DISTANCE = 3


def near_duplicate_rule(max_distance: int) -> str:
    return f"source within Levenshtein (character edit) distance {max_distance} of a training source"


def _source_hash(text: str, seed: int) -> int:
    return int.from_bytes(hashlib.md5(f"{seed}:{text}".encode()).digest()[:8], "little")


def _close(queries: Sequence[str], choices: Sequence[str], max_distance: int, cells: int = 1 << 24):
    """(column offset, bool [len(queries), width]) blocks: choice within `max_distance` edits of
    query (rapidfuzz's Levenshtein, bounded by the cutoff; the choices in column blocks)."""
    try:
        from rapidfuzz import process
        from rapidfuzz.distance import Levenshtein
    except ImportError:
        raise ImportError("the near-duplicate check of the dev split needs rapidfuzz: pip install rapidfuzz") from None
    width = max(1, cells // max(1, len(queries)))
    for start in range(0, len(choices), width):
        block = process.cdist(
            list(queries),
            list(choices[start : start + width]),
            scorer=Levenshtein.distance,
            score_cutoff=max_distance,
            dtype=np.int32,
            workers=-1,
        )
        yield start, block <= max_distance


def near_duplicates(
    queries: Sequence[str], references: Sequence[str], max_distance: int = NEAR_DUPLICATE_DISTANCE
) -> np.ndarray:
    """Which queries lie within `max_distance` character edits (Levenshtein; 0: the same string) of
    some reference: a bool array, one per query."""
    out = np.zeros(len(queries), bool)
    if len(queries) and len(references):
        for _, close in _close(queries, references, max_distance):
            out |= close.any(axis=1)
    return out


def split_by_source(
    pairs: Pairs, *, num_eval: int, seed: int = 0, max_edit_distance: int | None = NEAR_DUPLICATE_DISTANCE
) -> tuple[Pairs, Pairs]:
    """Hold out about `num_eval` pairs for eval, chosen by a seeded hash of the source text: every
    pair with a held-out source is held out, so no source sentence is in both sets.

    With `max_edit_distance` (default 3; None: off, the plain split) a held-out pair whose source is
    within that many character edits (Levenshtein) of any training source is removed from dev.
    Sources are compared as the readers give them (`clean`: whitespace runs made one space,
    stripped), case kept; exact repeats of a source never straddle the split (distance 0).
    Sources are held out in hash order until `num_eval` dev pairs survive the check (so more are
    held out than by the plain split), at most half of the distinct sources; fewer survive only
    when that cap is reached. A removed pair goes back to training unless its source is within the
    distance of a dev source too (then it is in neither set). The dev Pairs' `split_info` records
    the rule and the counts (`dev_removed_near_duplicates`, `returned_to_train`, `dropped`,
    `dev_pairs`). Deterministic for a seed."""
    n = len(pairs)
    if not 0 < num_eval < n:
        raise ValueError(f"cannot hold out {num_eval} of {n} pairs for eval")
    sources = [pairs[i][0] for i in range(n)]
    count: dict[str, int] = {}
    for s in sources:
        count[s] = count.get(s, 0) + 1
    order = sorted(count, key=lambda s: _source_hash(s, seed))
    counts = np.array([count[s] for s in order], np.int64)
    # ready[i]: the fewest held-out sources (a prefix of `order`) with which source i is in dev:
    # it is held out (i < k) and every source within the distance is held out too
    if max_edit_distance is None:
        ready, cap = np.arange(1, len(order) + 1), len(order)
    else:
        ready, cap = np.zeros(0, np.int64), max(1, len(order) // 2)
    computed = len(ready)
    while True:
        if computed < cap and max_edit_distance is not None:
            stop = min(cap, max(2 * num_eval, 2 * computed))
            last = np.full(stop - computed, -1, np.int64)  # the last (in `order`) source each is close to
            for start, close in _close(order[computed:stop], order, max_edit_distance):
                rows, cols = np.nonzero(close)
                cols = cols + start
                keep = cols != rows + computed  # not itself
                np.maximum.at(last, rows[keep], cols[keep])
            ready = np.concatenate([ready, np.maximum(np.arange(computed, stop), last) + 1])
            computed = stop
        # dev pairs with k sources held out, k <= computed: those i with ready[i] <= k
        now = ready <= computed
        dev_size = np.cumsum(np.bincount(ready[now], weights=counts[:computed][now], minlength=computed + 1))
        reached = np.nonzero(dev_size >= num_eval)[0]
        if len(reached) or computed >= cap:
            k = int(reached[0]) if len(reached) else cap
            break
    dev_sources = [order[i] for i in range(k) if ready[i] <= k]
    if not dev_sources:
        raise ValueError(
            f"no dev pair left: every held-out source of {pairs.name} is within {max_edit_distance} "
            "edits of a training source (give a separate eval split)"
        )
    removed = [order[i] for i in range(k) if ready[i] > k]
    # a removed source no dev source is close to goes back to training; the others are dropped
    dropped = (
        {s for s, near in zip(removed, near_duplicates(removed, dev_sources, max_edit_distance)) if near}
        if max_edit_distance is not None
        else set()  # no distance check: nothing was removed
    )
    dev_set = set(dev_sources)
    held = [i for i in range(n) if sources[i] in dev_set]
    kept = [i for i in range(n) if sources[i] not in dev_set and sources[i] not in dropped]
    train, dev = pairs.select(kept, pairs.name + ":train"), pairs.select(held, pairs.name + ":eval")
    removed_pairs = sum(count[s] for s in removed)
    dev.split_info = {
        "rule": None if max_edit_distance is None else near_duplicate_rule(max_edit_distance),
        "max_edit_distance": max_edit_distance,
        "held_out_pairs": len(held) + removed_pairs,  # looked at for dev, before the check
        "dev_removed_near_duplicates": removed_pairs,
        "returned_to_train": removed_pairs - sum(count[s] for s in dropped),
        "dropped": sum(count[s] for s in dropped),  # near both sides: in neither set
        "dev_pairs": len(held),
    }
    return train, dev


def tokenizer_texts(pairs: Pairs, max_pairs: int = 200_000, seed: int = 0) -> list[str]:
    """Both sides of (a seeded sample of) the pairs: what the shared vocabulary is trained on."""
    n = len(pairs)
    idx = np.random.default_rng(seed).permutation(n)[:max_pairs] if n > max_pairs else range(n)
    out = []
    for i in idx:
        src, tgt = pairs[int(i)]
        out += [src, tgt]
    return out


# ----------------------------------------------------------------------------- pipeline
def shift_right(targets: np.ndarray, segment_ids: np.ndarray, start_id: int = 0) -> np.ndarray:
    """Decoder inputs from packed targets [b, t]: each segment's tokens moved one step right,
    its first position `start_id`."""
    out = np.full_like(targets, start_id)
    out[:, 1:] = targets[:, :-1]
    first = np.ones_like(segment_ids, bool)
    first[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    out[first] = start_id
    out[segment_ids == 0] = 0
    return out


def model_batch(packed: dict[str, np.ndarray], start_id: int = 0) -> dict[str, np.ndarray]:
    """A packed grain batch -> the encoder-decoder's inputs, targets and loss mask."""
    seg, dseg = packed["inputs_segment_ids"].astype(np.int32), packed["targets_segment_ids"].astype(np.int32)
    targets = packed["targets"].astype(np.int32)
    return {
        "input_ids": packed["inputs"].astype(np.int32),
        "attention_mask": (seg > 0).astype(np.int32),
        "segment_ids": seg,
        "positions": packed["inputs_positions"].astype(np.int32),
        "decoder_input_ids": shift_right(targets, dseg, start_id).astype(np.int32),
        "decoder_attention_mask": (dseg > 0).astype(np.int32),
        "decoder_segment_ids": dseg,
        "decoder_positions": packed["targets_positions"].astype(np.int32),
        "targets": targets,
        "loss_mask": (dseg > 0).astype(np.float32),
    }


MODEL_INPUTS = (
    "input_ids",
    "attention_mask",
    "segment_ids",
    "positions",
    "decoder_input_ids",
    "decoder_attention_mask",
    "decoder_segment_ids",
    "decoder_positions",
)


def batch_shapes(*, source_len: int, target_len: int, batch_size: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    i32, f32 = np.dtype(np.int32), np.dtype(np.float32)
    shapes: dict[str, tuple[tuple[int, ...], np.dtype]] = {
        k: ((batch_size, source_len), i32) for k in ("input_ids", "attention_mask", "segment_ids", "positions")
    }
    shapes.update(
        {
            k: ((batch_size, target_len), i32)
            for k in (
                "decoder_input_ids",
                "decoder_attention_mask",
                "decoder_segment_ids",
                "decoder_positions",
                "targets",
            )
        }
    )
    shapes["loss_mask"] = ((batch_size, target_len), f32)
    return shapes


def make_dataset(
    pairs: Pairs,
    tokenizer,
    *,
    source_len: int,
    target_len: int,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    drop_remainder: bool = True,
    num_packing_bins: int | None = None,
    num_threads: int = 2,
    prefetch_buffer_size: int = 64,
):
    """A grain IterDataset of packed translation batches (shapes in `batch_shapes`).

    Each pair is tokenized with eos appended on both sides; a pair longer than the row on either
    side is dropped (truncating would teach the model to stop translating halfway). Pairs are
    packed first-fit into `num_packing_bins` rows at a time (default 2 * batch_size), so rows hold
    several short pairs and few pad tokens. drop_remainder=False pads the last batch with empty
    rows (eval)."""
    import grain

    if len(pairs) == 0:
        raise ValueError("no sentence pairs to train on")
    shard = process_shard(len(pairs), process_index, process_count, "pairs")
    eos = tokenizer.eos_id
    seeds = {k: derive_seed(seed, process_index, k) for k in ("pairs", "bins")}

    def encode(k):
        src, tgt = pairs[int(shard[k])]
        s = tokenizer.encode(src) + [eos]
        t = tokenizer.encode(tgt) + [eos]
        if len(s) > source_len or len(t) > target_len:
            return None
        return {"inputs": np.asarray(s, np.int32), "targets": np.asarray(t, np.int32)}

    ds = grain.MapDataset.range(len(shard))
    if shuffle:
        ds = ds.shuffle(seed=seeds["pairs"])
    ds = ds.repeat(num_epochs).map(encode).filter(lambda ex: ex is not None)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size))
    it = grain.experimental.FirstFitPackIterDataset(
        it,
        length_struct={"inputs": source_len, "targets": target_len},
        num_packing_bins=num_packing_bins or 2 * batch_size,
        seed=seeds["bins"],
        shuffle_bins=shuffle,
    )
    it = it.batch(
        batch_size, drop_remainder=drop_remainder, batch_fn=functools.partial(stack_pad, batch_size=batch_size)
    )
    return it.map(model_batch)


def make_eval_dataset(pairs: Pairs, tokenizer, **kw):
    """One pass in order, last batch padded: the same eval batches every time."""
    return make_dataset(pairs, tokenizer, shuffle=False, num_epochs=1, drop_remainder=False, **kw)
