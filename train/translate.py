"""Machine translation: train an encoder-decoder on parallel text, or translate with a trained one.

    python -m train.translate                                   # train the embedded default (below)
    python -m train.translate --config configs/transformer_base_wmt.yaml --set data.data_dir=DIR
    python -m train.translate --checkpoint runs/translate_tiny < sentences.txt
    python -m train.translate --checkpoint runs/translate_tiny --input news.en --output news.de --beam 4
    python -m train.translate --bench 5                         # BLEU before/after 5 minutes, as JSON
    python -m train.translate --bench_decode 128                # beam search with vs without the KV cache

Two modes, one program:

- train (no --checkpoint): `--config FILE`, `--set key=value`, `--workdir DIR` as in every
  program (default config `configs/translate_tiny.yaml`, default workdir `runs/<config name>`).
  It trains through the shared loop (train/trainer.py) with packed batches, label smoothing and
  the configured schedule, and at each eval translates `translate.eval_examples` dev sentences
  with beam search (KV cache) and logs detokenized BLEU and chrF (sacrebleu) as eval_bleu and
  eval_chrf in metrics.jsonl; the best checkpoint by BLEU is kept. On any number of processes:
  the parameters stay sharded, the dev batches are split over the mesh, every process scores
  every translation. The workdir also holds the shared SentencePiece vocabulary (tokenizer.model,
  trained on both sides) and config.yaml. A run started again on the same workdir resumes.
- translate (--checkpoint WORKDIR): restores the latest checkpoint's parameters with the
  workdir's config.yaml and tokenizer.model and translates --input (default stdin), one sentence
  per line, to --output (default stdout), in batches, with beam search (--beam, default the
  config's 4; --beam 1 is greedy) and the length penalty --alpha (default 0.6).

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
packages ship (Django, django-allauth, humanize: `pip install django django-allauth humanize`;
~1250 en-de pairs), English msgids to
translate.target_lang, no download; `tfds` reads data.tfds_name (e.g. wmt14_translate/de-en)
from data.data_dir, which the user prepared; `files` reads data.paths: a folder of
<lang>.<split>.txt files (TFDS TranslateFolder), .tsv files or <prefix>.<lang> line-aligned
files. data.split / data.eval_split name the splits (without eval_split, dev pairs are held out
by source sentence); data.max_documents caps the training pairs.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any

import jax

from train import cli, pretrain, trainer
from transformer_jax import config as config_lib
from transformer_jax import losses
from transformer_jax.config import Config, ConfigError
from transformer_jax.data import parallel
from transformer_jax.data.pipeline import ResumableIterator, process_rows
from transformer_jax.data.tokenizer import Tokenizer
from transformer_jax.models import Model, abstract_build, build

DEFAULT_CONFIG = os.path.join(cli.REPO, "configs", "translate_tiny.yaml")


# ----------------------------------------------------------------------------- data
def target_len(cfg: Config) -> int:
    return cfg.translate.target_len or cfg.data.seq_len


def max_decode_len(cfg: Config) -> int:
    return cfg.translate.max_decode_len or target_len(cfg)


def load_pairs(cfg: Config) -> tuple[parallel.Pairs, parallel.Pairs]:
    """(train pairs, dev pairs) as the config says."""
    d, tr = cfg.data, cfg.translate
    langs = dict(source_lang=tr.source_lang, target_lang=tr.target_lang)
    if d.source == "embedded":
        pairs = parallel.gettext_pairs(**langs, packages=tr.packages or parallel.GETTEXT_PACKAGES)
        num_eval = min(tr.eval_examples or 64, max(1, len(pairs) // 10))
        train, dev = parallel.split_by_source(pairs, num_eval=num_eval, seed=cfg.train.seed)
    else:
        if d.source == "tfds":
            read = lambda split, limit=None: parallel.tfds_pairs(d.tfds_name, data_dir=d.data_dir or None, split=split,
                                                                 max_examples=limit, **langs)
        else:
            read = lambda split, limit=None: parallel.local_pairs(d.paths, split=split, **langs)
        train = read(d.split, d.max_documents or None)
        if d.eval_split:
            dev = read(d.eval_split)
        else:
            num_eval = min(tr.eval_examples or 64, max(1, len(train) // 10))
            train, dev = parallel.split_by_source(train, num_eval=num_eval, seed=cfg.train.seed)
    if d.max_documents and len(train) > d.max_documents:
        train = train.select(range(d.max_documents))
    return train, dev


def tokenizer_for(cfg: Config, workdir: str, train: parallel.Pairs) -> Tokenizer:
    """The shared vocabulary: data.tokenizer if set, the workdir's (a resumed run), or one trained
    on both sides of the training pairs by process 0 and saved as <workdir>/tokenizer.model."""
    return pretrain.tokenizer_for(cfg, workdir, lambda: parallel.tokenizer_texts(train, seed=cfg.train.seed),
                                  num_sentinels=0, seed=cfg.train.seed)


def loss_fn_for(cfg: Config):
    t = cfg.train

    def loss_fn(model: Model, params, batch, dropout_rng):
        out = model.apply(params, **{k: batch[k] for k in parallel.MODEL_INPUTS}, dropout_rng=dropout_rng)
        loss, aux = losses.cross_entropy(out.logits, batch["targets"], batch["loss_mask"],
                                         label_smoothing=t.label_smoothing, z_loss=t.z_loss)
        # the per-token negative log-likelihood without smoothing: perplexity means what it says
        nll, _ = losses.cross_entropy(out.logits, batch["targets"], batch["loss_mask"])
        return loss, {"accuracy": aux["accuracy"], "nll": nll, "tokens": aux["weight_sum"]}
    return loss_fn


# ----------------------------------------------------------------------------- the task
@dataclasses.dataclass
class Prepared:
    cfg: Config
    task: trainer.Task
    tokenizer: Tokenizer
    train_pairs: parallel.Pairs
    dev_pairs: parallel.Pairs
    translator: parallel.Translator


def prepare(cfg: Config, workdir: str) -> Prepared:
    """The translation Task for trainer.run, with its tokenizer, data and translator."""
    if cfg.train.objective != "translate":
        cfg = config_lib.replace(cfg, train=dict(objective="translate"))
    m = cfg.model
    if m.position == "learned" and max(target_len(cfg), max_decode_len(cfg)) > m.max_len:
        raise ConfigError(f"translate.target_len: {max(target_len(cfg), max_decode_len(cfg))} exceeds "
                          f"model.max_len={m.max_len} (learned positions)")
    os.makedirs(workdir, exist_ok=True)
    train_pairs, dev_pairs = load_pairs(cfg)
    tokenizer = tokenizer_for(cfg, workdir, train_pairs)
    t, processes = cfg.train, jax.process_count()
    if t.batch_size % processes:
        raise ConfigError(f"train.batch_size: {t.batch_size} does not split over {processes} processes")
    lengths = dict(source_len=cfg.data.seq_len, target_len=target_len(cfg))
    train_data = parallel.make_dataset(train_pairs, tokenizer, batch_size=t.batch_size // processes, seed=t.seed,
                                       process_index=jax.process_index(), process_count=processes, **lengths)
    eval_data = parallel.make_eval_dataset(dev_pairs, tokenizer, batch_size=t.batch_size, seed=t.seed, **lengths)
    model, _ = abstract_build(cfg)
    tr = cfg.translate
    translator = parallel.Translator(model, None, tokenizer, source_len=cfg.data.seq_len,
                                     max_new_tokens=max_decode_len(cfg), beam_size=tr.beam_size, alpha=tr.alpha,
                                     batch_size=tr.eval_batch_size)

    def evaluate(params) -> dict:  # params stay sharded: the decode runs on their mesh
        if not tr.eval_examples:
            return {}
        scores = parallel.evaluate_translation(translator, dev_pairs, params=params, max_examples=tr.eval_examples)
        out = {"bleu": scores["bleu"], "chrf": scores["chrf"]}
        if tr.eval_greedy:
            greedy = parallel.evaluate_translation(translator, dev_pairs, params=params, beam_size=1,
                                                   max_examples=tr.eval_examples)
            out.update(greedy_bleu=greedy["bleu"], greedy_chrf=greedy["chrf"])
        return out

    task = trainer.Task(
        model=model,
        init_params=lambda rng: build(cfg, rng)[1],
        loss_fn=loss_fn_for(cfg),
        train_batches=ResumableIterator(train_data),
        eval_batches=lambda: process_rows(eval_data, jax.process_index(), processes),
        evaluate=evaluate,
        best_metric="bleu" if tr.eval_examples else "loss",
        best_mode="max" if tr.eval_examples else "min")
    return Prepared(cfg, task, tokenizer, train_pairs, dev_pairs, translator)


def train(cfg: Config, workdir: str, *, quiet: bool = False) -> tuple[dict, Any]:
    prepared = prepare(cfg, workdir)
    return trainer.run(prepared.cfg, workdir, prepared.task, quiet=quiet)


# ----------------------------------------------------------------------------- restoring a run
def latest_params_path(workdir: str) -> tuple[str, str | None]:
    """Where a workdir's weights are: (<workdir>/checkpoints/<latest>/state, 'params') for a
    training run, (<workdir>/params, None) for weights saved by checkpoint.save_params."""
    checkpoints = os.path.join(workdir, "checkpoints")
    steps = sorted(int(s) for s in os.listdir(checkpoints) if s.isdigit()) if os.path.isdir(checkpoints) else []
    if steps:
        return os.path.join(checkpoints, str(steps[-1]), "state"), "params"
    if os.path.isdir(os.path.join(workdir, "params")):
        return os.path.join(workdir, "params"), None
    raise ValueError(f"--checkpoint: {workdir} has no checkpoints/<step>/ and no params/")


def restore_params(workdir: str, abstract_params) -> Any:
    """The latest checkpoint's parameters (only they are read: not the optimizer state) on one device."""
    import orbax.checkpoint as ocp

    path, subtree = latest_params_path(workdir)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract_params)
    if subtree is None:
        from transformer_jax.checkpoint import load_params
        return load_params(path, abstract)
    from transformer_jax.checkpoint import _compare
    meta = ocp.PyTreeCheckpointer().metadata(os.path.abspath(path))
    tree = getattr(meta, "item_metadata", None) or getattr(meta, "tree", meta)
    tree = getattr(tree, "tree", tree)
    _compare(tree[subtree], abstract, path)  # a mismatch names the parameter
    item = {subtree: abstract}
    restored = ocp.PyTreeCheckpointer().restore(
        os.path.abspath(path), args=ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True))
    return restored[subtree]


