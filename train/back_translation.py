"""Back-translation where it is known to work: English -> German translation with few parallel pairs
and German text without its English (Sennrich et al. 2016; Edunov et al. 2018 on how to decode).

    python -m train.results --row back_translation      # the row: 3 seeds (docs/bench.md)
    python -m train.results --row back_translation --seeds 1 --set synthetic=300 --set decodings=beam,sample,beam_noise

The embedded gettext pairs' training side (the translation row's split: its dev set, near duplicates
of training removed, is the dev set here) is cut in two by a seeded permutation: `parallel` pairs
keep both sides; the rest keep their German only (the monolingual text; their English is used only
by the oracle arm). One SentencePiece vocabulary, trained on the text the experiment may see (both
sides of the parallel pairs, the German of the rest), serves every model. Then, each
translate_tiny trained `steps` steps:

1. the reverse model, German -> English on the parallel pairs; its own dev BLEU (German -> English);
2. the German text back-translated by it into synthetic English sources: beam 4, greedy, sampled
   (temperature 1, unrestricted) or beam 4 noised (words dropped, blanked, locally swapped): Edunov
   et al.'s two best; or, as a diagnosis, no reverse model at all: the German's real English noised
   the same way (`real_noise`: right content, wrong wording);
3. English -> German on the parallel pairs alone (the baseline), on the parallel pairs plus the
   synthetic pairs of each decoding, and on the parallel pairs plus the monolingual text's own English
   (the oracle: what the German text could give at most); dev BLEU (beam 4) for each.

The mix: `synthetic` synthetic pairs at most are added (0: all of them); `upsample` repeats the
parallel pairs that many times beside them (Edunov et al.'s upsampled bitext), so the real pairs are
not seen fewer times than in the baseline; `tag` starts every synthetic source with a tag word
(tagged back-translation, Caswell et al. 2019), so the model can tell synthetic sources from real
ones; `drop_memorised` leaves out synthetic pairs whose source is verbatim a parallel pair's English
(the reverse model's memorised output, which contradicts a real pair).
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

from train import cli
from transformer_jax.data import parallel

CONFIG = os.path.join(cli.REPO, "configs", "translate_tiny.yaml")
# real_noise is no decoding: the German's real English, noised as beam_noise is (a reverse model that
# gets every sentence's content right but its wording wrong): the diagnosis arm, what noise alone costs
DECODINGS = ("beam", "greedy", "sample", "beam_noise", "real_noise")
FILLER = "<blank>"  # Edunov et al.'s filler word for noised beam outputs
TAG = "<bt>"  # starts a synthetic source under `tag`: never in real text


def noised(text: str, rng: np.random.Generator, p_drop: float = 0.1, p_blank: float = 0.1, swap: int = 3) -> str:
    """Edunov et al. 2018's noised beam output: each word dropped with p_drop, else replaced by a filler
    with p_blank; then the words permuted with no word moved more than `swap` places (each kept word's
    position plus a uniform draw from [0, swap], sorted)."""
    words = []
    for w in text.split():
        r = rng.random()
        words.append(None if r < p_drop else FILLER if r < p_drop + p_blank else w)
    kept = [w for w in words if w is not None]
    keys = np.arange(len(kept)) + rng.uniform(0, swap, len(kept))
    return " ".join(kept[i] for i in np.argsort(keys, kind="stable"))


def split_monolingual(train: parallel.Pairs, num_parallel: int, seed: int) -> tuple[parallel.Pairs, parallel.Pairs]:
    """(parallel pairs, the rest): a seeded permutation's first `num_parallel` pairs and the others."""
    if not 0 < num_parallel < len(train):
        raise ValueError(f"parallel: must be between 1 and {len(train) - 1} (the training pairs), got {num_parallel}")
    order = np.random.default_rng(seed).permutation(len(train))
    return train.select(sorted(order[:num_parallel].tolist()), "parallel"), train.select(
        sorted(order[num_parallel:].tolist()), "monolingual"
    )


