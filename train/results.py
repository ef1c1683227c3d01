"""The library's claims, measured: run the rows of RESULTS.md and rewrite its table from what they measure.

    python -m train.results --list                     # the rows, what each runs, its threshold
    python -m train.results --row kv_cache             # one row (repeat --row for several)
    python -m train.results                            # every row (hours on a 2-core CPU)
    python -m train.results --row span_corruption --set steps=20 --threshold eval_loss_drop=9 \\
        --out /tmp/results --results /tmp/RESULTS.md    # a quick, non-default run kept apart

Each row (train/result_rows.py) measures one claim on held-out data for each seed (--seeds,
default 3), then checks the mean of each of its figures against the row's threshold. The row's
figures go to <out>/<row>.json (default results/), and RESULTS.md's table is rebuilt from every
JSON there: nothing in the table is typed in by hand. The exit status is 1 when a row falls below
a threshold (after every requested row has run and been written), so a row is a bench that can fail.

A threshold is a claim the measurement supports: below the measured mean by at most two spreads
(sample standard deviations over the seeds) and above the baseline. Each check's JSON records
whether that still holds (`within_2sd`, `above_baseline`), and the table flags a threshold that
does not: re-measure, then move the threshold in train/result_rows.py, never the other way round.
Runs and their checkpoints go to --workdir (default runs/results); a row's shared runs (the
pretrained bert_tiny of a seed) are reused by every row that needs them and kept between
invocations: a finished run is read back, not trained again.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time

from train import cli
from train.result_rows import ROWS
from train.result_types import Check, Context, Row

RESULTS_MD = os.path.join(cli.REPO, "RESULTS.md")
RESULTS_DIR = os.path.join(cli.REPO, "results")
TABLE_START, TABLE_END = "<!-- results table: written by python -m train.results -->", "<!-- end of results table -->"
INTRO = """# Results

What the library's claims measure to, on the CPU the tests run on, each row from one command with
its seeds fixed. `python -m train.results --row NAME` runs a row and rewrites this table from what
it measured (results/NAME.json); it exits non-zero when a figure falls below its threshold. A
threshold sits between the baseline and the measured mean, at most two spreads (standard
deviations over the seeds) below the mean. docs/bench.md says how each row is set up.

