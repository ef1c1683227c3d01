"""Convert between a local Hugging Face model directory and one of our workdirs.

    python -m train.convert --from-hf HF_DIR --to WORKDIR       # config.yaml, params/, tokenizer files
    python -m train.convert --from WORKDIR --to-hf HF_DIR       # model.safetensors + config.json

WORKDIR then serves `train.finetune --init_from WORKDIR` and `--config WORKDIR/config.yaml`.
`--set key=value` overrides the written config (e.g. --set train.steps=100); `--architecture`
picks the Hugging Face class to write (default from the model's family and heads).
Nothing is downloaded: HF_DIR must be a local directory.
"""
from __future__ import annotations

import json
import os
import shutil

from train import cli

# config.json keys carried from the imported directory to an exported one (ours has no place for them)
HF_CONFIG_FILE = "hf_config.json"
CARRIED_KEYS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "sep_token_id",
                "id2label", "label2id", "problem_type")


def objective_for(model_cfg) -> str:
    if model_cfg.family == "encoder":
        return "mlm_nsp" if "nsp" in model_cfg.heads else "mlm"
    return {"decoder": "clm", "encoder_decoder": "span_corruption"}[model_cfg.family]


def import_hf(hf_dir: str, workdir: str, config_file: str | None, overrides: list[str]) -> None:
    from transformer_jax import checkpoint, hf
    from transformer_jax.config import config_from_dict, load_config, save_config, to_dict

    model, params = hf.from_pretrained(hf_dir)
    mcfg = model.cfg
    base = to_dict(load_config(config_file)) if config_file else {}
    base["model"] = to_dict(mcfg)  # dataclasses.asdict with lists for tuples
    base.setdefault("train", {})["objective"] = objective_for(mcfg)
    data = base.setdefault("data", {})
    if mcfg.position == "learned":  # the default sequence length must fit the imported position table
        data["seq_len"] = min(int(data.get("seq_len", 128)), mcfg.max_len)
    base.setdefault("name", os.path.basename(os.path.normpath(hf_dir)))
    cfg = config_from_dict(base, overrides)
    os.makedirs(workdir, exist_ok=True)
    save_config(cfg, os.path.join(workdir, "config.yaml"))
    checkpoint.save_params(os.path.join(workdir, "params"), params)
    for name in hf.TOKENIZER_FILES:
        if os.path.isfile(os.path.join(hf_dir, name)):
            shutil.copy2(os.path.join(hf_dir, name), os.path.join(workdir, name))
    with open(os.path.join(hf_dir, "config.json")) as f:
        original = json.load(f)
    with open(os.path.join(workdir, HF_CONFIG_FILE), "w") as f:
        json.dump({k: original[k] for k in CARRIED_KEYS if k in original}, f, indent=2)
    print(f"imported {hf_dir} ({mcfg.family}, {sum(1 for _ in _leaves(params))} tensors, "
          f"{parameter_counts(model, params)}) into {workdir}")


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
    return (f"{published:,} parameters; {padded:,} with the vocabulary {cfg.vocab_size} padded to "
            f"{cfg.padded_vocab_size} (model.vocab_multiple={cfg.vocab_multiple})")


def export_hf(workdir: str, hf_dir: str, architecture: str | None, overrides: list[str]) -> None:
    import transformer_jax as tj
    from transformer_jax import checkpoint, hf

    config_path = os.path.join(workdir, "config.yaml")
    if not os.path.isdir(workdir):
        raise ValueError(f"--from: {workdir} is not a directory")
    if not os.path.isfile(config_path):
        raise ValueError(f"--from: {workdir} has no config.yaml (write one with --from-hf, or a training run)")
    params_dir = os.path.join(workdir, "params")
    if not os.path.isdir(params_dir):
        raise ValueError(f"--from: {workdir} has no params/ (written by --from-hf)")
    cfg = tj.load_config(config_path, overrides)
    model, abstract = tj.abstract_build(cfg)
    params = checkpoint.load_params(params_dir, abstract)
    extra = {}
    if os.path.isfile(os.path.join(workdir, HF_CONFIG_FILE)):
        with open(os.path.join(workdir, HF_CONFIG_FILE)) as f:
            extra = json.load(f)
    hf.to_pretrained(model, params, hf_dir, architecture=architecture, config_overrides=extra)
    for name in hf.TOKENIZER_FILES:
        if os.path.isfile(os.path.join(workdir, name)):
            shutil.copy2(os.path.join(workdir, name), os.path.join(hf_dir, name))
    print(f"exported {workdir} to {hf_dir} ({parameter_counts(model, params)})")


def run(argv: list[str] | None = None) -> None:
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--from-hf", dest="from_hf", metavar="HF_DIR", help="a local Hugging Face model directory")
    p.add_argument("--to", metavar="WORKDIR", help="the workdir to write (with --from-hf)")
    p.add_argument("--from", dest="from_workdir", metavar="WORKDIR", help="a workdir holding config.yaml and params/")
    p.add_argument("--to-hf", dest="to_hf", metavar="HF_DIR", help="the Hugging Face directory to write (with --from)")
    p.add_argument("--architecture", help="Hugging Face class to write with --to-hf (e.g. BertForMaskedLM)")
    args = p.parse_args(argv)
    if args.from_hf and args.from_workdir:
        raise ValueError("give either --from-hf HF_DIR --to WORKDIR or --from WORKDIR --to-hf HF_DIR, not both")
    if args.from_hf:
        workdir = args.to or args.workdir
        if not workdir:
            raise ValueError("--from-hf needs --to WORKDIR")
        import_hf(args.from_hf, workdir, args.config, args.overrides)
    elif args.from_workdir or args.to_hf:
        workdir = args.from_workdir or args.workdir
        if not workdir or not args.to_hf:
            raise ValueError("--to-hf needs --from WORKDIR" if not workdir else "--from needs --to-hf HF_DIR")
        export_hf(workdir, args.to_hf, args.architecture, args.overrides)
    else:
        raise ValueError("nothing to do: give --from-hf HF_DIR --to WORKDIR, or --from WORKDIR --to-hf HF_DIR")


if __name__ == "__main__":
    cli.main(run)
