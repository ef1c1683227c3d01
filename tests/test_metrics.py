"""Finetuning metrics against independent references: scikit-learn, SciPy, and the official SQuAD
v1.1 evaluation script's logic (transcribed below, as published with the dataset)."""

import collections
import re
import string

import numpy as np
import pytest
import scipy.stats
import sklearn.metrics

from transformer_jax import metrics


@pytest.fixture(scope="module")
def fixed():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 200)
    # predictions that agree with the labels 60% of the time: non-trivial values
    predictions = np.where(rng.random(200) < 0.6, labels, rng.integers(0, 3, 200))
    return predictions, labels


def test_classification_metrics_equal_sklearn(fixed):
    p, y = fixed
    assert metrics.accuracy(p, y) == pytest.approx(sklearn.metrics.accuracy_score(y, p), abs=1e-12)
    assert metrics.matthews_corrcoef(p, y) == pytest.approx(sklearn.metrics.matthews_corrcoef(y, p), abs=1e-12)
    assert metrics.macro_f1(p, y) == pytest.approx(sklearn.metrics.f1_score(y, p, average="macro"), abs=1e-12)
    pb, yb = p % 2, y % 2  # binary, as MRPC / QQP
    assert metrics.f1(pb, yb) == pytest.approx(sklearn.metrics.f1_score(yb, pb), abs=1e-12)
    assert metrics.matthews_corrcoef(pb, yb) == pytest.approx(sklearn.metrics.matthews_corrcoef(yb, pb), abs=1e-12)
    # degenerate cases: constant predictions (MCC 0 as sklearn), no positives (F1 0)
    assert metrics.matthews_corrcoef(np.zeros(10), yb[:10]) == sklearn.metrics.matthews_corrcoef(yb[:10], np.zeros(10))
    assert metrics.f1(np.zeros(5), np.zeros(5)) == 0.0


def test_correlations_equal_scipy():
    rng = np.random.default_rng(1)
    y = np.round(rng.uniform(0, 5, 300), 1)  # STS-B-like scores with many ties
    p = y + rng.normal(0, 1.0, 300)
    p[:40] = np.round(p[:40])  # ties in the predictions too
    assert metrics.pearson(p, y) == pytest.approx(scipy.stats.pearsonr(p, y)[0], abs=1e-12)
    assert metrics.spearman(p, y) == pytest.approx(scipy.stats.spearmanr(p, y)[0], abs=1e-12)
    np.testing.assert_allclose(metrics.rankdata(y), scipy.stats.rankdata(y))
    combined = metrics.compute(["pearson_spearman"], p, y)["pearson_spearman"]
    assert combined == pytest.approx((scipy.stats.pearsonr(p, y)[0] + scipy.stats.spearmanr(p, y)[0]) / 2)


# ---- the official SQuAD v1.1 evaluation (evaluate-v1.1.py), transcribed
def _official_normalize_answer(s):
    def remove_articles(text):
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    def lower(text):
        return text.lower()

    return white_space_fix(remove_articles(remove_punc(lower(s))))


def _official_f1(prediction, ground_truth):
    prediction_tokens = _official_normalize_answer(prediction).split()
    ground_truth_tokens = _official_normalize_answer(ground_truth).split()
    common = collections.Counter(prediction_tokens) & collections.Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def _official_em(prediction, ground_truth):
    return _official_normalize_answer(prediction) == _official_normalize_answer(ground_truth)


def _official_evaluate(dataset, predictions):
    f1 = exact_match = total = 0
    for article in dataset:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                total += 1
                if qa["id"] not in predictions:
                    continue
                ground_truths = list(map(lambda x: x["text"], qa["answers"]))
                prediction = predictions[qa["id"]]
                exact_match += max(_official_em(prediction, gt) for gt in ground_truths)
                f1 += max(_official_f1(prediction, gt) for gt in ground_truths)
    return {"exact_match": 100.0 * exact_match / total, "f1": 100.0 * f1 / total}


