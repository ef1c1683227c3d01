"""Continued (domain-adaptive) pretraining: train.pretrain --init_from a Hugging Face BERT (saved here,
random weights, its own WordPiece tokenizer) or one of our gpt_tiny workdirs, on local domain text."""

import os
import random

import jax
import numpy as np
import pytest

from train import pretrain
from transformer_jax import config as config_lib
from transformer_jax import hf, runs, tasks
from transformer_jax.config import ConfigError
from transformer_jax.data import corpus
from transformer_jax.data.pipeline import make_eval_dataset, objective_options
from transformer_jax.models import abstract_build

DRUGS = ["aspirin", "insulin", "heparin", "warfarin", "metformin", "statin"]
CONDITIONS = ["fever", "diabetes", "thrombosis", "pain", "hypertension", "infection"]


def domain_text(rng: random.Random, sentences: int) -> str:
    return " ".join(
        f"the patient received {rng.randint(1, 9)}0 mg of {rng.choice(DRUGS)} for "
        f"{rng.choice(CONDITIONS)} and was discharged on day {rng.randint(1, 9)}."
        for _ in range(sentences)
    )


@pytest.fixture(scope="module")
def domain(tmp_path_factory):
    """30 training documents and 6 held-out ones (separate folders) of a clinical-notes 'domain'."""
    root = tmp_path_factory.mktemp("domain")
    rng = random.Random(0)
    for split, n in (("train", 30), ("heldout", 6)):
        (root / split).mkdir()
        for i in range(n):
            (root / split / f"{i:02d}.txt").write_text(domain_text(rng, 12))
    return root


@pytest.fixture(scope="module")
def hf_bert(domain):
    """A tiny random-weight BertForMaskedLM with a WordPiece tokenizer trained on the domain text."""
    tf = pytest.importorskip("transformers")
    import torch
    from tokenizers import BertWordPieceTokenizer

    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train([str(p) for p in sorted((domain / "train").iterdir())], vocab_size=120, min_frequency=1)
    tokenizer = tf.BertTokenizerFast(
        tokenizer_object=wordpiece._tokenizer,
        unk_token="[UNK]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        mask_token="[MASK]",
    )
    directory = domain / "hf_bert"
    tokenizer.save_pretrained(directory)
    torch.manual_seed(0)
    config = tf.BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    tf.BertForMaskedLM(config).save_pretrained(directory)
    return directory


def domain_args(domain, steps: int, workdir, *extra) -> list[str]:
    return [
        "--set",
        "data.source=files",
        "--set",
        f"data.paths=[{domain / 'train'}]",
        "--set",
        f"train.steps={steps}",
        "--set",
        "train.batch_size=8",
        "--set",
        "data.seq_len=64",
        "--set",
        f"train.eval_every={steps}",
        "--set",
        "train.warmup_steps=5",
        "--set",
        f"train.checkpoint_every={steps}",
        "--workdir",
        str(workdir),
        *extra,
    ]


def heldout(cfg, model, tokenizer, directory):
    """params -> the objective's loss over every held-out document (weighted by its targets), dropout off."""
    objective = tasks.get(cfg.train.objective)
    batches = list(
        make_eval_dataset(
            corpus.get_corpus(str(directory)),
            tokenizer,
            objective=objective,
            seq_len=cfg.data.seq_len,
            batch_size=8,
            **objective_options(cfg.data),
        )
    )
    metrics_fn = jax.jit(lambda params, batch: objective.loss_fn(cfg)(model, params, batch, None)[1])

    def loss(params) -> float:
        total = weight = 0.0
        for batch in batches:
            metrics = metrics_fn(params, batch)
            name = next(k[: -len("_weight")] for k in metrics if k.endswith("_weight"))
            total += float(metrics[f"{name}_loss"]) * float(metrics[f"{name}_weight"])
            weight += float(metrics[f"{name}_weight"])
        return total / weight

    return loss


def trained(workdir):
    cfg = config_lib.load_config(os.path.join(workdir, "config.yaml"))
    model, abstract = abstract_build(cfg)
    return cfg, model, runs.restore_params(str(workdir), abstract)


@pytest.mark.slow
def test_hf_bert_continued_mlm_on_two_processes_learns_the_domain_and_exports(domain, hf_bert, tmp_path):
    """Two processes (the normal case): each reads the Hugging Face weights onto its devices; process 0
    alone copies the tokenizer and, once both have finished, writes the export."""
    import multiprocess

    tf = pytest.importorskip("transformers")
    import torch

    workdir, exported = tmp_path / "run", tmp_path / "exported"
    procs = multiprocess.run(
        "train.pretrain",
        [
            "--init_from",
            str(hf_bert),
            "--set",
            "train.learning_rate=3e-3",
            *domain_args(domain, 40, workdir),
            "--to-hf",
            str(exported),
        ],
        tmp_path,
    )
    assert f"restored 42 parameters from {hf_bert}; initialised fresh: none" in procs[0].output
    assert "exported" in procs[0].output and "exported" not in procs[1].output

    cfg, model, params = trained(workdir)
    assert cfg.train.objective == "mlm" and cfg.train.init_from == str(hf_bert)  # BertForMaskedLM's own objective
    assert (cfg.model.num_layers, cfg.model.model_dim, cfg.model.vocab_size) == (2, 32, 120)

    # the Hugging Face tokenizer, unchanged: no SentencePiece model trained, the same ids as transformers'
    assert not (workdir / "tokenizer.model").exists()
    tokenizer = hf.load_tokenizer(workdir)
    reference = tf.AutoTokenizer.from_pretrained(str(hf_bert))
    text = (domain / "heldout" / "00.txt").read_text()
    ids = tokenizer.encode(text)
    assert ids == reference(text, add_special_tokens=False).input_ids and reference.unk_token_id not in ids
    assert (tokenizer.mask_id, tokenizer.sep_id, tokenizer.eos_id) == (
        reference.mask_token_id,
        reference.sep_token_id,
        reference.sep_token_id,
    )

    # the held-out MLM loss falls from the Hugging Face weights to the continued ones
    hf_model, hf_params = hf.from_pretrained(hf_bert)
    loss = heldout(cfg, model, tokenizer, domain / "heldout")
    before, after = loss(hf_params), loss(params)
    print(f"\nheld-out MLM loss: Hugging Face weights {before:.3f}, continued 40 steps on 2 processes {after:.3f}")
    assert after < 0.85 * before, (before, after)

    # the export loads in transformers with our logits, and its tokenizer gives the same ids
    torch_model = tf.BertForMaskedLM.from_pretrained(str(exported)).eval()
    input_ids = np.asarray([ids[:48], ids[48:96]], np.int32)
    with torch.no_grad():
        theirs = torch_model(input_ids=torch.tensor(input_ids, dtype=torch.long)).logits.numpy()
    ours = np.asarray(model.apply(params, input_ids=input_ids).logits)[..., : cfg.model.vocab_size]
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    assert tf.AutoTokenizer.from_pretrained(str(exported))(text, add_special_tokens=False).input_ids == ids


