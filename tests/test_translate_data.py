"""The translation dev split: no dev source within 3 character edits (Levenshtein) of a training
source. Checked with a plain dynamic-programming edit distance written here, independent of the
library's (rapidfuzz), on the embedded English->German split as the tiny config makes it, and on
hand-made pools; the plain split (max_edit_distance=None) fails the same check."""

from __future__ import annotations

import os

import numpy as np
import pytest

from transformer_jax.data import parallel

from helpers import REPO

MAX = 3


def edit_distance_at_most(a: str, b: str, bound: int = MAX) -> int | None:
    """The Levenshtein distance of a and b (insertions, deletions, substitutions, each 1) when at
    most `bound`, else None: row by row, stopping once a whole row exceeds the bound."""
    if abs(len(a) - len(b)) > bound:
        return None
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        row = [i]
        for j, cb in enumerate(b, 1):
            row.append(min(previous[j] + 1, row[j - 1] + 1, previous[j - 1] + (ca != cb)))
        if min(row) > bound:
            return None
        previous = row
    return previous[-1] if previous[-1] <= bound else None


def near_pairs(dev: list[str], train: list[str], first_only: bool = False) -> list[tuple[str, str, int]]:
    """(dev source, training source, distance) of every pair at most MAX edits apart."""
    by_length: dict[int, list[str]] = {}
    for t in set(train):
        by_length.setdefault(len(t), []).append(t)
    found = []
    for d in sorted(set(dev)):
        for length in range(len(d) - MAX, len(d) + MAX + 1):  # distance >= the length difference
            for t in by_length.get(length, ()):
                dist = edit_distance_at_most(d, t)
                if dist is not None:
                    found.append((d, t, dist))
                    if first_only:
                        return found
    return found


def test_reference_edit_distance():
    assert edit_distance_at_most("kitten", "sitting") == 3
    assert edit_distance_at_most("flaw", "lawn") == 2
    assert edit_distance_at_most("same", "same") == 0
    assert edit_distance_at_most("", "abc") == 3
    assert edit_distance_at_most("abcd", "wxyz") is None  # 4
    assert edit_distance_at_most("Save", "Save changes") is None  # 8, pruned by length


def test_near_duplicates_distance_3_removed_4_kept():
    reference = ["Save changes", "Delete the selected items"]
    queries = {
        "Save changes": 0,  # the same string
        "save changes": 1,  # case is kept: one substitution
        "Save chang": 2,  # two deletions
        "Save changes!!!": 3,  # three insertions
        "Save chan": 3,
        "Seve chengas": 3,  # three substitutions
        "Save cha": 4,  # kept
        "Save changes now": 4,  # kept
        "Delete the selected item.": 1,
        "Delete the selected items....": 4,  # kept
        "Something else entirely": None,
    }
    for q, d in queries.items():  # the hand-made distances, by the reference implementation
        nearest = min((x for x in (edit_distance_at_most(q, r, 10) for r in reference) if x is not None), default=None)
        assert nearest == d or (d is None and (nearest is None or nearest > 4)), (q, nearest)
    near = parallel.near_duplicates(list(queries), reference, max_distance=MAX)
    assert [q for q, n in zip(queries, near) if n] == [q for q, d in queries.items() if d is not None and d <= MAX]
    assert parallel.near_duplicates([], reference).shape == (0,)
    assert not parallel.near_duplicates(["x"], []).any()


def _family_pool(seed: int = 0) -> parallel.Pairs:
    """60 random 20-letter sources (far apart), 30 of them with a variant 1 to 3 edits away."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    sources = []
    for k in range(60):
        base = "".join(rng.choice(letters, 20))
        sources.append(base)
        if k % 2 == 0:
            edits = 1 + k % 3
            sources.append(base[:-edits] + "0" * edits)
    return parallel.from_lists(sources, [s.upper() for s in sources], "families")


def _check_split(pairs, train, dev, max_distance=MAX):
    train_src, dev_src = train.sources, dev.sources
    assert not set(train_src) & set(dev_src)
    if max_distance is not None:
        assert near_pairs(dev_src, train_src) == []
    info = dev.split_info
    assert info["dev_pairs"] == len(dev)
    assert info["returned_to_train"] + info["dropped"] == info["dev_removed_near_duplicates"]
    assert len(train) + len(dev) + info["dropped"] == len(pairs)
    if max_distance is not None:
        assert (
            info["rule"] == f"source within Levenshtein (character edit) distance {max_distance} of a training source"
        )


def test_split_removes_near_duplicates_of_training_sources():
    pairs = _family_pool()
    train, dev = parallel.split_by_source(pairs, num_eval=12, seed=0)
    _check_split(pairs, train, dev)
    assert dev.split_info["dev_removed_near_duplicates"] > 0 and len(dev) >= 12
    again = parallel.split_by_source(pairs, num_eval=12, seed=0)  # deterministic
    assert list(again[0]) == list(train) and list(again[1]) == list(dev) and again[1].split_info == dev.split_info

    plain_train, plain_dev = parallel.split_by_source(pairs, num_eval=12, seed=0, max_edit_distance=None)
    assert near_pairs(plain_dev.sources, plain_train.sources)  # the check fails on the plain split
    assert plain_dev.split_info["dev_removed_near_duplicates"] == 0 and plain_dev.split_info["rule"] is None

    # nothing near anything: the same split as the plain one
    far = parallel.from_lists(*[[s for i, s in enumerate(pairs.sources) if i % 3 == 0]] * 2)
    assert near_pairs(far.sources[:1], far.sources[1:]) == []
    split, plain = (
        parallel.split_by_source(far, num_eval=5),
        parallel.split_by_source(far, num_eval=5, max_edit_distance=None),
    )
    assert [list(p) for p in split] == [list(p) for p in plain] and split[1].split_info["held_out_pairs"] == 5

    # every source close to every other: no dev pair can be kept apart
    close = parallel.from_lists([f"x{i}" for i in range(20)], [f"y{i}" for i in range(20)])
    with pytest.raises(ValueError, match="no dev pair left"):
        parallel.split_by_source(close, num_eval=4)


def test_embedded_dev_has_no_near_duplicate_of_training():
    pytest.importorskip("babel")
    from transformer_jax.config import load_config
    from transformer_jax.tasks import translation

    cfg = load_config(os.path.join(REPO, "configs", "translate_tiny.yaml"))
    try:
        train, dev = translation.load_pairs(cfg)
    except ValueError as e:
        pytest.skip(f"no embedded catalogs: {e}")
    pairs = parallel.gettext_pairs(cfg.translate.source_lang, cfg.translate.target_lang)
    _check_split(pairs, train, dev)
    info = dev.split_info
    assert len(dev) >= min(100, len(pairs) // 10)  # still a useful dev set
    assert info["dev_removed_near_duplicates"] > 0

    num_eval = min(cfg.translate.eval_examples, len(pairs) // 10)  # the old split: it has near duplicates
    plain_train, plain_dev = parallel.split_by_source(
        pairs, num_eval=num_eval, seed=cfg.train.seed, max_edit_distance=None
    )
    assert near_pairs(plain_dev.sources, plain_train.sources, first_only=True)
