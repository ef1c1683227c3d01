"""train.results: a row run end to end (tiny steps), the table rebuilt from its JSON, and the bench
failing once its threshold is raised above what was measured; the checks' arithmetic."""

import json

import numpy as np
import pytest

from train import results
from train.result_rows import ROWS
from train.result_types import Check

from helpers import run_main


@pytest.mark.slow
def test_a_cheap_row_end_to_end_and_its_threshold_can_fail(tmp_path, monkeypatch, capsys):
    out, md, runs = tmp_path / "out", tmp_path / "RESULTS.md", tmp_path / "runs"
    argv = [
        "--row",
        "span_corruption",
        "--set",
        "steps=3",
        "--seeds",
        "2",
        "--out",
        str(out),
        "--results",
        str(md),
        "--workdir",
        str(runs),
    ]
    code, stdout, err = run_main(results, [*argv, "--threshold", "eval_loss_drop=0.001"], monkeypatch, capsys)
    assert code == 0, err
    r = json.loads((out / "span_corruption.json").read_text())
    drops = [s["eval_loss_before"] - s["eval_loss"] for s in r["per_seed"]]
    assert [s["steps"] for s in r["per_seed"]] == [3, 3] and all(d > 0 for d in drops)  # 3 steps already help
    mean = r["summary"]["eval_loss_drop"]["mean"]
    assert mean == pytest.approx(np.mean(drops)) and r["summary"]["eval_loss_drop"]["sd"] == pytest.approx(
        np.std(drops, ddof=1)
    )
    assert r["checks"][0]["passed"] and r["command"].endswith(
        "--set steps=3 --seeds 2 --threshold eval_loss_drop=0.001"
    )
    table = md.read_text()
    assert f"eval_loss_drop {results.fmt(mean)} ± " in table and "span_corruption" in table and "pass" in table
    # the same measurement (the runs are read back) with the threshold just above it: the bench fails
    code, _, err = run_main(results, [*argv, "--threshold", f"eval_loss_drop={mean + 1e-3}"], monkeypatch, capsys)
    assert code == 1 and "FAIL: span_corruption: eval_loss_drop" in err, err
    again = json.loads((out / "span_corruption.json").read_text())
    assert again["summary"] == r["summary"] and not again["passed"]
    assert "**FAIL**" in md.read_text() and md.read_text().count("| span_corruption |") == 1


def test_checks_flag_thresholds_the_measurement_does_not_support():
    summary = {"acc": {"mean": 0.60, "sd": 0.02}, "base": {"mean": 0.40, "sd": 0.01}}
    ok = results.check(Check("acc", 0.57, "base"), summary, 0.57)
    assert ok["passed"] and ok["within_2sd"] and ok["above_baseline"] and ok["baseline"] == 0.40
    low = results.check(Check("acc", 0.50, "base"), summary, 0.50)  # 5 sd below the mean
    assert low["passed"] and not low["within_2sd"]
    under = results.check(Check("acc", 0.35, "base"), summary, 0.35)  # below the baseline itself
    assert not under["above_baseline"]
    edge = results.check(Check("acc", 0.559, 0.0), summary, 0.559)  # 2 sd and 0.001 below: the
    assert edge["within_2sd"]  # table's 3 decimals
    assert not results.check(Check("acc", 0.558, 0.0), summary, 0.558)["within_2sd"]
    same = {"acc": {"mean": 0.2944, "sd": 0.0}}  # every seed alike
    assert results.check(Check("acc", 0.294, 0.0), same, 0.294)["within_2sd"]
    high = results.check(Check("acc", 0.61, 0.0), summary, 0.61)
    assert not high["passed"] and high["within_2sd"]
    loss = {"loss": {"mean": 2.0, "sd": 0.1}}  # lower is better
    assert results.check(Check("loss", 2.1, 3.0, higher=False), loss, 2.1)["passed"]
    assert not results.check(Check("loss", 1.9, 3.0, higher=False), loss, 1.9)["passed"]


def test_every_row_is_listed_with_its_checks_and_a_table_keeps_the_text_around_it(tmp_path, monkeypatch, capsys):
    code, out, _ = run_main(results, ["--list"], monkeypatch, capsys)
    assert code == 0 and all(name in out for name in ROWS)
    for row in ROWS.values():
        assert row.checks and set(c.figure for c in row.checks) <= set(row.shown), row.name
    md = tmp_path / "R.md"
    md.write_text(f"# mine\n\nabove\n\n{results.TABLE_START}\nstale-row\n{results.TABLE_END}\n\nbelow\n")
    results.write_table(str(md), {})
    text = md.read_text()
    assert text.startswith("# mine\n\nabove") and text.rstrip().endswith("below") and "stale-row" not in text
    assert text.count("not measured yet") == len(ROWS)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--row", "nope"], "--row: unknown row 'nope'"),
        (["--row", "kv_cache", "--set", "steps=3"], "--set steps: row kv_cache has no such option"),
        (["--row", "kv_cache", "--threshold", "bleu=3"], "--threshold bleu: row kv_cache checks speedup"),
        (["--row", "kv_cache", "--threshold", "speedup"], "--threshold: expected KEY=VALUE"),
        (["--config", "configs/gpt_tiny.yaml"], "--config: each row fixes its configs"),
    ],
)
def test_mistakes_are_one_line(argv, message, monkeypatch, capsys, tmp_path):
    code, _, err = run_main(
        results, [*argv, "--out", str(tmp_path / "o"), "--workdir", str(tmp_path / "w")], monkeypatch, capsys
    )
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "w").exists() and not (tmp_path / "o").exists()


def test_a_run_that_stopped_short_is_no_result():
    from train.result_rows import finished

    assert finished({"step": 10}, 10, "w") == {"step": 10}
    with pytest.raises(RuntimeError, match="w: stopped at step 10 of 1500; not a result"):
        finished({"step": 10}, 1500, "w")
