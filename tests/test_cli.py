"""train.cli: --set keys checked against the schema alone and, on a checkpoint, to runtime keys;
init_distributed: distributed.mode auto / on / off over jax's own cluster detection (faked
`jax.distributed.initialize` in-process), and a real 2-process `train.pretrain` launched with
SLURM's environment variables only. The flags every program shares: tests/test_contract.py."""

import os
import random
import socket

import jax
import pytest

from train import cli
from transformer_jax.config import ConfigError, load_config

import multiprocess
from helpers import FAST_COMPILE, REPO, sets

TINY = (
    "model.num_layers=1",
    "model.model_dim=64",
    "model.num_heads=4",
    "model.mlp_dim=128",
    "model.vocab_size=512",
    "model.max_len=32",
    "data.seq_len=32",
    "data.max_documents=40",
    "train.batch_size=8",
    "train.steps=2",
    "train.eval_every=0",
)
CLUSTER_VARS = (
    "SLURM_",
    "OMPI_",
    "JAX_COORDINATOR",
    "JAX_NUM_PROCESSES",
    "JAX_PROCESS_ID",
    "TPU_",
    "MEGASCALE_",
    "KUBERNETES_",
    "JOB_COMPLETION_INDEX",
)


def test_keys_are_checked_against_the_schema_alone():
    cli.check_keys(["model.num_heads=4", "translate.beam_size=2", "mesh.data=-1", "model.heads=[mlm]"])
    with pytest.raises(ConfigError, match=r"^model\.num_head: unknown key \(did you mean model\.num_heads\?\)$"):
        cli.check_keys(["train.steps=2", "model.num_head=3"])
    with pytest.raises(ConfigError, match=r"^translate\.beam_size: expected an integer"):
        cli.check_keys(["translate.beam_size=wide"])


def test_a_checkpoint_takes_runtime_keys_only():
    cli.check_runtime_keys(
        [
            "model.dtype=bfloat16",
            "model.attention_impl=xla",
            "translate.alpha=1.0",
            "data.seq_len=8",
            "train.batch_size=4",
        ]
    )
    for override in ("model.num_layers=2", "model.vocab_size=9", "data.tokenizer=x.model", "model={}"):
        key = override.split("=")[0]
        with pytest.raises(ConfigError, match=rf"^{key}: fixed by the model of --checkpoint; .*model\.dtype"):
            cli.check_runtime_keys(["translate.alpha=1.0", override])


def test_the_mesh_is_checked_against_the_devices():
    cli.check_mesh(load_config(None, ["mesh.fsdp=2", "train.batch_size=8"]))
    with pytest.raises(ConfigError, match=r"^mesh: data\*fsdp\*sequence\*tensor = 3 but there are 8 devices$"):
        cli.check_mesh(load_config(None, ["mesh.data=3"]))
    with pytest.raises(ConfigError, match=r"^train\.batch_size: micro-batches of 4 do not split over data\*fsdp = 8"):
        cli.check_mesh(load_config(None, ["train.batch_size=4"]))
    cli.check_mesh(load_config(None, ["train.batch_size=4"]), jax.devices()[:1])


def slurm_env(process: int, tasks: int, job_id: int = 12345) -> dict:
    return {
        "SLURM_JOB_ID": str(job_id),
        "SLURM_STEP_NODELIST": "localhost",
        "SLURM_NTASKS": str(tasks),
        "SLURM_PROCID": str(process),
        "SLURM_LOCALID": str(process),
    }


@pytest.fixture
def fake(monkeypatch):
    """A plain machine's environment; records jax.distributed.initialize calls and config updates."""
    for key in list(os.environ):
        if key.startswith(CLUSTER_VARS):
            monkeypatch.delenv(key)
    recorded = {"calls": [], "updates": {}}
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: recorded["calls"].append(kw))
    monkeypatch.setattr(jax.config, "update", lambda key, value: recorded["updates"].__setitem__(key, value))

    def offline(*args, **kwargs):
        raise AssertionError("cluster detection went to the network")

    for name in ("getaddrinfo", "gethostbyname", "create_connection"):
        monkeypatch.setattr(socket, name, offline)
    return recorded


