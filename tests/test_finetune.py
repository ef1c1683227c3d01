"""train.finetune through the shared train loop: frozen / partial / LoRA strategies (frozen
parameters bitwise unchanged, optimizer state only for trainable ones), the loaded / new / unused
report, Hugging Face dirs as --init_from, distillation + contrastive (InfoNCE, SupCon) +
augmentation, the same_label_recall1 eval figure, GLUE through TFDS mock data, SQuAD
post-processing, local CSV / JSONL tasks, clear errors. Models are tiny."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import finetune as ftp
from train import optimizer, pretrain, trainer
from transformer_jax import finetune as ft
from transformer_jax import losses, metrics, sharding
from transformer_jax.config import ConfigError, load_config
from transformer_jax.data import labeled
from transformer_jax.data.tokenizer import Tokenizer
from transformer_jax.tasks import finetune as ftask
from transformer_jax.tasks import finetune_eval

from helpers import REPO, run_program, sets

TINY_MODEL = [
    "model.model_dim=32",
    "model.mlp_dim=64",
    "model.num_heads=2",
    "model.num_layers=2",
    "model.vocab_size=512",
    "model.max_len=32",
]
FT = [
    "data.seq_len=32",
    "train.batch_size=8",
    "train.steps=3",
    "train.eval_every=3",
    "train.log_every=1",
    "train.checkpoint_every=3",
    "train.learning_rate=1e-2",
    "train.warmup_steps=0",
    "finetune.embedded_classes=3",
    "finetune.max_train_examples=48",
    "finetune.max_eval_examples=16",
    "model.dropout_rate=0.0",
]


def mesh1():
    return sharding.make_mesh(load_config(None).mesh, jax.devices()[:1])


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, tokenizer_path):
    """A 2-layer BERT pretrained (MLM + NSP) for a few steps: config.yaml + checkpoints/4/."""
    workdir = str(tmp_path_factory.mktemp("pretrained"))
    cfg = load_config(
        os.path.join(REPO, "configs", "bert_tiny.yaml"),
        TINY_MODEL
        + [
            "data.seq_len=32",
            "train.batch_size=8",
            "train.steps=4",
            "train.checkpoint_every=4",
            "train.eval_every=0",
            "data.max_documents=60",
            "data.eval_documents=4",
            f"data.tokenizer={tokenizer_path}",
        ],
    )
    cfg, task = pretrain.make_task(cfg, workdir)
    trainer.run(cfg, workdir, task, mesh=mesh1(), quiet=True)
    return workdir


def ft_config(*overrides):
    return ftp.load_finetune_config(None, FT + list(overrides))


def train(cfg, workdir, **kw):
    """make_task + trainer.run: (prepared, the initial params on the host, the final state)."""
    prepared = ftp.make_task(cfg, str(workdir), mesh1(), log=lambda s: None, **kw)
    initial = jax.device_get(prepared.task.initial_params)
    _, state = trainer.run(prepared.cfg, str(workdir), prepared.task, mesh=mesh1(), quiet=True)
    return prepared, initial, state


def same_bits(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def adam_bytes(prepared, trainable_only: bool) -> int:
    """What AdamW's state should take: mu and nu (float32) for every (trainable) parameter."""
    abstract = jax.eval_shape(prepared.task.init_params, jax.random.key(0))
    mask = prepared.task.trainable if trainable_only and prepared.task.trainable is not None else None
    return 2 * 4 * ft.count(abstract, mask)


# ----------------------------------------------------------------------------- frozen / partial
@pytest.mark.slow
def test_frozen_backbone_is_bitwise_unchanged_and_has_no_optimizer_state(pretrained, tmp_path):
    cfg = ft_config("finetune.strategy=frozen", f"finetune.init_from={pretrained}")
    prepared, initial, state = train(cfg, tmp_path)
    report = prepared.report
    # the report: the backbone comes from the checkpoint, the classifier is new, MLM / NSP heads unused
    assert {p.split("/")[0] for p in report.new} == {"classifier"}
    assert any(p.startswith("encoder/layers/1/") for p in report.loaded)
    assert {p.split("/")[0] for p in report.unused} >= {"mlm", "nsp"}
    summary = report.summary()
    assert "newly initialised: 2 (classifier)" in summary and "mlm" in summary, summary

    mask, final = ft.flatten(prepared.task.trainable), ft.flatten(jax.device_get(state["params"]))
    initial = ft.flatten(initial)
    frozen = [p for p, keep in mask.items() if not keep]
    assert len(frozen) > 20 and all(p.startswith(("embed/", "encoder/", "pooler/")) for p in frozen)
    for p in frozen:
        assert same_bits(final[p], initial[p]), p
    for p in mask:
        if mask[p]:
            assert not np.array_equal(final[p], initial[p]), p  # the head did train
    # restored weights equal the pretrained checkpoint's
    saved = ft.restore_subset(
        os.path.join(pretrained, "checkpoints", "4", "state"),
        "params",
        {p: jax.ShapeDtypeStruct(initial[p].shape, initial[p].dtype) for p in frozen},
    )
    for p in frozen:
        assert same_bits(saved[p], initial[p]), p

    opt_bytes = ft.nbytes(state["opt_state"])
    head = adam_bytes(prepared, trainable_only=True)
    full = adam_bytes(prepared, trainable_only=False)
    print(f"\nfrozen: optimizer state {opt_bytes} bytes; AdamW for the head alone {head}, for all parameters {full}")
    assert head <= opt_bytes <= head + 64  # the head's mu and nu, plus step counters
    assert opt_bytes * 50 < full