"""


# ----------------------------------------------------------------------------- measuring
def summarise(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": values,
    }


def check(c: Check, summary: dict, threshold: float) -> dict:
    """A check's verdict on the measured means: passed (mean on the right side of the threshold),
    and whether the threshold is one the measurement supports."""
    got = summary[c.figure]
    base = summary[c.baseline]["mean"] if isinstance(c.baseline, str) else c.baseline
    sign = 1 if c.higher else -1
    return {
        "figure": c.figure,
        "threshold": threshold,
        "higher_is_better": c.higher,
        "mean": got["mean"],
        "sd": got["sd"],
        "baseline": base,
        "passed": sign * (got["mean"] - threshold) >= 0,
        "within_2sd": sign * (got["mean"] - threshold) <= 2 * got["sd"] + 1e-3,  # to the table's 3 decimals
        "above_baseline": sign * (threshold - base) > 0,
    }


def run_row(row: Row, workdir: str, seeds: list[int], options: dict, thresholds: dict) -> dict:
    ctx = Context(os.path.join(workdir, row.name), os.path.join(workdir, "shared"), {**row.options, **options})
    start = time.perf_counter()
    per_seed = []
    for seed in seeds:
        t0 = time.perf_counter()
        figures = row.measure(ctx, seed)
        per_seed.append(figures)
        print(
            f"{row.name} seed {seed} ({time.perf_counter() - t0:.0f} s): "
            + ", ".join(f"{k} {fmt(v)}" for k, v in figures.items() if isinstance(v, (int, float))),
            flush=True,
        )
    numeric = [k for k, v in per_seed[0].items() if isinstance(v, (int, float))]
    summary = {k: summarise([float(f[k]) for f in per_seed]) for k in numeric}
    checks = [check(c, summary, thresholds.get(c.figure, c.threshold)) for c in row.checks]
    command = " ".join(
        ["python -m train.results --row", row.name]
        + [f"--set {k}={v}" for k, v in options.items()]
        + ([f"--seeds {len(seeds)}"] if len(seeds) != 3 else [])
        + [f"--threshold {k}={v}" for k, v in thresholds.items()]
    )
    return {
        "row": row.name,
        "claim": row.claim,
        "command": command,
        "baseline": row.baseline,
        "options": ctx.options,
        "default_options": not options,
        "seeds": seeds,
        "per_seed": per_seed,
        "summary": summary,
        "shown": [k for k in row.shown if k in summary],
        "checks": checks,
        "passed": all(c["passed"] for c in checks),
        "note": row.note,
        "runtime_s": round(time.perf_counter() - start, 1),
        "measured": datetime.date.today().isoformat(),
        "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}, {jax_backend()}",
    }


def jax_backend() -> str:
    import jax

    return f"jax {jax.__version__} on {jax.default_backend()}"


def keep_measured_time(result: dict, path: str) -> None:
    """A row re-checked from runs it read back (same figures) keeps the time and date it was measured in."""
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
        if old.get("per_seed") == result["per_seed"] and old.get("options") == result["options"]:
            result["runtime_s"], result["measured"] = old["runtime_s"], old["measured"]


# ----------------------------------------------------------------------------- the table
def fmt(v: float) -> str:
    if isinstance(v, int) or (isinstance(v, float) and v.is_integer() and abs(v) >= 100):
        return f"{int(v):,}"
    return f"{v:.3g}" if abs(v) >= 1 else f"{v:.3f}"


def measured_cell(result: dict) -> str:
    parts = []
    for k in result["shown"]:
        s = result["summary"][k]
        parts.append(f"{k} {fmt(s['mean'])} ± {fmt(s['sd'])} ({', '.join(fmt(v) for v in s['values'])})")
    return "<br>".join(parts)


def threshold_cell(result: dict) -> str:
    out = []
    for c in result["checks"]:
        flags = ([] if c["within_2sd"] else ["more than 2 sd below the mean"]) + (
            [] if c["above_baseline"] else ["not above the baseline"]
        )
        out.append(
            f"{c['figure']} {'≥' if c['higher_is_better'] else '≤'} {fmt(c['threshold'])}"
            f" (baseline {fmt(c['baseline'])}): {'pass' if c['passed'] else '**FAIL**'}"
            + (f" — {'; '.join(flags)}" if flags else "")
        )
    return "<br>".join(out)


def table(results: dict[str, dict]) -> str:
    lines = [
        "| row | claim | command (seeds " + "0-2" + " unless said) | baseline | measured: mean ± sd (per seed) "
        "| threshold | time |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in ROWS.values():
        r = results.get(row.name)
        if r is None:
            lines.append(
                f"| {row.name} | {row.claim} | `python -m train.results --row {row.name}` | {row.baseline} "
                "| not measured yet | "
                + "<br>".join(f"{c.figure} {'≥' if c.higher else '≤'} {fmt(c.threshold)}" for c in row.checks)
                + " | |"
            )
            continue
        note = f"<br>{r['note']}" if r.get("note") else ""
        lines.append(
            f"| {row.name} | {r['claim']}{note} | `{r['command']}` ({r['measured']}) | {r['baseline']} "
            f"| {measured_cell(r)} | {threshold_cell(r)} | {r['runtime_s'] / 60:.1f} min |"
        )
    total = sum(r["runtime_s"] for r in results.values())
    machines = sorted({r["machine"] for r in results.values()})
    lines.append("")
    lines.append(
        f"Total time of the measured rows: {total / 60:.0f} min ({'; '.join(machines) or 'none yet'}); a run "
        "several rows share (the bert_tiny pretraining of a seed, its default finetune) counts in the row "
        "that made it."
    )
    return "\n".join(lines)


def load_results(out: str) -> dict[str, dict]:
    results = {}
    for name in ROWS:
        path = os.path.join(out, f"{name}.json")
        if os.path.isfile(path):
            with open(path) as f:
                results[name] = json.load(f)
    return results


def write_table(results_md: str, results: dict[str, dict]) -> None:
    """Replace the table between the markers (or write the file) and keep any text around it."""
    body = f"{TABLE_START}\n{table(results)}\n{TABLE_END}"
    text = INTRO + body + "\n"
    if os.path.isfile(results_md):
        with open(results_md) as f:
            old = f.read()
        if TABLE_START in old and TABLE_END in old:
            text = old[: old.index(TABLE_START)] + body + old[old.index(TABLE_END) + len(TABLE_END) :]
    with open(results_md + ".tmp", "w") as f:
        f.write(text)
    os.replace(results_md + ".tmp", results_md)


# ----------------------------------------------------------------------------- main
def parse_pairs(pairs: list[str], flag: str) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag}: expected KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main(argv: list[str] | None = None) -> None:
    p = cli.parser(
        __doc__.splitlines()[0],
        config="not taken: each row fixes its configs (see --list)",
        overrides="change one of a row's options (--list shows them), e.g. --set steps=20; the table's command says so",
        workdir="where the runs go (default runs/results)",
    )
    p.add_argument("--row", action="append", default=[], help="a row to run (repeatable); default every row")
    p.add_argument("--list", action="store_true", help="list the rows and exit")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1 (default 3)")
    p.add_argument(
        "--threshold",
        action="append",
        default=[],
        metavar="FIGURE=VALUE",
        help="check FIGURE against VALUE instead of the row's threshold",
    )
    p.add_argument("--out", default=RESULTS_DIR, help="where each row's JSON goes (default results/)")
    p.add_argument("--results", default=RESULTS_MD, help="the markdown file whose table is rewritten")
    args = p.parse_args(argv)
    if args.config:
        raise ValueError("--config: each row fixes its configs; change a row's options with --set (see --list)")
    if args.list:
        for row in ROWS.values():
            checks = ", ".join(f"{c.figure} {'>=' if c.higher else '<='} {c.threshold}" for c in row.checks)
            print(f"{row.name:22s} {row.claim} [{checks}; options {row.options}]")
        return
    unknown = [r for r in args.row if r not in ROWS]
    if unknown:
        raise ValueError(f"--row: unknown row {unknown[0]!r}; the rows are {', '.join(ROWS)}")
    if args.seeds < 1:
        raise ValueError(f"--seeds: must be >= 1, got {args.seeds}")
    rows = [ROWS[r] for r in dict.fromkeys(args.row)] or list(ROWS.values())
    options, thresholds = parse_pairs(args.overrides, "--set"), parse_pairs(args.threshold, "--threshold")
    for row in rows:
        bad = [k for k in options if k not in row.options]
        if bad:
            raise ValueError(
                f"--set {bad[0]}: row {row.name} has no such option (its options: {', '.join(row.options) or 'none'})"
            )
        bad = [k for k in thresholds if k not in {c.figure for c in row.checks}]
        if bad:
            raise ValueError(f"--threshold {bad[0]}: row {row.name} checks {', '.join(c.figure for c in row.checks)}")
    os.makedirs(args.out, exist_ok=True)
    failed = []
    workdir = args.workdir or os.path.join("runs", "results")
    for row in rows:
        result = run_row(row, workdir, list(range(args.seeds)), options, thresholds)
        keep_measured_time(result, os.path.join(args.out, f"{row.name}.json"))
        with open(os.path.join(args.out, f"{row.name}.json"), "w") as f:
            json.dump(result, f, indent=1)
        write_table(args.results, load_results(args.out))
        for c in result["checks"]:
            verdict = "pass" if c["passed"] else "FAIL"
            print(
                f"{row.name}: {c['figure']} {fmt(c['mean'])} ± {fmt(c['sd'])} vs threshold {fmt(c['threshold'])} "
                f"(baseline {fmt(c['baseline'])}): {verdict}",
                flush=True,
            )
            if not c["passed"]:
                failed.append(f"{row.name}: {c['figure']} {fmt(c['mean'])} below its threshold {fmt(c['threshold'])}")
    print(f"wrote {args.results} from {args.out}", file=sys.stderr)
    if failed:
        print("FAIL: " + "; ".join(failed), file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    cli.main(main)