def test_squad_equals_official_script():
    qas = [
        ("q1", ["Denver Broncos", "The Denver Broncos"], "the Denver Broncos!"),  # articles, punctuation: EM
        ("q2", ["Saint Bernadette Soubirous"], "Bernadette Soubirous"),  # partial: F1 only
        ("q3", ["1990s", "the 1990s"], "(1990s),"),  # punctuation-only difference
        ("q4", ["a copper statue of Christ"], "copper  statue of   Christ"),  # whitespace
        ("q5", ["Santa Clara"], "Levi's Stadium"),  # wrong
        ("q6", ["an apple a day"], "apple apple day"),  # repeated tokens (Counter)
        ("q7", ["Beyoncé"], "BEYONCÉ"),  # unicode case
        ("q8", ["three"], None),  # no prediction
    ]
    dataset = [
        {
            "paragraphs": [
                {"context": "", "qas": [{"id": i, "answers": [{"text": a} for a in answers]} for i, answers, _ in qas]}
            ]
        }
    ]
    predictions = {i: p for i, _, p in qas if p is not None}
    ours = metrics.squad(predictions, {i: answers for i, answers, _ in qas})
    official = _official_evaluate(dataset, predictions)
    assert ours["exact_match"] == pytest.approx(official["exact_match"], abs=1e-9)
    assert ours["f1"] == pytest.approx(official["f1"], abs=1e-9)
    assert 0 < ours["exact_match"] < ours["f1"] < 100
    for _, answers, _ in qas:
        for a in answers:
            assert metrics.normalize_answer(a) == _official_normalize_answer(a)


def test_best_span_respects_validity_and_length():
    start = np.array([5.0, 1.0, 0.0, 3.0, 0.0, 0.0])
    end = np.array([9.0, 0.0, 2.0, 0.0, 1.0, 4.0])
    valid = np.array([False, True, True, True, True, True])  # position 0 is [CLS]: never an answer
    # best valid: start 3 (3.0) with end 5 (4.0) -> 7.0; end before start and [CLS] are excluded
    assert metrics.best_span(start, end, valid, max_answer_length=5) == (3, 5, 7.0)
    # a span of at most 2 tokens: start 3 + end 4 (3 + 1 = 4) beats start 1 + end 2 (1 + 2 = 3)
    assert metrics.best_span(start, end, valid, max_answer_length=2) == (3, 4, 4.0)
    # brute force agrees on random logits
    rng = np.random.default_rng(0)
    for _ in range(20):
        s, e = rng.normal(size=12), rng.normal(size=12)
        v = rng.random(12) < 0.7
        best = max(
            ((s[i] + e[j], i, j) for i in range(12) for j in range(12) if v[i] and v[j] and i <= j < i + 4),
            default=None,
        )
        got = metrics.best_span(s, e, v, max_answer_length=4, n_best=12)
        assert (got is None) == (best is None)
        if got:
            assert (got[0], got[1]) == (best[1], best[2])


def test_same_label_recall1():
    rng = np.random.default_rng(1)
    # three well separated clusters (directions), one label each: every nearest neighbour agrees
    centres = np.eye(3, 8) * 10
    labels = np.repeat([0, 1, 2], 5)
    z = centres[labels] + rng.normal(scale=0.1, size=(15, 8))
    assert metrics.same_label_recall1(z, labels) == 1.0
    assert metrics.same_label_recall1(z, labels, chunk=4) == 1.0
    # unit vectors at 0, 5, 20 and 90 degrees with labels 0, 0, 1, 1 (scaled: cosine ignores length):
    # nearest neighbours 0 -> 5 (same), 5 -> 0 (same), 20 -> 5 (other), 90 -> 20 (same): 3 of 4
    angles = np.radians([0.0, 5.0, 20.0, 90.0])
    z = np.stack([np.cos(angles), np.sin(angles)], 1) * np.array([[1.0], [3.0], [0.5], [7.0]])
    assert metrics.same_label_recall1(z, [0, 0, 1, 1]) == 0.75
    assert metrics.same_label_recall1(z, [0, 0, 1, 1], chunk=1) == 0.75
    # against a brute-force loop on random data, in chunks
    z = rng.normal(size=(37, 6))
    labels = rng.integers(0, 3, 37)
    unit = z / np.linalg.norm(z, axis=1, keepdims=True)
    nearest = [max((j for j in range(37) if j != i), key=lambda j: unit[i] @ unit[j]) for i in range(37)]
    want = np.mean([labels[i] == labels[j] for i, j in enumerate(nearest)])
    assert metrics.same_label_recall1(z, labels, chunk=5) == pytest.approx(want)
    assert metrics.same_label_recall1(z[:1], labels[:1]) == 0.0  # no other example
