"""Shared pieces of the finetuning tasks: the task / data types, text-to-text conversion, special
ids, augmentation, and the encoding of examples into fixed-shape NumPy batches. The sources
(`embedded`, `glue`, `squad`, `files`) build on this module; nothing here imports them.

Example dicts: classification / regression `{text, text_pair, label}`; token classification
`{words, labels}`; qa `{id, question, context, answers, answer_starts}`; text-to-text `{input,
target}` (plus `label` when derived from a classification task).

Batches (`Encoder`): `input_ids, attention_mask, token_type_ids` [b, s] and `example_weight`
[b] (0 on padding rows), and per kind `labels` [b] (classification int / regression float),
`labels, label_weights` [b, s] (token classification), `start_positions, end_positions` [b]
(qa), `decoder_input_ids, decoder_attention_mask, targets, target_weights` [b, t]
(text-to-text). With two views (contrastive loss) the inputs come again with suffix `_2`.

Augmentation (`Augmentation`, training batches only): token noise (drop / replace / mask),
sentence reordering (lines for code), and back-translation through any `str -> str` round-trip
callable (e.g. a translation model of this project: `round_trip(en_de, de_en)`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any, overload

import numpy as np

from transformer_jax.data.pipeline import derive_seed, process_shard, stack_pad

KINDS = ("classification", "regression", "token_classification", "qa", "text_to_text")


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str  # one of KINDS
    label_names: tuple[str, ...] = ()  # classes (classification, token classification)
    metrics: tuple[str, ...] = ("accuracy",)  # computed at eval (metrics.compute / squad / exact_match)
    main_metric: str = "accuracy"  # picks the best checkpoint; higher is better
    text_names: tuple[str, str] = ("text", "text_pair")  # field names (text-to-text prompts)

    @property
    def num_labels(self) -> int:
        return 1 if self.kind == "regression" else len(self.label_names)


@dataclasses.dataclass
class TaskData:
    spec: TaskSpec
    train: list[dict]
    eval: list[dict]
    # inputs of the task's kind without labels (never eval text): distillation's transfer set
    unlabeled: list[dict] = dataclasses.field(default_factory=list)


def _limit(items: list, n: int) -> list:
    return items[:n] if n else items


# ----------------------------------------------------------------------------- text-to-text
def regression_target(value: float) -> str:
    """T5's STS-B targets: the score rounded to the nearest 0.2, one decimal."""
    return f"{round(value * 5) / 5:.1f}"


def as_text_to_text(data: TaskData) -> TaskData:
    """A classification / regression task as text-to-text (T5): the input names the task and its
    fields ('mrpc sentence1: ... sentence2: ...'), the target is the label's name (or score)."""
    spec = data.spec
    if spec.kind == "text_to_text":
        return data
    if spec.kind not in ("classification", "regression"):
        raise ValueError(f"finetune.head: text_to_text works for classification and regression tasks, not {spec.kind}")
    prefix = spec.name.split("/")[-1]
    first, second = spec.text_names

    def convert(ex):
        text = f"{prefix} {first}: {ex['text']}"
        if ex.get("text_pair") is not None:
            text += f" {second}: {ex['text_pair']}"
        target = regression_target(ex["label"]) if spec.kind == "regression" else spec.label_names[ex["label"]]
        marked = {"labeled": ex["labeled"]} if "labeled" in ex else {}  # a transfer set's marks stay
        return {"input": text, "target": target, "label": ex["label"], **marked}

    new_spec = dataclasses.replace(
        spec,
        kind="text_to_text",
        metrics=spec.metrics + ("exact_match",),
        label_names=spec.label_names if spec.kind == "classification" else (),
    )
    new_spec = dataclasses.replace(new_spec, text_names=(spec.kind, new_spec.text_names[1]))
    return TaskData(new_spec, *([convert(e) for e in part] for part in (data.train, data.eval, data.unlabeled)))


def source_kind(spec: TaskSpec) -> str:
    """For a text-to-text task derived by as_text_to_text: how its targets are scored."""
    return (
        spec.text_names[0]
        if spec.kind == "text_to_text" and spec.text_names[0] in ("classification", "regression")
        else spec.kind
    )


