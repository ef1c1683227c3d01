"""Hyperparameter search with Optuna: short runs of the shared train loop, the poor ones pruned.

    python -m train.sweep --config configs/gpt_tiny.yaml --space configs/sweep_gpt_tiny.yaml --trials 20
    python -m train.sweep --config configs/gpt_tiny.yaml --space configs/sweep_gpt_tiny.yaml --trials 20 \\
        --workdir runs/sweep --storage postgresql://user@db/sweeps      # machines share one study

The space (--space) is a YAML of config keys, each a range or choices:

    train.learning_rate: {low: 1.0e-4, high: 3.0e-3, log: true}
    train.batch_size: {choices: [8, 16, 32]}
    train.warmup_steps: {low: 0, high: 100, step: 10}     # an integer key: integers

and it is checked against the config (known keys, values of their types, ranges that hold
together, the config valid at every bound and choice) before any trial. Each trial is a run of
--config with --set and the trial's values, in <workdir>/trial_<n>, in this process, through
train.trainer.run; it reports its eval loss at each eval (train.eval_every) and Optuna's
MedianPruner stops it there when it is worse than the median of the finished trials at that step.
The sampler is TPE, seeded (--seed plus the number of trials the study already has). The study
is <workdir>/study.db (SQLite) or --storage; each invocation runs --trials more trials of it, so
running the command again continues the sweep. Every trial ends in trials.csv, trials.md (best
first, with the train.pretrain command that reproduces each trial), loss_curves.png,
params.png and best.yaml, rewritten after each trial. docs/sweep.md has the details.

Over 400 lines on purpose: the space's checks, the study and the trial share the trials' attributes
(overrides, workdir, config, error) that are easiest to keep in step in one file. The reports that
read them back are train/sweep_report.py.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
import warnings

import optuna
import yaml

from train import cli, trainer
from train.sweep_report import OBJECTIVE, outcome, write_reports
from transformer_jax import config as config_lib
from transformer_jax import config_parsing, tasks
from transformer_jax.config import Config, ConfigError

# what `distribution` makes of a space entry
Distribution: typing.TypeAlias = (
    optuna.distributions.CategoricalDistribution
    | optuna.distributions.IntDistribution
    | optuna.distributions.FloatDistribution
)
HEARTBEAT_S, STALE_S = 30, 120  # a RUNNING trial without a heartbeat for STALE_S s was killed: FAIL
# keys machines sharing a study may set differently: they change where and how a trial runs, not its result
FREE_KEYS = (
    "mesh.",
    "distributed.",
    "train.prefetch",
    "train.stop_check_every",
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "data.workers",
)


class TrialFailed(Exception):
    """A trial's values made a run that cannot train (a config they make impossible, a NaN loss): the
    trial is FAIL and the sweep goes on."""


class Interrupted(Exception):
    """A signal stopped the trial's run (the trainer saved a checkpoint): the trial is FAIL, the sweep stops."""