@dataclasses.dataclass
class Run:
    workdir: str
    cfg: Config
    model: Model
    params: Any
    tokenizer: Tokenizer | None


def load_run(workdir: str, *, need_tokenizer: bool = True) -> Run:
    """A finished (or interrupted) run of any program: its config.yaml, tokenizer and latest weights."""
    workdir = os.path.expanduser(workdir)
    if not os.path.isdir(workdir):
        raise ValueError(f"--checkpoint: {workdir} does not exist (or is not a directory)")
    config_path = os.path.join(workdir, "config.yaml")
    if not os.path.isfile(config_path):
        raise ValueError(f"--checkpoint: {workdir} has no config.yaml (not a workdir of ours)")
    cfg = config_lib.load_config(config_path)
    model, abstract = abstract_build(cfg)
    params = restore_params(workdir, abstract)
    tokenizer = None
    for path in (os.path.join(workdir, "tokenizer.model"), cfg.data.tokenizer):
        if path and os.path.isfile(path):
            tokenizer = Tokenizer(path)
            break
    if tokenizer is None and need_tokenizer:
        raise ValueError(f"--checkpoint: {workdir} has no tokenizer.model")
    return Run(workdir, cfg, model, params, tokenizer)


def translator_for(run: Run, *, beam_size: int | None = None, alpha: float | None = None,
                   batch_size: int | None = None, max_len: int | None = None) -> parallel.Translator:
    tr = run.cfg.translate
    return parallel.Translator(run.model, run.params, run.tokenizer, source_len=run.cfg.data.seq_len,
                               max_new_tokens=max_len or max_decode_len(run.cfg),
                               beam_size=tr.beam_size if beam_size is None else beam_size,
                               alpha=tr.alpha if alpha is None else alpha,
                               batch_size=batch_size or tr.eval_batch_size)


