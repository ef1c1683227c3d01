"""What several test files share: the repository root and running a program as a user does."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST_COMPILE = "--xla_backend_optimization_level=0"  # what the tests' own process runs with (conftest.py)


def run_program(module: str, args, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m <module> <args>` from the repository root, on one CPU device."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=FAST_COMPILE)
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def run_main(module, argv, monkeypatch, capsys, stdin: str | None = None) -> tuple[int, str, str]:
    """`python -m train.<module> <argv>` in this process, as `cli.main` runs it: (exit code, stdout,
    stderr). `module` is the program's module (or its main function)."""
    import io

    from train import cli

    main = getattr(module, "main", module)
    monkeypatch.setattr(sys, "argv", [getattr(module, "__name__", "prog"), *argv])
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = 0
    try:
        cli.main(main)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


def checkpoint_steps(workdir) -> list[int]:
    """The steps of the checkpoints in `workdir`/checkpoints, as Orbax lists them."""
    from transformer_jax.checkpoint import Checkpointer

    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"))
    try:
        return checkpointer.all_steps()
    finally:
        checkpointer.close()


def sets(overrides):
    """`--set` flags for a list of `key=value` overrides."""
    return [a for o in overrides for a in ("--set", o)]


def assert_same_outputs_and_grads(ours, theirs, q, k, v, probe, atol: float = 1e-5):
    """ours(q, k, v) and theirs(q, k, v) agree within atol, and so do the gradients of <out, probe>
    with respect to q, k and v. Returns ours' output."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    run = jax.jit(
        lambda f, q, k, v: (f(q, k, v), jax.grad(lambda *a: jnp.sum(f(*a) * probe), (0, 1, 2))(q, k, v)),
        static_argnums=0,
    )
    (got, got_grads), (want, want_grads) = run(ours, q, k, v), run(theirs, q, k, v)
    np.testing.assert_allclose(got, want, atol=atol, rtol=0)
    for a, b in zip(got_grads, want_grads):
        np.testing.assert_allclose(a, b, atol=atol, rtol=0)
    return got