# ----------------------------------------------------------------------------- the search space
def key_type(key: str) -> type:
    """The annotated type of a dotted config key (Optional stripped); an unknown key is the loader's own
    one line (with its did-you-mean)."""
    cls: type = Config
    prefix = ""
    *sections, last = key.split(".")
    for part in sections:
        tp = typing.get_type_hints(cls).get(part)
        if tp is None:
            config_parsing._from_dict(cls, {part: {}}, prefix)  # raises: unknown key
        if not (isinstance(tp, type) and dataclasses.is_dataclass(tp)):
            raise ConfigError(f"{key}: {prefix}{part} is not a section")
        cls, prefix = tp, f"{prefix}{part}."
    hints = typing.get_type_hints(cls)
    if last not in hints:
        config_parsing._from_dict(cls, {last: None}, prefix)  # raises: unknown key
    tp = hints[last]
    if dataclasses.is_dataclass(tp):
        raise ConfigError(f"{key}: a section, not a key")
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def override(key: str, value) -> str:
    """key=value as --set takes it; the value reads back exactly (floats in full)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30).strip()
    text = text[:-3].strip() if text.endswith("...") else text
    if config_parsing.parse_override(f"{key}={text}")[1] != value:
        raise ConfigError(f"{key}: {value!r} does not survive --set {key}={text}")
    return f"{key}={text}"


def load_space(path: str, cfg_path: str, overrides: list[str]) -> dict[str, Distribution]:
    """{config key: its Optuna distribution} of the space file, every mistake one line naming the key."""
    if not os.path.isfile(path):
        raise ConfigError(f"--space: no such file {path}")
    with open(path) as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict) and data is not None:
        raise ConfigError(f"{path}: the top level must map config keys to ranges or choices")
    if not data:
        raise ConfigError(f"--space: {path} names no key to search")
    fixed = {config_parsing.parse_override(o)[0] for o in overrides}
    space = {}
    for key, spec in data.items():
        key = str(key)
        if key in fixed:
            raise ConfigError(f"{key}: both searched ({path}) and fixed by --set; drop one")
        tp = key_type(key)
        d = space[key] = distribution(key, tp, spec)
        values = d.choices if isinstance(d, optuna.distributions.CategoricalDistribution) else (d.low, d.high)
        for value in values:  # every bound and choice makes a config valid, and one a sweep can run
            check_base(config_lib.load_config(cfg_path, [*overrides, override(key, value)]))
    return space


def distribution(key: str, tp, spec) -> Distribution:
    if not isinstance(spec, dict):
        raise ConfigError(f"{key}: expected {{low: .., high: ..}} or {{choices: [..]}}, got {spec!r}")
    fields = set(spec)
    if "choices" in fields:
        if fields != {"choices"}:
            raise ConfigError(f"{key}: choices take no {', '.join(sorted(fields - {'choices'}))}")
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{key}: choices must be a non-empty list, got {choices!r}")
        checked = [config_parsing._check_value(key, tp, c) for c in choices]
        if any(not isinstance(c, (bool, int, float, str)) for c in checked):
            raise ConfigError(f"{key}: choices must be numbers, strings or booleans, got {choices!r}")
        if len(set(map(repr, checked))) < len(checked):
            raise ConfigError(f"{key}: a choice is repeated in {choices!r}")
        return optuna.distributions.CategoricalDistribution(checked)
    unknown = fields - {"low", "high", "log", "step"}
    if unknown:
        raise ConfigError(
            f"{key}: unknown field {sorted(unknown)[0]!r} (a range is low, high, log, step; or give choices)"
        )
    if not {"low", "high"} <= fields:
        raise ConfigError(f"{key}: a range needs low and high (or give choices)")
    if tp not in (int, float):
        raise ConfigError(f"{key}: not a number key ({getattr(tp, '__name__', tp)}): give choices, not a range")
    low, high = (config_parsing._check_value(key, tp, spec[f]) for f in ("low", "high"))
    log = config_parsing._check_value(f"{key} log", bool, spec.get("log", False))
    step = spec.get("step")
    if low > high:
        raise ConfigError(f"{key}: low {low} is above high {high}")
    if log and low <= 0:
        raise ConfigError(f"{key}: a log range needs low > 0, got {low}")
    if step is not None:
        step = config_parsing._check_value(f"{key} step", tp, step)
        if log:
            raise ConfigError(f"{key}: a range takes log or step, not both")
        if step <= 0:
            raise ConfigError(f"{key}: step must be positive, got {step}")
        count = (high - low) / step
        if abs(count - round(count)) > 1e-9 * max(1.0, count):
            raise ConfigError(f"{key}: {low}..{high} is not a whole number of steps of {step}")
    if tp is int:
        return optuna.distributions.IntDistribution(low, high, log=log, step=step or 1)
    return optuna.distributions.FloatDistribution(low, high, log=log, step=step)


def suggest(trial: optuna.Trial, key: str, d: Distribution):
    if isinstance(d, optuna.distributions.CategoricalDistribution):
        return trial.suggest_categorical(key, d.choices)
    if isinstance(d, optuna.distributions.IntDistribution):
        return trial.suggest_int(key, d.low, d.high, step=d.step, log=d.log)
    return trial.suggest_float(key, d.low, d.high, step=d.step, log=d.log)


# ----------------------------------------------------------------------------- the study
def check_base(cfg: Config) -> None:
    """What a sweep cannot honour in the config every trial starts from, one line naming the key."""
    t = cfg.train
    if not t.eval_every:
        raise ConfigError(
            "train.eval_every: 0, but a sweep's objective is the eval loss: set evals (and the "
            "steps they are pruned at)"
        )
    if t.time_limit_s or t.early_stopping_patience:
        key = "train.time_limit_s" if t.time_limit_s else "train.early_stopping_patience"
        raise ConfigError(f"{key}: a trial runs to train.steps unless the pruner stops it; set it to 0")
    if t.init_from:
        raise ConfigError(
            "train.init_from: a sweep's trials start from scratch (continued pretraining is not swept yet)"
        )
    if cfg.distributed.mode == "on":
        raise ConfigError(
            "distributed.mode: a sweep runs each trial in one process (many machines share a "
            "study with --storage); set it to auto or off"
        )


def open_study(args, workdir: str, base: Config, space: dict) -> optuna.Study:
    """The study (created, or loaded and checked to be the same sweep), its sampler seeded after the
    trials it already has."""
    if not args.storage:
        os.makedirs(workdir, exist_ok=True)
    url = args.storage or f"sqlite:///{os.path.abspath(os.path.join(workdir, 'study.db'))}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
            storage = optuna.storages.RDBStorage(
                url, engine_kwargs=kwargs, heartbeat_interval=HEARTBEAT_S, grace_period=STALE_S
            )
        except Exception as e:
            raise ValueError(f"--storage: {url}: {cli.first_line(e)}") from None
    name = args.study or os.path.basename(os.path.normpath(workdir))
    study = optuna.create_study(storage=storage, study_name=name, direction="minimize", load_if_exists=True)
    sweep = {
        "config": config_lib.to_dict(base),
        "space": {k: optuna.distributions.distribution_to_json(d) for k, d in space.items()},
    }
    saved = study.user_attrs.get("sweep")
    if saved is None:
        study.set_user_attr("sweep", sweep)
    else:
        before, now = trainer._flatten(saved["config"]), trainer._flatten(sweep["config"])
        for key in sorted(set(before) | set(now)):
            if not key.startswith(FREE_KEYS) and before.get(key) != now.get(key):
                raise ConfigError(
                    f"{key}: {before.get(key)!r} in study {name}, {now.get(key)!r} now: a continued "
                    f"sweep keeps its config (or start a new --workdir / --study)"
                )
        if saved["space"] != sweep["space"]:
            changed = sorted(
                k for k in set(saved["space"]) | set(sweep["space"]) if saved["space"].get(k) != sweep["space"].get(k)
            )
            raise ConfigError(
                f"{changed[0]}: the space differs from study {name}'s: a continued sweep keeps its "
                f"space (or start a new --workdir / --study)"
            )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    done = len(study.get_trials(deepcopy=False))
    study.sampler = optuna.samplers.TPESampler(seed=args.seed + done, n_startup_trials=args.startup_trials)
    study.pruner = optuna.pruners.MedianPruner(n_startup_trials=args.prune_after, n_warmup_steps=args.prune_warmup)
    return study


def make_objective(cfg_path: str, overrides: list[str], space: dict, workdir: str):
    def objective(trial: optuna.Trial) -> float:
        sets = [override(key, suggest(trial, key, d)) for key, d in space.items()]
        trial_dir = os.path.join(workdir, f"trial_{trial.number}")
        trial.set_user_attr("overrides", sets)
        trial.set_user_attr("workdir", os.path.abspath(trial_dir))
        if os.path.exists(trial_dir):
            raise ValueError(
                f"--workdir: {trial_dir} exists but study trial {trial.number} is new: this workdir "
                f"holds another study's trials (start a new --workdir)"
            )
        try:
            cfg = config_lib.load_config(cfg_path, [*overrides, *sets])
            cfg, task = tasks.get(cfg.train.objective).make_task(cfg, trial_dir)
        except ConfigError as e:
            trial.set_user_attr("error", cli.first_line(e))
            raise TrialFailed(cli.first_line(e)) from None
        trial.set_user_attr("config", config_lib.to_dict(cfg))
        pruned = []

        def on_eval(step: int, metrics: dict) -> bool:
            if OBJECTIVE not in metrics:
                raise ValueError(f"train.objective: {cfg.train.objective} logs no {OBJECTIVE}, a sweep's objective")
            trial.report(metrics[OBJECTIVE], step)
            if step < cfg.train.steps and trial.should_prune():
                pruned.append(step)
                return True
            return False

        try:
            metrics, _ = trainer.run(cfg, trial_dir, task, quiet=True, on_eval=on_eval)
        except trainer.TrainingError as e:
            trial.set_user_attr("error", cli.first_line(e))
            raise TrialFailed(cli.first_line(e)) from None
        if pruned:
            raise optuna.TrialPruned(f"at step {pruned[0]}")
        if metrics["step"] < cfg.train.steps:
            trial.set_user_attr("error", f"interrupted at step {metrics['step']}")
            raise Interrupted(
                f"trial {trial.number} interrupted at step {metrics['step']} (checkpoint saved in "
                f"{trial_dir}); run the command again to continue the sweep"
            )
        if OBJECTIVE not in metrics:
            raise ValueError(f"train.objective: {cfg.train.objective} logs no {OBJECTIVE}, a sweep's objective")
        return metrics[OBJECTIVE]

    return objective


# ----------------------------------------------------------------------------- the program
def parser():
    p = cli.parser(
        __doc__.splitlines()[0],
        workdir="the sweep's directory: study.db, trial_<n>/, the reports (default runs/<config name>_sweep)",
    )
    p.add_argument(
        "--space",
        metavar="FILE",
        help="YAML of config keys to search: {low, high[, log][, step]} "
        "or {choices: [...]} (e.g. configs/sweep_gpt_tiny.yaml)",
    )
    p.add_argument("--trials", type=int, metavar="N", help="how many more trials this invocation runs")
    p.add_argument(
        "--storage",
        metavar="URL",
        help="an RDB URL (postgresql://, mysql://, sqlite:///) for a study "
        "many machines share (default sqlite:///<workdir>/study.db)",
    )
    p.add_argument("--study", metavar="NAME", help="the study's name in the storage (default the workdir's name)")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="TPE's seed, plus the trials already in the study (default 0; give machines sharing a study their own)",
    )
    p.add_argument(
        "--startup-trials",
        dest="startup_trials",
        type=int,
        default=10,
        metavar="N",
        help="random trials before TPE models the space (default 10)",
    )
    p.add_argument(
        "--prune-after",
        dest="prune_after",
        type=int,
        default=5,
        metavar="N",
        help="finished trials before any is pruned (default 5)",
    )
    p.add_argument(
        "--prune-warmup",
        dest="prune_warmup",
        type=int,
        default=0,
        metavar="STEPS",
        help="no trial is pruned before this step (default 0: from the first eval)",
    )
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    cli.check_keys(args.overrides)
    cfg_path = args.config or cli.DEFAULT_CONFIG
    base, _ = cli.config_and_workdir(args)
    check_base(base)
    cli.init_devices(base, distributed=False)  # each process is a worker of its own: no jax.distributed
    if not args.space:
        raise ValueError(
            "--space: required (a YAML of config keys with ranges or choices, e.g. configs/sweep_gpt_tiny.yaml)"
        )
    space = load_space(args.space, cfg_path, args.overrides)
    if args.trials is None or args.trials < 0:
        raise ValueError(f"--trials: required, a number >= 0 of trials to run, got {args.trials}")
    for flag, value in (
        ("--startup-trials", args.startup_trials),
        ("--prune-after", args.prune_after),
        ("--prune-warmup", args.prune_warmup),
    ):
        if value < 0:
            raise ValueError(f"{flag}: must be >= 0, got {value}")
    workdir = args.workdir or os.path.join("runs", f"{base.name or 'default'}_sweep")
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # one line a trial, ours
    study = open_study(args, workdir, base, space)
    os.makedirs(workdir, exist_ok=True)
    issued = len(study.get_trials(deepcopy=False))
    stray = sorted(d for d in os.listdir(workdir) if re.fullmatch(r"trial_\d+", d) and int(d[6:]) >= issued)
    if stray:  # the next trials would train into them
        raise ValueError(
            f"--workdir: {os.path.join(workdir, stray[0])} is no trial of study {study.study_name} "
            f"({issued} trials): this workdir holds another study's trials (start a new --workdir)"
        )
    keys = list(space)
    print(
        f"study {study.study_name}: {len(study.trials)} trials so far, {args.trials} more; reports in {workdir}",
        flush=True,
    )

    written = [-1]  # how many trials the reports last showed

    def report(study: optuna.Study, t: optuna.trial.FrozenTrial | None = None) -> None:
        if t is not None:
            print(f"trial {t.number}: {' '.join(t.user_attrs.get('overrides', []))} -> {outcome(t)}", flush=True)
        write_reports(study, workdir, cfg_path, args.overrides, keys)
        written[0] = len(study.get_trials(deepcopy=False))

    objective = make_objective(cfg_path, args.overrides, space, workdir)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.optimize(objective, n_trials=args.trials, catch=(TrialFailed,), callbacks=[report])
    except Interrupted as e:
        print(str(e), flush=True)
    finally:  # a trial that raised (a signal, a mistake) has had no callback
        if written[0] != len(study.get_trials(deepcopy=False)):
            report(study)
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    if complete:
        best = study.best_trial
        print(
            f"best: trial {best.number}, eval loss {best.value:.6g}: {' '.join(best.user_attrs['overrides'])}; "
            f"{os.path.join(workdir, 'trials.md')}, best.yaml",
            flush=True,
        )


if __name__ == "__main__":
    cli.main(main)
