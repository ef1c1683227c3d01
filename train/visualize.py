"""Attention heatmaps of a trained run: PNGs per attention, layer and head, and one HTML page.

    python -m train.visualize --checkpoint runs/translate_tiny --text "Enter a valid email address."
    python -m train.visualize --checkpoint runs/translate_tiny --text "..." --target "..." --workdir attn/
    python -m train.visualize --checkpoint runs/gpt_tiny --text "def main():" --layers 0 --heads 0,1
    python -m train.visualize --checkpoint runs/gpt_tiny --text "..." --set data.seq_len=32

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
and `index.html` to browse them, in `--workdir` (default <checkpoint>/attention; `--outdir` is
the same flag). Prints the page's path. The config is the checkpoint's config.yaml: `--set` takes
runtime keys on top of it (data.seq_len, the tokens at most per sequence, as --max_len does;
translate.max_decode_len, the greedy translation's length; model.dtype, ...), a key that changes
the parameters (model.num_layers, ...) is refused, and so is --config. A bad argument prints one
line `error: ...` and exits 2.
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
    p = cli.parser(
        __doc__.splitlines()[0],
        checkpoint="a run's workdir (required): config.yaml, tokenizer.model, checkpoints/<step>/ or params/",
        config="not taken: the config is the checkpoint's config.yaml (runtime keys: --set)",
        overrides="a runtime key on top of the checkpoint's config, e.g. --set model.dtype=bfloat16 (repeatable); "
        "one that changes the parameters is refused",
        workdir="where the PNGs and index.html go (default <checkpoint>/attention; --outdir is the same)",
    )
    p.add_argument("--outdir", dest="workdir", metavar="DIR", help="the same as --workdir")
    p.add_argument("--text", help="the (source) text (required)")
    p.add_argument("--target", help="encoder-decoder: the target text (default: the model's greedy translation)")
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


def visualize(
    checkpoint: str,
    text: str,
    *,
    target: str | None = None,
    outdir: str | None = None,
    layers=None,
    heads=None,
    max_len: int | None = None,
    overrides=(),
) -> dict:
    """Write the heatmaps and the page; returns {'index': path, 'pngs': [...], 'source', 'target'}.
    `overrides` (key=value, runtime keys only) go on top of the checkpoint's config."""
    from transformer_jax import viz
    from transformer_jax.tasks.translation import max_decode_len

    if not text or not text.strip():
        raise ValueError("--text: empty" if text is not None else "--text: required (the text to visualise)")
    run = cli.load_checkpoint(checkpoint, overrides)
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

            generated = np.asarray(
                decoding.generate(
                    run.model,
                    run.params,
                    np.asarray([src], np.int32),
                    max_new_tokens=min(max_len, max_decode_len(run.cfg)),
                    eos_id=tok.eos_id,
                    pad_id=tok.pad_id,
                )
            )[0].tolist()
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
    index = viz.write_index(
        heatmaps,
        os.path.join(outdir, "index.html"),
        title=f"Attention of {os.path.basename(os.path.normpath(checkpoint))} ({family})",
        texts=texts,
    )
    return {"index": index, "pngs": [h.path for h in heatmaps], "maps": maps, "tokens": tokens}


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    # a misspelt or architecture key, --config, a missing checkpoint: one line before the weights are read
    cli.checkpoint_config(args.checkpoint, args.overrides, args.config)
    if args.max_len is not None and any(o.split("=", 1)[0].strip() == "data.seq_len" for o in args.overrides):
        raise ValueError("--max_len: also given as --set data.seq_len; give one")
    result = visualize(
        args.checkpoint,
        args.text,
        target=args.target,
        outdir=args.workdir,
        layers=parse_indices(args.layers, "layers"),
        heads=parse_indices(args.heads, "heads"),
        max_len=args.max_len,
        overrides=args.overrides,
    )
    print(f"{len(result['pngs'])} heatmaps; open {result['index']}")


if __name__ == "__main__":
    cli.main(main)
