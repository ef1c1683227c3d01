"""Running a program as N real local processes of one `jax.distributed` run (gloo CPU collectives),
as a pod does: `launch` starts them through `_worker.py`, `finish` waits and collects their output."""

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time

from helpers import FAST_COMPILE, REPO

WORKER = os.path.join(REPO, "tests", "_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(devices_per_process: int = 1) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_", "OMPI_", "TJ_TEST_"))}
    flags = FAST_COMPILE + (
        f" --xla_force_host_platform_device_count={devices_per_process}" if devices_per_process > 1 else ""
    )
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=flags, PYTHONUNBUFFERED="1")
    return env


@dataclasses.dataclass
class Process:
    popen: subprocess.Popen
    log_path: str
    started: float
    ended: float | None = None  # time.time() when it was seen to exit

    @property
    def output(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    @property
    def returncode(self):
        return self.popen.returncode

    def worker_report(self) -> dict:
        """What `_worker.py` printed on its `WORKER {json}` line (process index, count, devices)."""
        line = next(line for line in self.output.splitlines() if line.startswith("WORKER "))
        return json.loads(line[len("WORKER ") :])


def launch(
    module: str,
    args,
    log_dir,
    *,
    processes: int = 2,
    devices_per_process: int = 1,
    env: dict | None = None,
    per_process_env=None,
    coordinator: bool = True,
) -> list[Process]:
    """Start `processes` copies of `python -m module args` (through `_worker.py`). With `coordinator`,
    each gets `--set distributed.*` naming a fresh local address; `per_process_env(i)` adds
    variables to process i's environment (SLURM-style launches use that instead)."""
    address = f"127.0.0.1:{free_port()}"
    started = []
    for i in range(processes):
        extra = (
            [
                "--set",
                f"distributed.coordinator_address={address}",
                "--set",
                f"distributed.num_processes={processes}",
                "--set",
                f"distributed.process_id={i}",
            ]
            if coordinator
            else []
        )
        process_env = {
            **base_env(devices_per_process),
            **(env or {}),
            **(per_process_env(i) if per_process_env else {}),
        }
        log_path = os.path.join(str(log_dir), f"process_{i}.log")
        log = open(log_path, "w")
        popen = subprocess.Popen(
            [sys.executable, WORKER, module, *args, *extra],
            cwd=REPO,
            env=process_env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        started.append(Process(popen, log_path, time.time()))
    return started


def finish(procs: list[Process], timeout: float = 300) -> list[Process]:
    """Wait for every process (killing all of them past `timeout`), then return them."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and any(p.ended is None for p in procs):
            for p in procs:
                if p.ended is None and p.popen.poll() is not None:
                    p.ended = time.time()
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.popen.poll() is None:
                p.popen.kill()
                p.popen.wait()
    return procs


def run(module: str, args, log_dir, *, timeout: float = 300, check: bool = True, **kw) -> list[Process]:
    procs = finish(launch(module, args, log_dir, **kw), timeout)
    if check:
        for i, p in enumerate(procs):
            assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{p.output[-4000:]}"
    return procs
