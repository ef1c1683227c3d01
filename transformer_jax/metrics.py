"""Evaluation metrics on host NumPy arrays: GLUE's (accuracy, F1, Matthews correlation,
Pearson / Spearman correlation) and SQuAD v1.1's (exact match and token F1 after the official
answer normalisation), plus the usual extractive-QA post-processing (best valid span), image-text
retrieval recall and how well embeddings cluster by label (`same_label_recall1`).

Every function is plain NumPy (float64) and agrees with scikit-learn / SciPy / the official
SQuAD v1.1 evaluation script on the same inputs (tests/test_metrics.py checks this).
"""

from __future__ import annotations

import collections
import math
import re
import string
from collections.abc import Iterable, Mapping, Sequence

import numpy as np


# ----------------------------------------------------------------------------- classification
def accuracy(predictions, labels) -> float:
    p, y = np.asarray(predictions), np.asarray(labels)
    return float(np.mean(p == y)) if len(y) else 0.0


def f1(predictions, labels, *, positive: int = 1) -> float:
    """Binary F1 of the `positive` class (scikit-learn's f1_score with average='binary')."""
    p, y = np.asarray(predictions) == positive, np.asarray(labels) == positive
    tp = float(np.sum(p & y))
    denominator = float(np.sum(p) + np.sum(y))
    return 2.0 * tp / denominator if denominator else 0.0


def macro_f1(predictions, labels) -> float:
    """Unweighted mean of per-class F1 over the classes present in labels or predictions."""
    p, y = np.asarray(predictions), np.asarray(labels)
    classes = np.union1d(np.unique(p), np.unique(y))
    return float(np.mean([f1(p, y, positive=c) for c in classes])) if len(classes) else 0.0


def matthews_corrcoef(predictions, labels) -> float:
    """Matthews correlation coefficient, multi-class (Gorodkin's R_K, as scikit-learn)."""
    p, y = np.asarray(predictions), np.asarray(labels)
    classes, inverse = np.unique(np.concatenate([y, p]), return_inverse=True)
    k = len(classes)
    yi, pi = inverse[: len(y)], inverse[len(y) :]
    confusion = np.zeros((k, k), np.float64)
    np.add.at(confusion, (yi, pi), 1.0)
    t_sum, p_sum = confusion.sum(axis=1), confusion.sum(axis=0)
    correct, n = np.trace(confusion), confusion.sum()
    cov_ytyp = correct * n - np.dot(t_sum, p_sum)
    cov_ypyp = n * n - np.dot(p_sum, p_sum)
    cov_ytyt = n * n - np.dot(t_sum, t_sum)
    if cov_ypyp * cov_ytyt == 0:
        return 0.0
    return float(cov_ytyp / np.sqrt(cov_ytyt * cov_ypyp))


# ----------------------------------------------------------------------------- regression
def pearson(predictions, labels) -> float:
    x, y = np.asarray(predictions, np.float64), np.asarray(labels, np.float64)
    x, y = x - x.mean(), y - y.mean()
    denominator = np.sqrt(np.dot(x, x) * np.dot(y, y))
    return float(np.dot(x, y) / denominator) if denominator else 0.0


def rankdata(x) -> np.ndarray:
    """Ranks from 1, ties get their average rank (scipy.stats.rankdata's 'average')."""
    x = np.asarray(x)
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    starts = np.concatenate([[True], sorted_x[1:] != sorted_x[:-1]])
    group = np.cumsum(starts) - 1
    first = np.flatnonzero(starts)
    last = np.concatenate([first[1:], [len(x)]]) - 1
    average = (first + last) / 2.0 + 1.0
    ranks = np.empty(len(x), np.float64)
    ranks[order] = average[group]
    return ranks


def spearman(predictions, labels) -> float:
    return pearson(rankdata(predictions), rankdata(labels))


CLASSIFICATION_METRICS = {"accuracy": accuracy, "f1": f1, "macro_f1": macro_f1, "matthews_corr": matthews_corrcoef}
REGRESSION_METRICS = {"pearson": pearson, "spearman": spearman}


def compute(names: Iterable[str], predictions, labels) -> dict[str, float]:
    """{name: value} for the named classification / regression metrics; GLUE's combined figures
    'pearson_spearman' (their mean) and 'accuracy_f1' (their mean) are available by name too."""
    table = {**CLASSIFICATION_METRICS, **REGRESSION_METRICS}
    out = {}
    for name in names:
        if name == "pearson_spearman":
            out[name] = (pearson(predictions, labels) + spearman(predictions, labels)) / 2
        elif name == "accuracy_f1":
            out[name] = (accuracy(predictions, labels) + f1(predictions, labels)) / 2
        elif name in table:
            out[name] = table[name](predictions, labels)
        else:
            raise ValueError(
                f"unknown metric {name!r} (known: {', '.join(sorted(table))}, pearson_spearman, accuracy_f1)"
            )
    return out


