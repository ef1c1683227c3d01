"""Image-caption data: the embedded shapes dataset, TFDS image-caption datasets, the grain pipeline.

Sources are random-access `ImageCaptions`: `len(src)`, `src[i] -> {"image": uint8 [H, W, C],
"captions": [str, ...], "pair_id": int}`; examples with equal `pair_id` show the same content
(no one's negative).

- `shapes_dataset(n)`: needs no download and no files. Example i is drawn from a generator seeded
  by (seed, split, i): two coloured shapes on a dark background, with the caption that describes
  them, e.g. "a red circle above a blue square" (6 colours x 4 shapes, relations above / below /
  left of / right of). "a blue square below a red circle" describes the same layout: the pair_id
  is the canonical layout (first object, second object, axis), so the two are each other's match.
  Each example also carries its `layout` (first object, relation, second object), from which
  `negative_layout` makes a caption one edit away (a hard negative that is never a paraphrase).
- `tfds_image_captions(name, data_dir=...)`: `coco_captions` (captions/text) or any TFDS dataset
  with an image feature and one caption (or a list of captions), prepared under `data_dir`;
  never downloads. pair_id = the example index.

`make_dataset` is the deterministic, resumable grain pipeline (shard by process, seeded shuffle
each epoch, one caption drawn per image per epoch, image centre-cropped and resized, caption
tokenised as [CLS] + pieces, batched, optional BERT masking of the caption for MLM). Batches:
`pixels` [b, S, S, C] uint8, `input_ids`, `attention_mask` [b, t] int32, `pair_id` [b] int32,
`example_weight` [b] float32 (0 on the padding rows of a last eval batch), and with mlm
`mlm_input_ids`, `mlm_targets` [b, t] int32, `mlm_weights` [b, t] float32, and with caption
negatives (shapes only: each example's caption with one attribute changed, `negative_layout`)
`negative_input_ids`, `negative_attention_mask` [b, t] int32.
"""

from __future__ import annotations

import functools
from typing import Any

import grain
import numpy as np

from transformer_jax import objectives as obj
from transformer_jax.data.corpus import LazySequence, _decode, _get_field, open_tfds
from transformer_jax.data.pipeline import derive_seed, process_shard, stack_pad

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 45, 45),
    "green": (45, 185, 70),
    "blue": (60, 95, 235),
    "yellow": (240, 215, 45),
    "purple": (165, 70, 210),
    "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle", "cross")
RELATIONS = ("above", "below", "left of", "right of")
BACKGROUND = 28


class ImageCaptions(LazySequence):
    """A random-access image-caption source: `src[i] -> {"image", "captions", "pair_id"}`."""

    item = "example"


def _shape_mask(kind: str, dy: np.ndarray, dx: np.ndarray, r: float) -> np.ndarray:
    if kind == "circle":
        return dx * dx + dy * dy <= r * r
    if kind == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.8 * r
    if kind == "triangle":  # apex up
        return (dy >= -r) & (dy <= 0.75 * r) & (np.abs(dx) <= 0.55 * (dy + r))
    if kind == "cross":
        return ((np.abs(dx) <= 0.33 * r) & (np.abs(dy) <= r)) | ((np.abs(dy) <= 0.33 * r) & (np.abs(dx) <= r))
    raise ValueError(f"unknown shape {kind!r}")


def layout_id(first: int, relation: str, second: int) -> int:
    """Canonical id of 'first RELATION second' (objects numbered colour * len(SHAPES) + shape):
    'A below B' is 'B above A', 'A right of B' is 'B left of A'."""
    if relation in ("below", "right of"):
        first, second = second, first
    axis = 0 if relation in ("above", "below") else 1
    return (first * len(COLORS) * len(SHAPES) + second) * 2 + axis


def render_shapes(rng: np.random.Generator, image_size: int = 32) -> dict:
    """One example: two different coloured shapes in the relation the caption names."""
    k = len(COLORS) * len(SHAPES)
    first = int(rng.integers(k))
    second = int((first + rng.integers(1, k)) % k)
    relation = RELATIONS[int(rng.integers(len(RELATIONS)))]
    return {
        "image": render_layout((first, relation, second), rng, image_size),
        "captions": [describe(first, relation, second)],
        "pair_id": layout_id(first, relation, second),
        "layout": (first, relation, second),
    }