# ----------------------------------------------------------------------------- tokens
@dataclasses.dataclass(frozen=True)
class SpecialIds:
    pad: int
    cls: int | None
    sep: int | None
    mask: int | None
    eos: int | None
    vocab_size: int
    special: tuple[int, ...]


def special_ids(tokenizer) -> SpecialIds:
    """The ids a task encoder needs, from our SentencePiece Tokenizer or a Hugging Face one."""
    if hasattr(tokenizer, "cls_id"):
        opt = lambda i: None if i is None or i < 0 else int(i)
        return SpecialIds(
            int(tokenizer.pad_id),
            opt(tokenizer.cls_id),
            opt(tokenizer.sep_id),
            opt(tokenizer.mask_id),
            opt(tokenizer.eos_id),
            int(tokenizer.vocab_size),
            tuple(int(i) for i in tokenizer.special_ids),
        )
    find = lambda *names: next((i for i in (tokenizer.token_to_id(n) for n in names) if i is not None), None)
    pad = find("[PAD]", "<pad>", "<|endoftext|>")
    ids = SpecialIds(
        pad if pad is not None else 0,
        find("[CLS]", "<s>"),
        find("[SEP]", "</s>"),
        find("[MASK]", "<mask>"),
        find("</s>", "<|endoftext|>", "[SEP]"),
        int(tokenizer.vocab_size),
        (),
    )
    return dataclasses.replace(
        ids, special=tuple(sorted({i for i in (ids.pad, ids.cls, ids.sep, ids.mask, ids.eos) if i is not None}))
    )


# ----------------------------------------------------------------------------- augmentation
def round_trip(forward: Callable[[str], str], backward: Callable[[str], str]) -> Callable[[str], str]:
    """Back-translation: text -> forward (e.g. en->de) -> backward (de->en)."""
    return lambda text: backward(forward(text))


def split_sentences(text: str) -> list[str]:
    """Lines for multi-line text (code), else sentences ending in . ! or ?."""
    if "\n" in text.strip():
        return text.split("\n")
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """Training-time augmentation; each probability 0 switches its part off. `translator` is the
    back-translation hook: a `str -> str` round trip (see `round_trip`), applied with probability
    `back_translate`."""

    token_drop: float = 0.0
    token_replace: float = 0.0
    token_mask: float = 0.0
    sentence_shuffle: float = 0.0
    back_translate: float = 0.0
    translator: Callable[[str], str] | None = None

    @property
    def active(self) -> bool:
        return any((self.token_drop, self.token_replace, self.token_mask, self.sentence_shuffle, self.back_translate))

    @overload
    def text(self, text: str, rng: np.random.Generator | None) -> str: ...
    @overload
    def text(self, text: None, rng: np.random.Generator | None) -> None: ...
    def text(self, text: str | None, rng: np.random.Generator | None) -> str | None:
        """rng may be None where nothing is drawn: all of this augmentation's probabilities 0."""
        if text is None:
            return None
        if not (self.sentence_shuffle or self.back_translate):
            return text
        assert rng is not None, "an active augmentation draws from rng"
        if self.sentence_shuffle and rng.random() < self.sentence_shuffle:
            parts = split_sentences(text)
            if len(parts) > 1:
                joiner = "\n" if "\n" in text.strip() else " "
                text = joiner.join(parts[int(i)] for i in rng.permutation(len(parts)))
        if self.back_translate and rng.random() < self.back_translate:
            if self.translator is None:
                raise ValueError(
                    "finetune.back_translate: needs a translator (a str -> str round trip); none was given"
                )
            text = self.translator(text)
        return text

    def tokens(
        self, ids: Sequence[int], rng: np.random.Generator | None, special: SpecialIds, *, allow_drop: bool = True
    ) -> list[int]:
        """Token noise on non-special ids: drop, replace by a random non-special id, or [MASK]. rng may be
        None where nothing is drawn (no noise of any kind, or no ids)."""
        drop = self.token_drop if allow_drop else 0.0
        if not (drop or self.token_replace or self.token_mask) or not len(ids):
            return list(ids)
        assert rng is not None, "an active augmentation draws from rng"
        u = rng.random(len(ids))
        random_ids = rng.integers(0, special.vocab_size, len(ids))
        specials = set(special.special)
        out = []
        for i, token in enumerate(ids):
            if token in specials:
                out.append(int(token))
            elif u[i] < drop:
                continue
            elif u[i] < drop + self.token_replace:
                r = int(random_ids[i])
                out.append(r if r not in specials else int(token))
            elif u[i] < drop + self.token_replace + self.token_mask and special.mask is not None:
                out.append(special.mask)
            else:
                out.append(int(token))
        return out