@pytest.mark.slow
def test_partial_top_layer_with_layer_decay(pretrained, tmp_path):
    cfg = ft_config(
        "finetune.strategy=partial",
        "finetune.top_layers=1",
        "finetune.layer_decay=0.5",
        f"finetune.init_from={pretrained}",
    )
    prepared, initial, state = train(cfg, tmp_path)
    mask = ft.flatten(prepared.task.trainable)
    final, initial = ft.flatten(jax.device_get(state["params"])), ft.flatten(initial)
    for p in mask:
        if p.startswith(("embed/", "encoder/layers/0/")):
            assert not mask[p] and same_bits(final[p], initial[p]), p
        if p.startswith(("encoder/layers/1/", "classifier/", "pooler/")):
            assert mask[p], p
    assert not np.array_equal(final["encoder/layers/1/mlp/wi/kernel"], initial["encoder/layers/1/mlp/wi/kernel"])
    scales = ft.flatten(prepared.task.lr_scale)  # layer 1 gets decay^1, the head decay^0
    assert scales["encoder/layers/1/mlp/wi/kernel"] == 0.5 and scales["classifier/kernel"] == 1.0
    assert scales["encoder/layers/0/mlp/wi/kernel"] == 0.25 and scales["embed/token/embedding"] == 0.125
    opt_bytes = ft.nbytes(state["opt_state"])
    head = adam_bytes(prepared, trainable_only=True)
    assert head <= opt_bytes <= head + 64 and opt_bytes < adam_bytes(prepared, trainable_only=False) * 0.75


@pytest.mark.slow
def test_mean_classifier_pooling_reads_the_mean_of_real_tokens(tmp_path):
    overrides = TINY_MODEL + ["model.heads=[classification, nsp]", "model.num_labels=3", "data.seq_len=32"]
    first = load_config(os.path.join(REPO, "configs", "bert_tiny.yaml"), overrides)
    mean = load_config(os.path.join(REPO, "configs", "bert_tiny.yaml"), overrides + ["model.classifier_pooling=mean"])
    from transformer_jax.models import build

    model, params = build(mean, jax.random.key(0))
    first_model, _ = build(first, jax.random.key(0))  # same parameters, other pooling
    ids = jax.random.randint(jax.random.key(3), (2, 16), 5, 500)
    mask = jnp.ones((2, 16), jnp.int32).at[1, 10:].set(0)
    out = model.apply(params, input_ids=ids, attention_mask=mask)
    kernel, bias = params["classifier"]["kernel"], params["classifier"]["bias"]
    states = np.asarray(out.hidden_states)
    expected = np.stack([states[0].mean(0), states[1, :10].mean(0)]) @ np.asarray(kernel) + np.asarray(bias)
    np.testing.assert_allclose(out.heads["classifier"], expected, rtol=1e-5, atol=1e-5)
    # padding content does not matter; NSP keeps the pooled first token
    other = model.apply(params, input_ids=ids.at[1, 10:].set(7), attention_mask=mask)
    np.testing.assert_allclose(other.heads["classifier"][1], out.heads["classifier"][1], rtol=1e-5, atol=1e-5)
    by_first = first_model.apply(params, input_ids=ids, attention_mask=mask)
    np.testing.assert_allclose(out.heads["nsp"], by_first.heads["nsp"], rtol=1e-6)
    assert float(jnp.max(jnp.abs(out.heads["classifier"] - by_first.heads["classifier"]))) > 1e-3
    from transformer_jax import hf

    with pytest.raises(ValueError, match="model.classifier_pooling: BertForSequenceClassification"):
        hf.state_dict(model, params, "BertForSequenceClassification")


# ----------------------------------------------------------------------------- LoRA
def test_lora_on_bert_base_trains_under_one_percent():
    cfg = load_config(
        os.path.join(REPO, "configs", "bert_base.yaml"), ["model.heads=[classification]", "model.num_labels=2"]
    )
    from transformer_jax.models import abstract_build

    model, abstract = abstract_build(cfg)  # shapes only: nothing is allocated
    lora = jax.eval_shape(
        lambda: ft.lora_init(
            abstract, jax.random.key(0), targets=ft.LORA_DEFAULT_TARGETS, rank=8, logical_axes=model.logical_axes
        )
    )
    mask = ft.trainable_mask(abstract, "lora", head_keys=["classifier"])
    total = ft.count(abstract) + ft.count(lora)
    trained = ft.count(lora) + ft.count(abstract, mask)
    print(f"\nLoRA r=8 on bert_base: {trained:,} of {total:,} parameters trained ({100 * trained / total:.3f}%)")
    assert 100e6 < ft.count(abstract) < 120e6
    assert 12 * 2 * 2 * 8 * 768 == ft.count(lora)  # query and value of 12 layers, A and B
    assert trained / total <= 0.01


