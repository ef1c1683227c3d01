"""The domain effect of continued pretraining: does continuing a general model's MLM on domain text
help a task of that domain? All offline, on a CPU:

    python -m train.bench_domain --workdir runs/bench_domain            # ~50 minutes on 2 cores
    python -m train.bench_domain --min-gain 0.01                        # exit 1 unless it helps by >= 1 point

1. general: bert_tiny pretrained on the whole embedded corpus (the standard library), once;
2. domain: for each seed, that model's MLM continued (`train.init_from`) on the source of the
   embedded task's packages only (asyncio, email, ...);
3. the embedded task (which package a snippet comes from; eval snippets from files finetuning never
   sees) finetuned from each, same steps and seed. `--control` adds a third arm: the general model
   continued on the whole corpus for the same steps, so the effect of the domain is told apart from
   that of more steps.
Writes <workdir>/domain.json and prints the eval accuracy per seed, the means and the gain.
Measured (docs/bench.md): continuing helps (+3.0 points over 3 seeds), but continuing on the whole
corpus for the same steps helps as much (+4.1). RESULTS.md's row `continued` (a general model per seed,
NSP pairs cut at lines) finds the domain ahead of the whole corpus by +1.3 ± 0.3 on every seed.
"""

from __future__ import annotations

import json
import os
import statistics
import sysconfig

from train import cli, pretrain, trainer
from train.finetune import finetune, load_finetune_config
from transformer_jax import config as config_lib
from transformer_jax import config_parsing
from transformer_jax.data import labeled
from transformer_jax.tasks import init_from

SMALL = ("model.vocab_size=512", "data.seq_len=64", "model.max_len=64")  # as train.finetune's documented comparison


def domain_paths() -> list[str]:
    """The source files of the embedded task's packages (asyncio, email, ...): the domain."""
    root = sysconfig.get_paths()["stdlib"]
    return [os.path.join(root, package, "**", "*.py") for package in labeled.embedded_task(6).spec.label_names]


def pretrain_run(cfg, workdir: str) -> dict:
    cfg, task = pretrain.make_task(cfg, workdir)
    metrics, _ = trainer.run(cfg, workdir, task, quiet=True)
    return {k: metrics.get(k) for k in ("step", "loss", "eval_loss")}


def continued(general: str, workdir: str, steps: int, seed: int, learning_rate: float, paths) -> dict:
    """`general`'s MLM continued for `steps` on `paths` (None: the embedded corpus)."""
    data = config_parsing.read_yaml(os.path.join(cli.REPO, "configs", "bert_tiny.yaml"))
    overrides = [
        f"train.steps={steps}",
        f"train.seed={seed}",
        f"train.learning_rate={learning_rate}",
        "train.warmup_steps=50",
        f"train.checkpoint_every={steps}",
        f"train.eval_every={steps}",
        "train.objective=mlm",
    ]
    if paths:
        overrides += ["data.source=files", f"data.paths={json.dumps(paths)}"]
    data = config_parsing.apply_overrides(data, overrides)
    explicit = {config_parsing.parse_override(o)[0] for o in overrides}
    cfg = init_from.continued_config(data, init_from.open_source(general, None, weights=False), explicit)
    return pretrain_run(cfg, workdir)


def finetuned(init: str, workdir: str, steps: int, seed: int) -> float:
    cfg = load_finetune_config(
        os.path.join(cli.REPO, "configs", "finetune_embedded.yaml"),
        [
            "data.seq_len=64",
            f"train.steps={steps}",
            "train.learning_rate=1e-3",
            f"train.eval_every={steps}",
            "train.batch_size=16",
            f"train.seed={seed}",
            f"finetune.init_from={init}",
            f"train.checkpoint_every={steps}",
        ],
    )
    return finetune(cfg, workdir, quiet=True, export=False)["eval_accuracy"]


def main(argv: list[str] | None = None) -> None:
    p = cli.parser(__doc__.splitlines()[0], workdir="where the runs and domain.json go (default runs/bench_domain)")
    p.add_argument("--general-steps", type=int, default=3000, help="pretraining steps on the whole corpus")
    p.add_argument("--domain-steps", type=int, default=1500, help="continued pretraining steps on the domain")
    p.add_argument("--finetune-steps", type=int, default=300)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--first-seed", type=int, default=0, help="seeds --first-seed .. --first-seed + --seeds - 1")
    p.add_argument("--learning-rate", type=float, default=1e-3, help="continued pretraining's peak learning rate")
    p.add_argument("--control", action="store_true", help="also continue on the whole corpus for the same steps")
    p.add_argument(
        "--min-gain", type=float, help="exit 1 unless the mean accuracy gain of the domain step is at least this"
    )
    args = p.parse_args(argv)
    cli.check_keys(args.overrides)
    if args.config or args.overrides:
        raise ValueError("--config / --set: this bench fixes its configs (bert_tiny, finetune_embedded); use its flags")
    workdir = args.workdir or os.path.join("runs", "bench_domain")
    general = os.path.join(workdir, "general")
    gcfg = config_lib.load_config(
        os.path.join(cli.REPO, "configs", "bert_tiny.yaml"),
        [
            *SMALL,
            f"train.steps={args.general_steps}",
            "train.eval_every=0",
            f"train.checkpoint_every={args.general_steps}",
        ],
    )
    cli.init_devices(gcfg)
    result: dict = {"general": pretrain_run(gcfg, general)}
    packages = labeled.embedded_task(6).spec.label_names
    result["domain"] = {"packages": list(packages), "steps": args.domain_steps}
    arms: dict[str, list] = {"general": [], "domain": [], **({"control": []} if args.control else {})}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for arm in arms:
            init = general
            if arm != "general":
                init = os.path.join(workdir, f"{arm}_{seed}")
                continued(
                    general,
                    init,
                    args.domain_steps,
                    seed,
                    args.learning_rate,
                    domain_paths() if arm == "domain" else None,
                )
            accuracy = finetuned(init, os.path.join(workdir, f"finetune_{arm}_{seed}"), args.finetune_steps, seed)
            arms[arm].append(accuracy)
            print(f"seed {seed} {arm:8s} eval accuracy {accuracy:.3f}", flush=True)
    gains = [d - g for d, g in zip(arms["domain"], arms["general"])]
    result.update(
        {
            "accuracy": arms,
            "mean": {a: statistics.mean(v) for a, v in arms.items()},
            "gain": gains,
            "mean_gain": statistics.mean(gains),
            "chance": 1 / len(packages),
        }
    )
    print(
        "mean eval accuracy: "
        + ", ".join(f"{a} {m:.3f}" for a, m in result["mean"].items())
        + f"; domain - general {result['mean_gain']:+.3f} (per seed {', '.join(f'{g:+.3f}' for g in gains)})"
    )
    with open(os.path.join(workdir, "domain.json"), "w") as f:
        json.dump(result, f, indent=1)
    if args.min_gain is not None and result["mean_gain"] < args.min_gain:
        print(f"FAIL: mean gain {result['mean_gain']:+.3f} < --min-gain {args.min_gain}")
        raise SystemExit(1)


if __name__ == "__main__":
    cli.main(main)
