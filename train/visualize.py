"""Attention heatmaps of a trained run: PNGs per attention, layer and head, and one HTML page.

    python -m train.visualize --checkpoint runs/translate_tiny --text "Enter a valid email address."
    python -m train.visualize --checkpoint runs/translate_tiny --text "..." --target "..." --outdir attn/
    python -m train.visualize --checkpoint runs/gpt_tiny --text "def main():" --layers 0 --heads 0,1

Works for the three model families of our workdirs (config.yaml, tokenizer.model and
checkpoints/<step>/ or params/):

- encoder-only: encoder self-attention over the text (with [CLS] ... [SEP] when the tokenizer
  has them);
- decoder-only: causal self-attention over the text;
- encoder-decoder: encoder self-attention over the source `--text`, and decoder self-attention
  and cross-attention over the target: `--target` if given (teacher forcing), else the model's
  own greedy translation (KV-cached decoding).

The weights come from the forward pass itself (`model.apply(..., return_weights=True)`), one
PNG per (attention, layer, head) named `<kind>_l<layer>_h<head>.png` (matplotlib, Agg backend),
and `index.html` to browse them, in `--outdir` (default <checkpoint>/attention). Prints the
page's path. A bad argument prints one line `error: ...` and exits 2.
"""
from __future__ import annotations

import os

import numpy as np

from train import cli


def parse_indices(text: str | None, name: str) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--{name}: expected comma-separated integers, got {text!r}") from None


def parser():
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", metavar="WORKDIR", required=True, help="a run's workdir")
    p.add_argument("--text", required=True, help="the (source) text")
    p.add_argument("--target", help="encoder-decoder: the target text (default: the model's greedy translation)")
    p.add_argument("--outdir", help="where the PNGs and index.html go (default <checkpoint>/attention)")
    p.add_argument("--layers", help="comma-separated layer indices (default all)")
    p.add_argument("--heads", help="comma-separated head indices (default all)")
    p.add_argument("--max_len", type=int, help="tokens at most per sequence (default the config's data.seq_len)")
    return p


def source_ids(run, text: str, max_len: int) -> list[int]:
    tok, family = run.tokenizer, run.cfg.model.family
    ids = tok.encode(text)
    if family == "encoder" and tok.cls_id >= 0 and tok.sep_id >= 0:
        return [tok.cls_id] + ids[: max_len - 2] + [tok.sep_id]
    if family == "encoder_decoder":
        return ids[: max_len - 1] + [tok.eos_id]
    return ids[:max_len]


def visualize(checkpoint: str, text: str, *, target: str | None = None, outdir: str | None = None,
              layers=None, heads=None, max_len: int | None = None) -> dict:
    """Write the heatmaps and the page; returns {'index': path, 'pngs': [...], 'source', 'target'}."""
    from transformer_jax import viz
    from transformer_jax.runs import load_run
    from transformer_jax.tasks.translation import max_decode_len

    if not text.strip():
        raise ValueError("--text: empty")
    run = load_run(checkpoint)
    family, tok = run.cfg.model.family, run.tokenizer
    if family not in ("encoder", "decoder", "encoder_decoder"):
        raise ValueError(f"--checkpoint: attention maps of a {family} model are not supported")
    if target is not None and family != "encoder_decoder":
        raise ValueError(f"--target: only for encoder-decoder models; this is {family}")
    max_len = max_len or run.cfg.data.seq_len
    if max_len < 2:
        raise ValueError(f"--max_len: must be at least 2, got {max_len}")
    src = source_ids(run, text, max_len)
    texts = {"text": text}
    tokens = {"source": viz.token_labels(tok, src)}
    kw = {}
    if family == "encoder_decoder":
        if target is None:
            from transformer_jax import decoding
            generated = np.asarray(decoding.generate(run.model, run.params, np.asarray([src], np.int32),
                                                     max_new_tokens=min(max_len, max_decode_len(run.cfg)),
                                                     eos_id=tok.eos_id, pad_id=tok.pad_id))[0].tolist()
            tgt = generated[: generated.index(tok.eos_id) + 1] if tok.eos_id in generated else generated
            texts["translation (greedy)"] = tok.decode([i for i in tgt if i != tok.eos_id])
        else:
            tgt = tok.encode(target)[: max_len - 1] + [tok.eos_id]
            texts["target"] = target
        # the decoder reads <start> y1 .. yn and predicts y1 .. yn </s>: rows are its inputs
        dec = [tok.pad_id] + [i for i in tgt if i != tok.eos_id][: max_len - 1]
        kw = dict(decoder_input_ids=np.asarray(dec, np.int32), decoder_attention_mask=np.ones(len(dec), np.int32))
        tokens["target"] = ["<start>"] + viz.token_labels(tok, dec[1:])
    maps = viz.attention_maps(run.model, run.params, input_ids=np.asarray(src, np.int32), **kw)
    outdir = outdir or os.path.join(checkpoint, "attention")
    heatmaps = viz.save_heatmaps(maps, tokens, outdir, layers=layers, heads=heads)
    index = viz.write_index(heatmaps, os.path.join(outdir, "index.html"),
                            title=f"Attention of {os.path.basename(os.path.normpath(checkpoint))} ({family})",
                            texts=texts)
    return {"index": index, "pngs": [h.path for h in heatmaps], "maps": maps, "tokens": tokens}


def main() -> None:
    args = parser().parse_args()
    result = visualize(args.checkpoint, args.text, target=args.target, outdir=args.outdir,
                       layers=parse_indices(args.layers, "layers"), heads=parse_indices(args.heads, "heads"),
                       max_len=args.max_len)
    print(f"{len(result['pngs'])} heatmaps; open {result['index']}")


if __name__ == "__main__":
    cli.main(main)
