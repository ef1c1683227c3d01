"""Hugging Face tokenizers from a local directory, behind our Tokenizer's small interface
(`load_tokenizer`, `HFTokenizer`), and the files that make up a tokenizer (`TOKENIZER_FILES`).

This module shares its name with the `tokenizers` library: it imports that library absolutely and
under another name (`import tokenizers as hf_tokenizers`), never relatively."""
from __future__ import annotations

import os

from transformer_jax.hf.common import _read_json, _require_local_dir

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model")


class HFTokenizer:
    """A Hugging Face tokenizer behind our Tokenizer's small interface: encode / decode / vocab_size.

    `backend` is the underlying `tokenizers.Tokenizer` (or SentencePieceProcessor for spiece.model).
    encode adds no special tokens.
    """

    def __init__(self, backend, kind: str, path: str):
        self.backend, self.kind, self.path = backend, kind, path

    @property
    def vocab_size(self) -> int:
        if self.kind == "sentencepiece":
            return self.backend.get_piece_size()
        return self.backend.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        if self.kind == "sentencepiece":
            return self.backend.encode(text)
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        return self.backend.decode(ids)

    def token_to_id(self, token: str) -> int | None:
        if self.kind == "sentencepiece":
            i = self.backend.piece_to_id(token)
            return None if i == self.backend.unk_id() and token != self.backend.id_to_piece(i) else i
        return self.backend.token_to_id(token)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, {self.kind}, vocab_size={self.vocab_size})"


def load_tokenizer(local_dir: str | os.PathLike) -> HFTokenizer:
    """The tokenizer of a local Hugging Face directory: tokenizer.json, else vocab.txt (BERT
    WordPiece), vocab.json + merges.txt (GPT-2 byte-level BPE), or spiece.model (T5 SentencePiece)."""
    directory = _require_local_dir(local_dir)
    path = lambda name: os.path.join(directory, name)
    settings = _read_json(path("tokenizer_config.json")) if os.path.isfile(path("tokenizer_config.json")) else {}
    if os.path.isfile(path("tokenizer.json")):
        import tokenizers as hf_tokenizers
        tok = hf_tokenizers.Tokenizer.from_file(path("tokenizer.json"))
        return HFTokenizer(tok, "tokenizers", path("tokenizer.json"))
    if os.path.isfile(path("vocab.txt")):
        import tokenizers as hf_tokenizers
        tok = hf_tokenizers.BertWordPieceTokenizer(path("vocab.txt"),
                                                   lowercase=bool(settings.get("do_lower_case", True)))
        return HFTokenizer(tok, "wordpiece", path("vocab.txt"))
    if os.path.isfile(path("vocab.json")) and os.path.isfile(path("merges.txt")):
        import tokenizers as hf_tokenizers
        tok = hf_tokenizers.ByteLevelBPETokenizer(path("vocab.json"), path("merges.txt"))
        return HFTokenizer(tok, "bpe", path("vocab.json"))
    for name in ("spiece.model", "sentencepiece.bpe.model"):
        if os.path.isfile(path(name)):
            import sentencepiece as spm
            return HFTokenizer(spm.SentencePieceProcessor(model_file=path(name)), "sentencepiece", path(name))
    raise ValueError(f"{directory}: no tokenizer (tokenizer.json, vocab.txt, vocab.json + merges.txt, or spiece.model)")
