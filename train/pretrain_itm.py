"""Image-text pretraining: ITM + ITC (+ masked LM) on a single-stream vision-language model, or
CLIP-style contrastive learning on a dual encoder, through the shared train loop.

    python -m train.pretrain_itm                                      # embedded shapes (configs/itm_tiny.yaml)
    python -m train.pretrain --config configs/itm_tiny.yaml           # the same through train.pretrain
    python -m train.pretrain_itm --set model.family=dual_encoder --set train.objective=itc    # CLIP
    python -m train.pretrain_itm --set data.source=tfds --set data.tfds_name=coco_captions \\
        --set data.data_dir=$HOME/tensorflow_datasets --set model.image_size=224 --set model.patch_size=16
    python -m train.pretrain_itm --bench        # train, print held-out figures (JSON); exit 1 below the targets

The objectives and their held-out figures (eval_ in metrics.jsonl) are transformer_jax/tasks/itm.py.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import jax

from train import cli, trainer
from transformer_jax.config import Config
from transformer_jax.data.images import NEGATIVE_KINDS
from transformer_jax.models import count_params, published_params
from transformer_jax.tasks.itm import make_task

DEFAULT_CONFIG = os.path.join(cli.REPO, "configs", "itm_tiny.yaml")


# The bench's held-out figures: (name in the report, eval metric). itm_accuracy is balanced ITM accuracy
# (chance 0.5) over every held-out (image, its caption) pair and, as negatives, each image with a random
# other caption and each caption with a random other image; itm_hard_accuracy the same with the most
# ITC-similar other caption / image as negatives; itm_in_batch_accuracy the eval loss's in-batch figure.
FIGURES = {
    "itm_accuracy": "itm_random_accuracy",
    "itm_hard_accuracy": "itm_hard_accuracy",
    "itm_match_accuracy": "itm_match_accuracy",
    "itm_random_negative_accuracy": "itm_random_negative_accuracy",
    "itm_hard_negative_accuracy": "itm_hard_negative_accuracy",
    "itm_in_batch_accuracy": "itm_accuracy",
    **{k: k for k in ("i2t_recall1", "i2t_recall5", "t2i_recall1", "t2i_recall5")},
    # the shapes data: the share of each held-out image's caption one edit away that ITM rejects
    **{f"itm_edited_{k}_negative_accuracy": f"itm_edited_{k}_negative_accuracy" for k in NEGATIVE_KINDS},
}
TARGET_ITM_ACCURACY = 0.9
TARGET_RECALL1_OVER_CHANCE = 10.0


def bench(cfg: Config, workdir: str | None = None, mesh=None) -> dict:
    """Train `cfg` in a fresh workdir, then report the held-out figures with their chance levels and
    whether they meet the targets (ITM accuracy >= 0.9, recall@1 >= 10x chance both ways)."""
    workdir = workdir or tempfile.mkdtemp(prefix="itm_bench_")
    start = time.perf_counter()
    cfg, task = make_task(cfg, workdir)
    metrics, state = trainer.run(cfg, workdir, task, mesh=mesh, quiet=True)
    seconds = time.perf_counter() - start
    if "eval_i2t_recall1" not in metrics:  # the last step had no eval (train.eval_every: 0)
        assert task.evaluate is not None  # image-text tasks evaluate retrieval
        metrics.update({f"eval_{k}": v for k, v in task.evaluate(state["params"]).items()})
    get = lambda k: None if f"eval_{k}" not in metrics else round(metrics[f"eval_{k}"], 4)
    chance = {
        "itm_accuracy": 0.5,
        **{k: get(f"chance_{k}") for k in ("i2t_recall1", "i2t_recall5", "t2i_recall1", "t2i_recall5")},
    }
    figures = {k: get(v) for k, v in FIGURES.items()}
    assert chance["i2t_recall1"] is not None and chance["t2i_recall1"] is not None  # every eval reports chance
    checks = {
        "i2t_recall1": (figures["i2t_recall1"] or 0) >= TARGET_RECALL1_OVER_CHANCE * chance["i2t_recall1"],
        "t2i_recall1": (figures["t2i_recall1"] or 0) >= TARGET_RECALL1_OVER_CHANCE * chance["t2i_recall1"],
    }
    if cfg.model.family == "vision_language":
        checks["itm_accuracy"] = (figures["itm_accuracy"] or 0) >= TARGET_ITM_ACCURACY
    return {
        "config": cfg.name,
        "family": cfg.model.family,
        "objective": cfg.train.objective,
        "backend": jax.default_backend(),
        "devices": jax.device_count() if mesh is None else mesh.size,
        "params": published_params(task.model, state["params"]),  # as published; padded_params: what the
        "padded_params": count_params(state["params"]),  # arrays hold (model.vocab_multiple)
        "steps": metrics["step"],
        "batch_size": cfg.train.batch_size,
        "image_size": cfg.model.image_size,
        "patch_size": cfg.model.patch_size,
        "held_out_examples": cfg.data.eval_documents,
        "train_seconds": round(seconds, 1),
        "seconds_per_step": round(seconds / max(metrics["step"], 1), 4),
        "final_train_loss": round(metrics["loss"], 4),
        "eval_loss": get("loss"),
        **figures,
        "chance": chance,
        "meets_targets": checks,
        "passed": all(checks.values()),
        "workdir": workdir,
    }


def main(argv: list[str] | None = None) -> None:
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument(
        "--bench", action="store_true", help="train in a fresh workdir (unless --workdir), print JSON figures"
    )
    args = p.parse_args(argv)
    cfg, workdir = cli.load(args, DEFAULT_CONFIG, distributed=not args.bench)  # the bench runs in one process
    if args.bench:
        result = bench(cfg, args.workdir)
        print(json.dumps(result, indent=1))
        if not result["passed"]:  # a bench that can fail: exit status 1 below the targets
            raise SystemExit(f"below target: {[k for k, ok in result['meets_targets'].items() if not ok]}")
        return
    cfg, task = make_task(cfg, workdir)
    metrics, _ = trainer.run(cfg, workdir, task)
    if jax.process_index() == 0:
        shown = {
            k: round(v, 4)
            for k, v in metrics.items()
            if k in ("step", "loss", "eval_loss") or k.endswith(("accuracy", "recall1", "recall5"))
        }
        print(f"done: {shown}; workdir {workdir}")


if __name__ == "__main__":
    cli.main(main)
