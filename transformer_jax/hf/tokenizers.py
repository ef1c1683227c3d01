"""Hugging Face tokenizers from a local directory, behind our Tokenizer's small interface
(`load_tokenizer`, `HFTokenizer`), and the files that make up a tokenizer (`TOKENIZER_FILES`).

This module shares its name with the `tokenizers` library: it imports that library absolutely and
under another name (`import tokenizers as hf_tokenizers`), never relatively."""

from __future__ import annotations

import os

import numpy as np

from transformer_jax.hf.common import _read_json, _require_local_dir

SPECIAL_ROLES = ("pad", "eos", "unk", "bos", "cls", "sep", "mask")
# what a role's token is usually called where the tokenizer's files do not say (BERT, GPT-2, T5)
CONVENTIONAL_TOKENS = {
    "pad": ("[PAD]", "<pad>"),
    "eos": ("</s>", "<|endoftext|>"),
    "unk": ("[UNK]", "<unk>"),
    "cls": ("[CLS]",),
    "sep": ("[SEP]",),
    "mask": ("[MASK]", "<mask>"),
}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
)


class HFTokenizer:
    """A Hugging Face tokenizer behind our Tokenizer's interface: encode / decode / vocab_size, and the
    ids the pretraining objectives read (`pad_id, eos_id, unk_id, bos_id, cls_id, sep_id, mask_id,
    sentinel_ids, special_ids`; -1 where the tokenizer has no such token), and `starts_word` /
    `ends_word` for whole-word masking (WordPiece: a piece without '##'; byte-level BPE and
    SentencePiece: a piece opening with a space marker).

    eos_id ends a document when documents are packed into rows: the eos token, else sep (BERT).
    `backend` is the underlying `tokenizers.Tokenizer` (or SentencePieceProcessor for spiece.model).
    encode adds no special tokens.
    """

    def __init__(self, backend, kind: str, path: str, special_tokens: dict[str, str | tuple[str, ...]] | None = None):
        self.backend, self.kind, self.path = backend, kind, path
        named: dict[str, int] = {}
        for role, tokens in (special_tokens or {}).items():
            found = [
                i for t in ([tokens] if isinstance(tokens, str) else tokens) if (i := self.token_to_id(t)) is not None
            ]
            named[role] = found[0] if found else -1
        ids = {role: named.get(role, -1) for role in SPECIAL_ROLES}
        if kind == "sentencepiece":  # the model itself says which of its pieces are pad / eos / unk / bos
            backend_ids = {
                "pad": backend.pad_id(),
                "eos": backend.eos_id(),
                "unk": backend.unk_id(),
                "bos": backend.bos_id(),
            }
            ids.update({r: i for r, i in backend_ids.items() if ids[r] < 0 and i >= 0})
        if ids["eos"] < 0:
            ids["eos"] = ids["sep"]
        self.pad_id, self.eos_id, self.unk_id, self.bos_id, self.cls_id, self.sep_id, self.mask_id = (
            ids[r] for r in SPECIAL_ROLES
        )
        sentinels: list[int] = []
        while (i := self.token_to_id(f"<extra_id_{len(sentinels)}>")) is not None:
            sentinels.append(i)
        self.sentinel_ids = np.asarray(sentinels, np.int32)
        self.special_ids = np.asarray(
            sorted({i for i in ids.values() if i >= 0} | set(sentinels) | set(self._added_special_ids())), np.int32
        )
        pieces = [self.id_to_piece(i) or "" for i in range(self.vocab_size)]
        if kind == "wordpiece" or (kind == "tokenizers" and any(p.startswith("##") for p in pieces)):
            self.starts_word = np.array([not p.startswith("##") for p in pieces])
            self.ends_word = np.zeros(len(pieces), bool)
        else:  # byte-level BPE 'Ġ', SentencePiece '▁'
            self.starts_word = np.array([p[:1] in ("\u0120", "\u2581") or p[:1].isspace() for p in pieces])
            self.ends_word = np.array([p[-1:].isspace() for p in pieces])
        self.starts_word[self.special_ids] = self.ends_word[self.special_ids] = True

    def _added_special_ids(self) -> list[int]:
        if self.kind == "sentencepiece":
            return []
        backend = getattr(self.backend, "_tokenizer", self.backend)  # BertWordPieceTokenizer & co wrap one
        decoder = backend.get_added_tokens_decoder() if hasattr(backend, "get_added_tokens_decoder") else {}
        return [int(i) for i, token in decoder.items() if getattr(token, "special", False)]

    def id_to_piece(self, i: int) -> str | None:
        if self.kind == "sentencepiece":
            return self.backend.id_to_piece(int(i))
        return self.backend.id_to_token(int(i))

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


def special_tokens(directory: str, settings: dict) -> dict[str, str | tuple[str, ...]]:
    """role ('pad', 'eos', 'cls', ...) -> token text, from special_tokens_map.json and
    tokenizer_config.json (either may hold '<role>_token' as a string or an {"content": ...})."""
    found: dict[str, str | tuple[str, ...]] = {}
    mapping = os.path.join(directory, "special_tokens_map.json")
    for source in (_read_json(mapping) if os.path.isfile(mapping) else {}, settings):
        for role in SPECIAL_ROLES:
            value = source.get(f"{role}_token")
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str) and value:
                found.setdefault(role, value)
    for role, names in CONVENTIONAL_TOKENS.items():  # files that name none: the usual spellings
        found.setdefault(role, names)
    return found


def load_tokenizer(local_dir: str | os.PathLike) -> HFTokenizer:
    """The tokenizer of a local Hugging Face directory: tokenizer.json, else vocab.txt (BERT
    WordPiece), vocab.json + merges.txt (GPT-2 byte-level BPE), or spiece.model (T5 SentencePiece)."""
    directory = _require_local_dir(local_dir)
    path = lambda name: os.path.join(directory, name)
    settings = _read_json(path("tokenizer_config.json")) if os.path.isfile(path("tokenizer_config.json")) else {}
    special = special_tokens(directory, settings)
    if os.path.isfile(path("tokenizer.json")):
        import tokenizers as hf_tokenizers

        tok = hf_tokenizers.Tokenizer.from_file(path("tokenizer.json"))
        return HFTokenizer(tok, "tokenizers", path("tokenizer.json"), special)
    if os.path.isfile(path("vocab.txt")):
        import tokenizers as hf_tokenizers

        tok = hf_tokenizers.BertWordPieceTokenizer(
            path("vocab.txt"), lowercase=bool(settings.get("do_lower_case", True))
        )
        return HFTokenizer(tok, "wordpiece", path("vocab.txt"), special)
    if os.path.isfile(path("vocab.json")) and os.path.isfile(path("merges.txt")):
        import tokenizers as hf_tokenizers

        tok = hf_tokenizers.ByteLevelBPETokenizer(path("vocab.json"), path("merges.txt"))
        return HFTokenizer(tok, "bpe", path("vocab.json"), special)
    for name in ("spiece.model", "sentencepiece.bpe.model"):
        if os.path.isfile(path(name)):
            import sentencepiece as spm

            return HFTokenizer(spm.SentencePieceProcessor(model_file=path(name)), "sentencepiece", path(name), special)
    raise ValueError(f"{directory}: no tokenizer (tokenizer.json, vocab.txt, vocab.json + merges.txt, or spiece.model)")
