"""Benchmark a config's compiled train step (or forward pass), optionally against the same model in PyTorch.

    python -m train.bench --config configs/gpt2_small.yaml --set train.batch_size=8 --set model.dtype=bfloat16
    python -m train.bench --config configs/gpt2_small.yaml --compare torch [--compile] [--forward] [--min-ratio 1.0]
    python -m train.bench --config configs/gpt3_175b.yaml --abstract --devices 256 --set mesh.fsdp=256 [--require-fit]

Prints one JSON object on stdout (with --workdir also written to <workdir>/bench.json) and a
one-line summary on stderr. This file is the program (flags, checks, the JSON, the summary); the
pieces it runs read on their own:
  train/step_bench.py   our side: the jitted train step (forward + loss + backward + optimizer
                        update) or, `--forward`, the jitted `model.apply`, timed on a synthetic
                        batch (the median of `--steps` timed steps after a warm-up); and
                        `--pipeline`'s input pipeline timed alone
  train/flops.py        the model FLOPs formula, and the peak MFU is stated against
  train/torch_peer.py   `--compare torch`: the same model in PyTorch (Hugging Face `transformers`),
                        timed on the same batch; the JSON gains a `torch` object and
                        `speedup_vs_torch_eager` / `speedup_vs_torch_compile` (ours / torch,
                        tokens per second); `--min-ratio X` exits 1 when ours / torch eager < X

`--acceptance` runs what a lent accelerator should measure, in one command within `--budget-s`
(train/acceptance.py): GPT-2 small and medium train steps on both attention routes, the same in
PyTorch, KV-cache decoding; a table on stdout, the JSON in `--out`; `--tiny` on a CPU.

    python -m train.bench --acceptance [--out acceptance.json] [--budget-s 420] [--items NAME,...] [--tiny]

`--abstract` runs nothing: the train step's bytes per device (parameters, optimizer state, gradients,
an activation estimate) on `--devices` devices of the config's mesh, which need not exist, against
one device's memory (`--device-memory-gb`); `--require-fit` exits 1 when it does not fit. How it
counts: train/memory.py.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import numpy as np

from train import acceptance, cli, memory, step_bench, torch_peer
from train.step_bench import BenchError
from transformer_jax import config as config_lib
from transformer_jax import sharding as sh


def summary(result: dict) -> str:
    """One line for people: our tokens/s, then torch's and the ratios (or MFU without torch)."""
    parts = [f"jax {result['tokens_per_sec']:,.0f} tok/s"]
    tr = result.get("torch")
    if tr:
        parts.append(
            f"torch eager {tr['eager']['tokens_per_sec']:,.0f} tok/s ({result['speedup_vs_torch_eager']:.2f}x)"
        )
        if "compile" in tr:
            parts.append(
                f"torch.compile {tr['compile']['tokens_per_sec']:,.0f} tok/s "
                f"({result['speedup_vs_torch_compile']:.2f}x)"
            )
    if result["mfu"] is None:
        parts.append("MFU n/a (no model FLOPs formula for this family: model_flops_note)")
    else:
        parts.append(f"MFU {100 * result['mfu']:.1f}% of {result['peak_tflops']:g} TFLOP/s ({result['peak_source']})")
    if "pipeline" in result:
        data = result["pipeline"]
        parts.append(
            f"pipeline ({data['source']}, {data['workers']} workers) {data['tokens_per_sec']:,.0f} tok/s: "
            f"the {data['bottleneck']} is the bottleneck"
        )
    what = "forward" if result["mode"] == "forward" else "train step"
    return f"{result['config'] or 'bench'} {what}: " + " · ".join(parts)


RESULT_FILE = "bench.json"