def render_layout(layout: tuple[int, str, int], rng: np.random.Generator, image_size: int = 32) -> np.ndarray:
    """uint8 [image_size, image_size, 3]: the two objects of `layout` (first, relation, second) on a
    dark background, placed (and sized) at random where the relation says."""
    first, relation, second = layout
    s = float(image_size)
    # the first object's centre on the named side, the second's on the other, free along the other axis
    near, far = rng.uniform(0.17, 0.33, 2) * s, rng.uniform(0.67, 0.83, 2) * s
    along = rng.uniform(0.2, 0.8, 2) * s
    a, b = (near[0], far[0]) if relation in ("above", "left of") else (far[0], near[0])
    if relation in ("above", "below"):
        centres = [(a, along[0]), (b, along[1])]  # (y, x)
    else:
        centres = [(along[0], a), (along[1], b)]
    image = np.clip(BACKGROUND + rng.normal(0, 6, (image_size, image_size, 3)), 0, 255)
    yy, xx = np.mgrid[0:image_size, 0:image_size] + 0.5
    for obj_id, (cy, cx) in zip((first, second), centres):
        color, shape = divmod(obj_id, len(SHAPES))
        r = rng.uniform(0.14, 0.19) * s
        mask = _shape_mask(SHAPES[shape], yy - cy, xx - cx, r)
        image[mask] = COLORS[list(COLORS)[color]]
    return image.astype(np.uint8)


def describe(first: int, relation: str, second: int) -> str:
    """The caption of a layout: 'a red circle above a blue square'."""
    colors = list(COLORS)
    name = lambda i: f"{colors[i // len(SHAPES)]} {SHAPES[i % len(SHAPES)]}"
    return f"a {name(first)} {relation} a {name(second)}"


NEGATIVE_KINDS = ("colour", "shape", "relation", "swap")


def negative_layout(layout: tuple[int, str, int], rng: np.random.Generator) -> tuple[tuple[int, str, int], str]:
    """A layout one edit away from `layout` that shows something else (NegCLIP's caption negatives,
    Yuksekgonul et al. 2023): one object's colour or shape changed, the relation changed, or the two
    objects' colours swapped. Never a paraphrase ('A above B' is 'B below A': another layout_id),
    never two equal objects. Returns (the layout, its kind: one of NEGATIVE_KINDS)."""
    first, relation, second = layout
    ns, nc = len(SHAPES), len(COLORS)
    while True:
        kind = NEGATIVE_KINDS[int(rng.integers(len(NEGATIVE_KINDS)))]
        objects, rel = [first, second], relation
        (c1, s1), (c2, s2) = divmod(first, ns), divmod(second, ns)
        which = int(rng.integers(2))
        color, shape = divmod(objects[which], ns)
        if kind == "colour":
            objects[which] = (color + int(rng.integers(1, nc))) % nc * ns + shape
        elif kind == "shape":
            objects[which] = color * ns + (shape + int(rng.integers(1, ns))) % ns
        elif kind == "relation":
            rel = [r for r in RELATIONS if r != relation][int(rng.integers(len(RELATIONS) - 1))]
        else:
            objects = [c2 * ns + s1, c1 * ns + s2]
        new = (objects[0], rel, objects[1])
        if objects[0] != objects[1] and layout_id(*new) != layout_id(*layout):
            return new, kind


def shapes_dataset(num_examples: int, *, image_size: int = 32, seed: int = 0, split: str = "train") -> ImageCaptions:
    """`num_examples` generated examples; example i depends only on (seed, split, i)."""
    if num_examples <= 0:
        raise ValueError(f"the shapes dataset needs a positive number of examples, got {num_examples}")
    base = derive_seed(seed, "shapes", split)
    return ImageCaptions(
        num_examples, lambda i: render_shapes(np.random.default_rng([base, i]), image_size), f"shapes/{split}"
    )


# ----------------------------------------------------------------------------- TFDS
CAPTION_FEATURES = ("captions/text", "caption", "text", "captions")


def _captions(value: Any) -> list[str]:
    if isinstance(value, (str, bytes)) or (hasattr(value, "ndim") and value.ndim == 0):
        return [_decode(value)]
    return [_decode(v) for v in value]


