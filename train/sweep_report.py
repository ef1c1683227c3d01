"""train.sweep's reports, rewritten after each trial: trials.csv and trials.md (best first, with
the train.pretrain command that reproduces each trial), loss_curves.png, params.png and best.yaml,
all read from the study (and each trial's metrics.jsonl) alone."""

from __future__ import annotations

import csv
import json
import math
import os
import shlex

import optuna
import yaml

from transformer_jax import config as config_lib

OBJECTIVE = "eval_loss"  # what a trial reports at each eval and the study minimises


def last_report(t: optuna.trial.FrozenTrial) -> tuple[int | None, float | None]:
    if not t.intermediate_values:
        return None, None
    step = max(t.intermediate_values)
    return step, t.intermediate_values[step]


def ranked(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Best first: finished trials by eval loss, then pruned ones (furthest, then lowest), then the rest."""
    S = optuna.trial.TrialState

    def key(t):
        step, value = last_report(t)
        if t.state == S.COMPLETE:
            return 0, t.value, 0, t.number
        if t.state == S.PRUNED:
            return 1, -(step or 0), value if value is not None else math.inf, t.number
        return 2, 0, 0, t.number

    return sorted(study.get_trials(deepcopy=False), key=key)


def command(t: optuna.trial.FrozenTrial, cfg_path: str, overrides: list[str]) -> str:
    sets = " ".join(f"--set {shlex.quote(o)}" for o in [*overrides, *t.user_attrs.get("overrides", [])])
    return f"python -m train.pretrain --config {shlex.quote(cfg_path)} {sets}".strip()


def outcome(t: optuna.trial.FrozenTrial) -> str:
    step, value = last_report(t)
    if t.state == optuna.trial.TrialState.COMPLETE:
        return f"eval loss {t.value:.6g}"
    if t.state == optuna.trial.TrialState.PRUNED:
        return f"pruned at step {step} (eval loss {value:.6g})" if step is not None else "pruned"
    error = t.user_attrs.get("error") or (
        "running" if t.state == optuna.trial.TrialState.RUNNING else "killed (no heartbeat)"
    )
    return f"{t.state.name.lower()}: {error}"


def write_reports(study: optuna.Study, workdir: str, cfg_path: str, overrides: list[str], keys: list[str]) -> None:
    trials = ranked(study)
    rows = []
    for t in trials:
        step, value = last_report(t)
        rows.append(
            {
                "number": t.number,
                "state": t.state.name,
                "eval_loss": t.value if t.value is not None else value,
                "last_step": step,
                **{k: t.params.get(k) for k in keys},
                "duration_s": t.duration.total_seconds() if t.duration else None,
                "note": "" if t.state == optuna.trial.TrialState.COMPLETE else outcome(t),
                "workdir": t.user_attrs.get("workdir", ""),
                "command": command(t, cfg_path, overrides),
            }
        )
    replace(os.path.join(workdir, "trials.csv"), lambda f: csv_rows(f, rows))
    replace(os.path.join(workdir, "trials.md"), lambda f: f.write(markdown(study, rows, keys)))
    plots(trials, workdir, keys)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE and "config" in t.user_attrs]
    if complete:
        cfg = config_lib.config_from_dict(complete[0].user_attrs["config"])
        replace(
            os.path.join(workdir, "best.yaml"), lambda f: yaml.safe_dump(config_lib.to_dict(cfg), f, sort_keys=False)
        )


def replace(path: str, write) -> None:
    """Write `path` whole or not at all (a reader never sees half a table)."""
    with open(path + ".tmp", "w", newline="") as f:
        write(f)
    os.replace(path + ".tmp", path)


def csv_rows(f, rows: list[dict]) -> None:
    if rows:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def show(value) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def markdown(study: optuna.Study, rows: list[dict], keys: list[str]) -> str:
    head = ["trial", "state", "eval loss", "step", *keys, "reproduce"]
    lines = [
        f"# Study {study.study_name}: {len(rows)} trials, best first",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        state = r["state"] if r["state"] in ("COMPLETE", "PRUNED") else f"{r['state']}: {r['note'].split(': ', 1)[-1]}"
        loss = f"{r['eval_loss']:.6g}" if r["eval_loss"] is not None else ""
        cells = [str(r["number"]), state, loss, show(r["last_step"]), *(show(r[k]) for k in keys), f"`{r['command']}`"]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def metrics_of(t: optuna.trial.FrozenTrial) -> list[dict]:
    path = os.path.join(t.user_attrs.get("workdir", ""), "metrics.jsonl")
    if not t.user_attrs.get("workdir") or not os.path.exists(path):
        return []  # a trial another machine ran
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plots(trials: list[optuna.trial.FrozenTrial], workdir: str, keys: list[str]) -> None:
    """loss_curves.png (train and eval loss per trial, pruned ones dashed) and params.png (the eval
    loss against each searched key: finished trials filled, pruned ones hollow at their last eval)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    fig = Figure(figsize=(12, 4.5))
    train_ax, eval_ax = fig.subplots(1, 2)
    for t in sorted(trials, key=lambda t: t.number):
        records = metrics_of(t)
        if not records:
            continue
        style = "--" if t.state == optuna.trial.TrialState.PRUNED else "-"
        (line,) = train_ax.plot(
            [r["step"] for r in records], [r["loss"] for r in records], style, label=f"trial {t.number}"
        )
        evals = [r for r in records if OBJECTIVE in r]
        eval_ax.plot(
            [r["step"] for r in evals],
            [r[OBJECTIVE] for r in evals],
            style + "o",
            color=line.get_color(),
            label=f"trial {t.number}",
        )
    for ax, title in ((train_ax, "train loss"), (eval_ax, "eval loss")):
        ax.set_xlabel("step")
        ax.set_title(title)
    if 0 < len(trials) <= 20:
        eval_ax.legend(fontsize="small")
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.12, top=0.92, wspace=0.2)  # tight_layout: 1 s a call
    fig.savefig(os.path.join(workdir, "loss_curves.png"), dpi=80)

    fig = Figure(figsize=(4 * len(keys), 3.6))
    for ax, key in zip(fig.subplots(1, len(keys), squeeze=False)[0], keys):
        for state, marker in ((optuna.trial.TrialState.COMPLETE, "o"), (optuna.trial.TrialState.PRUNED, "o")):
            points = [
                (t.params[key], t.value if state == optuna.trial.TrialState.COMPLETE else last_report(t)[1])
                for t in trials
                if t.state == state and key in t.params and last_report(t)[1] is not None
            ]
            if not points:
                continue
            xs, ys = zip(*points)
            if any(isinstance(x, (str, bool)) for x in xs):
                xs = tuple(str(x) for x in xs)
            filled = state == optuna.trial.TrialState.COMPLETE
            ax.scatter(
                xs,
                ys,
                marker=marker,
                facecolors="C0" if filled else "none",
                edgecolors="C0",
                label="finished" if filled else "pruned (last eval)",
            )
        distribution = next((t.distributions[key] for t in trials if key in t.distributions), None)
        if getattr(distribution, "log", False):
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # labelled minor ticks overlap on a short range
        ax.set_xlabel(key)
        ax.set_ylabel("eval loss")
        if key == keys[0] and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    fig.subplots_adjust(left=0.8 / (4 * len(keys)), right=0.98, bottom=0.14, top=0.95, wspace=0.35)
    fig.savefig(os.path.join(workdir, "params.png"), dpi=80)