def parser():
    p = cli.parser(
        __doc__.splitlines()[0],
        workdir=f"where the JSON result is also written ({RESULT_FILE}), and where --pipeline trains or "
        "finds its tokenizer (default there: runs/bench_pipeline); without it nothing is written",
    )
    p.add_argument("--steps", type=int, help="timed steps, median reported (default 10; --acceptance --tiny: 2)")
    p.add_argument("--forward", action="store_true", help="time the forward pass (inference) instead of the train step")
    p.add_argument("--compare", choices=["torch"], help="also time the same model in PyTorch (Hugging Face)")
    p.add_argument("--compile", action="store_true", help="with --compare torch: also time torch.compile(model)")
    p.add_argument("--min-ratio", type=float, help="exit 1 when ours / torch eager tokens/s is below this")
    p.add_argument(
        "--pipeline",
        type=int,
        nargs="?",
        const=400,
        metavar="BATCHES",
        help="also time the input pipeline alone (train.pretrain's, as configured: data.source, "
        "data.workers) over BATCHES batches (default 400), and say which is the bottleneck",
    )
    p.add_argument(
        "--abstract",
        action="store_true",
        help="run nothing: the train step's memory per device (params, optimizer state, gradients, "
        "activations) on --devices devices of the config's mesh, nothing allocated (train/memory.py)",
    )
    p.add_argument("--devices", type=int, help="with --abstract: the devices of the mesh (default: this machine's)")
    p.add_argument(
        "--device-memory-gb",
        type=float,
        dest="device_memory_gb",
        help=f"with --abstract: one device's memory in GB (1e9 bytes; default: the device's own on an "
        f"accelerator, else an H200's {memory.H200_GB})",
    )
    p.add_argument(
        "--require-fit",
        action="store_true",
        dest="require_fit",
        help="with --abstract: exit 1 when the estimate does not fit the device memory",
    )
    p.add_argument(
        "--acceptance",
        action="store_true",
        help="the measurements a lent accelerator should make, in one run (train/acceptance.py): "
        "a table on stdout, the JSON in --out; exit 1 when an item failed",
    )
    p.add_argument("--tiny", action="store_true", help="with --acceptance: gpt_tiny-sized models at T 64 (a CPU)")
    p.add_argument("--out", help=f"with --acceptance: the JSON (default {acceptance.DEFAULT_OUT})")
    p.add_argument(
        "--budget-s",
        type=float,
        dest="budget_s",
        help=f"with --acceptance: the items after this many seconds are 'skipped: budget' "
        f"(default {acceptance.DEFAULT_BUDGET_S:g})",
    )
    p.add_argument("--items", help="with --acceptance: only these items, comma-separated (default all)")
    return p


def abstract_run(args) -> tuple[dict, str | None]:
    """--abstract: (train/memory.py's estimate, None or the line saying why --require-fit failed)."""
    timing = [
        flag
        for flag, on in (
            ("--compare", args.compare),
            ("--forward", args.forward),
            ("--pipeline", args.pipeline),
            ("--compile", args.compile),
            ("--min-ratio", args.min_ratio is not None),
        )
        if on
    ]
    if timing:
        raise BenchError(f"{timing[0]}: --abstract runs nothing (it estimates memory); drop one of the two")
    devices = len(jax.devices()) if args.devices is None else args.devices
    if devices < 1:
        raise BenchError(f"--devices: {devices}, needs at least 1")
    if args.device_memory_gb is not None and args.device_memory_gb <= 0:
        raise BenchError(f"--device-memory-gb: {args.device_memory_gb:g}, needs a positive size")
    cfg, _ = cli.config_and_workdir(args)
    result = memory.estimate(cfg, devices, args.device_memory_gb)
    if args.require_fit and not result["fits"]:
        per = result["bytes_per_device"]
        return result, (
            f"--require-fit: {per['total'] / memory.GB:,.1f} GB per device does not fit in "
            f"{result['device_memory_bytes'] / memory.GB:,.1f} GB ({result['device_memory_source']})"
        )
    return result, None


