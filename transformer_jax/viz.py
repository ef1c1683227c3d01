"""Attention heatmaps: the model's own attention weights, drawn per layer and head.

    maps = attention_maps(model, params, input_ids=ids, decoder_input_ids=dec)   # one forward pass
    maps.weights["cross"]          # [layers, heads, target, source]; every row sums to 1
    files = save_heatmaps(maps, {"source": src_pieces, "target": tgt_pieces}, "out/")
    write_index(files, "out/index.html")

The weights are those the forward pass used: `model.apply(..., return_weights=True)` returns each
attention's softmax probabilities alongside the logits (`ModelOutput.attention_weights`); nothing
here recomputes them. Works for the three families: encoder-only (encoder self-attention),
decoder-only (causal self-attention) and encoder-decoder (encoder self, decoder self, cross).
PNGs are drawn with matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import dataclasses
import html
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# which attention, its (rows, columns) token sequences, and a title
KINDS = {
    "encoder_self": ("source", "source", "encoder self-attention"),
    "decoder_self": ("target", "target", "decoder self-attention"),
    "cross": ("target", "source", "cross-attention (decoder -> encoder)"),
}


@dataclasses.dataclass
class AttentionMaps:
    """One example's attention weights from one forward pass: {kind: [layers, heads, rows, cols]}
    (kinds in KINDS; only the real, unpadded tokens), and that pass's output: its logits [len, vocab]
    (the real vocabulary: the padded columns, `model.vocab_multiple`, are cut off),
    or its final hidden states [len, model_dim] for an encoder without an LM head."""

    weights: dict[str, np.ndarray]
    outputs: np.ndarray
    family: str


def _real(mask, n: int) -> int:
    return n if mask is None else int(np.asarray(mask).sum())


def attention_maps(
    model, params, *, input_ids, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None
) -> AttentionMaps:
    """Run the model once on ONE example (ids [len] or [1, len]) with return_weights=True and
    keep its attention weights (float32, padding cut off). Encoder-decoder models need
    `decoder_input_ids`; a decoder-only model's sequence is `input_ids`. Masks mark real
    tokens; real tokens must come first (right padding)."""
    import jax.numpy as jnp

    family = model.cfg.family
    if family not in ("encoder", "decoder", "encoder_decoder"):
        raise ValueError(f"attention maps for family {family!r} are not supported (encoder, decoder, encoder_decoder)")
    row = lambda x: jnp.asarray(x, jnp.int32).reshape(1, -1)
    as_row = lambda x: None if x is None else row(x)
    ids, mask = row(input_ids), as_row(attention_mask)
    inputs = dict(input_ids=ids, attention_mask=mask if mask is not None else jnp.ones_like(ids))
    if family == "encoder_decoder":
        if decoder_input_ids is None:
            raise ValueError("an encoder-decoder model needs decoder_input_ids for its attention maps")
        dec, dec_mask = row(decoder_input_ids), as_row(decoder_attention_mask)
        inputs.update(
            decoder_input_ids=dec, decoder_attention_mask=dec_mask if dec_mask is not None else jnp.ones_like(dec)
        )
    out = model.apply(params, **inputs, return_weights=True)  # the weights this very pass used
    w = {k: {kk: np.asarray(vv, np.float32) for kk, vv in v.items()} for k, v in out.attention_weights.items()}
    s = _real(inputs["attention_mask"], ids.shape[1])
    weights: dict[str, np.ndarray] = {}
    if family == "encoder":
        weights["encoder_self"] = w["encoder"]["self"][:, 0, :, :s, :s]
    elif family == "decoder":
        weights["decoder_self"] = w["decoder"]["self"][:, 0, :, :s, :s]
    else:
        t = _real(inputs["decoder_attention_mask"], inputs["decoder_input_ids"].shape[1])
        weights["encoder_self"] = w["encoder"]["self"][:, 0, :, :s, :s]
        weights["decoder_self"] = w["decoder"]["self"][:, 0, :, :t, :t]
        weights["cross"] = w["decoder"]["cross"][:, 0, :, :t, :s]
    rows = s if family != "encoder_decoder" else t
    final = out.logits if out.logits is not None else out.hidden_states
    if out.logits is not None and final.ndim == 3 and final.shape[-1] == model.cfg.padded_vocab_size:
        final = final[..., : model.cfg.vocab_size]
    return AttentionMaps(weights, np.asarray(final[0, :rows], np.float32), family)


def plot_heatmap(weights: np.ndarray, rows: Sequence[str], cols: Sequence[str], path: str, title: str = "") -> str:
    """One [rows, cols] matrix as a PNG, tokens on the axes (queries down, keys across)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure  # no pyplot: no global state, no display

    weights = np.asarray(weights)
    if weights.shape != (len(rows), len(cols)):
        raise ValueError(f"heatmap of shape {weights.shape} but {len(rows)} row and {len(cols)} column labels")
    size = lambda n: min(2.0 + 0.28 * n, 40.0)
    fig = Figure(figsize=(size(len(cols)) + 1.0, size(len(rows))))
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(weights, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels(cols, rotation=90, fontsize=7)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(rows, fontsize=7)
    ax.set_xlabel("attended to (keys)")
    ax.set_ylabel("attending (queries)")
    if title:
        ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=80)
    return path


