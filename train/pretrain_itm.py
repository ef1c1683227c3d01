"""Image-text pretraining: ITM + ITC (+ masked LM) on a single-stream vision-language model, or
CLIP-style contrastive learning on a dual encoder, through the shared train loop.

    python -m train.pretrain_itm                                      # embedded shapes (configs/itm_tiny.yaml)
    python -m train.pretrain --config configs/itm_tiny.yaml           # the same through train.pretrain
    python -m train.pretrain_itm --set model.family=dual_encoder --set train.objective=itc    # CLIP
    python -m train.pretrain_itm --set data.source=tfds --set data.tfds_name=coco_captions \\
        --set data.data_dir=$HOME/tensorflow_datasets --set model.image_size=224 --set model.patch_size=16
    python -m train.pretrain_itm --bench        # train, print held-out figures (JSON); exit 1 below the targets

Held-out figures (eval_ in metrics.jsonl): retrieval recall@1 / @5 image->text and text->image over
the whole held-out set by ITC similarity (and their chance levels), ITM accuracy (balanced: chance
0.5) with each image's hardest held-out negative caption and each caption's hardest negative image
(`itm_hard_accuracy`) and with random ones (`itm_random_accuracy`); plus the in-batch losses.
"""
from __future__ import annotations

import json
import os
import tempfile
import time

import jax
import numpy as np

from train import cli, pretrain, trainer
from transformer_jax import config as config_lib
from transformer_jax import decoding
from transformer_jax.config import Config, ConfigError
from transformer_jax.data import images
from transformer_jax.data import pipeline
from transformer_jax.models import abstract_build, build, count_params, published_params
from transformer_jax.models import vision

DEFAULT_CONFIG = os.path.join(cli.REPO, "configs", "itm_tiny.yaml")
EMBEDDED_EXAMPLES = 20000       # generated training examples of the shapes dataset (data.max_documents: 0)
TOKENIZER_EXAMPLES = 5000


def with_itm_heads(cfg: Config) -> Config:
    """Masked LM (itm.mlm_weight > 0) adds the mlm head to the model."""
    if cfg.itm.mlm_weight > 0 and "mlm" not in cfg.model.heads:
        return config_lib.replace(cfg, model=dict(heads=cfg.model.heads + ("mlm",)))
    return cfg