# ----------------------------------------------------------------------------- encoding
def _truncate_pair(a: list[int], b: list[int] | None, budget: int) -> tuple[list[int], list[int] | None]:
    a = list(a)
    b = None if b is None else list(b)
    while len(a) + (len(b) if b is not None else 0) > budget:
        if b is not None and len(b) > len(a):
            b.pop()
        else:
            a.pop()
    return a, b


@dataclasses.dataclass
class Encoder:
    """Turns examples of a task into fixed-shape features (dicts of NumPy arrays) and batches."""

    spec: TaskSpec
    tokenizer: Any
    seq_len: int
    family: str = "encoder"  # encoder | encoder_decoder
    target_len: int = 8
    doc_stride: int = 32
    augmentation: Augmentation = dataclasses.field(default_factory=Augmentation)

    def __post_init__(self):
        self.ids = special_ids(self.tokenizer)
        if self.spec.kind == "text_to_text":
            if self.family != "encoder_decoder":
                raise ValueError(f"finetune.head: text_to_text needs an encoder_decoder model, got {self.family}")
            if self.ids.eos is None:
                raise ValueError("the tokenizer has no end-of-sequence token (</s>), which text_to_text needs")
        elif self.ids.cls is None or self.ids.sep is None:
            raise ValueError("the tokenizer has no [CLS] / [SEP] tokens, which an encoder's task inputs need")

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    # ---- sequence classification / regression
    def _sequence(self, a: list[int], b: list[int] | None) -> dict[str, np.ndarray]:
        s, ids = self.seq_len, self.ids
        a, b = _truncate_pair(a, b, s - (3 if b is not None else 2))
        row = [ids.cls, *a, ids.sep] + ([*b, ids.sep] if b is not None else [])
        types = [0] * (len(a) + 2) + ([1] * (len(b) + 1) if b is not None else [])
        out = {
            "input_ids": np.full(s, ids.pad, np.int32),
            "attention_mask": np.zeros(s, np.int32),
            "token_type_ids": np.zeros(s, np.int32),
        }
        out["input_ids"][: len(row)] = row
        out["attention_mask"][: len(row)] = 1
        out["token_type_ids"][: len(row)] = types
        return out

    def _sequence_view(self, ex: dict, rng: np.random.Generator | None) -> dict[str, np.ndarray]:
        aug = self.augmentation if rng is not None else Augmentation()
        text, pair = aug.text(ex["text"], rng), aug.text(ex.get("text_pair"), rng)
        a = aug.tokens(self.encode(text), rng, self.ids)
        b = None if pair is None else aug.tokens(self.encode(pair), rng, self.ids)
        return self._sequence(a, b)

    # ---- token classification
    def _words(self, ex: dict, rng: np.random.Generator | None) -> dict[str, np.ndarray]:
        s, ids = self.seq_len, self.ids
        pieces = self.tokenizer.encode_batch(ex["words"]) if ex["words"] else []
        tokens, labels, weights = [ids.cls], [0], [0.0]
        for word_pieces, label in zip(pieces, ex["labels"]):
            word_pieces = list(word_pieces) or [ids.pad]
            if rng is not None:
                word_pieces = self.augmentation.tokens(word_pieces, rng, self.ids, allow_drop=False)
            if len(tokens) + len(word_pieces) > s - 1:
                break
            tokens += word_pieces
            labels += [label] + [0] * (len(word_pieces) - 1)
            weights += [1.0] + [0.0] * (len(word_pieces) - 1)
        tokens.append(ids.sep)
        labels.append(0)
        weights.append(0.0)
        out = self._sequence([], None)
        out["input_ids"][:] = ids.pad
        out["attention_mask"][:] = 0
        out["input_ids"][: len(tokens)] = tokens
        out["attention_mask"][: len(tokens)] = 1
        out["labels"] = np.zeros(s, np.int32)
        out["labels"][: len(labels)] = labels
        out["label_weights"] = np.zeros(s, np.float32)
        out["label_weights"][: len(weights)] = weights
        return out

    # ---- text-to-text
    def _text_to_text(self, ex: dict, rng: np.random.Generator | None) -> dict[str, np.ndarray]:
        s, t, ids = self.seq_len, self.target_len, self.ids
        aug = self.augmentation if rng is not None else Augmentation()
        source = aug.tokens(self.encode(aug.text(ex["input"], rng)), rng, self.ids)[: s - 1] + [ids.eos]
        target = self.encode(ex["target"])[: t - 1] + [ids.eos]
        out = {
            "input_ids": np.full(s, ids.pad, np.int32),
            "attention_mask": np.zeros(s, np.int32),
            "decoder_input_ids": np.full(t, ids.pad, np.int32),
            "decoder_attention_mask": np.zeros(t, np.int32),
            "targets": np.full(t, ids.pad, np.int32),
            "target_weights": np.zeros(t, np.float32),
        }
        out["input_ids"][: len(source)] = source
        out["attention_mask"][: len(source)] = 1
        decoder_inputs = [ids.pad] + target[:-1]  # T5 starts decoding from the pad id
        out["decoder_input_ids"][: len(decoder_inputs)] = decoder_inputs
        out["decoder_attention_mask"][: len(decoder_inputs)] = 1
        out["targets"][: len(target)] = target
        out["target_weights"][: len(target)] = 1.0
        return out

    # ---- extractive QA
    def qa_features(self, ex: dict, *, train: bool) -> list[dict[str, Any]]:
        """[CLS] question [SEP] context window [SEP] features over windows of the context (doc
        stride). Context tokens come from its whitespace-separated words, so each token maps back to
        a word's characters. Training features carry start/end positions (0 = [CLS] when the answer
        is not inside the window); eval features carry `token_to_chars` for post-processing."""
        s, ids = self.seq_len, self.ids
        context = ex["context"]
        words = [(m.start(), m.end()) for m in re.finditer(r"\S+", context)]
        pieces = self.tokenizer.encode_batch([context[a:b] for a, b in words]) if words else []
        tokens, token_word = [], []
        for w, word_pieces in enumerate(pieces):
            tokens += list(word_pieces)
            token_word += [w] * len(word_pieces)
        question = self.encode(ex["question"])[: max(1, s // 2)]
        budget = s - len(question) - 3
        if budget < 8:
            raise ValueError(f"data.seq_len: {s} leaves no room for the context after a {len(question)}-token question")
        answer_span = None
        if train and ex["answers"]:
            start_char = ex["answer_starts"][0]
            end_char = start_char + len(ex["answers"][0]) - 1
            start_word = next((w for w, (a, b) in enumerate(words) if a <= start_char < b), None)
            end_word = next((w for w, (a, b) in enumerate(words) if a <= end_char < b), None)
            if start_word is not None and end_word is not None:
                start_tok = token_word.index(start_word)
                end_tok = len(token_word) - 1 - token_word[::-1].index(end_word)
                answer_span = (start_tok, end_tok)
        features, start = [], 0
        stride = max(1, min(self.doc_stride, budget))
        while True:
            window = list(range(start, min(start + budget, len(tokens))))
            row = [ids.cls, *question, ids.sep] + [tokens[i] for i in window] + [ids.sep]
            offset = len(question) + 2
            f = self._sequence([], None)
            f["input_ids"][:] = ids.pad
            f["attention_mask"][:] = 0
            f["input_ids"][: len(row)] = row
            f["attention_mask"][: len(row)] = 1
            f["token_type_ids"][offset : len(row)] = 1
            if train:
                sp = ep = 0
                if answer_span and window and window[0] <= answer_span[0] and answer_span[1] <= window[-1]:
                    sp, ep = answer_span[0] - window[0] + offset, answer_span[1] - window[0] + offset
                f["start_positions"], f["end_positions"] = np.int32(sp), np.int32(ep)
            else:
                chars = np.full((s, 2), -1, np.int64)
                for j, i in enumerate(window):
                    chars[offset + j] = words[token_word[i]]
                f["token_to_chars"] = chars
            features.append(f)
            if start + budget >= len(tokens):
                break
            start += stride
        return features

    # ---- one example -> features
    def features(self, ex: dict, rng: np.random.Generator | None = None, *, views: int = 1) -> dict[str, np.ndarray]:
        """Features of one (non-QA) example; rng given = training (augmentation applies); views=2
        adds a second, independently augmented view of the inputs (keys with suffix '_2')."""
        kind = self.spec.kind
        if kind == "token_classification":
            out = self._words(ex, rng)
        elif kind == "text_to_text":
            out = self._text_to_text(ex, rng)
        elif kind in ("classification", "regression"):
            out = self._sequence_view(ex, rng)
            out["labels"] = np.asarray(ex["label"], np.float32 if kind == "regression" else np.int32)
        else:
            raise ValueError(f"{kind} examples are encoded with qa_features")
        if views == 2:
            second = (
                self._words(ex, rng)
                if kind == "token_classification"
                else self._text_to_text(ex, rng)
                if kind == "text_to_text"
                else self._sequence_view(ex, rng)
            )
            out.update({f"{k}_2": second[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in second})
        out["example_weight"] = np.float32(1.0)
        if "labeled" in ex:  # a train set with a transfer set: the hard loss counts labelled examples only
            out["hard_weight"] = np.float32(ex["labeled"])
        return out


def train_dataset(
    encoder: Encoder,
    examples: Sequence[dict],
    *,
    batch_size: int,
    seed: int,
    views: int = 1,
    process_index: int = 0,
    process_count: int = 1,
    num_threads: int = 2,
):
    """An endless, seeded, resumable grain IterDataset of training batches (augmented when the
    encoder's augmentation is on): shuffled anew each epoch; each process reads its own examples."""
    import grain

    if encoder.spec.kind == "qa":  # windows are computed once; QA has no augmentation
        items = [f for ex in examples for f in encoder.qa_features(ex, train=True)]
        make = lambda item, rng: {**item, "example_weight": np.float32(1.0)}
    else:
        items = list(examples)
        make = lambda item, rng: encoder.features(item, rng, views=views)
    shard = [items[i] for i in process_shard(len(items), process_index, process_count, "training examples")]
    ds = grain.MapDataset.range(len(shard)).shuffle(seed=derive_seed(seed, process_index, "examples")).repeat(None)
    ds = ds.random_map(lambda i, rng: make(shard[int(i)], rng), seed=derive_seed(seed, process_index, "augment"))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=4 * batch_size))
    return it.batch(batch_size, drop_remainder=True, batch_fn=stack_pad)


def eval_features(encoder: Encoder, examples: Sequence[dict]) -> tuple[list[dict], list[int]]:
    """(features, the example index of each feature) in order; QA examples give several features."""
    if encoder.spec.kind == "qa":
        features, owners = [], []
        for i, ex in enumerate(examples):
            for f in encoder.qa_features(ex, train=False):
                features.append({**f, "example_weight": np.float32(1.0)})
                owners.append(i)
        return features, owners
    return [encoder.features(ex) for ex in examples], list(range(len(examples)))


def batches(features: Sequence[dict], batch_size: int):
    """Fixed-size batches in order, the last padded with zero rows (example_weight 0)."""
    for start in range(0, len(features), batch_size):
        yield stack_pad(features[start : start + batch_size], batch_size)
