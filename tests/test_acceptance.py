"""`python -m train.bench --acceptance` (train/acceptance.py): every item in the JSON with its figures,
the table on stdout, cudnn not applicable on a CPU, a failing item recorded and the exit status 1,
the budget and the per-item guard; and the nominal peaks of the accelerators it is meant for."""

import json
import os
import subprocess
import sys

import pytest

from train import acceptance, bench, cli, flops


def test_nominal_peaks_of_the_lent_accelerators():
    """jax's device_kind strings of an H100 SXM (the lent kind), an H200 and a PCIe H100."""
    assert flops.nominal_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert flops.nominal_peak("NVIDIA H200") == 989e12
    assert flops.nominal_peak("NVIDIA H100 PCIe") == 756e12
    assert flops.nominal_peak("cpu") is None


@pytest.mark.slow
def test_tiny_acceptance_measures_every_item(tmp_path):
    out = tmp_path / "acceptance.json"
    run = subprocess.run(
        [sys.executable, "-m", "train.bench", "--acceptance", "--tiny", "--out", str(out)],
        cwd=cli.REPO,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    items = {e["item"]: e for e in report["items"]}
    assert list(items) == list(acceptance.ORDER) and report["failed"] == [] and report["backend"] == "cpu"
    assert report["peak"]["peak_source"] == "measured matmul 1024x1024 float32" and report["torch_version"]
    for name, entry in items.items():
        if name.endswith(".jax_cudnn"):
            assert entry["status"] == "not applicable on cpu" and "result" not in entry
            continue
        assert entry["status"] == "ok", entry
        result = entry["result"]
        assert result["tokens_per_sec"] > 0 and result["step_s"] > 0 and entry["wall_s"] > 0
        if name.endswith(".decode"):
            assert result["mfu"] is None and result["seq_len"] == 16 + 32 and result["batch"] == 2
        else:
            assert 0 < result["mfu"] < 1 and (result["batch"], result["seq_len"]) == (4, 64)
        if name.endswith(".torch"):
            assert result["peak_memory_source"] == "n/a on cpu" and "eager" in result["mode"]
        else:
            assert result["peak_memory_bytes"] > 0 and result["peak_memory_source"].startswith("compiled")
    # the larger stand-in is larger on both sides
    small, medium = items["gpt2_small.jax_xla"]["result"], items["gpt2_medium.jax_xla"]["result"]
    assert medium["bench"]["params_published"] > small["bench"]["params_published"]
    assert items["gpt2_medium.torch"]["result"]["torch"]["params"] == medium["bench"]["params_published"]
    table = run.stdout
    assert table.startswith("acceptance on cpu") and "| gpt2_medium.decode | ok | 2 x 48 |" in table
    assert "| gpt2_small.jax_cudnn | not applicable on cpu |" in table and "eager" in table
    assert "[8/8] gpt2_medium.decode" in run.stderr


@pytest.mark.slow
def test_failing_item_makes_the_exit_status_1_and_the_budget_skips(tmp_path, capsys, monkeypatch):
    """Rotary positions have no Hugging Face GPT-2: the torch item fails in one line, recorded in the
    JSON beside the items that ran; a budget too short to start an item skips it, and that is no
    failure; the per-item guard stops a process that runs past it."""
    monkeypatch.delenv("XLA_PYTHON_CLIENT_ALLOCATOR", raising=False)  # restored after: run() sets it
    out = tmp_path / "acceptance.json"
    argv = ["--acceptance", "--tiny", "--out", str(out), "--set", "model.position=rotary"]
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv + ["--items", "gpt2_small.jax_cudnn,gpt2_small.torch"])
    assert exit_info.value.code == 1
    report = json.loads(out.read_text())
    assert report["failed"] == ["gpt2_small.torch"]
    cudnn, torch_item = report["items"]
    assert cudnn["status"] == "not applicable on cpu"
    assert torch_item["status"] == "failed" and "rotary" in torch_item["error"] and "\n" not in torch_item["error"]
    assert "model.position=rotary" in torch_item["overrides"]
    assert "| gpt2_small.torch | failed |" in capsys.readouterr().out

    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--acceptance", "--tiny", "--out", str(out), "--budget-s", "1", "--items", "gpt2_medium.decode"])
    assert exit_info.value.code == 0
    assert json.loads(out.read_text())["items"] == [{"item": "gpt2_medium.decode", "status": "skipped: budget"}]

    spec = acceptance.Spec(
        item="gpt2_small.jax_xla",
        overrides=acceptance.config_overrides("gpt2_small.jax_xla", True, []),
        steps=1,
        warmup=1,
        tiny=True,
        decode=[2, 16, 32],
        peak=report["peak"],
    )
    result, timed_out = acceptance.run_item(spec, 0.5, dict(os.environ))
    assert timed_out and result == {"status": "failed", "error": "stopped after 0.5 s"}


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--acceptance", "--compare", "torch"], "--compare: --acceptance runs its own items"),
        (["--acceptance", "--items", "gpt2_large.jax_xla"], "--items: gpt2_large.jax_xla is not an item"),
        (["--acceptance", "--set", "model.no_such_key=1"], "no_such_key"),
        (["--tiny"], "--tiny needs --acceptance"),
        (["--budget-s", "10"], "--budget-s needs --acceptance"),
    ],
)
def test_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(lambda: bench.main(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err, err
