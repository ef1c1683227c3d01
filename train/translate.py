"""Machine translation: train an encoder-decoder on parallel text, or translate with a trained one.

    python -m train.translate                                   # train the embedded default (below)
    python -m train.translate --config configs/transformer_base_wmt.yaml --set data.data_dir=DIR
    python -m train.translate --checkpoint runs/translate_tiny < sentences.txt
    python -m train.translate --checkpoint runs/translate_tiny --input news.en --output news.de --beam 4
    python -m train.translate --checkpoint runs/translate_tiny --set translate.alpha=1.0 --set model.dtype=bfloat16
    python -m train.translate --bench 5                         # BLEU before/after 5 minutes, as JSON
    python -m train.translate --bench_decode 128                # beam search with vs without the KV cache

Two modes, one program:

- train (no --checkpoint): `--config FILE`, `--set key=value`, `--workdir DIR` as in every
  program (default config `configs/translate_tiny.yaml`, default workdir `runs/<config name>`).
  It trains the `translate` objective (transformer_jax/tasks/translation.py) through the shared
  loop (train/trainer.py) with packed batches, label smoothing and the configured schedule, and
  at each eval translates `translate.eval_examples` dev sentences with beam search (KV cache) and
  logs detokenized BLEU and chrF (sacrebleu) as eval_bleu and eval_chrf in metrics.jsonl; the
  best checkpoint by BLEU is kept. On any number of processes: the parameters stay sharded, the
  dev batches are split over the mesh, every process scores every translation. The workdir also
  holds the shared SentencePiece vocabulary (tokenizer.model, trained on both sides) and
  config.yaml. A run started again on the same workdir resumes.
- translate (--checkpoint WORKDIR): restores the latest checkpoint's parameters with the
  workdir's config.yaml and tokenizer.model (transformer_jax.runs.load_run) and translates
  (transformer_jax.translation.Translator) --input (default stdin), one sentence per line, to
  --output (default stdout), in batches, with beam search (--beam, default the config's 4;
  --beam 1 is greedy) and the length penalty --alpha (default 0.6). `--set` takes runtime keys
  on top of config.yaml (translate.beam_size / alpha / eval_batch_size / max_decode_len, which
  --beam / --alpha / --batch_size / --max_len stand for, data.seq_len, model.dtype,
  model.attention_impl); a key that changes the parameters (model.num_layers, ...) is refused,
  and so are --config, --workdir and --bench.

`--bench MINUTES` trains a fresh workdir for that long and prints one JSON line: dev BLEU / chrF
of the untrained model and of the trained one with beam search and with greedy decoding.
Measured on the embedded default (`python -m train.translate --bench 30 --workdir W`, 2 CPU cores,
8350 steps, 1121 train / 124 dev pairs held out by source string): sacrebleu BLEU 0.0 -> 44.0 with
beam 4 (greedy 43.0), chrF 2.1 -> 51.0 (greedy 51.4); with the cores shared (1800 steps) 44.4. The dev
messages are UI strings from the same catalogs as the training ones (near-duplicates such as
plural variants are common), so this is easier than news text.
`--bench_decode 128` times beam search (beam 4) with and without the KV cache on a random
encoder-decoder: identical outputs, 10-23x faster with the cache on that CPU.

Data (data.source): `embedded` (default) is the gettext message catalogs that installed PyPI
packages ship (Django, django-allauth, humanize; read with Babel: `pip install transformer-jax[mt]`;
~1250 en-de pairs), English msgids to translate.target_lang, no download; `tfds` reads
data.tfds_name (e.g. wmt14_translate/de-en) from data.data_dir, which the user prepared; `files`
reads data.paths: a folder of <lang>.<split>.txt files (TFDS TranslateFolder), .tsv files or
<prefix>.<lang> line-aligned files. data.split / data.eval_split name the splits (without
eval_split, dev pairs are held out by source sentence); data.max_documents caps the training pairs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import jax

from train import cli, trainer
from transformer_jax import config as config_lib
from transformer_jax import config_parsing, tasks
from transformer_jax.config import Config
from transformer_jax.models import build
from transformer_jax.tasks.translation import prepare, translator_for
from transformer_jax.translation import Translator, evaluate_translation

DEFAULT_CONFIG = os.path.join(cli.REPO, "configs", "translate_tiny.yaml")


def train(cfg: Config, workdir: str, *, quiet: bool = False) -> tuple[dict, Any]:
    cfg, task = tasks.get("translate").make_task(cfg, workdir)
    return trainer.run(cfg, workdir, task, quiet=quiet)


def translate_stream(translator: Translator, lines, out, chunk: int = 512) -> int:
    """Translate an iterable of lines in chunks, writing one line per input line; returns the count."""
    n = 0
    buffer: list[str] = []

    def flush():
        for text in translator(buffer):
            out.write(text + "\n")
        out.flush()
        buffer.clear()

    for line in lines:
        buffer.append(line.rstrip("\n"))
        n += 1
        if len(buffer) >= chunk:
            flush()
    if buffer:
        flush()
    return n


# ----------------------------------------------------------------------------- bench
def bench(cfg: Config, workdir: str, minutes: float, *, quiet: bool = False) -> dict:
    """Train a fresh workdir for `minutes`; dev BLEU / chrF before (random init) and after, with beam
    search and with greedy decoding."""
    if os.path.isdir(os.path.join(workdir, "checkpoints")) and os.listdir(os.path.join(workdir, "checkpoints")):
        raise ValueError(f"--bench: {workdir} already holds checkpoints; give a fresh --workdir")
    cfg = config_lib.replace(
        cfg,
        train=dict(time_limit_s=minutes * 60.0, steps=max(cfg.train.steps, 10**7) if minutes > 0 else cfg.train.steps),
    )
    prepared = prepare(cfg, workdir)
    cfg, tr = prepared.cfg, prepared.cfg.translate
    n_eval = tr.eval_examples or len(prepared.dev_pairs)
    init = prepared.task.init_params(jax.random.key(cfg.train.seed))
    t0 = time.perf_counter()
    before = evaluate_translation(prepared.translator, prepared.dev_pairs, params=init, max_examples=n_eval)
    decode_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    metrics, state = trainer.run(cfg, workdir, prepared.task, quiet=quiet)
    train_s = time.perf_counter() - t0
    params = state["params"]
    t0 = time.perf_counter()
    beam = evaluate_translation(prepared.translator, prepared.dev_pairs, params=params, max_examples=n_eval)
    beam_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    greedy = evaluate_translation(
        prepared.translator, prepared.dev_pairs, params=params, beam_size=1, max_examples=n_eval
    )
    greedy_s = time.perf_counter() - t0
    examples = [
        {
            "source": prepared.dev_pairs[i][0],
            "reference": prepared.dev_pairs[i][1],
            "beam": beam["hypotheses"][i],
            "greedy": greedy["hypotheses"][i],
        }
        for i in range(min(5, n_eval))
    ]
    return {
        "pair": f"{tr.source_lang}-{tr.target_lang}",
        "data": prepared.train_pairs.name,
        "train_pairs": len(prepared.train_pairs),
        "dev_pairs": min(n_eval, len(prepared.dev_pairs)),
        "vocab": prepared.tokenizer.vocab_size,
        "minutes": minutes,
        "steps": metrics.get("step"),
        "train_seconds": round(train_s, 1),
        "final_loss": metrics.get("loss"),
        "bleu_before": before["bleu"],
        "chrf_before": before["chrf"],
        "bleu_after": beam["bleu"],
        "chrf_after": beam["chrf"],
        "greedy_bleu_after": greedy["bleu"],
        "greedy_chrf_after": greedy["chrf"],
        "beam_size": tr.beam_size,
        "alpha": tr.alpha,
        "decode_seconds": {
            "before_beam": round(decode_s, 1),
            "after_beam": round(beam_s, 1),
            "after_greedy": round(greedy_s, 1),
        },
        "examples": examples,
    }


def bench_decoding(
    *,
    length: int = 128,
    beam_size: int = 4,
    batch: int = 2,
    source_len: int = 16,
    model_dim: int = 64,
    num_layers: int = 2,
    repeats: int = 3,
    seed: int = 0,
) -> dict:
    """Beam search with and without the KV cache on a random-weight encoder-decoder, `length` new
    tokens (eos never stops it early): whether the outputs are identical, and the best-of-`repeats`
    wall times (compile excluded) and their ratio."""
    import numpy as np

    from transformer_jax import decoding
    from transformer_jax.config import ModelConfig

    mcfg = ModelConfig(
        family="encoder_decoder",
        vocab_size=256,
        model_dim=model_dim,
        num_heads=4,
        mlp_dim=2 * model_dim,
        num_layers=num_layers,
        position="sinusoidal",
        init_std=0.2,
    )
    model, params = build(mcfg, seed)
    ids = jax.random.randint(jax.random.key(seed + 1), (batch, source_len), 3, mcfg.vocab_size)
    outputs, seconds = {}, {}
    for use_cache in (True, False):
        run = lambda: np.asarray(
            decoding.beam_search(
                model, params, ids, beam_size=beam_size, max_new_tokens=length, eos_id=-1, use_cache=use_cache
            )
        )
        run()  # compile
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            outputs[use_cache] = run()
            times.append(time.perf_counter() - t0)
        seconds[use_cache] = min(times)
    return {
        "length": length,
        "beam_size": beam_size,
        "batch": batch,
        "model_dim": model_dim,
        "num_layers": num_layers,
        "identical": bool(np.array_equal(outputs[True], outputs[False])),
        "cached_s": round(seconds[True], 4),
        "uncached_s": round(seconds[False], 4),
        "speedup": round(seconds[False] / seconds[True], 2),
        "backend": jax.default_backend(),
    }


# ----------------------------------------------------------------------------- main
def parser() -> argparse.ArgumentParser:
    p = cli.parser(
        __doc__.splitlines()[0],
        checkpoint="translate with this run's latest checkpoint (its config.yaml, "
        "with --set of runtime keys: translate.beam_size, translate.alpha, data.seq_len, model.dtype, ...)",
        config="YAML config to train (see configs/; not with --checkpoint: its config.yaml is the config)",
        overrides="override a config value, e.g. --set model.num_layers=4 (repeatable); with --checkpoint "
        "runtime keys only, e.g. --set translate.alpha=1.0",
        workdir="train mode: where checkpoints, metrics and the tokenizer go (default runs/<config name>)",
    )
    p.add_argument("--input", help="translate mode: a file with one sentence per line (default stdin)")
    p.add_argument("--output", help="translate mode: write translations here (default stdout)")
    p.add_argument("--beam", type=int, help="beam size (default the config's, 4); 1 = greedy")
    p.add_argument("--alpha", type=float, help="length penalty (default the config's, 0.6)")
    p.add_argument("--batch_size", type=int, help="sentences decoded together (default translate.eval_batch_size)")
    p.add_argument("--max_len", type=int, help="longest translation in tokens (default the config's)")
    p.add_argument(
        "--bench",
        type=float,
        metavar="MINUTES",
        help="train a fresh workdir this long; print dev BLEU before/after (beam and greedy) as JSON",
    )
    p.add_argument(
        "--bench_decode",
        type=int,
        metavar="LENGTH",
        help="time beam search with and without the KV cache at this length; print JSON",
    )
    return p


# decoding flags and the config keys they stand for
FLAG_KEYS = {
    "beam": "translate.beam_size",
    "alpha": "translate.alpha",
    "batch_size": "translate.eval_batch_size",
    "max_len": "translate.max_decode_len",
}


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.bench_decode is not None:
        if args.bench_decode < 2:
            raise ValueError(f"--bench_decode: length must be at least 2, got {args.bench_decode}")
        if args.config or args.overrides or args.workdir or args.checkpoint:
            raise ValueError(
                "--bench_decode times a random encoder-decoder of its own: it takes no --config, "
                "--set, --workdir or --checkpoint"
            )
        print(json.dumps(bench_decoding(length=args.bench_decode)))
        return
    cli.check_keys(args.overrides)  # a misspelt key is named first, in either mode
    if args.checkpoint:
        cli.check_runtime_keys(args.overrides)  # an architecture key next, before the checkpoint is read
        if args.bench is not None or args.workdir is not None:
            raise ValueError(
                f"{'--bench' if args.bench is not None else '--workdir'}: train mode only; --checkpoint "
                "translates with a trained run"
            )
        keys = {config_parsing.parse_override(o)[0] for o in args.overrides}
        for flag, key in FLAG_KEYS.items():
            if getattr(args, flag) is not None and key in keys:
                raise ValueError(f"--{flag}: also given as --set {key}; give one")
        if args.beam is not None and args.beam < 1:
            raise ValueError(f"--beam: must be at least 1, got {args.beam}")
        run = cli.load_checkpoint(args.checkpoint, args.overrides, args.config)
        if run.cfg.model.family != "encoder_decoder":
            raise ValueError(
                f"--checkpoint: {args.checkpoint} holds a {run.cfg.model.family} model; translation "
                "needs an encoder_decoder"
            )
        translator = translator_for(
            run, beam_size=args.beam, alpha=args.alpha, batch_size=args.batch_size, max_len=args.max_len
        )
        if args.input and not os.path.isfile(args.input):
            raise ValueError(f"--input: no such file {args.input}")
        source = open(args.input, encoding="utf-8") if args.input else sys.stdin
        out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
        try:
            n = translate_stream(translator, source, out)
        except UnicodeDecodeError as e:
            raise ValueError(
                f"--input: {args.input or 'stdin'} is not UTF-8 text ({e.reason} at byte {e.start})"
            ) from None
        finally:
            if args.input:
                source.close()
            if args.output:
                out.close()
        if args.output:
            print(f"translated {n} lines -> {args.output}", file=sys.stderr)
        return
    if any(v is not None for v in (args.input, args.output, args.beam, args.alpha, args.batch_size, args.max_len)):
        raise ValueError("--input, --output, --beam, --alpha, --batch_size and --max_len go with --checkpoint")
    if args.bench is not None and args.bench <= 0:
        raise ValueError(f"--bench: minutes must be positive, got {args.bench}")
    cfg, workdir = cli.load(args, DEFAULT_CONFIG, distributed=args.bench is None)  # the bench runs in one process
    if args.bench is not None:
        workdir = args.workdir or os.path.join("runs", f"{cfg.name or 'translate'}-bench-{int(time.time())}")
        report = bench(cfg, workdir, args.bench)
        print(json.dumps(report, ensure_ascii=False))
        return
    metrics, _ = train(cfg, workdir)
    if jax.process_index() == 0:
        shown = {
            k: round(v, 4)
            for k, v in metrics.items()
            if k in ("step", "loss", "eval_loss", "eval_bleu", "eval_chrf", "best_eval_bleu", "tokens_per_sec")
        }
        print(f"done: {shown}; workdir {workdir}")


if __name__ == "__main__":
    cli.main(main)