def tfds_image_captions(
    name: str,
    *,
    data_dir: str | None,
    split: str = "train",
    image_feature: str = "image",
    caption_feature: str = "",
    max_examples: int | None = None,
) -> ImageCaptions:
    """Image-caption pairs of a TFDS dataset prepared under `data_dir` (never downloads):
    `coco_captions` (one example per image, its 5 captions) or any dataset with an image feature
    and a caption (string or list of strings). `caption_feature` "" tries captions/text, caption,
    text. Missing data_dir, unknown or unprepared dataset, missing features: a one-line ValueError."""
    import tensorflow_datasets as tfds  # lazy: heavy import

    source = open_tfds(name, data_dir=data_dir, split=split)
    if hasattr(source, "as_numpy_iterator"):  # a tf.data.Dataset: read once into memory
        source = list(tfds.as_numpy(source.take(max_examples) if max_examples else source))
    n = len(source) if not max_examples else min(len(source), max_examples)
    if n == 0:
        raise ValueError(f"TFDS dataset {name}/{split} in {data_dir} is empty")
    first = source[0]

    def has(ex, field):
        try:
            _get_field(ex, field)
            return True
        except (KeyError, TypeError):
            return False

    if not has(first, image_feature):
        raise ValueError(
            f"TFDS dataset {name!r} has no image feature {image_feature!r} (its features: {sorted(first)})"
        )
    caption_feature = caption_feature or next((f for f in CAPTION_FEATURES if has(first, f)), "")
    if not caption_feature or not has(first, caption_feature):
        raise ValueError(
            f"TFDS dataset {name!r} has no caption feature {caption_feature or 'captions/text, caption or text'!r} "
            f"(its features: {sorted(first)}); set itm.caption_feature"
        )

    def read(i: int) -> dict:
        ex = source[i]
        return {
            "image": np.asarray(_get_field(ex, image_feature)),
            "captions": _captions(_get_field(ex, caption_feature)),
            "pair_id": i,
        }

    return ImageCaptions(n, read, f"tfds:{name}/{split}")


def caption_corpus(source: ImageCaptions, max_examples: int = 5000) -> list[str]:
    """Every caption of the first `max_examples` examples (a tokenizer's training text)."""
    return [c for i in range(min(len(source), max_examples)) for c in source[i]["captions"]]


# ----------------------------------------------------------------------------- encoding
def prepare_image(image: np.ndarray, size: int, channels: int = 3) -> np.ndarray:
    """uint8 [size, size, channels]: the centre square, resized (bicubic); grey <-> RGB as needed."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.shape == (size, size, channels) and image.dtype == np.uint8:
        return image
    from PIL import Image

    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = np.ascontiguousarray(image[top : top + side, left : left + side])
    pil = Image.fromarray(crop[..., 0] if crop.shape[-1] == 1 else crop[..., :3].astype(np.uint8))
    pil = pil.convert("L" if channels == 1 else "RGB")
    if side != size:
        pil = pil.resize((size, size), Image.Resampling.BICUBIC)
    out = np.asarray(pil, np.uint8)
    return out[..., None] if out.ndim == 2 else out


def encode_caption(tokenizer, text: str, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """[CLS] + the caption's pieces, cut to seq_len and padded: (input_ids, attention_mask) int32 [seq_len]."""
    ids = ([tokenizer.cls_id] + tokenizer.encode(text))[:seq_len]
    out = np.full((seq_len,), tokenizer.pad_id, np.int32)
    out[: len(ids)] = ids
    mask = np.zeros((seq_len,), np.int32)
    mask[: len(ids)] = 1
    return out, mask


def encode_example(
    example: dict, tokenizer, *, seq_len: int, image_size: int, num_channels: int, caption: int = 0
) -> dict[str, np.ndarray]:
    ids, mask = encode_caption(tokenizer, example["captions"][caption], seq_len)
    return {
        "pixels": prepare_image(example["image"], image_size, num_channels),
        "input_ids": ids,
        "attention_mask": mask,
        "pair_id": np.int32(example["pair_id"]),
        "example_weight": np.float32(1.0),
    }