def reversed_pairs(pairs: parallel.Pairs, name: str) -> parallel.Pairs:
    return parallel.from_lists(pairs.targets, pairs.sources, name)


def mixed(
    par: parallel.Pairs, sources: list[str], german: list[str], *, upsample: int, tag: bool, drop_memorised: bool
) -> parallel.Pairs:
    """The parallel pairs `upsample` times, then the synthetic pairs (back-translated source, German): empty
    sources left out, and under `drop_memorised` any source that is verbatim a parallel pair's English;
    under `tag` each synthetic source starts with TAG."""
    known = set(par.sources)
    keep = [i for i, e in enumerate(sources) if e.strip() and not (drop_memorised and e in known)]
    return parallel.from_lists(
        par.sources * upsample + [f"{TAG} {sources[i]}" if tag else sources[i] for i in keep],
        par.targets * upsample + [german[i] for i in keep],
        "parallel+synthetic",
    )


def _cfg(seed: int, steps: int, source: str, target: str, tokenizer: str):
    from transformer_jax import config as config_lib

    return config_lib.load_config(
        CONFIG,
        [
            f"train.seed={seed}",
            f"train.steps={steps}",
            "train.eval_every=0",  # no eval loss: the dev BLEU is measured once, at the end
            f"train.checkpoint_every={steps}",
            f"translate.source_lang={source}",
            f"translate.target_lang={target}",
            "translate.eval_examples=0",  # scored once, at the end, below
            f"data.tokenizer={tokenizer}",
        ],
    )


def trained(workdir: str, cfg, train: parallel.Pairs, dev: parallel.Pairs, *, quiet: bool = True):
    """(translator, params) of translate_tiny trained on `train` in workdir."""
    from train import result_types, trainer
    from transformer_jax.tasks.translation import prepare

    prepared = prepare(cfg, workdir, pairs=(train, dev))
    metrics, state = trainer.run(prepared.cfg, workdir, prepared.task, quiet=quiet)
    result_types.finished(metrics, cfg.train.steps, workdir)
    return prepared.translator, state["params"]


def dev_bleu(translator, params, dev: parallel.Pairs) -> float:
    from transformer_jax.translation import evaluate_translation

    return float(evaluate_translation(translator, dev, params=params)["bleu"])


