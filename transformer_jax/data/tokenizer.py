"""SentencePiece tokenizer: trained on (a bounded sample of) the corpus, saved with the run.

Reserved ids: pad=0, eos=1, unk=2, bos=3; then the user-defined pieces [CLS], [SEP],
[MASK] and the T5 sentinels <extra_id_0> .. <extra_id_{N-1}>; then 256 byte pieces
(byte fallback: any text round-trips) and the learned pieces.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np

PAD_ID, EOS_ID, UNK_ID, BOS_ID = 0, 1, 2, 3
CLS, SEP, MASK = "[CLS]", "[SEP]", "[MASK]"
WORD_START = "\u2581"  # SentencePiece's '▁'


def sentinel(i: int) -> str:
    return f"<extra_id_{i}>"


class Tokenizer:
    """A SentencePiece model with the ids the objectives need.

    `encode(str) -> list[int]` (no eos/bos added), `decode(list[int]) -> str`,
    `pad_id, eos_id, unk_id, bos_id, cls_id, sep_id, mask_id, sentinel_ids, vocab_size`,
    `special_ids` (all of the above: never masked or corrupted), `starts_word` / `ends_word`
    (bool per id, for whole-word masking).
    """

    def __init__(self, model_path: str | os.PathLike):
        import sentencepiece as spm

        self.path = os.fspath(model_path)
        if not os.path.isfile(self.path):
            raise ValueError(f"no SentencePiece model at {self.path!r}")
        self.sp = spm.SentencePieceProcessor(model_file=self.path)
        self.vocab_size = self.sp.get_piece_size()
        self.pad_id, self.eos_id, self.unk_id, self.bos_id = (
            self.sp.pad_id(),
            self.sp.eos_id(),
            self.sp.unk_id(),
            self.sp.bos_id(),
        )
        self.cls_id, self.sep_id, self.mask_id = (self._piece_id(p) for p in (CLS, SEP, MASK))
        sentinels: list[int] = []
        while self.sp.piece_to_id(sentinel(len(sentinels))) != self.unk_id:
            sentinels.append(self.sp.piece_to_id(sentinel(len(sentinels))))
        self.sentinel_ids = np.asarray(sentinels, np.int32)
        ids = [self.pad_id, self.eos_id, self.unk_id, self.bos_id, self.cls_id, self.sep_id, self.mask_id]
        self.special_ids = np.asarray(sorted({i for i in ids if i >= 0} | set(sentinels)), np.int32)
        # Word boundaries for whole-word masking: a piece starts a word if it begins with '▁' or
        # whitespace, and the piece after one that ends with whitespace (e.g. '\n') starts one too.
        pieces = [self.sp.id_to_piece(i) for i in range(self.vocab_size)]
        self.starts_word = np.array([p[:1].isspace() or p.startswith(WORD_START) for p in pieces])
        self.ends_word = np.array([p[-1:].isspace() or p.endswith(WORD_START) for p in pieces])
        self.starts_word[self.special_ids] = self.ends_word[self.special_ids] = True

    def _piece_id(self, piece: str) -> int:
        i = self.sp.piece_to_id(piece)
        return -1 if i == self.unk_id else i

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.sp.encode(list(texts))

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def __repr__(self) -> str:
        return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size})"


def _training_text(documents: Sequence[str], max_chars: int, chunk_chars: int, seed: int) -> Iterator[str]:
    """A seeded sample of the documents, cut at line ends into chunks of <= chunk_chars."""
    total = 0
    for i in np.random.default_rng(seed).permutation(len(documents)):
        text = documents[int(i)]
        start = 0
        while start < len(text) and total < max_chars:
            end = min(len(text), start + chunk_chars)
            if end < len(text):
                nl = text.rfind("\n", start, end)
                end = nl + 1 if nl > start else end
            chunk = text[start:end]
            start = end
            if chunk.strip():
                total += len(chunk)
                yield chunk
        if total >= max_chars:
            return


def train_sentencepiece(
    documents: Sequence[str],
    vocab_size: int,
    path_prefix: str | os.PathLike,
    *,
    num_sentinels: int = 100,
    model_type: str = "bpe",
    max_chars: int = 3_000_000,
    chunk_chars: int = 2000,
    seed: int = 0,
    character_coverage: float = 0.9995,
    num_threads: int | None = None,
    verbose: bool = False,
) -> Tokenizer:
    """Trains a SentencePiece model on a seeded sample (<= max_chars) of `documents` and saves
    it as `<path_prefix>.model` (e.g. `<workdir>/tokenizer.model`); returns the Tokenizer.

    Text is kept exactly (identity normalisation, whitespace and newlines kept, byte
    fallback), so source code round-trips. The vocabulary may come out smaller than
    `vocab_size` on a tiny corpus: read the real size from `Tokenizer.vocab_size`.
    """
    import sentencepiece as spm

    path_prefix = os.fspath(path_prefix)
    user_symbols = [CLS, SEP, MASK] + [sentinel(i) for i in range(num_sentinels)]
    reserved = 4 + len(user_symbols) + 256  # control + user-defined + byte pieces
    if vocab_size < reserved + 64:
        raise ValueError(
            f"vocab_size {vocab_size} is too small: {reserved} ids are reserved "
            f"({num_sentinels} sentinels and 256 byte pieces); use >= {reserved + 64}"
        )
    os.makedirs(os.path.dirname(path_prefix) or ".", exist_ok=True)
    t0 = time.time()
    spm.set_random_generator_seed(seed)
    spm.SentencePieceTrainer.train(
        sentence_iterator=_training_text(documents, max_chars, chunk_chars, seed),
        model_prefix=path_prefix,
        vocab_size=vocab_size,
        model_type=model_type,
        pad_id=PAD_ID,
        eos_id=EOS_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        bos_piece="<s>",
        user_defined_symbols=user_symbols,
        byte_fallback=True,
        character_coverage=character_coverage,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        max_sentence_length=4 * chunk_chars + 16,
        hard_vocab_limit=False,
        shuffle_input_sentence=True,
        input_sentence_size=0,
        num_threads=num_threads or os.cpu_count() or 1,
        minloglevel=0 if verbose else 2,
    )
    if verbose:
        print(f"trained SentencePiece ({vocab_size}) in {time.time() - t0:.1f}s -> {path_prefix}.model")
    return Tokenizer(path_prefix + ".model")


def load_or_train_tokenizer(
    workdir: str | os.PathLike,
    documents: Sequence[str] | Callable | None = None,
    vocab_size: int = 8000,
    *,
    path: str | os.PathLike | None = None,
    **train_kw,
) -> Tokenizer:
    """`path` if given; else `<workdir>/tokenizer.model` if it exists (a resumed run); else train
    it on `documents` (or on what `documents()` returns, so costly text is gathered only when
    needed) and save it there."""
    if path is not None:
        return Tokenizer(path)
    model = os.path.join(os.fspath(workdir), "tokenizer.model")
    if os.path.isfile(model):
        return Tokenizer(model)
    if documents is None:
        raise ValueError(f"no tokenizer at {model!r} and no documents to train one on")
    documents = documents() if callable(documents) else documents
    return train_sentencepiece(documents, vocab_size, os.path.join(os.fspath(workdir), "tokenizer"), **train_kw)
