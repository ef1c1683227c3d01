"""`python -m train.bench --acceptance`: what a lent accelerator should measure, in one command.

GPT-2 small and medium (configs/gpt2_small.yaml, gpt2_medium.yaml: the published sizes) in
bfloat16 at T 1024, batch 16, dropout off, remat dots_saveable (gpt2_medium's file says `full`;
dots_saveable fits an 80 GB H100 with room to spare: `train.bench --abstract` gives 21 GB):
  <size>.jax_cudnn      our train step (train/step_bench.py), attention_impl cudnn
  <size>.jax_xla        the same, attention_impl xla
  <size>.torch          the same model in PyTorch (train/torch_peer.py: Hugging Face, SDPA, bf16
                        autocast, torch.compile), same batch
  <size>.decode         KV-cache greedy decoding (transformer_jax.decoding.generate), batch 8,
                        prompt 128, 256 new tokens, attention_impl xla
each with tokens/s, MFU against the peak of train/flops.py and the peak memory. `--tiny` runs
the same items on gpt_tiny-sized models at T 64 on a CPU (torch eager there: torch.compile
builds C++ for a minute on a CPU).

Each item runs in a process of its own (`python -m train.acceptance SPEC RESULT`): the device
allocator's peak is then the item's own, torch gets the whole GPU, and a hung compile can be
stopped. An item gets at most its guard (ITEM_GUARD_S) and what is left of `--budget-s`; at the
deadline the items left are "skipped: budget". The JSON (`--out`) is rewritten after every item,
so a killed run leaves what it measured. Exit status 1 when an item failed, else 0; an item the
backend cannot run (cudnn on a CPU) is "not applicable on cpu", not a failure.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback

# run in this order, the most wanted first: a budget that runs out cuts the end of the list
ORDER = (
    "gpt2_small.jax_cudnn",
    "gpt2_small.jax_xla",
    "gpt2_small.torch",
    "gpt2_medium.jax_cudnn",
    "gpt2_medium.torch",
    "gpt2_small.decode",
    "gpt2_medium.jax_xla",
    "gpt2_medium.decode",
)
ITEM_GUARD_S = {"jax_cudnn": 180, "jax_xla": 180, "torch": 240, "decode": 150}
TINY_GUARD_S = 120
DEFAULT_OUT, DEFAULT_BUDGET_S = "acceptance.json", 420.0
MIN_START_S = 20  # an item is not started with less of the budget left

COMMON = ["model.dtype=bfloat16", "model.dropout_rate=0", "model.attention_dropout_rate=0", "model.remat=dots_saveable"]


@dataclasses.dataclass(frozen=True)
class Scale:
    overrides: tuple[str, ...]  # the train step's batch and length
    decode: tuple[int, int, int]  # batch, prompt, new tokens
    warmup: int
    steps: int
    matmul: int  # the measured peak's matmul size (the CPU's peak; an accelerator's is nominal)


FULL = Scale(("train.batch_size=16", "data.seq_len=1024"), (8, 128, 256), warmup=3, steps=10, matmul=4096)
# a 4096 matmul takes 5 to 10 s on 2 busy cores: a tiny run's MFU is a smoke test, not a figure
TINY = Scale(("train.batch_size=4", "data.seq_len=64"), (2, 16, 32), warmup=1, steps=2, matmul=1024)
TINY_SIZES = {  # gpt_tiny-sized stand-ins, one a little larger than the other
    "gpt2_small": ["model.num_layers=2", "model.model_dim=64", "model.mlp_dim=256"],
    "gpt2_medium": ["model.num_layers=3", "model.model_dim=96", "model.mlp_dim=384"],
}
TINY_MODEL = ["model.num_heads=4", "model.vocab_size=512", "model.max_len=64"]


@dataclasses.dataclass(frozen=True)
class Spec:
    """What one item's process runs."""

    item: str
    overrides: list[str]  # the item's config overrides, the user's --set last
    steps: int
    warmup: int
    tiny: bool
    decode: list[int]  # batch, prompt, new tokens
    peak: dict  # train/flops.py's peaks(), measured once by the parent


def config_overrides(item: str, tiny: bool, user_sets: list[str]) -> list[str]:
    size, runner = item.split(".")
    impl = "cudnn" if runner == "jax_cudnn" else "xla"  # torch ignores it; decode: xla (over a KV cache)
    sizes = TINY_SIZES[size] + TINY_MODEL if tiny else []
    return COMMON + list((TINY if tiny else FULL).overrides) + sizes + [f"model.attention_impl={impl}"] + user_sets