def run(args, mesh=None) -> tuple[dict, str | None]:
    """(the JSON object, None or the line saying why --min-ratio failed) for parsed arguments."""
    acceptance_only = [
        flag
        for flag, on in (
            ("--tiny", args.tiny),
            ("--items", args.items),
            ("--out", args.out),
            ("--budget-s", args.budget_s is not None),
        )
        if on
    ]
    if acceptance_only:
        raise BenchError(f"{acceptance_only[0]} needs --acceptance")
    if args.abstract:
        return abstract_run(args)
    abstract_only = [
        flag
        for flag, on in (
            ("--devices", args.devices is not None),
            ("--require-fit", args.require_fit),
            ("--device-memory-gb", args.device_memory_gb is not None),
        )
        if on
    ]
    if abstract_only:
        raise BenchError(f"{abstract_only[0]} needs --abstract")
    steps = 10 if args.steps is None else args.steps
    if steps < 1:
        raise BenchError(f"--steps: {steps}, needs at least 1")
    if (args.compile or args.min_ratio is not None) and args.compare != "torch":
        raise BenchError(f"{'--compile' if args.compile else '--min-ratio'} needs --compare torch")
    cfg, _ = cli.config_and_workdir(args)
    if mesh is None:  # the mesh and batch split, before anything is built (a given mesh: bench() checks the batch)
        cli.check_mesh(cfg, jax.devices()[:1] if args.compare == "torch" else None)
    if args.compare == "torch":
        torch_peer.check_comparable(cfg, forward=args.forward)  # before the (long) JAX side: said at once
        mesh = mesh or sh.make_mesh(cfg.mesh, jax.devices()[:1])  # torch runs on one device: so do we
    if args.pipeline and not config_lib.is_text_objective(cfg.train.objective):
        raise BenchError(f"--pipeline: times train.pretrain's text pipeline; train.objective is {cfg.train.objective}")
    batch = step_bench.synthetic_batch(cfg, np.random.default_rng(0))
    result = step_bench.bench(cfg, steps, mesh, forward=args.forward, batch=batch)
    if args.pipeline:
        workdir = args.workdir or os.path.join("runs", "bench_pipeline")
        result["pipeline"] = data = step_bench.pipeline_bench(cfg, workdir, args.pipeline)
        # this process's pipeline feeds 1/process_count of the step's tokens
        data["step_tokens_per_sec_per_process"] = round(result["tokens_per_sec"] / jax.process_count(), 1)
        data["bottleneck"] = "pipeline" if data["tokens_per_sec"] < data["step_tokens_per_sec_per_process"] else "step"
    if args.compare != "torch":
        return result, None
    result["torch"] = tr = torch_peer.torch_bench(cfg, batch, steps, forward=args.forward, compile=args.compile)
    tr["params_match"] = tr["params"] == result["params_published"]
    result["speedup_vs_torch_eager"] = round(result["tokens_per_sec"] / tr["eager"]["tokens_per_sec"], 3)
    result["speedup_vs_torch_compile"] = (
        round(result["tokens_per_sec"] / tr["compile"]["tokens_per_sec"], 3) if "compile" in tr else None
    )
    if args.min_ratio is not None and result["speedup_vs_torch_eager"] < args.min_ratio:
        return result, (
            f"ours / torch eager = {result['speedup_vs_torch_eager']:.3f}x is below --min-ratio "
            f"{args.min_ratio:g} ({result['tokens_per_sec']:,.0f} vs {tr['eager']['tokens_per_sec']:,.0f} tok/s)"
        )
    return result, None


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    if args.acceptance:
        sys.exit(acceptance.run(args, argv))
    if args.compare == "torch":  # JAX must leave the GPU's memory to torch too
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    result, failure = run(args)
    print(json.dumps(result, indent=1), flush=True)
    if args.workdir and jax.process_index() == 0:
        os.makedirs(args.workdir, exist_ok=True)
        path = os.path.join(args.workdir, RESULT_FILE)
        with open(path + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
        os.replace(path + ".tmp", path)
    if result["mode"] == "abstract":
        print(memory.summary(result), file=sys.stderr)
        if failure:
            print(f"error: {failure}", file=sys.stderr)
            sys.exit(1)
        return
    tr = result.get("torch")
    if tr and not tr["params_match"]:
        print(
            f"warning: parameter counts differ: ours {result['params_published']:,} (published), "
            f"torch {tr['architecture']} {tr['params']:,}",
            file=sys.stderr,
        )
    print(summary(result), file=sys.stderr)
    if failure:
        print(f"error: {failure}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    cli.main(main)
