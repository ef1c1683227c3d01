"""Pretraining: any registered objective (transformer_jax.tasks) through the shared train loop.

    python -m train.pretrain                                   # small GPT on the embedded corpus (clm)
    python -m train.pretrain --config configs/bert_tiny.yaml   # MLM + NSP
    python -m train.pretrain --config configs/t5_tiny.yaml --set train.steps=100 --workdir runs/t5
    python -m train.pretrain --config configs/t5_tiny.yaml --set train.objective=prefix_lm
    python -m train.pretrain --config configs/itm_tiny.yaml    # image-text matching
    python -m train.pretrain --init_from HF_OR_WORKDIR --set data.source=files --set data.paths=[domain/] \
        --to-hf runs/domain_hf                                 # continued (domain-adaptive) pretraining

--init_from (train.init_from) continues from our workdir or a local Hugging Face directory: its
architecture, weights and tokenizer; the objective is the model's own unless train.objective is set.
"""

from __future__ import annotations

import os

import jax

from train import cli, trainer
from train.convert import write_hf
from transformer_jax import tasks
from transformer_jax.config import Config
from transformer_jax.tasks import init_from


def make_task(cfg: Config, workdir: str) -> tuple[Config, trainer.Task]:
    """(the config with the objective's heads, the Task of train.objective)."""
    return tasks.get(cfg.train.objective).make_task(cfg, workdir)


def parser():
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument(
        "--init_from",
        metavar="DIR",
        help="continue pretraining from our workdir or a local Hugging Face "
        "directory (its architecture, weights and tokenizer)",
    )
    p.add_argument(
        "--to-hf",
        dest="to_hf",
        metavar="HF_DIR",
        help="when done, export the model to a Hugging Face directory (as train.convert --to-hf)",
    )
    return p


def load(args) -> tuple[Config, str]:
    """(config, workdir); with --init_from (or train.init_from) the config continues that checkpoint
    (`init_from.continued_config`: its architecture, its objective unless one is named)."""
    if args.init_from:
        args.overrides = [*args.overrides, f"train.init_from={args.init_from}"]
    data, explicit = cli.raw_config(args)
    directory = (data.get("train") or {}).get("init_from")
    if not directory:
        return cli.load(args)
    source = init_from.open_source(directory, None, weights=False)
    cfg = init_from.continued_config(data, source, explicit)
    workdir = args.workdir or os.path.join("runs", cfg.name)
    if os.path.abspath(workdir) == os.path.abspath(os.path.expanduser(directory)):
        raise ValueError(f"--workdir: {workdir} is the --init_from checkpoint; the continued run needs its own")
    cli.init_devices(cfg)
    return cfg, workdir


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    cfg, workdir = load(args)
    if args.to_hf and cfg.model.family not in ("encoder", "decoder", "encoder_decoder"):
        raise ValueError(f"--to-hf: a {cfg.model.family} model has no Hugging Face counterpart here")
    cfg, task = make_task(cfg, workdir)
    metrics, state = trainer.run(cfg, workdir, task)
    if args.to_hf:  # every process: the parameters are gathered from all of them, process 0 writes
        write_hf(task.model, state["params"], workdir, args.to_hf)
    if jax.process_index() == 0:
        shown = {
            k: round(v, 4)
            for k, v in metrics.items()
            if k in ("step", "loss", "eval_loss", "eval_perplexity", "tokens_per_sec") or k.endswith("accuracy")
        }
        print(f"done: {shown}; workdir {workdir}")


if __name__ == "__main__":
    cli.main(main)