def load_sources(cfg: Config) -> tuple[images.ImageCaptions, images.ImageCaptions]:
    """(train, held-out) image-caption sources."""
    d, m = cfg.data, cfg.model
    if d.source == "embedded":  # the data set itself does not depend on train.seed: only its order does
        train = images.shapes_dataset(d.max_documents or EMBEDDED_EXAMPLES, image_size=m.image_size, split="train")
        return train, images.shapes_dataset(d.eval_documents, image_size=m.image_size, split="eval")
    if d.source != "tfds":
        raise ConfigError(f"data.source: image-text pretraining reads embedded or tfds data, got {d.source}")
    kw = dict(data_dir=d.data_dir or None, image_feature=cfg.itm.image_feature, caption_feature=cfg.itm.caption_feature)
    train = images.tfds_image_captions(d.tfds_name, split=d.split, max_examples=d.max_documents or None, **kw)
    if d.eval_split:
        return train, images.tfds_image_captions(d.tfds_name, split=d.eval_split, max_examples=d.eval_documents, **kw)
    num_eval = min(d.eval_documents, max(1, len(train) // 10))
    if len(train) < 2:
        raise ValueError(f"{train.name} has {len(train)} example: too few to hold some out (set data.eval_split)")
    return (train.select(range(len(train) - num_eval)),
            train.select(range(len(train) - num_eval, len(train)), f"{train.name} (held out)"))


def objective_loss_fn(cfg: Config):
    i = cfg.itm

    def loss_fn(model, params, batch, dropout_rng):
        module = model.module(params)
        if cfg.model.family == "dual_encoder":
            loss, metrics = vision.dual_encoder_loss(module, batch, dropout_rng)
            loss = i.itc_weight * loss
        else:
            loss, metrics = vision.vision_language_loss(module, batch, dropout_rng, itm_weight=i.itm_weight,
                                                        itc_weight=i.itc_weight, mlm_weight=i.mlm_weight,
                                                        negatives=i.negatives)
        return loss, {**metrics, "loss": loss}
    return loss_fn


def make_evaluate(cfg: Config, model, held_out: dict[str, np.ndarray], batch_size: int):
    """evaluate(params) -> held-out retrieval recall@1/5 both ways (and chance), ITM accuracy with hard
    and random negatives. Jitted once; the set goes through in fixed-size chunks."""
    embed_image = jax.jit(lambda p, x: model.module(p).embed_image(x))
    embed_text = jax.jit(lambda p, ids, mask: model.module(p).embed_text(ids, mask))
    match_prob = jax.jit(lambda p, x, ids, mask: jax.nn.softmax(model.module(p).match(x, ids, mask))[:, 1])
    n = len(held_out["pair_id"])
    pair = held_out["pair_id"]
    matches = pair[:, None] == pair[None, :]
    chance = vision.chance_recall(matches)

    def chunked(fn, params, *arrays):  # sharded params stay on their mesh, each chunk split over it
        out = []
        for start in range(0, len(arrays[0]), batch_size):
            part = [a[start:start + batch_size] for a in arrays]
            short = batch_size - len(part[0])
            part = [np.concatenate([a, np.repeat(a[-1:], short, 0)]) if short else a for a in part]
            out.append(decoding.on_mesh(fn, params, *part)[:batch_size - short])
        return np.concatenate(out)

    def evaluate(params) -> dict:
        image = chunked(embed_image, params, held_out["pixels"])
        text = chunked(embed_text, params, held_out["input_ids"], held_out["attention_mask"])
        sim = image @ text.T
        metrics = vision.retrieval_recall(sim, matches)
        metrics.update({f"chance_{k}": v for k, v in chance.items()})
        if cfg.model.family != "vision_language" or n < 2:
            return metrics
        candidates = np.where(matches, -np.inf, sim)
        rng = np.random.default_rng(0)
        random_scores = np.where(matches, -np.inf, rng.random(sim.shape))
        negatives = {"hard": (candidates.argmax(1), candidates.argmax(0)),
                     "random": (random_scores.argmax(1), random_scores.argmax(0))}
        px, ids, mask = held_out["pixels"], held_out["input_ids"], held_out["attention_mask"]
        positive = chunked(match_prob, params, px, ids, mask) > 0.5
        metrics["itm_match_accuracy"] = float(positive.mean())
        for kind, (text_for_image, image_for_text) in negatives.items():
            neg_t = chunked(match_prob, params, px, ids[text_for_image], mask[text_for_image]) <= 0.5
            neg_i = chunked(match_prob, params, px[image_for_text], ids, mask) <= 0.5
            negative = float(np.concatenate([neg_t, neg_i]).mean())
            metrics[f"itm_{kind}_negative_accuracy"] = negative
            metrics[f"itm_{kind}_accuracy"] = (metrics["itm_match_accuracy"] + negative) / 2
        return metrics
    return evaluate


def make_task(cfg: Config, workdir: str) -> tuple[Config, trainer.Task]:
    if cfg.train.objective not in ("itm", "itc"):
        raise ConfigError(f"train.objective: image-text pretraining is itm or itc, got {cfg.train.objective}")
    cfg = with_itm_heads(cfg)
    train_source, eval_source = load_sources(cfg)
    tokenizer = pretrain.tokenizer_for(cfg, workdir, images.caption_corpus(train_source, TOKENIZER_EXAMPLES))
    t, m, processes = cfg.train, cfg.model, jax.process_count()
    if t.batch_size % processes:
        raise ConfigError(f"train.batch_size: {t.batch_size} does not split over {processes} processes")
    common = dict(seq_len=cfg.data.seq_len, image_size=m.image_size, num_channels=m.num_channels,
                  batch_size=t.batch_size // processes, mlm=cfg.itm.mlm_weight > 0 and m.family == "vision_language",
                  mask_rate=cfg.itm.mask_rate, seed=t.seed)
    train_data = images.make_dataset(train_source, tokenizer, process_index=jax.process_index(),
                                     process_count=processes, **common)
    model, _ = abstract_build(cfg)
    # every process reads the whole held-out set in global batches and keeps its rows of each
    eval_data = images.make_eval_dataset(eval_source, tokenizer, **{**common, "batch_size": t.batch_size})
    held_out = images.encode_all(eval_source, tokenizer, seq_len=cfg.data.seq_len, image_size=m.image_size,
                                 num_channels=m.num_channels)
    task = trainer.Task(
        model=model,
        init_params=lambda rng: build(cfg, rng)[1],
        loss_fn=objective_loss_fn(cfg),
        train_batches=pipeline.ResumableIterator(train_data),
        eval_batches=lambda: pipeline.process_rows(eval_data, jax.process_index(), processes),
        evaluate=make_evaluate(cfg, model, held_out, t.batch_size),
        best_metric="loss")
    return cfg, task


# The bench's held-out figures: (name in the report, eval metric). itm_accuracy is balanced ITM accuracy
# (chance 0.5) over every held-out (image, its caption) pair and, as negatives, each image with a random
# other caption and each caption with a random other image; itm_hard_accuracy the same with the most
# ITC-similar other caption / image as negatives; itm_in_batch_accuracy the eval loss's in-batch figure.
FIGURES = {"itm_accuracy": "itm_random_accuracy", "itm_hard_accuracy": "itm_hard_accuracy",
           "itm_match_accuracy": "itm_match_accuracy", "itm_random_negative_accuracy": "itm_random_negative_accuracy",
           "itm_hard_negative_accuracy": "itm_hard_negative_accuracy", "itm_in_batch_accuracy": "itm_accuracy",
           **{k: k for k in ("i2t_recall1", "i2t_recall5", "t2i_recall1", "t2i_recall5")}}
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
        metrics.update({f"eval_{k}": v for k, v in task.evaluate(state["params"]).items()})
    get = lambda k: None if f"eval_{k}" not in metrics else round(metrics[f"eval_{k}"], 4)
    chance = {"itm_accuracy": 0.5, **{k: get(f"chance_{k}") for k in ("i2t_recall1", "i2t_recall5", "t2i_recall1",
                                                                       "t2i_recall5")}}
    figures = {k: get(v) for k, v in FIGURES.items()}
    checks = {"i2t_recall1": (figures["i2t_recall1"] or 0) >= TARGET_RECALL1_OVER_CHANCE * chance["i2t_recall1"],
              "t2i_recall1": (figures["t2i_recall1"] or 0) >= TARGET_RECALL1_OVER_CHANCE * chance["t2i_recall1"]}
    if cfg.model.family == "vision_language":
        checks["itm_accuracy"] = (figures["itm_accuracy"] or 0) >= TARGET_ITM_ACCURACY
    return {
        "config": cfg.name, "family": cfg.model.family, "objective": cfg.train.objective,
        "backend": jax.default_backend(), "devices": jax.device_count() if mesh is None else mesh.size,
        "params": published_params(task.model, state["params"]),  # as published; padded_params: what the
        "padded_params": count_params(state["params"]),            # arrays hold (model.vocab_multiple)
        "steps": metrics["step"],
        "batch_size": cfg.train.batch_size, "image_size": cfg.model.image_size, "patch_size": cfg.model.patch_size,
        "held_out_examples": cfg.data.eval_documents, "train_seconds": round(seconds, 1),
        "seconds_per_step": round(seconds / max(metrics["step"], 1), 4),
        "final_train_loss": round(metrics["loss"], 4), "eval_loss": get("loss"),
        **figures, "chance": chance, "meets_targets": checks, "passed": all(checks.values()),
        "workdir": workdir,
    }


def main() -> None:
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--bench", action="store_true", help="train in a fresh workdir (unless --workdir), print JSON figures")
    args = p.parse_args()
    cfg, workdir = cli.config_and_workdir(args, DEFAULT_CONFIG)
    if args.bench:
        result = bench(cfg, args.workdir)
        print(json.dumps(result, indent=1))
        if not result["passed"]:  # a bench that can fail: exit status 1 below the targets
            raise SystemExit(f"below target: {[k for k, ok in result['meets_targets'].items() if not ok]}")
        return
    cli.init_distributed(cfg)
    cfg, task = make_task(cfg, workdir)
    metrics, _ = trainer.run(cfg, workdir, task)
    if jax.process_index() == 0:
        shown = {k: round(v, 4) for k, v in metrics.items()
                 if k in ("step", "loss", "eval_loss") or k.endswith(("accuracy", "recall1", "recall5"))}
        print(f"done: {shown}; workdir {workdir}")


if __name__ == "__main__":
    cli.main(main)