def encode_all(
    source: ImageCaptions, tokenizer, *, seq_len: int, image_size: int, num_channels: int = 3
) -> dict[str, np.ndarray]:
    """Every example of `source` with its first caption, stacked (a held-out set for retrieval)."""
    rows = [
        encode_example(source[i], tokenizer, seq_len=seq_len, image_size=image_size, num_channels=num_channels)
        for i in range(len(source))
    ]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def edited_captions(source: ImageCaptions, tokenizer, *, seq_len: int, seed: int = 0) -> dict[str, np.ndarray] | None:
    """Each example's first caption one edit away (`negative_layout`, drawn with a fixed seed): a
    held-out set's edited negatives. `negative_input_ids`, `negative_attention_mask` int32 [n, seq_len]
    and `negative_kind` int32 [n] (an index into NEGATIVE_KINDS); None for a source without layouts."""
    if len(source) == 0 or "layout" not in source[0]:
        return None
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(len(source)):
        negative, kind = negative_layout(source[i]["layout"], rng)
        rows.append((*encode_caption(tokenizer, describe(*negative), seq_len), NEGATIVE_KINDS.index(kind)))
    ids, masks, kinds = zip(*rows)
    return {
        "negative_input_ids": np.stack(ids),
        "negative_attention_mask": np.stack(masks),
        "negative_kind": np.asarray(kinds, np.int32),
    }


def _mask_captions(batch: dict, rng: np.random.Generator, **mask_kw) -> dict:
    masked, targets, weights = obj.mask_tokens(batch["input_ids"], rng, **mask_kw)
    return {**batch, "mlm_input_ids": masked, "mlm_targets": targets, "mlm_weights": weights}


def make_dataset(
    source: ImageCaptions,
    tokenizer,
    *,
    seq_len: int,
    image_size: int,
    num_channels: int = 3,
    batch_size: int = 32,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    drop_remainder: bool = True,
    random_caption: bool = True,
    mlm: bool = False,
    mask_rate: float = 0.15,
    caption_negatives: bool = False,
    num_threads: int = 2,
    prefetch_buffer_size: int = 16,
) -> grain.IterDataset:
    """A grain IterDataset of image-caption batches (see the module docstring). Same seed, same
    batches; `ResumableIterator(dataset)` saves and restores its position. num_epochs None repeats
    forever, each epoch shuffled anew and (random_caption) with a newly drawn caption per image;
    drop_remainder=False pads the last batch with rows of example_weight 0 (eval); caption_negatives
    (the shapes dataset only) adds each example a caption one edit away (`negative_layout`), drawn
    anew each epoch, as `negative_input_ids`, `negative_attention_mask`."""
    if len(source) == 0:
        raise ValueError("the image-caption source is empty")
    shard = process_shard(len(source), process_index, process_count, "examples")
    seeds = {k: derive_seed(seed, process_index, k) for k in ("order", "captions", "mask")}
    ds = grain.MapDataset.range(len(shard))
    if shuffle:
        ds = ds.shuffle(seed=seeds["order"])
    ds = ds.repeat(num_epochs)

    def example(k: int, rng: np.random.Generator) -> dict:
        ex = source[int(shard[int(k)])]
        choice = int(rng.integers(len(ex["captions"]))) if random_caption else 0
        out = encode_example(
            ex, tokenizer, seq_len=seq_len, image_size=image_size, num_channels=num_channels, caption=choice
        )
        if caption_negatives:
            if "layout" not in ex:
                raise ValueError(f"caption negatives need the shapes dataset's layouts; {source.name} has none")
            negative, _ = negative_layout(ex["layout"], rng)
            ids, mask = encode_caption(tokenizer, describe(*negative), seq_len)
            pixels = prepare_image(render_layout(negative, rng, image_size), image_size, num_channels)
            out.update(negative_input_ids=ids, negative_attention_mask=mask, negative_pixels=pixels)
        return out

    it = ds.random_map(example, seed=seeds["captions"]).to_iter_dataset(
        grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size)
    )
    it = it.batch(
        batch_size, drop_remainder=drop_remainder, batch_fn=functools.partial(stack_pad, batch_size=batch_size)
    )
    if mlm:
        mask_kw = dict(
            vocab_size=tokenizer.vocab_size,
            mask_id=tokenizer.mask_id,
            special_ids=tokenizer.special_ids,
            mask_rate=mask_rate,
        )
        it = it.random_map(lambda b, rng: _mask_captions(b, rng, **mask_kw), seed=seeds["mask"])
    return it


def make_eval_dataset(source: ImageCaptions, tokenizer, **kw) -> grain.IterDataset:
    """One pass in order with each image's first caption, last batch padded: the same batches every time."""
    return make_dataset(
        source, tokenizer, shuffle=False, num_epochs=1, drop_remainder=False, random_caption=False, **kw
    )