def load(spec: Spec):
    from train import cli
    from transformer_jax.config import load_config

    size = spec.item.split(".")[0]
    return load_config(os.path.join(cli.REPO, "configs", f"{size}.yaml"), spec.overrides)


# ----------------------------------------------------------------------------- one item (its own process)
def run_jax(spec: Spec) -> dict:
    import jax

    from train import step_bench
    from transformer_jax import sharding as sh

    cfg = load(spec)
    result = step_bench.bench(
        cfg, spec.steps, sh.make_mesh(cfg.mesh, jax.devices()[:1]), warmup=spec.warmup, peak=spec.peak
    )
    keep = ("compile_s", "step_s", "step_s_range", "tokens_per_sec", "mfu", "peak_memory_bytes", "peak_memory_source")
    return {k: result[k] for k in keep} | {"batch": cfg.train.batch_size, "seq_len": cfg.data.seq_len, "bench": result}


def run_torch(spec: Spec) -> dict:
    import numpy as np

    from train import step_bench, torch_peer
    from train.flops import model_flops_per_example
    from transformer_jax import tasks
    from transformer_jax.models import abstract_build

    cfg = load(spec)
    batch = step_bench.synthetic_batch(cfg, np.random.default_rng(0))
    mode = "eager" if spec.tiny else "compile"
    tr = torch_peer.torch_bench(cfg, batch, spec.steps, compile=not spec.tiny, eager=spec.tiny, warmup=spec.warmup)
    timed = tr[mode]
    with_heads = tasks.get(cfg.train.objective).with_heads(cfg)  # the same model FLOPs as ours
    per_example = model_flops_per_example(with_heads, abstract_build(with_heads)[1], cfg.data.seq_len, 0)
    mfu = None if per_example is None else per_example / cfg.data.seq_len * timed["tokens_per_sec"] / spec.peak["peak"]
    return {
        "mode": f"torch {tr['torch_version']} {'eager' if spec.tiny else 'torch.compile'}, {tr['architecture']}, "
        f"attention {tr['attn_implementation']}, {tr['dtype']}"
        + (" (tiny: torch.compile would build C++ for a minute on a CPU)" if spec.tiny else ""),
        "compile_s": timed["warmup_s"],  # the warm-up steps, the first of which compiles
        "step_s": timed["step_s"],
        "step_s_range": timed["step_s_range"],
        "tokens_per_sec": timed["tokens_per_sec"],
        "mfu": None if mfu is None else round(mfu, 4),
        "peak_memory_bytes": timed.get("peak_memory_bytes"),
        "peak_memory_source": "torch.cuda.max_memory_allocated" if "peak_memory_bytes" in timed else "n/a on cpu",
        "batch": cfg.train.batch_size,
        "seq_len": cfg.data.seq_len,
        "torch": tr,
    }


