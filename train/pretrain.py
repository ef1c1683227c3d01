"""Pretraining: any registered objective (transformer_jax.tasks) through the shared train loop.

    python -m train.pretrain                                   # small GPT on the embedded corpus (clm)
    python -m train.pretrain --config configs/bert_tiny.yaml   # MLM + NSP
    python -m train.pretrain --config configs/t5_tiny.yaml --set train.steps=100 --workdir runs/t5
    python -m train.pretrain --config configs/t5_tiny.yaml --set train.objective=prefix_lm
    python -m train.pretrain --config configs/itm_tiny.yaml    # image-text matching
"""
from __future__ import annotations

import jax

from train import cli, trainer
from transformer_jax import tasks
from transformer_jax.config import Config


def make_task(cfg: Config, workdir: str) -> tuple[Config, trainer.Task]:
    """(the config with the objective's heads, the Task of train.objective)."""
    return tasks.get(cfg.train.objective).make_task(cfg, workdir)


def main(argv: list[str] | None = None) -> None:
    args = cli.parser(__doc__.splitlines()[0]).parse_args(argv)
    cfg, workdir = cli.load(args)
    cfg, task = make_task(cfg, workdir)
    metrics, _ = trainer.run(cfg, workdir, task)
    if jax.process_index() == 0:
        shown = {k: round(v, 4) for k, v in metrics.items() if k in ("step", "loss", "eval_loss", "eval_perplexity",
                                                                     "tokens_per_sec") or k.endswith("accuracy")}
        print(f"done: {shown}; workdir {workdir}")


if __name__ == "__main__":
    cli.main(main)