@pytest.mark.slow
def test_our_gpt_tiny_workdir_continues_with_its_tokenizer(domain, tmp_path, capsys):
    base, continued = tmp_path / "base", tmp_path / "continued"
    small = [
        "--set",
        "model.num_layers=1",
        "--set",
        "model.model_dim=64",
        "--set",
        "model.mlp_dim=128",
        "--set",
        "model.vocab_size=512",
        "--set",
        "data.max_documents=120",
        "--set",
        "data.seq_len=64",
        "--set",
        "train.batch_size=8",
        "--set",
        "train.steps=20",
        "--set",
        "train.eval_every=20",
        "--set",
        "train.checkpoint_every=20",
        "--workdir",
        str(base),
    ]
    pretrain.main(small)  # the general corpus (the embedded default)
    pretrain.main(["--init_from", str(base), "--set", "train.learning_rate=3e-3", *domain_args(domain, 30, continued)])
    out = capsys.readouterr().out
    assert f"restored 20 parameters from {base} (checkpoints/20/state); initialised fresh: none" in out

    cfg, model, params = trained(continued)
    assert cfg.train.objective == "clm" and cfg.model == config_lib.load_config(base / "config.yaml").model
    assert (continued / "tokenizer.model").read_bytes() == (base / "tokenizer.model").read_bytes()
    from transformer_jax.data.tokenizer import Tokenizer

    tokenizer = Tokenizer(continued / "tokenizer.model")
    _, _, base_params = trained(base)
    loss = heldout(cfg, model, tokenizer, domain / "heldout")
    before, after = loss(base_params), loss(params)
    with capsys.disabled():
        print(f"\nheld-out causal LM loss on the domain: general gpt_tiny {before:.3f}, continued 30 steps {after:.3f}")
    assert after < 0.8 * before, (before, after)

    # run again with more steps: it resumes its own checkpoint, the base's weights are not read again
    pretrain.main(
        [
            "--init_from",
            str(base),
            "--set",
            "train.learning_rate=3e-3",
            *domain_args(domain, 30, continued),
            "--set",
            "train.steps=32",
        ]
    )
    out = capsys.readouterr().out
    assert "restored" not in out and "'step': 32" in out


def test_a_missing_head_is_initialised_fresh_and_named(domain, hf_bert, tmp_path, capsys):
    args = pretrain.parser().parse_args(
        ["--init_from", str(hf_bert), "--set", "train.objective=mlm_nsp", *domain_args(domain, 5, tmp_path / "w")]
    )
    cfg, workdir = pretrain.load(args)
    cfg, task = pretrain.make_task(cfg, workdir)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line == f"restored 42 parameters from {hf_bert}; initialised fresh: nsp, pooler", line
    assert cfg.model.heads == ("mlm", "nsp") and cfg.model.pooler


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.num_layers=4", "model.num_layers"),
        ("data.tokenizer=/some/spm.model", "data.tokenizer"),
        ("model.heads=[mlm,nsp]", "model.heads"),  # not ignored: train.objective=mlm_nsp adds the head
    ],
)
def test_a_key_the_checkpoint_fixes_is_one_line(domain, hf_bert, tmp_path, override, key):
    with pytest.raises(ConfigError, match=f"^{key}: .*--init_from") as e:
        pretrain.main(["--init_from", str(hf_bert), "--set", override, *domain_args(domain, 5, tmp_path / "w")])
    assert "\n" not in str(e.value)
    assert not (tmp_path / "w").exists()  # nothing was written


def test_runtime_keys_and_the_objective_may_be_set(hf_bert, domain):
    args = pretrain.parser().parse_args(
        [
            "--init_from",
            str(hf_bert),
            "--set",
            "model.dropout_rate=0.2",
            "--set",
            "model.heads=[mlm]",
            "--set",
            "train.objective=mlm",
            "--set",
            "data.seq_len=32",
        ]
    )
    cfg, workdir = pretrain.load(args)
    assert cfg.model.dropout_rate == 0.2 and cfg.model.num_layers == 2 and cfg.train.objective == "mlm"
    assert cfg.data.seq_len == 32 and workdir == os.path.join("runs", "hf_bert_continued")
    with pytest.raises(ValueError, match="--workdir: .* is the --init_from checkpoint"):
        pretrain.load(pretrain.parser().parse_args(["--init_from", str(hf_bert), "--workdir", str(hf_bert)]))