def init(*overrides):
    cli.init_distributed(load_config(None, list(overrides)))


def test_plain_machine_is_one_process_without_initialize(fake):
    assert cli.detect_cluster() is None
    init()
    assert fake["calls"] == [] and fake["updates"] == {}


def test_off_never_initializes_even_under_slurm(fake, monkeypatch):
    for key, value in slurm_env(0, 2).items():
        monkeypatch.setenv(key, value)
    init("distributed.mode=off")
    init("distributed.mode=off", "distributed.coordinator_address=10.0.0.1:1234")
    assert fake["calls"] == []


def test_auto_initializes_under_a_multi_task_slurm_step(fake, monkeypatch, capsys):
    for key, value in slurm_env(0, 2).items():
        monkeypatch.setenv(key, value)
    assert cli.detect_cluster().__name__ == "SlurmCluster"
    init()
    assert fake["calls"] == [{"coordinator_address": None, "num_processes": None, "process_id": None}]
    assert fake["updates"] == {"jax_cpu_collectives_implementation": "gloo"}
    assert capsys.readouterr().out.startswith("distributed: SLURM, ")


def test_auto_skips_a_single_task_slurm_step_and_on_does_not(fake, monkeypatch):
    for key, value in slurm_env(0, 1).items():
        monkeypatch.setenv(key, value)
    init()
    assert fake["calls"] == []
    init("distributed.mode=on")
    assert len(fake["calls"]) == 1


def test_explicit_keys_win_over_detection(fake, monkeypatch, capsys):
    for key, value in slurm_env(0, 2).items():
        monkeypatch.setenv(key, value)
    init("distributed.coordinator_address=10.0.0.1:1234", "distributed.num_processes=4", "distributed.process_id=3")
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.2:99")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "8")
    init("distributed.process_id=5")
    assert fake["calls"] == [
        {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3},
        {"coordinator_address": "10.0.0.2:99", "num_processes": 8, "process_id": 5},
    ]
    assert "distributed: coordinator 10.0.0.1:1234, " in capsys.readouterr().out


def test_on_without_a_cluster_is_one_line(fake, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(lambda: init("distributed.mode=on"))
    assert exit_.value.code == 2 and fake["calls"] == []
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: distributed: no coordinator: no cluster was detected")


def test_a_failing_initialize_is_one_line(fake, monkeypatch):
    for key, value in slurm_env(1, 2).items():
        monkeypatch.setenv(key, value)

    def fail(**kw):
        raise RuntimeError("DEADLINE_EXCEEDED: Barrier timed out\nmore detail")

    monkeypatch.setattr(jax.distributed, "initialize", fail)
    with pytest.raises(
        ConfigError,
        match=r"^distributed: initialization via SLURM failed: DEADLINE_EXCEEDED: "
        r"Barrier timed out$",
    ):
        init()


def free_slurm_job_id() -> int:
    """A job id whose coordinator port (jax: 61440 + job_id % 4096) is free here."""
    for port in random.sample(range(61440, 65536), 4096):
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
        return 4096 * 9 + port - 61440
    raise RuntimeError("no free port in 61440-65535")


@pytest.mark.slow
def test_two_processes_join_from_slurm_variables_alone(tokenizer_path, tmp_path):
    workdir = tmp_path / "run"
    job_id = free_slurm_job_id()
    args = [
        "--config",
        os.path.join(REPO, "configs", "gpt_tiny.yaml"),
        "--workdir",
        str(workdir),
        *sets([*TINY, f"data.tokenizer={tokenizer_path}"]),
    ]
    # what is checked is the join, not the run's speed or figures: XLA's optimisation level 0 roughly
    # halves the compile that dominates each process's two steps (as test_docs does for the pages)
    procs = multiprocess.run(
        "train.pretrain",
        args,
        tmp_path,
        coordinator=False,
        env={"XLA_FLAGS": FAST_COMPILE},
        per_process_env=lambda i: slurm_env(i, 2, job_id),
    )
    assert [(r["process_index"], r["process_count"]) for r in (p.worker_report() for p in procs)] == [(0, 2), (1, 2)]
    assert "distributed: SLURM, 2 processes" in procs[0].output
    assert "distributed:" not in procs[1].output