def run_decode(spec: Spec) -> dict:
    import jax
    import numpy as np

    from train.step_bench import peak_memory, time_steps
    from transformer_jax.decoding import generate
    from transformer_jax.models import build

    cfg = load(spec)
    batch, prompt, new_tokens = spec.decode
    model, params = build(cfg, jax.random.key(0))
    ids = jax.numpy.asarray(np.random.default_rng(0).integers(7, cfg.model.vocab_size, (batch, prompt)), "int32")
    start = time.perf_counter()
    compiled = generate.lower(model, params, ids, max_new_tokens=new_tokens).compile()
    compile_s = time.perf_counter() - start
    run = lambda: jax.block_until_ready(compiled(params, ids))
    time_steps(run, spec.warmup)
    times = time_steps(run, max(spec.steps // 2, 1))  # each call is new_tokens steps already
    step_s = float(np.median(times))
    memory, source = peak_memory(compiled)
    return {
        "mode": f"greedy, KV cache, batch {batch}, prompt {prompt}, {new_tokens} new tokens (the prompt's prefill timed too)",
        "compile_s": round(compile_s, 2),
        "step_s": round(step_s, 5),
        "step_s_range": [round(min(times), 5), round(max(times), 5)],
        "tokens_per_sec": round(batch * new_tokens / step_s, 1),
        "mfu": None,
        "peak_memory_bytes": memory,
        "peak_memory_source": source,
        "batch": batch,
        "seq_len": prompt + new_tokens,
    }


RUN = {"jax_cudnn": run_jax, "jax_xla": run_jax, "torch": run_torch, "decode": run_decode}


def child_main(spec_json: str, result_path: str) -> None:
    spec = Spec(**json.loads(spec_json))
    try:
        out = {"status": "ok", "result": RUN[spec.item.split(".")[1]](spec)}
    except Exception as e:  # the item's failure, in one line: the parent records it and goes on
        traceback.print_exc()  # the whole of it in the log: a lent machine is seldom lent twice
        text = str(e).strip()
        out = {"status": "failed", "error": f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"}
    with open(result_path, "w") as f:
        json.dump(out, f)


# ----------------------------------------------------------------------------- the run (the parent)
def chosen_items(items: str | None) -> list[str]:
    from train.step_bench import BenchError

    names = [n.strip() for n in items.split(",")] if items else list(ORDER)
    unknown = [n for n in names if n not in ORDER]
    if unknown:
        raise BenchError(f"--items: {unknown[0]} is not an item; the items are {', '.join(ORDER)}")
    return [n for n in ORDER if n in names]


def check_flags(args) -> None:
    from train.step_bench import BenchError

    others = [
        flag
        for flag, on in (
            ("--config", args.config),
            ("--compare", args.compare),
            ("--forward", args.forward),
            ("--abstract", args.abstract),
            ("--pipeline", args.pipeline),
            ("--workdir", args.workdir),
            ("--compile", args.compile),
            ("--min-ratio", args.min_ratio is not None),
            ("--devices", args.devices is not None),
            ("--require-fit", args.require_fit),
            ("--device-memory-gb", args.device_memory_gb is not None),
        )
        if on
    ]
    if others:
        raise BenchError(f"{others[0]}: --acceptance runs its own items (train/acceptance.py); drop one of the two")
    if args.budget_s is not None and args.budget_s <= 0:
        raise BenchError(f"--budget-s: {args.budget_s:g}, needs a positive number of seconds")
    if args.steps is not None and args.steps < 1:
        raise BenchError(f"--steps: {args.steps}, needs at least 1")


def run_item(spec: Spec, timeout_s: float, env: dict) -> tuple[dict, bool]:
    """(the item's {'status', 'result' | 'error'}, whether it ran out of time) from its own process."""
    from train import cli

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "result.json")
        # an internal child, not a program: no `python -m train.acceptance` for users to find
        child = "import sys; from train.acceptance import child_main; child_main(*sys.argv[1:])"
        command = [sys.executable, "-c", child, json.dumps(dataclasses.asdict(spec)), path]
        # its stdout joins our stderr (stdout is the table); its own session, so that a timeout
        # also stops the compile workers it started (torch inductor's)
        proc = subprocess.Popen(command, cwd=cli.REPO, env=env, stdout=2, start_new_session=True)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return {"status": "failed", "error": f"stopped after {round(timeout_s, 1):g} s"}, True
        if not os.path.exists(path):
            return {"status": "failed", "error": f"its process exited with code {proc.returncode} and no result"}, False
        with open(path) as f:
            return json.load(f), False


def write(report: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    os.replace(path + ".tmp", path)


def run(args, argv: list[str]) -> int:
    """Every chosen item, the JSON after each, the table on stdout: 1 when an item failed, else 0."""
    from train import cli, flops

    check_flags(args)
    budget_s = DEFAULT_BUDGET_S if args.budget_s is None else args.budget_s
    out_path = args.out or DEFAULT_OUT
    names = chosen_items(args.items)
    cli.check_keys(args.overrides)  # a misspelt --set key: one line, before anything runs
    env = dict(os.environ)  # the items' environment, before this process sets its own
    os.environ.setdefault("XLA_PYTHON_CLIENT_ALLOCATOR", "platform")  # this process holds no GPU pool
    import jax

    start, backend = time.monotonic(), jax.default_backend()
    scale = TINY if args.tiny else FULL
    print(f"acceptance: {len(names)} items on {jax.devices()[0].device_kind}, budget {budget_s:g} s", file=sys.stderr)
    report = {
        "command": "python -m train.bench " + " ".join(argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "backend": backend,
        "device_kind": jax.devices()[0].device_kind,
        "jax_version": jax.__version__,
        "tiny": args.tiny,
        "budget_s": budget_s,
        "peak": flops.peaks(scale.matmul),
        "settings": settings(scale, args),
        "items": [],
    }
    for i, name in enumerate(names):
        runner = name.split(".")[1]
        left = budget_s - (time.monotonic() - start)
        entry: dict = {"item": name}
        if runner == "jax_cudnn" and backend != "gpu":
            entry["status"] = f"not applicable on {backend}"
        elif left < MIN_START_S:
            entry["status"] = "skipped: budget"
        else:
            guard = TINY_GUARD_S if args.tiny else ITEM_GUARD_S[runner]
            spec = Spec(
                item=name,
                overrides=config_overrides(name, args.tiny, args.overrides),
                steps=scale.steps if args.steps is None else args.steps,
                warmup=scale.warmup,
                tiny=args.tiny,
                decode=list(scale.decode),
                peak=report["peak"],
            )
            print(f"[{i + 1}/{len(names)}] {name} (at most {min(guard, left):.0f} s)", file=sys.stderr, flush=True)
            item_env = env | {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"} if runner == "torch" else env
            t0 = time.monotonic()
            out, timed_out = run_item(spec, min(guard, left), item_env)
            entry |= out | {"wall_s": round(time.monotonic() - t0, 1), "overrides": spec.overrides}
            if timed_out and left < guard:  # the deadline stopped it, not its own guard
                entry["status"] = "skipped: budget"
            if "torch" in entry.get("result", {}):
                report["torch_version"] = entry["result"]["torch"]["torch_version"]
        report["items"].append(entry)
        report["elapsed_s"] = round(time.monotonic() - start, 1)
        write(report, out_path)
        print(f"    {name}: {line(entry)}", file=sys.stderr, flush=True)
    report["failed"] = [e["item"] for e in report["items"] if e["status"] == "failed"]
    write(report, out_path)
    print(table(report), flush=True)
    return 1 if report["failed"] else 0


# ----------------------------------------------------------------------------- the table
def settings(scale: Scale, args) -> str:
    batch, prompt, new_tokens = scale.decode
    steps = scale.steps if args.steps is None else args.steps
    return (
        f"{', '.join(COMMON + list(scale.overrides) + args.overrides)}; "
        f"train steps: {scale.warmup} warm-up + {steps} timed (median); "
        f"decode: batch {batch}, prompt {prompt}, {new_tokens} new tokens, attention xla"
    )


MEMORY_LABEL = {"torch.cuda.max_memory_allocated": "torch", "n/a on cpu": "n/a"}


def memory_text(r: dict) -> str:
    if r.get("peak_memory_bytes") is None:
        return "n/a"
    source, size = r["peak_memory_source"], r["peak_memory_bytes"]
    label = MEMORY_LABEL.get(source) or ("device" if source.startswith("device") else "compiled")
    return (f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB") + f" ({label})"


def line(entry: dict) -> str:
    if entry["status"] != "ok":
        return entry["status"] + (f": {entry['error']}" if "error" in entry else "")
    r = entry["result"]
    mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    return f"{r['tokens_per_sec']:,.0f} tok/s, MFU {mfu}, peak memory {memory_text(r)}, {entry['wall_s']} s"


def table(report: dict) -> str:
    peak = report["peak"]
    rows = [
        f"acceptance on {report['device_kind']} ({report['backend']}), jax {report['jax_version']}, "
        f"torch {report.get('torch_version', 'n/a')}{', tiny' if report['tiny'] else ''}; "
        f"MFU against {peak['peak'] / 1e12:.3g} TFLOP/s ({peak['peak_source']})",
        report["settings"],
        "| item | status | batch x T | tokens/s | MFU | peak memory | compile s | wall s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    notes = []
    for e in report["items"]:
        r = e.get("result")
        if r is None:
            rows.append(f"| {e['item']} | {e['status']} | | | | | | {e.get('wall_s', '')} |")
            if "error" in e:
                notes.append(f"{e['item']}: {e['error']}")
            continue
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        rows.append(
            f"| {e['item']} | ok | {r['batch']} x {r['seq_len']} | {r['tokens_per_sec']:,.0f} | {mfu} | "
            f"{memory_text(r)} | {r['compile_s']} | {e['wall_s']} |"
        )
        if "mode" in r:
            notes.append(f"{e['item']}: {r['mode']}")
    sources = sorted({e["result"]["peak_memory_source"] for e in report["items"] if "result" in e})
    notes += [f"peak memory: {s}" for s in sources]
    return "\n".join(rows + notes + [f"elapsed {report['elapsed_s']} s of a {report['budget_s']:g} s budget"])
