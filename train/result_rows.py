"""The rows of RESULTS.md: each a claim, how one seed measures it on held-out data, and its checks.

`train.results` runs them. A row's `measure(ctx, seed)` returns that seed's figures (numbers); its
checks compare the mean over the seeds with a threshold. Runs that several rows share (the default
bert_tiny pretraining of a seed, the back-translation models) are made once in `ctx.shared` and
read back afterwards; any run whose config changed is trained again.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import statistics
from collections.abc import Callable

from train import cli
from train.result_types import Check, Context, Row, config_key, finished, fresh_summary, save_summary

CONFIGS = os.path.join(cli.REPO, "configs")


def initial_eval(cfg, task, seed: int) -> dict:
    """The held-out figures of the untrained model (the train loop's initial parameters)."""
    import jax

    from train import trainer
    from transformer_jax import sharding as sh

    mesh = sh.make_mesh(cfg.mesh)
    params = jax.jit(task.init_params)(jax.random.key(seed))
    return trainer.evaluate(task, jax.jit(trainer.make_eval_step(task)), params, mesh, cfg.train.eval_steps)


def pretrained(workdir: str, config: str, overrides: list[str], *, before: bool = False) -> dict:
    """`python -m train.pretrain --config <config> --set ...` in workdir: its last logged metrics (the
    final eval among them), with the untrained model's eval figures as before_<name> when asked."""
    from train import pretrain, trainer
    from transformer_jax import config as config_lib

    cfg = config_lib.load_config(config, overrides)
    key = {"config": config_key(cfg), "before": before}
    saved = fresh_summary(workdir, key)
    if saved is not None:
        return saved
    cfg, task = pretrain.make_task(cfg, workdir)
    first = {f"before_{k}": v for k, v in initial_eval(cfg, task, cfg.train.seed).items()} if before else {}
    metrics, _ = trainer.run(cfg, workdir, task, quiet=True)
    return save_summary(workdir, key, {**finished(metrics, cfg.train.steps, workdir), **first})


def bert_tiny(ctx: Context, seed: int) -> tuple[str, dict]:
    """The default `python -m train.pretrain --config configs/bert_tiny.yaml --set train.seed=<seed>`."""
    steps = ctx.options.get("pretrain_steps")
    workdir = os.path.join(ctx.shared, f"bert_tiny_{seed}" + (f"_{steps}_steps" if steps else ""))
    metrics = pretrained(
        workdir,
        os.path.join(CONFIGS, "bert_tiny.yaml"),
        [f"train.seed={seed}"] + ([f"train.steps={steps}"] if steps else []),
        before=True,
    )
    return workdir, metrics


def finetune_steps(ctx: Context) -> list[str]:
    """The finetunes' step count where a quick run (--set steps=N) shortens them."""
    return [f"train.steps={ctx['steps']}"] if ctx.options.get("steps") else []


def finetuned(
    workdir: str, seed: int, overrides: list[str], *, scratch: bool = False, export: bool = False, translator=None
) -> dict:
    """The default `python -m train.finetune --set train.seed=<seed> --set ...` (configs/finetune_embedded.yaml)
    in workdir: its summary, with the median train tokens/s of its logged windows (the first,
    which compiles, left out)."""
    from train.finetune import finetune, load_finetune_config

    cfg = load_finetune_config(None, [f"train.seed={seed}", *overrides])
    key = {"config": config_key(cfg), "scratch": scratch, "export": export, "translator": translator is not None}
    saved = fresh_summary(workdir, key)
    if saved is not None:
        return saved
    summary = finished(
        finetune(cfg, workdir, quiet=True, scratch=scratch, export=export, translator=translator),
        cfg.train.steps,
        workdir,
    )
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rates = [r["tokens_per_sec"] for r in map(json.loads, f) if "tokens_per_sec" in r][1:]
    summary["train_tokens_per_s"] = statistics.median(rates) if rates else float("nan")
    summary["workdir"] = workdir
    return save_summary(workdir, key, summary)


def accuracy(summary: dict) -> float:
    return float(summary["eval_accuracy"])


# ----------------------------------------------------------------------------- rows
def measure_kv_cache(ctx: Context, seed: int) -> dict:
    from train.translate import bench_decoding

    r = bench_decoding(length=ctx["length"], beam_size=4, batch=2, model_dim=64, num_layers=2, repeats=3, seed=seed)
    if not r["identical"]:
        raise RuntimeError(f"kv_cache: beam search with the cache differs from without it (seed {seed})")
    return {"speedup": r["speedup"], "cached_s": r["cached_s"], "uncached_s": r["uncached_s"]}


def measure_span_corruption(ctx: Context, seed: int) -> dict:
    overrides = [f"train.seed={seed}"] + ([f"train.steps={ctx['steps']}"] if ctx["steps"] else [])
    m = pretrained(ctx.path(f"t5_tiny_{seed}"), os.path.join(CONFIGS, "t5_tiny.yaml"), overrides, before=True)
    return {
        "eval_loss_before": m["before_eval_loss"],
        "eval_loss": m["eval_loss"],
        "eval_loss_drop": m["before_eval_loss"] - m["eval_loss"],
        "steps": m["step"],
    }


def measure_mlm_nsp(ctx: Context, seed: int) -> dict:
    _, m = bert_tiny(ctx, seed)
    return {
        "nsp_accuracy": m["eval_nsp_accuracy"],
        "mlm_accuracy": m["eval_mlm_accuracy"],
        "nsp_accuracy_before": m["before_eval_nsp_accuracy"],
        "mlm_accuracy_before": m["before_eval_mlm_accuracy"],
        "nsp_loss": m["eval_nsp_loss"],
        "steps": m["step"],
    }


def pretrained_finetune(ctx: Context, seed: int) -> dict:
    """The default finetune from the seed's bert_tiny (shared: several rows compare with it)."""
    init, _ = bert_tiny(ctx, seed)
    steps = ctx.options.get("steps")
    workdir = os.path.join(ctx.shared, f"finetune_bert_tiny_{seed}" + (f"_{steps}_steps" if steps else ""))
    return finetuned(workdir, seed, [f"finetune.init_from={init}", *finetune_steps(ctx)], export=True)


def measure_pretrained_vs_scratch(ctx: Context, seed: int) -> dict:
    init, _ = bert_tiny(ctx, seed)
    pre = accuracy(pretrained_finetune(ctx, seed))
    scratch = accuracy(
        finetuned(ctx.path(f"scratch_{seed}"), seed, [f"finetune.init_from={init}", *finetune_steps(ctx)], scratch=True)
    )
    return {"pretrained_accuracy": pre, "scratch_accuracy": scratch, "gain": pre - scratch}


LORA_ALL_KERNELS = '["attention/(query|key|value|out)/kernel", "mlp/(wi|wo)/kernel"]'

STRATEGIES = {
    "full": [],
    "partial": ["finetune.strategy=partial", "finetune.top_layers=1"],
    "frozen": ["finetune.strategy=frozen"],
    # LoRA's own learning rate (5x full finetuning's; the LoRA paper's are 10-100x) on every kernel of
    # the layers: at 1e-3 on query / value only it barely moved from the pretrained model (docs/bench.md)
    "lora": ["finetune.strategy=lora", "train.learning_rate=5e-3", f"finetune.lora_targets={LORA_ALL_KERNELS}"],
}


STRATEGY_THRESHOLDS = {"full": 0.47, "partial": 0.41, "frozen": 0.24, "lora": 0.49}


def measure_strategies(ctx: Context, seed: int) -> dict:
    init, _ = bert_tiny(ctx, seed)
    out = {}
    for name, overrides in STRATEGIES.items():
        s = (
            pretrained_finetune(ctx, seed)
            if name == "full"
            else finetuned(
                ctx.path(f"{name}_{seed}"), seed, [f"finetune.init_from={init}", *finetune_steps(ctx), *overrides]
            )
        )
        out.update(
            {
                f"{name}_accuracy": accuracy(s),
                f"{name}_trainable_params": s["trainable_params"],
                f"{name}_optimizer_mb": s["optimizer_state_bytes"] / 2**20,
                f"{name}_tokens_per_s": s["train_tokens_per_s"],
            }
        )
    out["lora_minus_full"] = out["lora_accuracy"] - out["full_accuracy"]
    out["frozen_minus_full"] = out["frozen_accuracy"] - out["full_accuracy"]
    return out


STUDENT = ["model.model_dim=64", "model.num_heads=2", "model.mlp_dim=128", "model.num_layers=1"]


def measure_distillation(ctx: Context, seed: int) -> dict:
    """A stronger teacher (the seed's bert_tiny finetuned `teacher_steps`: pretrained, 2 x 128, 3x the
    default's steps) and a 1-layer 64-wide student from scratch. Few labels: the student on `labels`
    labelled snippets alone vs the same plus the task's unlabelled pool as a transfer set, taught by the
    teacher's soft labels (weight `weight`, temperature 2). All labels: alone vs distilled, no transfer set."""
    init, _ = bert_tiny(ctx, seed)
    t = finetuned(
        ctx.path(f"teacher_{seed}"),
        seed,
        [f"finetune.init_from={init}", f"train.steps={ctx['teacher_steps']}"],
        export=True,
    )
    teacher = t["workdir"]
    student = [*STUDENT, f"data.tokenizer={os.path.join(teacher, 'tokenizer.model')}", *finetune_steps(ctx)]
    few = [*student, f"finetune.max_train_examples={ctx['labels']}"]
    distill = [f"finetune.distill_from={teacher}", f"finetune.distill_weight={ctx['weight']}"]
    out = {
        "teacher_accuracy": accuracy(t),
        "few_alone_accuracy": accuracy(finetuned(ctx.path(f"few_alone_{seed}"), seed, few)),
        "few_distilled_accuracy": accuracy(
            finetuned(
                ctx.path(f"few_distilled_{seed}"),
                seed,
                [*few, *distill, f"finetune.transfer_examples={ctx['transfer']}"],
            )
        ),
        "alone_accuracy": accuracy(finetuned(ctx.path(f"student_alone_{seed}"), seed, student)),
        "distilled_accuracy": accuracy(finetuned(ctx.path(f"student_distilled_{seed}"), seed, [*student, *distill])),
    }
    out["few_gain"] = out["few_distilled_accuracy"] - out["few_alone_accuracy"]
    out["gain"] = out["distilled_accuracy"] - out["alone_accuracy"]
    out["teacher_minus_alone"] = out["teacher_accuracy"] - out["alone_accuracy"]
    return out


def measure_contrastive(ctx: Context, seed: int) -> dict:
    """Few labels (`labels` of the 2,400 train snippets), finetuned from the seed's bert_tiny with and
    without supervised contrastive loss (SupCon, weight `weight`, temperature 0.1, one view): held-out
    accuracy and same_label_recall1 (the nearest other eval snippet by the pooled embedding shares the label)."""
    init, _ = bert_tiny(ctx, seed)
    few = [f"finetune.init_from={init}", f"finetune.max_train_examples={ctx['labels']}", *finetune_steps(ctx)]
    supcon = [f"finetune.contrastive_weight={ctx['weight']}", "finetune.contrastive_loss=supcon"]
    without = finetuned(ctx.path(f"without_{seed}"), seed, few)
    with_ = finetuned(ctx.path(f"with_{seed}"), seed, [*few, *supcon])
    out = {
        "with_accuracy": accuracy(with_),
        "without_accuracy": accuracy(without),
        "with_recall1": with_["eval_same_label_recall1"],
        "without_recall1": without["eval_same_label_recall1"],
    }
    out["gain"] = out["with_accuracy"] - out["without_accuracy"]
    out["recall1_gain"] = out["with_recall1"] - out["without_recall1"]
    return out


AUGMENTATIONS = {
    "sentence_shuffle": ["finetune.sentence_shuffle=0.5"],
    "noise": ["finetune.token_drop=0.1", "finetune.token_replace=0.1", "finetune.token_mask=0.1"],
    "back_translation": ["finetune.back_translate=0.5"],
}


AUGMENTATION_THRESHOLDS = {"sentence_shuffle": 0.05, "noise": 0.005}


def back_translator(ctx: Context) -> Callable[[str], str]:
    """en -> de -> en through two translate_tiny models trained on the embedded gettext pairs, line
    by line (the models know sentences, not 6-line snippets), greedy, each text translated once."""
    from train.translate import train
    from transformer_jax import config as config_lib
    from transformer_jax import runs
    from transformer_jax.data.labeled.base import round_trip
    from transformer_jax.tasks.translation import translator_for

    models = {}
    for pair in (("en", "de"), ("de", "en")):
        workdir = os.path.join(ctx.shared, f"translate_{pair[0]}_{pair[1]}")
        cfg = config_lib.load_config(
            os.path.join(CONFIGS, "translate_tiny.yaml"),
            [
                f"translate.source_lang={pair[0]}",
                f"translate.target_lang={pair[1]}",
                f"train.steps={ctx['translate_steps']}",
                "translate.eval_examples=0",
            ],
        )
        key = {"config": config_key(cfg)}
        if fresh_summary(workdir, key) is None:
            train(cfg, workdir, quiet=True)
            save_summary(workdir, key, {})
        models[pair] = translator_for(runs.load_run(workdir), beam_size=1)
    per_line = lambda t: lambda text: "\n".join(t(text.split("\n")))
    trip = round_trip(per_line(models["en", "de"]), per_line(models["de", "en"]))
    return functools.lru_cache(maxsize=None)(trip)


def measure_augmentation(ctx: Context, seed: int) -> dict:
    init, _ = bert_tiny(ctx, seed)
    base = [f"finetune.init_from={init}", f"finetune.max_train_examples={ctx['train_examples']}", *finetune_steps(ctx)]
    out = {"none_accuracy": accuracy(finetuned(ctx.path(f"none_{seed}"), seed, base))}
    for name, overrides in AUGMENTATIONS.items():
        translator = back_translator(ctx) if name == "back_translation" else None
        a = accuracy(finetuned(ctx.path(f"{name}_{seed}"), seed, [*base, *overrides], translator=translator))
        out[f"{name}_accuracy"], out[f"{name}_gain"] = a, a - out["none_accuracy"]
    return out


def benched(ctx: Context, seed: int, name: str, config: str, bench: Callable) -> dict:
    """`bench(cfg, workdir)` of configs/<config> at the seed (and the row's steps, when set), made once."""
    from transformer_jax import config as config_lib

    workdir = ctx.path(f"{name}_{seed}")
    cfg = config_lib.load_config(
        os.path.join(CONFIGS, config),
        [f"train.seed={seed}"] + ([f"train.steps={ctx['steps']}"] if ctx["steps"] else []),
    )
    key = {"config": config_key(cfg)}
    saved = fresh_summary(workdir, key)
    return saved if saved is not None else save_summary(workdir, key, bench(cfg, workdir))


def measure_translation(ctx: Context, seed: int) -> dict:
    from train.translate import bench

    r = benched(ctx, seed, "translate", "translate_tiny.yaml", lambda cfg, w: bench(cfg, w, 0, quiet=True))
    return {
        "bleu": r["bleu_after"],
        "greedy_bleu": r["greedy_bleu_after"],
        "chrf": r["chrf_after"],
        "greedy_chrf": r["greedy_chrf_after"],
        "bleu_before": r["bleu_before"],
        "beam_minus_greedy_bleu": r["bleu_after"] - r["greedy_bleu_after"],
        "dev_pairs": r["dev_pairs"],
        "train_pairs": r["train_pairs"],
        "steps": r["steps"],
    }


# sampled back-translation over beam (Edunov et al. 2018), and what the German-only text is worth when
# its real English comes with it (the oracle: the room back-translation has)
BACK_TRANSLATION_THRESHOLDS = {"sample_minus_beam": 0.2, "oracle_gain": 10.0}
BACK_TRANSLATION_NOTE = (
    "Sampled sources beat beam ones (the check), but no check claims a gain over the 300 pairs alone: the "
    "reverse model memorises its 300 pairs and its beam output repeats their English with other German "
    "(docs/bench.md). The oracle check is the room the German text leaves."
)


def measure_back_translation(ctx: Context, seed: int) -> dict:
    """train.back_translation's arms: `parallel` en-de pairs and the rest's German alone; a de -> en
    model on the pairs back-translates the German (each of `decodings`); en -> de on the pairs alone
    vs on the pairs plus the synthetic ones, every model translate_tiny at `steps` steps."""
    from train import back_translation

    decodings = ctx["decodings"]
    decodings = tuple(d for d in decodings.split(",") if d) if isinstance(decodings, str) else tuple(decodings)
    if ctx["oracle"] is not True or not {"beam", "sample"} <= set(decodings):
        raise ValueError(
            f"oracle, decodings: the row checks oracle_gain and sample_minus_beam, so oracle must be true and "
            f"decodings hold beam and sample (got {ctx['oracle']!r}, {ctx['decodings']!r})"
        )
    out = back_translation.measure(
        ctx.path(f"seed_{seed}"),
        seed,
        steps=ctx["steps"],
        num_parallel=ctx["parallel"],
        synthetic=ctx["synthetic"],
        upsample=ctx["upsample"],
        tag=ctx["tag"],
        drop_memorised=ctx["drop_memorised"],
        decodings=decodings,
        oracle=ctx["oracle"],
    )
    out["sample_minus_beam"] = out["sample_bleu"] - out["beam_bleu"]
    return out


ITM_THRESHOLDS = {"itm_accuracy": 0.963, "i2t_recall1": 0.26, "t2i_recall1": 0.265}


def measure_itm(ctx: Context, seed: int) -> dict:
    from train.pretrain_itm import bench

    r = benched(ctx, seed, "itm", "itm_tiny.yaml", bench)
    figures = ("itm_accuracy", "itm_hard_accuracy", "i2t_recall1", "i2t_recall5", "t2i_recall1", "t2i_recall5")
    return {
        **{k: r[k] for k in figures},
        "chance_recall1": r["chance"]["i2t_recall1"],
        "chance_recall5": r["chance"]["i2t_recall5"],
    }


def measure_continued(ctx: Context, seed: int) -> dict:
    """train.bench_domain's arms, with the seed's default bert_tiny as the general model: its MLM
    continued on the domain (the embedded task's packages) and, as the control, on the whole corpus
    for the same steps; the general model and both continuations finetuned with the default finetune."""
    from train import bench_domain

    general, _ = bert_tiny(ctx, seed)
    out = {"general_accuracy": accuracy(pretrained_finetune(ctx, seed))}
    for arm in ("domain", "control"):
        init = ctx.path(f"{arm}_{seed}")
        if not os.path.isfile(os.path.join(init, "done")):
            shutil.rmtree(init, ignore_errors=True)
            finished(
                bench_domain.continued(
                    general,
                    init,
                    ctx["domain_steps"],
                    seed,
                    ctx["learning_rate"],
                    bench_domain.domain_paths() if arm == "domain" else None,
                ),
                ctx["domain_steps"],
                init,
            )
            open(os.path.join(init, "done"), "w").close()
        out[f"{arm}_accuracy"] = accuracy(
            finetuned(ctx.path(f"finetune_{arm}_{seed}"), seed, [f"finetune.init_from={init}", *finetune_steps(ctx)])
        )
    out["gain"] = out["domain_accuracy"] - out["general_accuracy"]
    out["domain_minus_control"] = out["domain_accuracy"] - out["control_accuracy"]
    return out


SWEEP_THRESHOLD = 5.45

# Where a user starts (§3.1.4 of the seed): GPT's published settings (Radford et al. 2018: learning rate
# 2.5e-4, dropout 0.1) with a small batch, untuned for gpt_tiny. The search space (configs/sweep_gpt_tiny.yaml)
# covers each of these keys, so every trial replaces them.
UNTUNED = ["train.learning_rate=2.5e-4", "model.dropout_rate=0.1", "train.batch_size=8", "train.warmup_steps=100"]


def measure_sweep(ctx: Context, seed: int) -> dict:
    """train.sweep (configs/sweep_gpt_tiny.yaml, TPE after `startup` random trials, median pruning at
    each eval) of gpt_tiny from the untuned base at `steps`; then the best config, the untuned base and
    the hand-tuned default, each retrained with a seed no trial used and compared on held-out loss (the
    sweep's own best value is selected on the eval set, the retrained one is not)."""
    from train import sweep
    from transformer_jax import config as config_lib

    workdir = ctx.path(f"sweep_{seed}")
    config = os.path.join(CONFIGS, "gpt_tiny.yaml")
    untuned = ctx.path("gpt_tiny_untuned.yaml")  # the sweep's --config: its searched keys come from --set
    os.makedirs(ctx.workdir, exist_ok=True)
    config_lib.save_config(config_lib.load_config(config, UNTUNED), untuned)
    steps = [f"train.steps={ctx['steps']}", f"train.eval_every={ctx['steps'] // 4}"]
    if not os.path.isfile(os.path.join(workdir, "best.yaml")):
        shutil.rmtree(workdir, ignore_errors=True)
        sweep.main(
            [
                "--config",
                untuned,
                "--space",
                os.path.join(CONFIGS, "sweep_gpt_tiny.yaml"),
                "--trials",
                str(ctx["trials"]),
                "--seed",
                str(seed),
                "--workdir",
                workdir,
                "--startup-trials",
                str(ctx["startup"]),
                "--prune-after",
                str(ctx["startup"]),
                *[a for o in steps for a in ("--set", o)],
            ]
        )
    import optuna

    study = optuna.load_study(study_name=None, storage=f"sqlite:///{os.path.join(workdir, 'study.db')}")
    states = [t.state for t in study.trials]
    fresh = [f"train.seed={1000 + seed}"]
    best = pretrained(ctx.path(f"best_{seed}"), os.path.join(workdir, "best.yaml"), fresh)
    base = pretrained(ctx.path(f"untuned_{seed}"), untuned, [*steps, *fresh])
    default = pretrained(ctx.path(f"default_{seed}"), config, [*steps, *fresh])
    return {
        "improvement": base["eval_loss"] - best["eval_loss"],
        "untuned_eval_loss": base["eval_loss"],
        "best_eval_loss": best["eval_loss"],
        "default_eval_loss": default["eval_loss"],
        "best_minus_default": best["eval_loss"] - default["eval_loss"],
        "trials": len(states),
        "pruned": sum(s == optuna.trial.TrialState.PRUNED for s in states),
    }


QUICK = {"pretrain_steps": 0, "steps": 0}  # 0: the configs' own step counts; a quick check sets them

ROWS: dict[str, Row] = {
    r.name: r
    for r in [
        Row(
            "pretrained_vs_scratch",
            "pretraining helps finetuning: bert_tiny's default pretraining, then the default "
            "finetune (embedded task), vs the same finetune from random weights",
            "the same finetune from scratch",
            measure_pretrained_vs_scratch,
            (Check("gain", 0.05, 0.0),),
            ("gain", "pretrained_accuracy", "scratch_accuracy"),
            dict(QUICK),
        ),
        Row(
            "mlm_nsp",
            "MLM and NSP learn: held-out accuracies after the default bert_tiny pretraining",
            "the untrained model (NSP chance 0.5)",
            measure_mlm_nsp,
            (Check("mlm_accuracy", 0.535, "mlm_accuracy_before"), Check("nsp_accuracy", 0.75, 0.5)),
            ("mlm_accuracy", "nsp_accuracy", "mlm_accuracy_before", "nsp_accuracy_before"),
            {"pretrain_steps": 0},
            note="At batch 16 NSP stayed at 0.674 ± 0.065 and MLM at 0.484: NSP has one label a row; batch 32 "
            "gives both more (docs/objectives.md)",
        ),
        Row(
            "span_corruption",
            "T5 span corruption learns: t5_tiny's held-out loss falls",
            "the untrained model's loss",
            measure_span_corruption,
            (Check("eval_loss_drop", 2.8, 0.0),),
            ("eval_loss_drop", "eval_loss_before", "eval_loss"),
            {"steps": 0},
        ),
        Row(
            "finetune_strategies",
            "full, partial (top layer + head), frozen (head) and LoRA finetuning from bert_tiny: "
            "held-out accuracy, trainable parameters, optimizer state, train speed",
            "chance (1/6)",
            measure_strategies,
            (
                *(Check(f"{s}_accuracy", t, 1 / 6) for s, t in STRATEGY_THRESHOLDS.items()),
                Check("lora_minus_full", -0.045, "frozen_minus_full"),  # LoRA within 5 points of full
            ),
            (
                "lora_minus_full",
                "frozen_minus_full",
                *(
                    f"{s}_{f}"
                    for f in ("accuracy", "trainable_params", "optimizer_mb", "tokens_per_s")
                    for s in STRATEGIES
                ),
            ),
            dict(QUICK),
        ),
        Row(
            "distillation",
            "distillation with a transfer set: a 1-layer student from scratch given 24 labelled snippets, alone vs "
            "taught by a stronger teacher (bert_tiny finetuned 900 steps) on the task's 2,911 unlabelled snippets; "
            "and with all 2,400 labels, alone vs distilled",
            "the student trained alone on the same labels (few_gain, gain); chance 1/6 (accuracy)",
            measure_distillation,
            (Check("few_gain", 0.1, 0.0),),
            (
                "few_gain",
                "few_alone_accuracy",
                "few_distilled_accuracy",
                "teacher_accuracy",
                "gain",
                "alone_accuracy",
                "distilled_accuracy",
                "teacher_minus_alone",
            ),
            {"labels": 24, "transfer": 2911, "weight": 0.9, "teacher_steps": 900, **QUICK},
            note="With all labels, distilling at weight 0.9 without a transfer set loses 0.043 ± 0.030: trained "
            "alone the student already reaches what its size and 300 steps allow (docs/bench.md). The transfer "
            "set carries the teacher's knowledge where labels are scarce.",
        ),
        Row(
            "contrastive",
            "supervised contrastive loss (SupCon) with few labels: 240 of the 2,400 train snippets, finetuned from "
            "bert_tiny with and without it; held-out accuracy and same-label retrieval (recall@1 of the pooled "
            "embedding)",
            "the same finetune without it (gain, recall1_gain); chance 1/6 (accuracy)",
            measure_contrastive,
            (Check("recall1_gain", 0.017, 0.0), Check("with_accuracy", 0.35, 1 / 6)),
            ("recall1_gain", "gain", "with_accuracy", "without_accuracy", "with_recall1", "without_recall1"),
            {"weight": 0.3, "labels": 240, **QUICK},
            note="SupCon clusters the embeddings by label (recall1_gain 0.028 ± 0.006); the accuracy gain "
            "(0.020 ± 0.035) is within the seeds' spread, so no check claims it.",
        ),
        Row(
            "augmentation",
            "data augmentation on a low-data split of the embedded task (120 snippets, finetuned from "
            "bert_tiny): line reordering, token noise, back-translation, each against none",
            "the same finetune without augmentation",
            measure_augmentation,
            (
                Check("sentence_shuffle_gain", AUGMENTATION_THRESHOLDS["sentence_shuffle"], 0.0),
                Check("noise_gain", AUGMENTATION_THRESHOLDS["noise"], 0.0),
            ),
            ("none_accuracy", *(f"{a}_{f}" for a in AUGMENTATIONS for f in ("accuracy", "gain"))),
            {"train_examples": 120, "translate_steps": 600, **QUICK},
            note="Back-translation hurts here: the translation models know short English UI messages, not Python, "
            "and their round trip garbles code; no check claims it helps.",
        ),
        Row(
            "translation",
            "translate_tiny learns English -> German (embedded gettext pairs): dev BLEU and chrF, beam 4 "
            "vs greedy, on a dev set with near-duplicates of training removed",
            "the untrained model",
            measure_translation,
            (Check("bleu", 30.0, "bleu_before"), Check("beam_minus_greedy_bleu", 0.5, 0.0)),
            ("bleu", "greedy_bleu", "beam_minus_greedy_bleu", "chrf", "greedy_chrf", "bleu_before", "dev_pairs"),
            {"steps": 0},
        ),
        Row(
            "back_translation",
            "back-translation in translation (Sennrich et al. 2016): English -> German from 300 embedded gettext "
            "pairs plus the other ~826 training pairs' German, its English back-translated by a German -> English "
            "model trained on the 300, sampled vs beam 4 (Edunov et al. 2018), vs the 300 alone and vs the German "
            "with its real English (oracle); dev BLEU (beam 4, near-duplicates removed)",
            "the same model on the 300 real pairs alone (gains); beam back-translation (sample_minus_beam)",
            measure_back_translation,
            (
                Check("sample_minus_beam", BACK_TRANSLATION_THRESHOLDS["sample_minus_beam"], 0.0),
                Check("oracle_gain", BACK_TRANSLATION_THRESHOLDS["oracle_gain"], 0.0),
            ),
            (
                "sample_minus_beam",
                "beam_gain",
                "sample_gain",
                "oracle_gain",
                "baseline_bleu",
                "beam_bleu",
                "sample_bleu",
                "oracle_bleu",
                "reverse_bleu",
                "beam_synthetic_bleu",
                "sample_synthetic_bleu",
                "beam_memorised",
                "sample_memorised",
                *(f"{d}_{f}" for d in ("greedy", "beam_noise") for f in ("bleu", "gain")),
            ),
            {
                "steps": 300,
                "parallel": 300,
                "synthetic": 0,
                "upsample": 1,
                "tag": False,
                "drop_memorised": False,
                "decodings": "beam,sample",
                "oracle": True,
            },
            note=BACK_TRANSLATION_NOTE,
        ),
        Row(
            "itm",
            "image-text matching (itm_tiny, embedded shapes): held-out ITM accuracy on random and on hard "
            "negatives, retrieval recall@1/5 both ways",
            "chance (ITM 0.5, recall@k k/N)",
            measure_itm,
            (
                Check("itm_accuracy", ITM_THRESHOLDS["itm_accuracy"], 0.5),
                Check("i2t_recall1", ITM_THRESHOLDS["i2t_recall1"], "chance_recall1"),
                Check("t2i_recall1", ITM_THRESHOLDS["t2i_recall1"], "chance_recall1"),
            ),
            (
                "itm_accuracy",
                "itm_hard_accuracy",
                "i2t_recall1",
                "i2t_recall5",
                "t2i_recall1",
                "t2i_recall5",
                "chance_recall1",
                "chance_recall5",
            ),
            {"steps": 0},
            note="Hard negatives (the most ITC-similar other caption or image, e.g. one colour or the relation "
            "changed) stay at chance: the model matches what is in the image, not how the parts are bound.",
        ),
        Row(
            "kv_cache",
            "the KV cache speeds up decoding (beam 4, 128 new tokens, identical output)",
            "decoding without the cache",
            measure_kv_cache,
            (Check("speedup", 8.0, 1.0),),
            ("speedup", "cached_s", "uncached_s"),
            {"length": 128},
        ),
        Row(
            "sweep",
            "hyperparameter search: train.sweep (20 trials of gpt_tiny at 100 steps, TPE after 5 random ones, "
            "the poor ones pruned) from an untuned base (GPT's published learning rate 2.5e-4, dropout 0.1, "
            "batch 8), its best config retrained with an unseen seed vs the base",
            "the untuned base, same steps and seed (improvement); the untrained model's loss, ln 2048 (best_eval_loss)",
            measure_sweep,
            (Check("improvement", 1.0, 0.0), Check("best_eval_loss", SWEEP_THRESHOLD, math.log(2048), higher=False)),
            (
                "improvement",
                "untuned_eval_loss",
                "best_eval_loss",
                "default_eval_loss",
                "best_minus_default",
                "trials",
                "pruned",
            ),
            {"trials": 20, "startup": 5, "steps": 100},
            note="The best trial also beats the hand-tuned default, within the spread (best_minus_default "
            "-0.362 ± 0.300).",
        ),
        Row(
            "continued",
            "continued (domain-adaptive) pretraining helps a task of the domain, and more than the same "
            "steps on the whole corpus (train.bench_domain's arms)",
            "the general model, not continued (gain); continued as long on the whole corpus (domain_minus_control)",
            measure_continued,
            (Check("gain", 0.005, 0.0), Check("domain_minus_control", 0.007, 0.0)),
            ("gain", "domain_minus_control", "general_accuracy", "domain_accuracy", "control_accuracy"),
            {"domain_steps": 1500, "learning_rate": 1e-3, **QUICK},
        ),
    ]
}
