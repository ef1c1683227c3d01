"""The task registry: every training objective by name, one module each.

    from transformer_jax import tasks
    objective = tasks.get("clm")                    # a tasks.base.Objective
    cfg, task = objective.make_task(cfg, workdir)   # a tasks.base.Task for train.trainer.run

A module is imported the first time its objective is asked for, so registering one costs
nothing and no module here imports another objective's. Adding an objective is one new
module that defines it and one line below (docs/objectives.md walks through an example).
"""

from __future__ import annotations

import importlib

REGISTRY: dict[str, str] = {  # train.objective -> "module:attribute" defining its Objective
    "clm": "transformer_jax.tasks.clm:OBJECTIVE",
    "mlm": "transformer_jax.tasks.mlm:OBJECTIVE",
    "mlm_nsp": "transformer_jax.tasks.mlm_nsp:OBJECTIVE",
    "span_corruption": "transformer_jax.tasks.span_corruption:OBJECTIVE",
    "prefix_lm": "transformer_jax.tasks.prefix_lm:OBJECTIVE",
    "itm": "transformer_jax.tasks.itm:ITM",
    "itc": "transformer_jax.tasks.itm:ITC",
    "translate": "transformer_jax.tasks.translation:OBJECTIVE",
    "finetune": "transformer_jax.tasks.finetune:OBJECTIVE",
}


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def get(name: str):
    """The registered Objective called `name`."""
    if name not in REGISTRY:
        raise ValueError(f"unknown objective {name!r}; registered: {', '.join(REGISTRY)}")
    module, attribute = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), attribute)