def measure(
    workdir: str,
    seed: int,
    *,
    steps: int,
    num_parallel: int,
    synthetic: int = 0,
    upsample: int = 1,
    tag: bool = False,
    drop_memorised: bool = False,
    decodings: tuple[str, ...] = DECODINGS,
    oracle: bool = True,
    quiet: bool = True,
) -> dict:
    """One seed's arms (module docstring): dev BLEU of each, the reverse model's own, the gains."""
    import shutil

    from train.result_types import config_key, fresh_summary, save_summary
    from transformer_jax import config as config_lib
    from transformer_jax.data.tokenizer import load_or_train_tokenizer
    from transformer_jax.tasks.translation import load_pairs
    from transformer_jax.translation import corpus_scores

    bad = [d for d in decodings if d not in DECODINGS]
    if bad:
        raise ValueError(f"decodings: unknown {bad[0]!r} (known: {', '.join(DECODINGS)})")
    if steps < 1:
        raise ValueError(f"steps: must be >= 1, got {steps}")
    if synthetic < 0:
        raise ValueError(f"synthetic: must be >= 0 (0: every monolingual sentence), got {synthetic}")
    if upsample < 1:
        raise ValueError(f"upsample: must be >= 1 (how many times the parallel pairs are repeated), got {upsample}")
    # a finished measurement of exactly these settings is read back; anything else is redone from scratch
    base = config_lib.load_config(CONFIG)
    key = {
        "config": config_key(base),
        "seed": seed,
        "steps": steps,
        "parallel": num_parallel,
        "synthetic": synthetic,
        "upsample": upsample,
        "tag": tag,
        "drop_memorised": drop_memorised,
        "decodings": list(decodings),
        "oracle": oracle,
    }
    saved = fresh_summary(workdir, key)
    if saved is not None:
        return saved
    os.makedirs(workdir)
    start = time.perf_counter()
    # the translation row's split (its seed, its dev set), then parallel / monolingual
    train, dev = load_pairs(config_lib.load_config(CONFIG, [f"train.seed={seed}"]))
    par, mono = split_monolingual(train, num_parallel, seed)
    german = mono.targets[: synthetic or len(mono)]
    real_english = mono.sources[: len(german)]  # never trained on, but by the oracle (and real_noise)
    vocab = load_or_train_tokenizer(
        workdir,
        par.sources + par.targets + german + ([TAG] if tag else []),
        base.model.vocab_size,
        num_sentinels=0,
        seed=seed,
    )
    tokenizer = os.path.join(workdir, "tokenizer.model")
    out: dict = {
        "parallel_pairs": len(par),
        "monolingual": len(german),
        "dev_pairs": len(dev),
        "vocab": vocab.vocab_size,
    }

    # 1. the reverse model (German -> English) and its own dev BLEU
    reverse, reverse_params = trained(
        os.path.join(workdir, "reverse"),
        _cfg(seed, steps, "de", "en", tokenizer),
        reversed_pairs(par, "parallel:de-en"),
        reversed_pairs(dev, "dev:de-en"),
        quiet=quiet,
    )
    out["reverse_bleu"] = dev_bleu(reverse, reverse_params, reversed_pairs(dev, "dev:de-en"))
    # 2. back-translations of the German text (each decoding once)
    made: dict[str, list[str]] = {}

    def english(d: str) -> list[str]:
        if d not in made:
            if d in ("beam_noise", "real_noise"):
                rng = np.random.default_rng(seed)
                made[d] = [noised(e, rng) for e in (english("beam") if d == "beam_noise" else real_english)]
            elif d == "sample":
                made[d] = reverse(german, params=reverse_params, temperature=1.0, seed=seed)
            else:
                made[d] = reverse(german, params=reverse_params, beam_size=4 if d == "beam" else 1)
        return made[d]

    # 3. English -> German: parallel alone, + each back-translation, + the oracle
    forward = _cfg(seed, steps, "en", "de", tokenizer)
    arms = {"baseline": par}
    known = set(par.sources)
    for d in decodings:
        sources = english(d)
        # how close the synthetic sources are to the English the German text came with (never trained on)
        out[f"{d}_synthetic_bleu"] = corpus_scores(sources, real_english)["bleu"]
        out[f"{d}_copied"] = sum(e == g for e, g in zip(sources, german)) / len(german)  # left in German
        # an English source of the parallel pairs given back verbatim (now with other German): memorised
        out[f"{d}_memorised"] = sum(e in known for e in sources) / len(german)
        with open(os.path.join(workdir, f"synthetic_{d}.tsv"), "w", encoding="utf-8") as f:
            f.writelines(f"{parallel.clean(e)}\t{g}\n" for e, g in zip(sources, german))  # one line each
        arms[d] = mixed(par, sources, german, upsample=upsample, tag=tag, drop_memorised=drop_memorised)
        out[f"{d}_kept"] = len(arms[d]) - upsample * len(par)
    if oracle:
        # the same mix, with the German's own English
        arms["oracle"] = mixed(par, real_english, german, upsample=upsample, tag=False, drop_memorised=False)
    for name, pairs in arms.items():
        translator, params = trained(os.path.join(workdir, name), forward, pairs, dev, quiet=quiet)
        out[f"{name}_bleu"] = dev_bleu(translator, params, dev)
        with open(os.path.join(workdir, "figures.json"), "w") as f:  # so far: a long run can be watched
            json.dump(out, f, indent=1)
        shutil.rmtree(os.path.join(workdir, name, "checkpoints"), ignore_errors=True)
    for name in (*decodings, *(["oracle"] if oracle else [])):
        out[f"{name}_gain"] = out[f"{name}_bleu"] - out["baseline_bleu"]
    out["seconds"] = time.perf_counter() - start  # this seed's wall time: the row's, when read back
    return save_summary(workdir, key, out)