@dataclasses.dataclass
class Heatmap:
    kind: str
    layer: int
    head: int
    path: str  # the PNG
    title: str


def save_heatmaps(
    maps: AttentionMaps,
    tokens: Mapping[str, Sequence[str]],
    outdir: str,
    *,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
) -> list[Heatmap]:
    """PNGs `<kind>_l<layer>_h<head>.png` in outdir for every kind, layer and head (or the chosen
    ones). `tokens` has the 'source' (encoder / decoder-only sequence) and, for encoder-decoder,
    'target' labels: as many as the maps' rows and columns."""
    out = []
    for kind, w in maps.weights.items():
        row_key, col_key, name = KINDS[kind]
        if maps.family == "decoder":  # a decoder-only model's one sequence
            row_key = col_key = "source"
        rows, cols = list(tokens[row_key]), list(tokens[col_key])
        num_layers, num_heads = w.shape[:2]
        for layer in range(num_layers) if layers is None else layers:
            if not 0 <= layer < num_layers:
                raise ValueError(f"layer {layer} out of range: the model has {num_layers}")
            for head in range(num_heads) if heads is None else heads:
                if not 0 <= head < num_heads:
                    raise ValueError(f"head {head} out of range: the model has {num_heads}")
                title = f"{name}, layer {layer}, head {head}"
                path = os.path.join(outdir, f"{kind}_l{layer}_h{head}.png")
                plot_heatmap(w[layer, head], rows, cols, path, title)
                out.append(Heatmap(kind, layer, head, path, title))
    return out


def write_index(
    heatmaps: Sequence[Heatmap], path: str, *, title: str = "Attention", texts: dict[str, str] | None = None
) -> str:
    """One HTML page that shows every heatmap: a section per kind, a row per layer, a column per head."""
    base = os.path.dirname(os.path.abspath(path))
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif} img{max-width:420px;border:1px solid #ccc} "
        "td{vertical-align:top;text-align:center;font-size:12px}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    for label, text in (texts or {}).items():
        parts.append(f"<p><b>{html.escape(label)}:</b> {html.escape(text)}</p>")
    for kind, (_, _, name) in KINDS.items():
        maps = [h for h in heatmaps if h.kind == kind]
        if not maps:
            continue
        parts.append(f"<h2 id='{kind}'>{html.escape(name)}</h2><table>")
        for layer in sorted({h.layer for h in maps}):
            parts.append(f"<tr><th>layer {layer}</th>")
            for h in sorted((h for h in maps if h.layer == layer), key=lambda h: h.head):
                rel = os.path.relpath(os.path.abspath(h.path), base)
                parts.append(
                    f"<td><a href='{html.escape(rel)}'><img src='{html.escape(rel)}' "
                    f"alt='{html.escape(h.title)}'></a><br>head {h.head}</td>"
                )
            parts.append("</tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(parts))
    return path


def token_labels(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Readable axis labels: SentencePiece pieces (the word-start mark kept as '▁'), specials by name."""
    names = {tokenizer.pad_id: "<pad>", tokenizer.eos_id: "</s>", tokenizer.bos_id: "<s>"}
    return [names.get(int(i)) or tokenizer.id_to_piece(int(i)) for i in ids]