def translate_stream(translator: parallel.Translator, lines, out, chunk: int = 512) -> int:
    """Translate an iterable of lines in chunks, writing one line per input line; returns the count."""
    n, buffer = 0, []

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
    cfg = config_lib.replace(cfg, train=dict(time_limit_s=minutes * 60.0, steps=max(cfg.train.steps, 10 ** 7)
                                             if minutes > 0 else cfg.train.steps))
    prepared = prepare(cfg, workdir)
    cfg, tr = prepared.cfg, prepared.cfg.translate
    n_eval = tr.eval_examples or len(prepared.dev_pairs)
    init = prepared.task.init_params(jax.random.key(cfg.train.seed))
    t0 = time.perf_counter()
    before = parallel.evaluate_translation(prepared.translator, prepared.dev_pairs, params=init, max_examples=n_eval)
    decode_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    metrics, state = trainer.run(cfg, workdir, prepared.task, quiet=quiet)
    train_s = time.perf_counter() - t0
    params = state["params"]
    t0 = time.perf_counter()
    beam = parallel.evaluate_translation(prepared.translator, prepared.dev_pairs, params=params, max_examples=n_eval)
    beam_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    greedy = parallel.evaluate_translation(prepared.translator, prepared.dev_pairs, params=params, beam_size=1,
                                           max_examples=n_eval)
    greedy_s = time.perf_counter() - t0
    examples = [{"source": prepared.dev_pairs[i][0], "reference": prepared.dev_pairs[i][1],
                 "beam": beam["hypotheses"][i], "greedy": greedy["hypotheses"][i]} for i in range(min(5, n_eval))]
    return {"pair": f"{tr.source_lang}-{tr.target_lang}", "data": prepared.train_pairs.name,
            "train_pairs": len(prepared.train_pairs), "dev_pairs": min(n_eval, len(prepared.dev_pairs)),
            "vocab": prepared.tokenizer.vocab_size, "minutes": minutes, "steps": metrics.get("step"),
            "train_seconds": round(train_s, 1), "final_loss": metrics.get("loss"),
            "bleu_before": before["bleu"], "chrf_before": before["chrf"],
            "bleu_after": beam["bleu"], "chrf_after": beam["chrf"],
            "greedy_bleu_after": greedy["bleu"], "greedy_chrf_after": greedy["chrf"],
            "beam_size": tr.beam_size, "alpha": tr.alpha,
            "decode_seconds": {"before_beam": round(decode_s, 1), "after_beam": round(beam_s, 1),
                               "after_greedy": round(greedy_s, 1)},
            "examples": examples}


