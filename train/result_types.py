"""What a RESULTS.md row is: its claim, how it is measured and checked (`Row`, `Check`), and what its
`measure(ctx, seed)` is given (`Context`), and how a run is made once and read back (`fresh_summary`,
`save_summary`, keyed by `config_key`). The rows are train/result_rows.py; train.results runs them."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable


@dataclasses.dataclass(frozen=True)
class Check:
    figure: str
    threshold: float
    baseline: str | float  # a figure (its mean) or a constant such as chance
    higher: bool = True  # the claim: mean >= threshold (False: <=)


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    claim: str
    baseline: str  # what the figures are compared with, in words
    measure: Callable[[Context, int], dict]
    checks: tuple[Check, ...]
    shown: tuple[str, ...]  # the figures the table shows
    options: dict = dataclasses.field(default_factory=dict)
    note: str = ""  # what the figures mean where it is not obvious (never a figure)


@dataclasses.dataclass(frozen=True)
class Context:
    workdir: str  # this row's runs
    shared: str  # runs several rows share
    options: dict

    def __getitem__(self, key):
        return self.options[key]

    def path(self, *parts) -> str:
        return os.path.join(self.workdir, *parts)


# ----------------------------------------------------------------------------- runs, made once
def fresh_summary(workdir: str, key: dict) -> dict | None:
    """The saved summary of a finished run of exactly `key` in workdir; else None, and the workdir
    emptied (a run of another config, or an unfinished one, is not resumed: it is redone)."""
    path = os.path.join(workdir, "result.json")
    if os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f)
        if saved.get("key") == key:
            return saved["summary"]
    shutil.rmtree(workdir, ignore_errors=True)
    return None


def finished(summary: dict, steps: int, workdir: str) -> dict:
    """A run that stopped short (a signal, a time limit) is no result: say so rather than keep it."""
    if (summary.get("step") or 0) < steps:
        raise RuntimeError(
            f"{workdir}: stopped at step {summary.get('step')} of {steps}; not a result "
            "(run the row again: an unfinished run is redone)"
        )
    return summary


def save_summary(workdir: str, key: dict, summary: dict) -> dict:
    with open(os.path.join(workdir, "result.json"), "w") as f:
        json.dump({"key": key, "summary": summary}, f, indent=1, default=float)
    return summary


def config_key(cfg) -> dict:
    from transformer_jax import config as config_lib

    return json.loads(json.dumps(config_lib.to_dict(cfg), default=str))
