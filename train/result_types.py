"""What a RESULTS.md row is: its claim, how it is measured and checked (`Row`, `Check`), and what its
`measure(ctx, seed)` is given (`Context`). The rows are train/result_rows.py; train.results runs them."""

from __future__ import annotations

import dataclasses
import os
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
