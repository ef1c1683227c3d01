"""Convert between a local Hugging Face model directory and one of our workdirs.

    python -m train.convert --from-hf HF_DIR --workdir WORKDIR      # config.yaml, params/, tokenizer files
    python -m train.convert --checkpoint WORKDIR --to-hf HF_DIR     # model.safetensors + config.json

Exporting reads WORKDIR's params/ where it has one, else its latest checkpoint (a pretraining run).
WORKDIR then serves `train.finetune --init_from WORKDIR` and `--config WORKDIR/config.yaml`.
Importing, `--config FILE` gives the written config's other sections (data, train, ...) and `--set
key=value` overrides it (e.g. --set train.steps=100); exporting, `--set` goes on top of the
workdir's config.yaml. Either way the weights fix the model: `--set` of a key that changes the
parameters (model.num_layers, ...) is refused; runtime ones (model.dtype, ...) are not.
`--architecture` picks the Hugging Face class to write (default from the model's family and heads).
Nothing is downloaded: HF_DIR must be a local directory. (`--to WORKDIR` and `--from WORKDIR`
are the older spellings of --workdir and --checkpoint.)
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence

from train import cli


def import_hf(hf_dir: str, workdir: str, config_file: str | None, overrides: list[str]) -> None:
    from transformer_jax import checkpoint, hf
    from transformer_jax.config import config_from_dict, load_config, save_config, to_dict
    from transformer_jax.tasks import init_from

    model, params = hf.from_pretrained(hf_dir)
    mcfg = model.cfg
    base = to_dict(load_config(config_file)) if config_file else {}
    base["model"] = to_dict(mcfg)  # dataclasses.asdict with lists for tuples
    base.setdefault("train", {})["objective"] = init_from.default_objective(mcfg)
    data = base.setdefault("data", {})
    if mcfg.position == "learned":  # the default sequence length must fit the imported position table
        data["seq_len"] = min(int(data.get("seq_len", 128)), mcfg.max_len)
    base.setdefault("name", os.path.basename(os.path.normpath(hf_dir)))
    cfg = config_from_dict(base, overrides)
    os.makedirs(workdir, exist_ok=True)
    save_config(cfg, os.path.join(workdir, "config.yaml"))
    checkpoint.save_params(os.path.join(workdir, "params"), params)
    init_from.keep_tokenizer(None, workdir, init_from.Source("hf", hf_dir))
    print(
        f"imported {hf_dir} ({mcfg.family}, {sum(1 for _ in _leaves(params))} tensors, "
        f"{parameter_counts(model, params)}) into {workdir}"
    )


def _leaves(tree):
    import jax

    return jax.tree.leaves(tree)


def parameter_counts(model, params) -> str:
    """'N parameters' as published (the real vocabulary), and the count with the vocabulary padded to
    a multiple of model.vocab_multiple (what our arrays hold) where that differs."""
    import transformer_jax as tj

    published, padded = tj.published_params(model, params), tj.count_params(params)
    if padded == published:
        return f"{published:,} parameters"
    cfg = model.cfg
    return (
        f"{published:,} parameters; {padded:,} with the vocabulary {cfg.vocab_size} padded to "
        f"{cfg.padded_vocab_size} (model.vocab_multiple={cfg.vocab_multiple})"
    )


def export_hf(workdir: str, hf_dir: str, architecture: str | None = None, overrides: Sequence[str] = ()) -> None:
    """Our workdir -> a Hugging Face directory: its params/ (an import, or train.finetune's best
    weights), else the latest checkpoint's parameters (a pretraining run); its tokenizer files."""
    import transformer_jax as tj
    from transformer_jax import checkpoint, runs

    cfg = cli.checkpoint_config(workdir, overrides)
    model, abstract = tj.abstract_build(cfg)
    params_dir = os.path.join(workdir, "params")
    if os.path.isdir(params_dir):
        params = checkpoint.load_params(params_dir, abstract)
    else:
        params = runs.restore_params(workdir, abstract)
    write_hf(model, params, workdir, hf_dir, architecture)