@pytest.mark.slow
def test_lora_merged_equals_unmerged():
    cfg = load_config(
        os.path.join(REPO, "configs", "bert_tiny.yaml"),
        TINY_MODEL + ["model.heads=[classification]", "model.num_labels=3", "data.seq_len=32"],
    )
    from transformer_jax.models import build

    model, params = build(cfg, jax.random.key(0))
    lora = ft.lora_init(
        params,
        jax.random.key(1),
        targets=["attention/(query|key|value|out)/kernel"],
        rank=4,
        logical_axes=model.logical_axes,
    )
    # B starts at 0 (the model starts as the pretrained one); make it non-zero as after training
    lora = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(2), x.shape), lora)
    ids = jax.random.randint(jax.random.key(3), (2, 16), 5, 500)
    mask = jnp.ones((2, 16), jnp.int32).at[1, 10:].set(0)
    unmerged = jax.jit(
        lambda p, l: model.apply(ft.lora_apply(p, l, alpha=8.0, rank=4), input_ids=ids, attention_mask=mask).heads[
            "classifier"
        ]
    )(params, lora)
    merged_params = jax.jit(lambda p, l: ft.lora_merge(p, l, alpha=8.0, rank=4))(params, lora)
    forward = jax.jit(lambda p: model.apply(p, input_ids=ids, attention_mask=mask).heads["classifier"])
    merged, base = forward(merged_params), forward(params)
    np.testing.assert_allclose(merged, unmerged, rtol=1e-5, atol=1e-5)
    assert float(jnp.max(jnp.abs(merged - base))) > 1e-2  # the LoRA update does change the outputs


@pytest.mark.slow
def test_lora_run_keeps_the_backbone_and_exports_merged(pretrained, tmp_path):
    cfg = ft_config("finetune.strategy=lora", "finetune.lora_rank=2", f"finetune.init_from={pretrained}")
    summary = ftp.finetune(cfg, str(tmp_path), mesh=mesh1(), quiet=True)
    assert summary["trainable_params"] < 0.1 * summary["total_params"]
    assert summary["optimizer_state_bytes"] <= 8 * summary["trainable_params"] + 64
    assert summary["exported"].startswith(os.path.join(str(tmp_path), "params"))
    state = os.path.join(str(tmp_path), "checkpoints", "3", "state")
    saved = ft.saved_shapes(state, "params")
    trained = ft.restore_subset(state, "params", {p: jax.ShapeDtypeStruct(s, jnp.float32) for p, s in saved.items()})
    pre = ft.restore_subset(
        os.path.join(pretrained, "checkpoints", "4", "state"),
        "params",
        {
            p[len("model/") :]: jax.ShapeDtypeStruct(s, jnp.float32)
            for p, s in saved.items()
            if p.startswith("model/encoder/")
        },
    )
    for p, x in pre.items():
        assert same_bits(trained["model/" + p], x), p  # the backbone is frozen under LoRA
    # the export is the merged kernel: W + alpha / r * A @ B
    q = "encoder/layers/0/attention/query/kernel"
    exported = ft.restore_subset(
        os.path.join(str(tmp_path), "params"), None, {q: jax.ShapeDtypeStruct(saved["model/" + q], jnp.float32)}
    )[q]
    want = trained["model/" + q] + ft.lora_delta(
        trained[f"lora/{q}/a"], trained[f"lora/{q}/b"], cfg.finetune.lora_alpha / 2, exported.ndim
    )
    np.testing.assert_allclose(exported, want, rtol=1e-6, atol=1e-6)
    assert not np.allclose(exported, trained["model/" + q])


# ----------------------------------------------------------------------------- losses, augmentation
@pytest.mark.slow
def test_distillation_contrastive_and_augmentation(pretrained, tmp_path):
    teacher = tmp_path / "teacher"
    ftp.finetune(ft_config(f"finetune.init_from={pretrained}"), str(teacher), mesh=mesh1(), quiet=True)
    assert os.path.isdir(teacher / "params") and os.path.isfile(teacher / "tokenizer.model")
    cfg = ft_config(
        f"finetune.init_from={pretrained}",
        f"finetune.distill_from={teacher}",
        "finetune.distill_weight=0.5",
        "finetune.contrastive_weight=0.3",
        "finetune.token_drop=0.1",
        "finetune.token_replace=0.1",
        "finetune.token_mask=0.1",
        "finetune.sentence_shuffle=0.5",
        "train.label_smoothing=0.1",
    )
    summary = ftp.finetune(cfg, str(tmp_path / "student"), mesh=mesh1(), quiet=True, export=False)
    records = [json.loads(line) for line in open(tmp_path / "student" / "metrics.jsonl")]
    first = records[0]
    assert first["distill_loss"] > 0 and first["contrastive_loss"] > 0 and np.isfinite(first["loss"])
    # loss = 0.5 * task + 0.5 * KL + 0.3 * InfoNCE
    assert first["loss"] == pytest.approx(
        0.5 * first["task_loss"] + 0.5 * first["distill_loss"] + 0.3 * first["contrastive_loss"], rel=1e-4
    )
    assert summary["step"] == 3 and 0 <= summary["eval"]["accuracy"] <= 1


