"""Entry point of the tests' real processes: `python tests/_worker.py MODULE ARGS...` runs
`python -m MODULE ARGS` (the program's own `main`, `cli.init_distributed` included), then prints
one line `WORKER {json}`: this process's index, the process count, its devices.

Test hooks, set through the environment, act where a pod's faults would:
  TJ_TEST_BATCH_HASHES=DIR     each process appends `{"step", "hash"}` of every local batch it
                               trains on to DIR/batches_<process>.jsonl
  TJ_TEST_SIGNAL=STEP:PROC:SIG process PROC sends itself signal SIG (TERM, INT) when it draws the
                               batch of step STEP
  TJ_TEST_SLOW_SAVE=STEP       the save of step STEP stalls in its async write (so it can be killed)
  TJ_TEST_SAVE_ERROR=STEP      the save of step STEP fails with ENOSPC, as on a full disk
"""

import errno
import hashlib
import json
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from train import cli, trainer  # noqa: E402


def batch_hash(batch: dict) -> str:
    digest = hashlib.sha256()
    for key in sorted(batch):
        digest.update(key.encode())
        digest.update(batch[key].tobytes())
    return digest.hexdigest()[:16]


class Watched:
    """The batches the trainer is handed (after its read-ahead), passed through unchanged; records
    hashes and fires signals. The step count starts where the trainer's restored state says
    (`init_state` is watched too)."""

    def __init__(self):
        import jax

        self.step, self.process = 0, jax.process_index()
        directory = os.environ.get("TJ_TEST_BATCH_HASHES")
        self.log = open(os.path.join(directory, f"batches_{self.process}.jsonl"), "a") if directory else None
        self.signal = None
        if os.environ.get("TJ_TEST_SIGNAL"):
            step, process, name = os.environ["TJ_TEST_SIGNAL"].split(":")
            if int(process) == self.process:
                self.signal = (int(step), getattr(signal, f"SIG{name}"))

    def saw(self, batch):
        self.step += 1
        if self.log:
            self.log.write(json.dumps({"step": self.step, "hash": batch_hash(batch)}) + "\n")
            self.log.flush()
        if self.signal and self.signal[0] == self.step:
            print(
                f"TEST: process {self.process} sends itself {self.signal[1].name} at step {self.step} "
                f"time {time.time()}",
                flush=True,
            )
            os.kill(os.getpid(), self.signal[1])


def install_hooks() -> None:
    real_run, real_init_state = trainer.run, trainer.init_state
    watching = []

    def run(cfg, workdir, task, **kw):
        watching.append(Watched())
        return real_run(cfg, workdir, task, **kw)

    class WatchedPrefetch(trainer.DevicePrefetch):
        def __next__(self):
            local, batch = super().__next__()
            watching[-1].saw(local)
            return local, batch

    trainer.DevicePrefetch = WatchedPrefetch

    def init_state(*args, **kw):
        sharded, restored = real_init_state(*args, **kw)
        if watching:
            watching[-1].step = int(sharded.state["step"])
        return sharded, restored

    trainer.run, trainer.init_state = run, init_state

    if os.environ.get("TJ_TEST_SLOW_SAVE"):
        import orbax.checkpoint as ocp

        slow = int(os.environ["TJ_TEST_SLOW_SAVE"])
        real_finalize = ocp.CheckpointManager._finalize

        def finalize(self, step, *args, **kwargs):
            if step == slow:
                print(f"TEST: the async save of step {step} stalls before its commit", flush=True)
                time.sleep(600)
            return real_finalize(self, step, *args, **kwargs)

        ocp.CheckpointManager._finalize = finalize

    if os.environ.get("TJ_TEST_SAVE_ERROR"):
        import grain.checkpoint

        failing = os.environ["TJ_TEST_SAVE_ERROR"]
        real_save = grain.checkpoint.CheckpointHandler.save

        def save(self, directory, *args, **kwargs):
            if any(part.split(".")[0] == failing for part in str(directory).split(os.sep)):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
            return real_save(self, directory, *args, **kwargs)

        grain.checkpoint.CheckpointHandler.save = save


def main() -> None:
    module, sys.argv = sys.argv[1], [sys.argv[1], *sys.argv[2:]]
    install_hooks()
    program = __import__(module, fromlist=["main"])
    cli.main(program.main)
    import jax

    print(
        "WORKER "
        + json.dumps(
            {
                "process_index": jax.process_index(),
                "process_count": jax.process_count(),
                "local_devices": jax.local_device_count(),
                "devices": jax.device_count(),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