def write_hf(model, params, workdir: str, hf_dir: str, architecture: str | None = None) -> None:
    """`model` with `params` as a Hugging Face directory, with the tokenizer files and the carried
    config.json keys of `workdir`. Every process calls it (parameters sharded over processes are
    gathered); process 0 writes."""
    import jax

    from transformer_jax import hf, runs

    extra = {}
    if os.path.isfile(os.path.join(workdir, runs.HF_CONFIG_FILE)):
        with open(os.path.join(workdir, runs.HF_CONFIG_FILE)) as f:
            extra = json.load(f)
    hf.to_pretrained(model, params, hf_dir, architecture=architecture, config_overrides=extra)
    if jax.process_index() != 0:
        return
    for name in hf.TOKENIZER_FILES:
        if os.path.isfile(os.path.join(workdir, name)):
            shutil.copy2(os.path.join(workdir, name), os.path.join(hf_dir, name))
    print(f"exported {workdir} to {hf_dir} ({parameter_counts(model, params)})")


USAGE = "--from-hf HF_DIR --workdir WORKDIR, or --checkpoint WORKDIR --to-hf HF_DIR"


def parser():
    import argparse

    p = cli.parser(
        __doc__.splitlines()[0],
        checkpoint="the workdir to export (config.yaml and params/ or checkpoints/), with --to-hf",
        config="with --from-hf: a YAML config whose other sections (data, train, ...) the written "
        "config.yaml takes (the model section comes from HF_DIR)",
        overrides="override a value of the written (--from-hf) or read (--checkpoint) config, e.g. "
        "--set train.steps=100 (repeatable); the weights fix the model: runtime model keys only",
        workdir="with --from-hf: the workdir to write (config.yaml, params/, tokenizer files)",
    )
    p.add_argument("--from-hf", dest="from_hf", metavar="HF_DIR", help="a local Hugging Face model directory to import")
    p.add_argument(
        "--to-hf", dest="to_hf", metavar="HF_DIR", help="the Hugging Face directory to write (with --checkpoint)"
    )
    p.add_argument("--architecture", help="Hugging Face class to write with --to-hf (e.g. BertForMaskedLM)")
    p.add_argument("--to", dest="old_to", help=argparse.SUPPRESS)  # the older spellings
    p.add_argument("--from", dest="old_from", help=argparse.SUPPRESS)
    return p


def _either(new, old, new_flag: str, old_flag: str) -> str | None:
    if new and old and new != old:
        raise ValueError(f"{old_flag}: the older spelling of {new_flag}, given both with different values")
    return new or old


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    cli.check_runtime_keys(args.overrides, "--from-hf" if args.from_hf else "--checkpoint")  # before any file
    workdir = _either(args.workdir, args.old_to, "--workdir", "--to")
    checkpoint = _either(args.checkpoint, args.old_from, "--checkpoint", "--from")
    if args.from_hf and (checkpoint or args.to_hf):
        raise ValueError(f"{'--checkpoint' if checkpoint else '--to-hf'}: give either {USAGE}, not both")
    if args.from_hf:
        if not workdir:
            raise ValueError("--from-hf needs --workdir WORKDIR (where config.yaml and params/ go)")
        if args.architecture:
            raise ValueError("--architecture: names the class --to-hf writes; --from-hf reads config.json's")
        import_hf(args.from_hf, workdir, args.config, args.overrides)
    elif checkpoint or args.to_hf:
        if not checkpoint or not args.to_hf:
            raise ValueError(
                "--to-hf needs --checkpoint WORKDIR" if not checkpoint else "--checkpoint needs --to-hf HF_DIR"
            )
        if args.config:
            raise ValueError("--config: exporting, the config is the checkpoint's config.yaml (runtime keys: --set)")
        if args.workdir:
            raise ValueError(
                "--workdir: the workdir --from-hf writes; exporting, give --checkpoint WORKDIR --to-hf HF_DIR"
            )
        export_hf(checkpoint, args.to_hf, args.architecture, args.overrides)
    else:
        raise ValueError(f"nothing to do: give {USAGE}")


if __name__ == "__main__":
    cli.main(main)
