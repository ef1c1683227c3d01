"""The embedded finetuning task: needs no download. Snippets of the running Python's standard
library labelled with the package they come from (asyncio, email, importlib, ...); train and eval
snippets come from different files, so the model must recognise a package's vocabulary and style
rather than memorise a file. A language model pretrained on the same corpus (`train.pretrain`)
knows these identifiers and idioms, which is what finetuning builds on."""

from __future__ import annotations

import os
import sysconfig

import numpy as np

from transformer_jax.data.labeled.base import TaskData, TaskSpec

# Packages present in every CPython 3.10 - 3.13 (lib2to3 / distutils are gone in newer ones,
# encodings and idlelib are too easy: codec tables and Tk dialogs), most files first.
EMBEDDED_PACKAGES = (
    "asyncio",
    "email",
    "importlib",
    "multiprocessing",
    "xml",
    "unittest",
    "tkinter",
    "ctypes",
    "concurrent",
    "http",
    "json",
    "urllib",
    "logging",
    "curses",
    "sqlite3",
    "wsgiref",
)


def embedded_task(
    num_classes: int = 6,
    *,
    lines_per_snippet: int = 6,
    eval_fraction: float = 0.3,
    max_per_class: int = 400,
    max_eval_per_class: int = 60,
    seed: int = 0,
    stdlib_dir: str | None = None,
) -> TaskData:
    """Which standard-library package does a snippet of `lines_per_snippet` non-blank lines come
    from? The `num_classes` packages of EMBEDDED_PACKAGES with the most files; a seeded
    `eval_fraction` of each package's files (at least one) gives the eval snippets. Classes are
    balanced (the same number of train snippets per package, at most max_per_class). The train
    files' snippets left over are the unlabelled pool (`TaskData.unlabeled`, shuffled)."""
    from transformer_jax.data.corpus import stdlib_files

    root = stdlib_dir or sysconfig.get_paths()["stdlib"]
    by_package: dict[str, list[str]] = {}
    for path in stdlib_files(root):
        parts = os.path.relpath(path, root).split(os.sep)
        if len(parts) > 1 and parts[0] in EMBEDDED_PACKAGES:
            by_package.setdefault(parts[0], []).append(path)
    ranked = sorted(
        (p for p in by_package if len(by_package[p]) >= 3),
        key=lambda p: (-len(by_package[p]), EMBEDDED_PACKAGES.index(p)),
    )
    if len(ranked) < num_classes:
        raise ValueError(
            f"finetune.embedded_classes: only {len(ranked)} standard-library packages with >= 3 files "
            f"here ({', '.join(ranked)}), {num_classes} asked for"
        )
    packages = tuple(sorted(ranked[:num_classes]))
    rng = np.random.default_rng(seed)
    train_by_class, eval_by_class = [], []
    for label, package in enumerate(packages):
        files = sorted(by_package[package])
        held = set(rng.permutation(len(files))[: max(1, round(len(files) * eval_fraction))].tolist())
        train: list[dict] = []
        held_out: list[dict] = []
        for i, path in enumerate(files):
            snippets = _snippets(path, lines_per_snippet)
            (held_out if i in held else train).extend({"text": s, "text_pair": None, "label": label} for s in snippets)
        train_by_class.append(train)
        eval_by_class.append(held_out)
    per_class = min(max_per_class, min(len(t) for t in train_by_class))
    per_eval = min(max_eval_per_class, min(len(e) for e in eval_by_class))
    if per_class == 0 or per_eval == 0:
        raise ValueError("embedded task: a package yields no snippets")
    choose = lambda items, k: sorted(rng.permutation(len(items))[:k].tolist())
    chosen = [choose(items, per_class) for items in train_by_class]
    train = [items[i] for items, picked in zip(train_by_class, chosen) for i in picked]
    # the train files' other snippets, without labels: distillation's transfer set
    unlabeled = [
        {"text": ex["text"], "text_pair": None, "label": 0}
        for items, picked in zip(train_by_class, map(set, chosen))
        for i, ex in enumerate(items)
        if i not in picked
    ]
    evaluation = [items[i] for items in eval_by_class for i in choose(items, per_eval)]
    train = [train[int(i)] for i in rng.permutation(len(train))]
    evaluation = [evaluation[int(i)] for i in rng.permutation(len(evaluation))]  # any prefix mixes the classes
    taken = {ex["text"] for ex in train + evaluation}  # a snippet repeated in another file stays out
    unlabeled = [ex for ex in unlabeled if ex["text"] not in taken]
    unlabeled = [unlabeled[int(i)] for i in np.random.default_rng(seed + 1).permutation(len(unlabeled))]
    spec = TaskSpec(
        "stdlib_package", "classification", packages, ("accuracy", "macro_f1"), "accuracy", ("snippet", "snippet_pair")
    )
    return TaskData(spec, train, evaluation, unlabeled)


def _snippets(path: str, lines_per_snippet: int) -> list[str]:
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [line.rstrip() for line in f if line.strip()]
    out = []
    for start in range(0, len(lines) - lines_per_snippet + 1, lines_per_snippet):
        snippet = "\n".join(lines[start : start + lines_per_snippet])
        if len(snippet) >= 80:
            out.append(snippet)
    return out
