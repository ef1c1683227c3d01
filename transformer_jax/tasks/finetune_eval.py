"""Finetuning evaluation: the jitted predict step, the loop over the whole eval set and the task's
metrics (classification / regression / token-classification metrics, and for classification
same_label_recall1 of the pooled embeddings; SQuAD EM and F1 from the best answer span of each
question's windows; text-to-text exact match plus the source task's metrics).
Used by transformer_jax.tasks.finetune.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from transformer_jax import finetune as ft
from transformer_jax import losses
from transformer_jax import metrics as metrics_lib
from transformer_jax import sharding as sh
from transformer_jax.data import labeled
from transformer_jax.models import Model

HOST_ONLY_KEYS = ("token_to_chars",)  # eval feature keys kept on the host (SQuAD post-processing)


def _predict_fn(model: Model, kind: str, loss_cfg: ft.LossConfig, ids: labeled.SpecialIds, target_len: int):
    from transformer_jax import decoding

    def predict(params, batch):
        p = ft.effective_params(params, loss_cfg)
        output = model.apply(p, **ft.model_inputs(model.cfg.family, batch))
        out = ft.task_outputs(kind, output)
        loss, _ = losses.hard_loss(kind, out, batch)
        result = {"loss": loss, "count": jnp.sum(batch["example_weight"])}
        if kind == "classification":
            result["pred"] = jnp.argmax(out, axis=-1)
            # the embedding the contrastive losses train: mean-pooled final hidden states [b, m]
            result["embedding"] = ft.mean_pool(output.hidden_states, batch["attention_mask"])
        elif kind == "regression":
            result["pred"] = out.astype(jnp.float32)
        elif kind == "token_classification":
            result["pred"] = jnp.argmax(out, axis=-1)
        elif kind == "qa":
            result.update(ft.qa_logits(out, batch["attention_mask"]))
        else:
            result["tokens"] = decoding.generate(
                model,
                p,
                batch["input_ids"],
                batch["attention_mask"],
                max_new_tokens=target_len,
                eos_id=ids.eos,
                pad_id=ids.pad,
                decoder_start_id=ids.pad,
            )
        return result

    return predict


def _gather(tree, rows: int):
    """Host NumPy copies of a jitted function's outputs (all processes), the first `rows` rows."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        tree = multihost_utils.process_allgather(tree, tiled=True)
    tree = jax.device_get(tree)
    return {k: (np.asarray(v)[:rows] if np.ndim(v) else np.asarray(v)) for k, v in tree.items()}


def _decode(tokenizer, ids: labeled.SpecialIds, tokens) -> str:
    out = []
    for t in tokens:
        if int(t) == ids.eos:
            break
        if int(t) != ids.pad:
            out.append(int(t))
    return tokenizer.decode(out).strip()


def make_evaluate(
    model: Model,
    data: labeled.TaskData,
    encoder: labeled.Encoder,
    loss_cfg: ft.LossConfig,
    mesh,
    batch_size: int,
    tokenizer,
    target_len: int,
    max_answer_length: int = 30,
) -> Callable[[Any], dict]:
    """evaluate(params) -> {'loss', official metrics...} over the whole eval set; classification
    adds same_label_recall1 (the nearest other eval example by cosine similarity of the mean-pooled
    final hidden states has the same label). Every process feeds the same batches (the first copy
    of the gathered outputs is used)."""
    spec = data.spec
    features, owners = labeled.eval_features(encoder, data.eval)
    predict = jax.jit(_predict_fn(model, spec.kind, loss_cfg, encoder.ids, target_len))

    def evaluate(params) -> dict:
        outputs = []
        for batch in labeled.batches(features, batch_size):
            device = sh.global_batch({k: v for k, v in batch.items() if k not in HOST_ONLY_KEYS}, mesh)
            outputs.append(_gather(predict(params, device), batch_size))
        counts = np.array([o["count"] for o in outputs])
        result = {"loss": float(np.sum([o["loss"] * c for o, c in zip(outputs, counts)]) / max(counts.sum(), 1))}
        cat = lambda key: np.concatenate([o[key] for o in outputs])[: len(features)]
        kind = spec.kind
        if kind in ("classification", "regression"):
            labels = np.array([ex["label"] for ex in data.eval])
            result.update(metrics_lib.compute(spec.metrics, cat("pred"), labels))
            if kind == "classification":
                result["same_label_recall1"] = metrics_lib.same_label_recall1(cat("embedding"), labels)
        elif kind == "token_classification":
            keep = np.stack([f["label_weights"] for f in features]) > 0
            gold = np.stack([f["labels"] for f in features])
            result.update(metrics_lib.compute(spec.metrics, cat("pred")[keep], gold[keep]))
        elif kind == "qa":
            result.update(
                _squad_metrics(
                    data.eval, features, owners, cat("start"), cat("end"), max_answer_length=max_answer_length
                )
            )
        else:
            texts = [_decode(tokenizer, encoder.ids, row) for row in cat("tokens")]
            targets = [ex["target"] for ex in data.eval]
            result["exact_match"] = float(np.mean([p == t.strip() for p, t in zip(texts, targets)]))
            source = labeled.source_kind(spec)
            if source == "classification":
                index = {n: i for i, n in enumerate(spec.label_names)}
                preds = np.array([index.get(t, -1) for t in texts])
                labels = np.array([ex["label"] for ex in data.eval])
                result.update(metrics_lib.compute([m for m in spec.metrics if m != "exact_match"], preds, labels))
            elif source == "regression":

                def number(text):
                    try:
                        return float(text)
                    except ValueError:
                        return 0.0

                preds = np.array([number(t) for t in texts])
                labels = np.array([ex["label"] for ex in data.eval])
                result.update(metrics_lib.compute([m for m in spec.metrics if m != "exact_match"], preds, labels))
        return result

    return evaluate


def _squad_metrics(examples, features, owners, start, end, *, max_answer_length: int) -> dict:
    best: dict[int, tuple[float, str]] = {}
    for f, owner, s, e in zip(features, owners, start, end):
        chars = f["token_to_chars"]
        span = metrics_lib.best_span(s, e, chars[:, 0] >= 0, max_answer_length=max_answer_length)
        if span is None:
            continue
        a, b, score = span
        if owner not in best or score > best[owner][0]:
            context = examples[owner]["context"]
            best[owner] = (score, context[chars[a, 0] : chars[b, 1]])
    predictions = {examples[i]["id"]: text for i, (_, text) in best.items()}
    references = {ex["id"]: ex["answers"] for ex in examples}
    return metrics_lib.squad(predictions, references)