@pytest.mark.slow
def test_supcon_finetune_and_same_label_recall1(tmp_path, tokenizer_path):
    supcon = TINY_MODEL + [
        f"data.tokenizer={tokenizer_path}",
        "finetune.contrastive_weight=0.3",
        "finetune.contrastive_loss=supcon",
    ]
    summary = ftp.finetune(ft_config(*supcon), str(tmp_path / "run"), mesh=mesh1(), quiet=True, export=False)
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    first = records[0]
    assert first["contrastive_loss"] > 0  # one view, no augmentation: SupCon over the labels still applies
    assert first["loss"] == pytest.approx(first["task_loss"] + 0.3 * first["contrastive_loss"], rel=1e-4)
    # the embedding figure: in metrics.jsonl and the summary, beside the selecting metric (unchanged)
    assert any("eval_same_label_recall1" in r for r in records)
    assert 0 <= summary["eval_same_label_recall1"] <= 1
    assert summary["eval_same_label_recall1"] == summary["eval"]["same_label_recall1"]
    assert summary["metric"] == "accuracy" and summary["eval_accuracy"] is not None


def test_contrastive_views():
    views = lambda overrides, augmenting: ftask.contrastive_views(ft_config(*overrides).finetune, augmenting)
    assert views([], False) == 1 and views([], True) == 1  # no contrastive loss
    assert views(["finetune.contrastive_weight=0.3"], False) == 2  # InfoNCE: two views (else alike but for dropout)
    supcon = ["finetune.contrastive_weight=0.3", "finetune.contrastive_loss=supcon"]
    assert views(supcon, False) == 1 and views(supcon, True) == 2