def bench_decoding(*, length: int = 128, beam_size: int = 4, batch: int = 2, source_len: int = 16,
                   model_dim: int = 64, num_layers: int = 2, repeats: int = 3, seed: int = 0) -> dict:
    """Beam search with and without the KV cache on a random-weight encoder-decoder, `length` new
    tokens (eos never stops it early): whether the outputs are identical, and the best-of-`repeats`
    wall times (compile excluded) and their ratio."""
    import numpy as np
    from transformer_jax import decoding
    from transformer_jax.config import ModelConfig

    mcfg = ModelConfig(family="encoder_decoder", vocab_size=256, model_dim=model_dim, num_heads=4,
                       mlp_dim=2 * model_dim, num_layers=num_layers, position="sinusoidal", init_std=0.2)
    model, params = build(mcfg, seed)
    ids = jax.random.randint(jax.random.key(seed + 1), (batch, source_len), 3, mcfg.vocab_size)
    outputs, seconds = {}, {}
    for use_cache in (True, False):
        run = lambda: np.asarray(decoding.beam_search(model, params, ids, beam_size=beam_size, max_new_tokens=length,
                                                      eos_id=-1, use_cache=use_cache))
        run()  # compile
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            outputs[use_cache] = run()
            times.append(time.perf_counter() - t0)
        seconds[use_cache] = min(times)
    return {"length": length, "beam_size": beam_size, "batch": batch, "model_dim": model_dim, "num_layers": num_layers,
            "identical": bool(np.array_equal(outputs[True], outputs[False])),
            "cached_s": round(seconds[True], 4), "uncached_s": round(seconds[False], 4),
            "speedup": round(seconds[False] / seconds[True], 2), "backend": jax.default_backend()}