# ----------------------------------------------------------------------------- SQuAD v1.1
def normalize_answer(s: str) -> str:
    """The official SQuAD v1.1 normalisation: lower case, drop punctuation, articles, extra spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def squad_exact_match(prediction: str, ground_truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def squad_f1(prediction: str, ground_truth: str) -> float:
    prediction_tokens = normalize_answer(prediction).split()
    ground_truth_tokens = normalize_answer(ground_truth).split()
    common = collections.Counter(prediction_tokens) & collections.Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(prediction_tokens)
    recall = num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def squad(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """Official SQuAD v1.1 figures (percentages): each question scores the max over its gold
    answers; a question without a prediction scores 0 (the official script warns and counts it)."""
    em = f1_total = 0.0
    for qid, answers in references.items():
        if qid not in predictions:
            continue
        em += max(squad_exact_match(predictions[qid], a) for a in answers)
        f1_total += max(squad_f1(predictions[qid], a) for a in answers)
    n = max(len(references), 1)
    return {"exact_match": 100.0 * em / n, "f1": 100.0 * f1_total / n}


def best_span(
    start_logits, end_logits, valid, *, max_answer_length: int, n_best: int = 20
) -> tuple[int, int, float] | None:
    """The highest-scoring span (start, end, start_logit + end_logit) with both ends on `valid`
    positions (context tokens), start <= end and end - start + 1 <= max_answer_length, searched
    over the n_best starts and ends (BERT's / Hugging Face's post-processing). None if none fits."""
    start_logits, end_logits = np.asarray(start_logits, np.float64), np.asarray(end_logits, np.float64)
    valid = np.asarray(valid, bool)
    masked_start = np.where(valid, start_logits, -np.inf)
    masked_end = np.where(valid, end_logits, -np.inf)
    starts = np.argsort(-masked_start, kind="stable")[:n_best]
    ends = np.argsort(-masked_end, kind="stable")[:n_best]
    best = None
    for s in starts:
        if not valid[s]:
            continue
        for e in ends:
            if not valid[e] or e < s or e - s + 1 > max_answer_length:
                continue
            score = start_logits[s] + end_logits[e]
            if best is None or score > best[2]:
                best = (int(s), int(e), float(score))
    return best


# ----------------------------------------------------------------------------- image-text retrieval
def retrieval_recall(similarity: np.ndarray, match: np.ndarray, ks=(1, 5)) -> dict[str, float]:
    """Recall@k both ways from similarity [n_images, n_texts] and match [n_images, n_texts] (bool:
    the text describes the image). image->text: the share of images with a matching text among
    their k most similar texts; text->image the same over columns."""
    sim, match = np.asarray(similarity, np.float64), np.asarray(match, bool)
    out = {}
    for k in ks:
        top_t = np.argsort(-sim, axis=1, kind="stable")[:, :k]
        top_i = np.argsort(-sim, axis=0, kind="stable")[:k, :]
        out[f"i2t_recall{k}"] = float(np.mean(np.take_along_axis(match, top_t, 1).any(1)))
        out[f"t2i_recall{k}"] = float(np.mean(np.take_along_axis(match, top_i, 0).any(0)))
    return out


def chance_recall(match: np.ndarray, ks=(1, 5)) -> dict[str, float]:
    """Expected recall@k of a random ranking: 1 - C(n - m, k) / C(n, k) per query with m matches."""
    match = np.asarray(match, bool)

    def expected(counts, n, k):
        return float(np.mean([1.0 - math.comb(n - m, k) / math.comb(n, k) for m in counts]))

    out = {}
    for k in ks:
        out[f"i2t_recall{k}"] = expected(match.sum(1), match.shape[1], k)
        out[f"t2i_recall{k}"] = expected(match.sum(0), match.shape[0], k)
    return out


# ----------------------------------------------------------------------------- embeddings
def same_label_recall1(embeddings, labels, *, chunk: int = 1024) -> float:
    """The share of examples whose nearest other example (cosine similarity of embeddings [n, m];
    ties: the lower index) has the same label [n]: how well the embedding space clusters by label.
    0.0 with fewer than 2 examples. Rows are compared `chunk` at a time (memory n * chunk)."""
    z = np.asarray(embeddings, np.float64)
    y = np.asarray(labels)
    n = len(y)
    if n < 2:
        return 0.0
    z = z / np.maximum(np.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
    hits = 0
    for start in range(0, n, chunk):
        sim = z[start : start + chunk] @ z.T  # [rows, n]
        rows = np.arange(sim.shape[0])
        sim[rows, start + rows] = -np.inf  # not itself
        hits += int(np.sum(y[np.argmax(sim, axis=1)] == y[start : start + chunk]))
    return hits / n