@pytest.mark.slow
def test_supcon_loss_over_one_or_both_views():
    """make_loss_fn with contrastive_loss supcon: the task loss + w * SupCon of the mean-pooled final
    states, labels and weights from the batch; with a second view the 2b rows of both are anchors."""
    from transformer_jax.models import build

    cfg = load_config(
        os.path.join(REPO, "configs", "bert_tiny.yaml"),
        TINY_MODEL + ["model.heads=[classification]", "model.num_labels=3", "data.seq_len=32"],
    )
    model, params = build(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    ids = lambda: jnp.asarray(rng.integers(5, 500, (6, 16)), jnp.int32)
    mask = jnp.ones((6, 16), jnp.int32).at[1, 9:].set(0)
    batch = {
        "input_ids": ids(),
        "attention_mask": mask,
        "token_type_ids": jnp.zeros((6, 16), jnp.int32),
        "labels": jnp.array([0, 0, 1, 1, 2, 0]),
        "example_weight": jnp.array([1.0, 1.0, 1.0, 1.0, 1.0, 0.0]),
    }
    two = {**batch, "input_ids_2": ids(), "attention_mask_2": mask.at[2, 5:].set(0)}
    two["token_type_ids_2"] = batch["token_type_ids"]
    c = ft.LossConfig("classification", contrastive_weight=0.3, contrastive_temperature=0.2, contrastive_loss="supcon")
    loss_fn = ft.make_loss_fn(model, c)
    pooled = lambda b, s: ft.mean_pool(
        model.apply(params, **ft.model_inputs("encoder", b, s)).hidden_states, b["attention_mask" + s]
    )
    for b, z, n in ((batch, [pooled(batch, "")], 1), (two, [pooled(two, ""), pooled(two, "_2")], 2)):
        loss, got = loss_fn(None, params, b, None)
        want = losses.supcon_loss(
            jnp.concatenate(z), jnp.tile(b["labels"], n), jnp.tile(b["example_weight"], n), temperature=0.2
        )
        np.testing.assert_allclose(got["contrastive_loss"], want, rtol=1e-5)
        np.testing.assert_allclose(loss, got["task_loss"] + 0.3 * want, rtol=1e-5)


def test_supcon_config_mistakes_are_one_line(tmp_path, tokenizer_path):
    with pytest.raises(ConfigError, match=r"^finetune\.contrastive_loss: 'simclr' is not one of 'infonce', 'supcon'$"):
        ft_config("finetune.contrastive_loss=simclr")
    reg = tmp_path / "r.jsonl"
    reg.write_text("".join(json.dumps({"text": f"s{i}", "label": i / 4}) + "\n" for i in range(10)))
    cfg = ft_config(
        *TINY_MODEL,
        f"data.tokenizer={tokenizer_path}",
        "finetune.task=local",
        f"finetune.train_paths=[{reg}]",
        f"finetune.eval_paths=[{reg}]",
        "finetune.contrastive_loss=supcon",
    )
    with pytest.raises(
        ConfigError, match=r"^finetune\.contrastive_loss: supcon needs a classification task; .* is regression$"
    ):
        ftp.make_task(cfg, str(tmp_path / "run"), mesh1(), log=lambda s: None)


def test_transfer_set_adds_unlabelled_inputs_the_hard_loss_skips(tokenizer_path):
    """finetune.transfer_examples: the first n of the task's unlabelled pool join the train set marked
    labeled 0; their features carry hard_weight 0 (labelled ones 1); mistakes are one line."""
    spec = labeled.TaskSpec("t", "classification", ("a", "b"), ("accuracy",), "accuracy")
    ex = lambda text, label: {"text": text, "text_pair": None, "label": label}
    data = labeled.TaskData(spec, [ex("x y", 1), ex("y z", 0)], [ex("z", 1)], [ex("u v", 0), ex("w", 0), ex("q", 0)])
    assert ftask.with_transfer_set(data, 0, "t") is data
    mixed = ftask.with_transfer_set(data, 2, "t")
    assert [(e["text"], e["labeled"]) for e in mixed.train] == [("x y", 1), ("y z", 1), ("u v", 0), ("w", 0)]
    assert mixed.eval == data.eval
    with pytest.raises(ConfigError, match=r"^finetune\.transfer_examples: 4 asked for; task t has 3 unlabelled"):
        ftask.with_transfer_set(data, 4, "t")
    with pytest.raises(ConfigError, match=r"^finetune\.transfer_examples: unlabelled examples need a teacher"):
        ft_config("finetune.transfer_examples=8")
    encoder = labeled.Encoder(spec, Tokenizer(tokenizer_path), 16, "encoder")
    assert [float(encoder.features(e)["hard_weight"]) for e in mixed.train] == [1.0, 1.0, 0.0, 0.0]
    assert "hard_weight" not in encoder.features(data.train[0])  # no transfer set: batches as before
    as_t5 = labeled.as_text_to_text(mixed)  # a T5 student keeps the marks (and the pool)
    assert [e["labeled"] for e in as_t5.train] == [1, 1, 0, 0] and len(as_t5.unlabeled) == 3
    # the embedded task's pool: the train files' other snippets, none of them a train or eval snippet
    task = labeled.embedded_task(3)
    seen = {e["text"] for e in task.train + task.eval}
    assert len(task.unlabeled) > 100 and not any(e["text"] in seen for e in task.unlabeled)


@pytest.mark.slow
def test_hard_loss_counts_labelled_examples_only():
    """With hard_weight in the batch, the task loss is the mean over the labelled rows; the
    distillation term still covers every row."""
    from transformer_jax.models import build

    cfg = load_config(
        os.path.join(REPO, "configs", "bert_tiny.yaml"),
        TINY_MODEL + ["model.heads=[classification]", "model.num_labels=3", "data.seq_len=32"],
    )
    model, params = build(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    batch = {
        "input_ids": jnp.asarray(rng.integers(5, 500, (4, 16)), jnp.int32),
        "attention_mask": jnp.ones((4, 16), jnp.int32),
        "token_type_ids": jnp.zeros((4, 16), jnp.int32),
        "labels": jnp.array([0, 2, 1, 1]),
        "example_weight": jnp.ones(4),
        "teacher": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
    }
    loss_fn = ft.make_loss_fn(model, ft.LossConfig("classification", distill_weight=0.5, distill_temperature=2.0))
    _, mixed = loss_fn(None, params, {**batch, "hard_weight": jnp.array([1.0, 1.0, 0.0, 0.0])}, None)
    _, first_two = loss_fn(None, params, {k: v[:2] for k, v in batch.items()}, None)
    _, every = loss_fn(None, params, batch, None)
    np.testing.assert_allclose(mixed["task_loss"], first_two["task_loss"], rtol=1e-6)
    np.testing.assert_allclose(mixed["distill_loss"], every["distill_loss"], rtol=1e-6)
    assert abs(float(mixed["task_loss"]) - float(every["task_loss"])) > 1e-4


def test_augmentation_switches(tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    ids = labeled.special_ids(tok)
    rng = np.random.default_rng(0)
    tokens = [i for i in range(ids.vocab_size) if i not in set(ids.special)][:200]
    assert len(tokens) == 200
    off = labeled.Augmentation()
    assert off.tokens(tokens, rng, ids) == tokens and not off.active
    dropped = labeled.Augmentation(token_drop=0.5).tokens(tokens, rng, ids)
    assert 60 < len(dropped) < 140 and set(dropped) <= set(tokens)
    masked = labeled.Augmentation(token_mask=0.5).tokens(tokens, rng, ids)
    assert len(masked) == len(tokens) and 60 < masked.count(ids.mask) < 140
    replaced = labeled.Augmentation(token_replace=1.0).tokens(tokens, rng, ids)
    assert len(replaced) == len(tokens) and sum(a != b for a, b in zip(replaced, tokens)) > 150
    with_specials = [ids.cls, *tokens, ids.sep]
    kept = labeled.Augmentation(token_drop=1.0).tokens(with_specials, rng, ids)
    assert kept == [ids.cls, ids.sep]  # special tokens are never touched
    text = "One. Two! Three? Four."
    shuffled = {labeled.Augmentation(sentence_shuffle=1.0).text(text, np.random.default_rng(s)) for s in range(10)}
    assert len(shuffled) > 1 and all(sorted(t.split()) == sorted(text.split()) for t in shuffled)
    back = labeled.Augmentation(back_translate=1.0, translator=labeled.round_trip(str.upper, lambda s: s + "!"))
    assert back.text("hello", rng) == "HELLO!"
    with pytest.raises(ValueError, match="translator"):
        labeled.Augmentation(back_translate=1.0).text("hello", rng)


# ----------------------------------------------------------------------------- Hugging Face init
@pytest.mark.slow
def test_hugging_face_dir_as_init_from(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer as HFTok
    from tokenizers import models, pre_tokenizers

    words = "the a cat dog sat ran on mat fast slow big small red blue".split()
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])}
    config = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    hf_dir = tmp_path / "hf"
    transformers.BertForMaskedLM(config).eval().save_pretrained(hf_dir)
    tok = HFTok(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(hf_dir / "tokenizer.json"))
    rng = np.random.default_rng(0)
    rows = [{"sentence": " ".join(rng.choice(words, 6)), "label": ["neg", "pos"][i % 2]} for i in range(40)]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = ft_config(
        "finetune.task=local",
        f"finetune.train_paths=[{path}]",
        "finetune.text_column=sentence",
        "finetune.eval_fraction=0.2",
        f"finetune.init_from={hf_dir}",
        "train.steps=2",
        "train.eval_every=2",
    )
    prepared, initial, state = train(cfg, tmp_path / "run")
    assert prepared.spec.label_names == ("neg", "pos") and prepared.cfg.model.num_labels == 2
    assert {p.split("/")[0] for p in prepared.report.new} == {"classifier"}
    assert any(p.startswith("mlm") for p in prepared.report.unused)
    assert len(prepared.report.loaded) > 30
    # the embedding came from the Hugging Face weights
    from transformer_jax import hf

    _, hf_params = hf.from_pretrained(str(hf_dir))
    assert same_bits(ft.flatten(initial)["embed/token/embedding"], ft.flatten(hf_params)["embed/token/embedding"])
    assert np.isfinite(float(jax.device_get(state["step"])))


def test_model_settings_the_config_names_win_even_at_their_defaults(tmp_path):
    # a Hugging Face BERT's config.json: dropout 0.1 (ModelConfig's default is 0.0)
    hf_cfg = {
        "vocab_size": 64,
        "hidden_size": 32,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "max_position_embeddings": 512,
    }
    from transformer_jax import hf

    source = ftask.Source("hf", str(tmp_path), model_cfg=hf.config_from_hf(hf_cfg, "BertForMaskedLM"))
    assert (source.model_cfg.dropout_rate, source.model_cfg.attention_dropout_rate) == (0.1, 0.1)
    spec = labeled.TaskSpec("t", "classification", ("a", "b"))

    def run_model(cfg):
        return ftask.finetune_config(cfg, source, spec).model

    # --set at the default value
    model = run_model(ftp.load_finetune_config(None, ["model.dropout_rate=0.0", "model.dtype=float32"]))
    assert (model.dropout_rate, model.attention_dropout_rate, model.model_dim) == (0.0, 0.1, hf_cfg["hidden_size"])
    # the YAML's model section, --set on top of it
    path = tmp_path / "ft.yaml"
    path.write_text("model:\n  family: encoder\n  attention_dropout_rate: 0.0\n  remat: full\n")
    cfg = ftp.load_finetune_config(str(path), ["model.remat=none"])
    assert cfg.finetune.model_keys == ("attention_dropout_rate", "remat")
    model = run_model(cfg)
    assert (model.dropout_rate, model.attention_dropout_rate, model.remat) == (0.1, 0.0, "none")
    # unnamed: the pretrained model's own
    assert run_model(ftp.load_finetune_config(str(path), ["model={family: encoder}"])).attention_dropout_rate == 0.1
    with pytest.raises(ValueError, match="finetune.model_keys: num_layers is not one of"):
        run_model(ftp.load_finetune_config(None, ["finetune.model_keys=[num_layers]"]))


# ----------------------------------------------------------------------------- errors
def run_cli(args, timeout=240):
    return run_program("train.finetune", args, timeout)


@pytest.mark.slow
def test_missing_init_from_is_one_line(tmp_path):
    result = run_cli(["--init_from", str(tmp_path / "nowhere"), "--workdir", str(tmp_path / "run")])
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --init_from:") and "nowhere" in lines[0], result.stderr
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


@pytest.mark.slow
def test_label_count_that_does_not_fit_the_checkpoint(pretrained, tmp_path):
    """A finetuned 3-class model as --init_from for a 4-class task: its classifier does not fit."""
    donor = tmp_path / "three"
    ftp.finetune(
        ft_config(f"finetune.init_from={pretrained}", "train.steps=1", "train.eval_every=0"),
        str(donor),
        mesh=mesh1(),
        quiet=True,
    )
    mismatch = r"classifier/(bias has shape \(3,\).*needs \(4,\)|kernel has shape \(32, 3\).*needs \(32, 4\))"
    with pytest.raises(ValueError, match=mismatch + ".*reset_heads"):
        ftp.make_task(
            ft_config(f"finetune.init_from={donor}", "finetune.embedded_classes=4"),
            str(tmp_path / "x"),
            mesh1(),
            log=lambda s: None,
        )
    result = run_cli(
        [
            "--init_from",
            str(donor),
            "--workdir",
            str(tmp_path / "run"),
            *sets(FT),
            "--set",
            "finetune.embedded_classes=4",
        ]
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "classifier/" in lines[0] and lines[0].startswith("error: "), result.stderr
    # with reset_heads the head is re-initialised and reported
    prepared = ftp.make_task(
        ft_config(f"finetune.init_from={donor}", "finetune.embedded_classes=4", "finetune.reset_heads=true"),
        str(tmp_path / "y"),
        mesh1(),
        log=lambda s: None,
    )
    assert {p.split("/")[0] for p in prepared.report.reset} == {"classifier"}
    # an explicit num_labels that contradicts the task
    with pytest.raises(Exception, match="finetune.num_labels: 5"):
        ftp.make_task(
            ft_config(f"finetune.init_from={pretrained}", "finetune.num_labels=5"),
            str(tmp_path / "z"),
            mesh1(),
            log=lambda s: None,
        )


# ----------------------------------------------------------------------------- data sources
def test_glue_through_tfds_mock_data(tmp_path, tokenizer_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    (tmp_path / "data").mkdir()
    with tfds.testing.mock_data(num_examples=12):
        every = {name: labeled.glue_task(name, data_dir=str(tmp_path / "data")) for name in labeled.GLUE}
        cola = labeled.glue_task("cola", data_dir=str(tmp_path / "data"), max_train=5)
    mrpc, stsb = every["mrpc"], every["stsb"]
    for name, data in every.items():  # the official metric of each task
        assert data.spec.name == f"glue/{name}" and len(data.train) == 12 and len(data.eval) > 0, name
        assert data.spec.main_metric == {"cola": "matthews_corr", "mrpc": "f1", "qqp": "f1", "stsb": "pearson"}.get(
            name, "accuracy"
        ), name
    assert len(every["mnli"].spec.label_names) == 3
    assert mrpc.spec.kind == "classification" and mrpc.spec.label_names == ("not_equivalent", "equivalent")
    assert mrpc.spec.main_metric == "f1" and len(mrpc.train) == 12 and len(mrpc.eval) == 12
    assert all(isinstance(ex["text"], str) and isinstance(ex["text_pair"], str) for ex in mrpc.train)
    assert stsb.spec.kind == "regression" and stsb.spec.metrics == ("pearson", "spearman")
    assert all(isinstance(ex["label"], float) for ex in stsb.train)
    assert cola.spec.main_metric == "matthews_corr" and len(cola.train) == 5 and cola.train[0]["text_pair"] is None
    enc = labeled.Encoder(mrpc.spec, Tokenizer(tokenizer_path), 32)
    features = enc.features(mrpc.train[0])
    assert features["input_ids"].shape == (32,) and features["token_type_ids"].max() == 1
    as_t5 = labeled.as_text_to_text(stsb)
    assert as_t5.spec.kind == "text_to_text" and as_t5.train[0]["input"].startswith("stsb sentence1: ")
    assert as_t5.train[0]["target"] == labeled.regression_target(stsb.train[0]["label"])
    t5 = labeled.Encoder(as_t5.spec, Tokenizer(tokenizer_path), 32, family="encoder_decoder", target_len=6)
    row = t5.features(as_t5.train[0])
    target = t5.encode(as_t5.train[0]["target"])[:5] + [t5.ids.eos]
    assert row["targets"][: len(target)].tolist() == target and row["target_weights"].sum() == len(target)
    assert (
        row["decoder_input_ids"][0] == t5.ids.pad and row["decoder_input_ids"][1 : len(target)].tolist() == target[:-1]
    )
    with pytest.raises(ValueError, match="finetune.data_dir"):
        labeled.glue_task("mrpc", data_dir=str(tmp_path / "nowhere"))


def test_local_csv_and_jsonl(tmp_path):
    csv_path = tmp_path / "t.csv"
    csv_path.write_text("text,pair,label\n" + "".join(f"a{i},b{i},{['x', 'y', 'z'][i % 3]}\n" for i in range(20)))
    data = labeled.local_task([str(csv_path)], text_pair_column="pair", eval_fraction=0.25)
    assert data.spec.kind == "classification" and data.spec.label_names == ("x", "y", "z")
    assert len(data.train) == 15 and len(data.eval) == 5 and data.train[0]["text_pair"].startswith("b")
    reg = tmp_path / "r.jsonl"
    reg.write_text("".join(json.dumps({"text": f"s{i}", "label": i / 4}) + "\n" for i in range(10)))
    data = labeled.local_task([str(reg)], eval_paths=[str(reg)])
    assert data.spec.kind == "regression" and data.eval[3]["label"] == 0.75
    tok = tmp_path / "tok.jsonl"
    tok.write_text(
        "".join(json.dumps({"text": ["New", "York", "is"], "label": ["LOC", "LOC", "O"]}) + "\n" for _ in range(4))
    )
    data = labeled.local_task([str(tok)], eval_paths=[str(tok)])
    assert data.spec.kind == "token_classification" and data.train[0]["labels"] == [0, 0, 1]
    with pytest.raises(ValueError, match="finetune.label_column"):
        labeled.local_task([str(csv_path)], label_column="nope")
    with pytest.raises(ValueError, match="not one of"):
        labeled.local_task([str(csv_path)], labels=("x", "y"))


def test_squad_post_processing(tokenizer_path):
    """Features over context windows (doc stride), then logits peaked at the gold answer's tokens:
    post-processing recovers the answer text exactly (EM 100), however the windows cut the context."""
    context = (
        "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, "
        "a region in France. They were descended from Norse raiders and pirates from Denmark, Iceland "
        "and Norway who, under their leader Rollo, agreed to swear fealty to King Charles III."
    )
    qas = [
        ("q1", "Who led the raiders?", "Rollo"),
        ("q2", "Where is Normandy?", "France"),
        ("q3", "Which king?", "King Charles III"),
        ("q4", "When?", "10th and 11th centuries"),
    ]
    examples = [
        {"id": i, "question": q, "context": context, "answers": [a], "answer_starts": [context.index(a)]}
        for i, q, a in qas
    ]
    enc = labeled.Encoder(labeled.SQUAD_SPEC, Tokenizer(tokenizer_path), 48, doc_stride=12)
    features, owners = labeled.eval_features(enc, examples)
    assert len(features) > 2 * len(examples)  # the context does not fit one window
    train_features = [f for ex in examples for f in enc.qa_features(ex, train=True)]
    start, end = [], []
    for f, owner in zip(features, owners):
        chars = f["token_to_chars"]
        a = examples[owner]["answer_starts"][0]
        b = a + len(examples[owner]["answers"][0])
        inside = (chars[:, 0] < b) & (chars[:, 1] > a) & (chars[:, 0] >= 0)  # tokens of the answer's words
        s, e = np.zeros(48), np.zeros(48)
        if inside.any() and chars[inside, 0].min() <= a and chars[inside, 1].max() >= b:  # all of it in the window
            s[np.flatnonzero(inside)[0]], e[np.flatnonzero(inside)[-1]] = 10.0, 10.0
        start.append(s)
        end.append(e)
    result = finetune_eval._squad_metrics(
        examples, features, owners, np.stack(start), np.stack(end), max_answer_length=30
    )
    assert result == {"exact_match": 100.0, "f1": 100.0}
    # training features point at the answer tokens where the window holds it, else at [CLS]
    ids = Tokenizer(tokenizer_path)
    spans = [(int(f["start_positions"]), int(f["end_positions"])) for f in train_features]
    assert any(s > 0 for s, _ in spans) and any(s == 0 for s, _ in spans)
    f = next(f for f in train_features if f["start_positions"] > 0)
    text = ids.decode(f["input_ids"][int(f["start_positions"]) : int(f["end_positions"]) + 1].tolist())
    assert metrics.normalize_answer(text) in [metrics.normalize_answer(a) for _, _, a in qas]
    # a wrong span scores by the official F1
    wrong = finetune_eval._squad_metrics(
        examples[:1], features[:1], [0], np.stack(start[:1]) * 0, np.stack(end[:1]) * 0, max_answer_length=3
    )
    assert wrong["exact_match"] == 0.0
    assert metrics.squad({"q": "King Charles"}, {"q": ["King Charles III"]})["f1"] == pytest.approx(80.0)


# ----------------------------------------------------------------------------- schedule, early stopping
def test_warmup_ratio():
    cfg = ft_config("train.steps=200", "train.warmup_ratio=0.1", "train.schedule=linear", "train.learning_rate=1.0")
    schedule = optimizer.learning_rate_schedule(cfg.train)
    assert float(schedule(10)) == pytest.approx(0.5) and float(schedule(20)) == pytest.approx(1.0)
    assert float(schedule(110)) == pytest.approx(0.5)


@pytest.mark.slow
def test_early_stopping_keeps_the_best_checkpoint(pretrained, tmp_path):
    import dataclasses

    cfg = ft_config(
        f"finetune.init_from={pretrained}",
        "finetune.strategy=frozen",
        "train.steps=20",
        "train.eval_every=1",
        "train.checkpoint_every=100",
        "train.early_stopping_patience=2",
    )
    prepared = ftp.make_task(cfg, str(tmp_path), mesh1(), log=lambda s: None)
    scripted = iter([0.2, 0.5, 0.4, 0.45, 0.9, 0.95])  # best at step 2, then two evals without a better one
    task = dataclasses.replace(prepared.task, evaluate=lambda params: {"accuracy": next(scripted)})
    prepared = dataclasses.replace(prepared, task=task)
    metrics_, _ = trainer.run(prepared.cfg, str(tmp_path), task, mesh=mesh1(), quiet=True)
    assert metrics_["step"] == 4 and metrics_["best_step"] == 2 and metrics_["best_eval_accuracy"] == 0.5
    assert os.path.isdir(tmp_path / "checkpoints" / "2")
    assert ftp.export_best(prepared, str(tmp_path), mesh1()).endswith("(step 2)")