# ----------------------------------------------------------------------------- main
def parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--checkpoint", metavar="WORKDIR", help="translate with this run's latest checkpoint")
    p.add_argument("--input", help="translate mode: a file with one sentence per line (default stdin)")
    p.add_argument("--output", help="translate mode: write translations here (default stdout)")
    p.add_argument("--beam", type=int, help="beam size (default the config's, 4); 1 = greedy")
    p.add_argument("--alpha", type=float, help="length penalty (default the config's, 0.6)")
    p.add_argument("--batch_size", type=int, help="sentences decoded together (default translate.eval_batch_size)")
    p.add_argument("--max_len", type=int, help="longest translation in tokens (default the config's)")
    p.add_argument("--bench", type=float, metavar="MINUTES",
                   help="train a fresh workdir this long; print dev BLEU before/after (beam and greedy) as JSON")
    p.add_argument("--bench_decode", type=int, metavar="LENGTH",
                   help="time beam search with and without the KV cache at this length; print JSON")
    return p


def main() -> None:
    args = parser().parse_args()
    if args.bench_decode is not None:
        if args.bench_decode < 2:
            raise ValueError(f"--bench_decode: length must be at least 2, got {args.bench_decode}")
        print(json.dumps(bench_decoding(length=args.bench_decode)))
        return
    if args.checkpoint:
        if args.config or args.overrides or args.bench is not None:
            raise ValueError("--checkpoint translates with a trained run: it takes no --config, --set or --bench")
        if args.beam is not None and args.beam < 1:
            raise ValueError(f"--beam: must be at least 1, got {args.beam}")
        run = load_run(args.checkpoint)
        if run.cfg.model.family != "encoder_decoder":
            raise ValueError(f"--checkpoint: {args.checkpoint} holds a {run.cfg.model.family} model; translation "
                             "needs an encoder_decoder")
        translator = translator_for(run, beam_size=args.beam, alpha=args.alpha, batch_size=args.batch_size,
                                    max_len=args.max_len)
        if args.input and not os.path.isfile(args.input):
            raise ValueError(f"--input: no such file {args.input}")
        source = open(args.input, encoding="utf-8") if args.input else sys.stdin
        out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
        try:
            n = translate_stream(translator, source, out)
        except UnicodeDecodeError as e:
            raise ValueError(f"--input: {args.input or 'stdin'} is not UTF-8 text ({e.reason} at byte {e.start})") from None
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
    cfg, workdir = cli.config_and_workdir(args, DEFAULT_CONFIG)
    if args.bench is not None:
        if args.bench <= 0:
            raise ValueError(f"--bench: minutes must be positive, got {args.bench}")
        workdir = args.workdir or os.path.join("runs", f"{cfg.name or 'translate'}-bench-{int(time.time())}")
        report = bench(cfg, workdir, args.bench)
        print(json.dumps(report, ensure_ascii=False))
        return
    cli.init_distributed(cfg)
    metrics, _ = train(cfg, workdir)
    if jax.process_index() == 0:
        shown = {k: round(v, 4) for k, v in metrics.items()
                 if k in ("step", "loss", "eval_loss", "eval_bleu", "eval_chrf", "best_eval_bleu", "tokens_per_sec")}
        print(f"done: {shown}; workdir {workdir}")


if __name__ == "__main__":
    cli.main(main)
