"""Generate text with a trained decoder or encoder-decoder: our workdir or a Hugging Face directory.

    python -m train.generate --checkpoint runs/gpt_tiny --prompt "def main(" --prompt "import "
    python -m train.generate --checkpoint runs/gpt_tiny --temperature 0.8 --top_p 0.9 --seed 1 < prompts.txt
    python -m train.generate --checkpoint runs/translate_tiny --prompt "Enter a valid email address." --beam 4
    python -m train.generate --checkpoint path/to/hf_gpt2 --prompt "Hello" --json
    python -m train.generate --checkpoint runs/gpt_tiny --set model.dtype=bfloat16 --prompt "def main("

`--checkpoint DIR` is our workdir (config.yaml, checkpoints/<step>/ or params/, tokenizer.model) or a
local Hugging Face GPT-2 / T5 directory (config.json, weights, tokenizer files):
`transformer_jax.runs.open_model`. Prompts come from `--prompt` (repeatable) or stdin, one a line;
all are read and checked before the first is decoded, then each is decoded alone (no padding: the
tokens are exactly those of the prompt decoded by itself).

- decoder models: greedy by default, through `tj.decoding.generate` (KV cache, stops at eos).
  `--temperature T` (> 0) samples; `--top_k K` / `--top_p P` restrict it; `--seed S` (default 0)
  seeds it (prompt i uses `jax.random.fold_in(jax.random.key(S), i)`). Given without
  `--temperature`, any of these samples at temperature 1; with `--temperature 0` they are refused.
- encoder-decoder models: beam search with the GNMT length penalty through
  `tj.decoding.beam_search`, `--beam` (default the config's translate.beam_size, 4) and `--alpha`
  (default translate.alpha, 0.6); `--beam 1` is greedy. The source is the prompt's tokens + eos.
- `--max_new_tokens N` (default 64) bounds the output.

Output, one record per prompt, flushed as soon as that prompt is decoded: the generated text (a
decoder's continuation, without the prompt; an encoder-decoder's output) and a newline; or with
`--json` one JSON object a line: prompt, text, prompt_ids, token_ids (up to and including eos),
and scores: per-token log-probabilities of the chosen tokens under the model (temperature 1, no
top-k / top-p: one extra forward pass over prompt + output) for greedy and sampling, the beam's
length-penalised score for beam search; cache_bytes: the bytes of the KV cache the decode held
(`decoding.cache_bytes`: a banded layer keeps a ring of model.local_window_size positions). Not token by token: `decoding.generate` is one jitted
`lax.scan` and returns the whole completion; streaming each token would need a per-token loop.

Bad input is one line on stderr and exit code 2: a missing checkpoint, an encoder-only model, an
empty prompt for a decoder, a prompt longer than the model takes (learned positions:
model.max_len, prompt + --max_new_tokens included; otherwise the config's data.seq_len, or an
HF config.json's n_positions), out-of-range flags, beam flags on a decoder and sampling flags on an
encoder-decoder (never silently ignored). The config is the checkpoint's: `--config` and
`--workdir` are refused; `--set` takes runtime keys (model.dtype, model.attention_impl,
translate.beam_size, translate.alpha, data.seq_len for the length check of a model without learned
positions, ...), and a key that would change the parameters is refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from train import cli
from transformer_jax import decoding
from transformer_jax.runs import OpenedModel, open_model

DEFAULT_MAX_NEW_TOKENS = 64
SAMPLING_FLAGS = ("temperature", "top_k", "top_p", "seed")
BEAM_FLAGS = ("beam", "alpha")


@dataclasses.dataclass(frozen=True)
class Settings:
    """How to decode: mode 'greedy', 'sample' or 'beam', and the numbers each needs."""

    mode: str
    max_new_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    beam: int = 4
    alpha: float = 0.6


def parser() -> argparse.ArgumentParser:
    p = cli.parser(
        __doc__.splitlines()[0],
        checkpoint="our workdir (config.yaml, checkpoints/ or params/, tokenizer.model) or a local "
        "Hugging Face directory (config.json, weights, tokenizer files); required",
        config="not taken: the config is the checkpoint's (change runtime keys with --set)",
        workdir="not taken: generate writes nothing but stdout",
    )
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable); default: stdin, one a line")
    p.add_argument("--max_new_tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, help="most tokens generated (64)")
    p.add_argument("--temperature", type=float, help="decoder: sample at this temperature (> 0); 0 = greedy")
    p.add_argument("--top_k", type=int, help="decoder: sample among the k likeliest tokens (0 = all)")
    p.add_argument("--top_p", type=float, help="decoder: sample from the nucleus of this mass, in (0, 1]")
    p.add_argument("--seed", type=int, help="decoder: the sampling seed (default 0)")
    p.add_argument("--beam", type=int, help="encoder-decoder: beam size (default translate.beam_size); 1 = greedy")
    p.add_argument("--alpha", type=float, help="encoder-decoder: length penalty (default translate.alpha)")
    p.add_argument("--json", action="store_true", help="one JSON record per prompt: text, token ids, scores")
    return p


def _given(args, names) -> list[str]:
    return [f"--{n}" for n in names if getattr(args, n) is not None]


def check_flags(args) -> None:
    """What can be refused before the model is read."""
    cli.check_runtime_keys(args.overrides)  # a misspelt or architecture key first, before the checkpoint is read
    if args.config:
        raise ValueError(
            "--config: the config is the checkpoint's (config.yaml or config.json); change runtime keys with --set"
        )
    if args.workdir:
        raise ValueError("--workdir: generate writes nothing but stdout; give the model with --checkpoint")
    if not args.checkpoint:
        raise ValueError("--checkpoint: required (our workdir or a local Hugging Face directory)")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens: must be at least 1, got {args.max_new_tokens}")
    if args.temperature is not None and not args.temperature >= 0:
        raise ValueError(f"--temperature: must be >= 0 (0 = greedy), got {args.temperature}")
    if args.top_k is not None and args.top_k < 0:
        raise ValueError(f"--top_k: must be >= 0 (0 = no top-k cut), got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"--top_p: must be in (0, 1], got {args.top_p}")
    if args.beam is not None and args.beam < 1:
        raise ValueError(f"--beam: must be at least 1, got {args.beam}")
    if args.alpha is not None and not args.alpha >= 0:
        raise ValueError(f"--alpha: must be >= 0, got {args.alpha}")
    if args.temperature == 0 and _given(args, ("top_k", "top_p", "seed")):
        raise ValueError(
            f"{', '.join(_given(args, ('top_k', 'top_p', 'seed')))}: sampling options, but "
            "--temperature 0 is greedy; give --temperature > 0"
        )


def settings_for(args, opened: OpenedModel) -> Settings:
    """The decoding the flags ask for, for this model's family; a flag the family has no use for is an error."""
    family, where = opened.cfg.model.family, opened.directory
    if family == "decoder":
        if _given(args, BEAM_FLAGS):
            raise ValueError(
                f"{', '.join(_given(args, BEAM_FLAGS))}: beam search is for encoder-decoder models; "
                f"{where} holds a decoder (greedy, or sample with --temperature / --top_k / --top_p)"
            )
        if args.top_k is not None and args.top_k > opened.cfg.model.vocab_size:
            raise ValueError(f"--top_k: {args.top_k} is more than the vocabulary ({opened.cfg.model.vocab_size})")
        sample = bool(args.temperature) or (args.temperature is None and bool(_given(args, ("top_k", "top_p", "seed"))))
        if not sample:
            return Settings("greedy", args.max_new_tokens)
        temperature = 1.0 if args.temperature is None else args.temperature
        return Settings(
            "sample",
            args.max_new_tokens,
            temperature=temperature,
            top_k=args.top_k or 0,
            top_p=1.0 if args.top_p is None else args.top_p,
            seed=args.seed or 0,
        )
    if family == "encoder_decoder":
        if _given(args, SAMPLING_FLAGS):
            raise ValueError(
                f"{', '.join(_given(args, SAMPLING_FLAGS))}: sampling is for decoder models; {where} "
                "holds an encoder_decoder (beam search: --beam, --alpha)"
            )
        if opened.cfg.model.position == "learned" and args.max_new_tokens > opened.max_len:
            raise ValueError(
                f"--max_new_tokens: {args.max_new_tokens} > {opened.max_len_from} {opened.max_len} (learned positions)"
            )
        tr = opened.cfg.translate
        return Settings(
            "beam",
            args.max_new_tokens,
            beam=tr.beam_size if args.beam is None else args.beam,
            alpha=tr.alpha if args.alpha is None else args.alpha,
        )
    what = "an encoder-only" if family == "encoder" else f"a {family}"
    raise ValueError(
        f"--checkpoint: {where} holds {what} model, which cannot generate text "
        "(generate needs a decoder or an encoder_decoder)"
    )


def read_prompts(args, stdin) -> list[str]:
    if args.prompt:
        return list(args.prompt)
    try:
        prompts = [line.rstrip("\r\n") for line in stdin]
    except UnicodeDecodeError as e:
        raise ValueError(f"stdin: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not prompts:
        raise ValueError("no prompts: give --prompt TEXT or lines on stdin")
    return prompts


def encode_prompt(opened: OpenedModel, settings: Settings, prompt: str, number: int) -> list[int]:
    """The prompt's ids (an encoder-decoder's source ends with eos), checked against the model's length."""
    ids = [int(i) for i in opened.tokenizer.encode(prompt)]
    cfg, n = opened.cfg.model, settings.max_new_tokens
    if cfg.family == "encoder_decoder" and opened.eos_id is not None:
        ids.append(opened.eos_id)
    if not ids:
        raise ValueError(f"prompt {number}: empty; a decoder needs at least one prompt token")
    limit, named = opened.max_len, opened.max_len_from
    if limit is not None and len(ids) > limit:
        raise ValueError(f"prompt {number}: {len(ids)} tokens, longer than the model takes ({named} {limit})")
    # past the table: refused (learned positions: limit is the table's size)
    if cfg.position == "learned" and cfg.family == "decoder" and limit is not None and len(ids) + n > limit:
        raise ValueError(
            f"prompt {number}: {len(ids)} prompt tokens + --max_new_tokens {n} = {len(ids) + n} > "
            f"{named} {limit} (learned positions); lower --max_new_tokens"
        )
    return ids


def _cut(tokens: np.ndarray, eos_id: int | None) -> list[int]:
    """The generated ids up to and including the first eos."""
    ids = [int(t) for t in tokens]
    return ids[: ids.index(eos_id) + 1] if eos_id is not None and eos_id in ids else ids


@partial(jax.jit, static_argnames="model")
def _log_probs(model, params, input_ids):
    """log p(next token) at every position: [b, t, v]."""
    return jax.nn.log_softmax(model.apply(params, input_ids=input_ids).logits.astype(jnp.float32), axis=-1)


class Generator:
    """Decode one prompt's ids: (token_ids up to eos, scores)."""

    def __init__(self, opened: OpenedModel, settings: Settings):
        self.opened, self.settings = opened, settings

    def __call__(self, ids: list[int], index: int) -> tuple[list[int], Any]:
        o, s = self.opened, self.settings
        input_ids = jnp.asarray([ids], jnp.int32)
        if s.mode == "beam":
            seqs, scores = decoding.beam_search(
                o.model,
                o.params,
                input_ids,
                beam_size=s.beam,
                max_new_tokens=s.max_new_tokens,
                alpha=s.alpha,
                eos_id=-1 if o.eos_id is None else o.eos_id,
                decoder_start_id=o.decoder_start_id,
                return_all=True,
            )
            return _cut(np.asarray(seqs)[0, 0], o.eos_id), float(np.asarray(scores)[0, 0])
        rng = None if s.mode == "greedy" else jax.random.fold_in(jax.random.key(s.seed), index)
        out = decoding.generate(
            o.model,
            o.params,
            input_ids,
            max_new_tokens=s.max_new_tokens,
            rng=rng,
            temperature=s.temperature,
            top_k=s.top_k,
            top_p=s.top_p,
            eos_id=o.eos_id,
            pad_id=o.pad_id,
        )
        tokens = _cut(np.asarray(out)[0], o.eos_id)
        return tokens, self.logprobs(ids, tokens)

    def cache_bytes(self, ids: list[int]) -> int:
        """The KV cache's bytes for this prompt: beams x (the target) or 1 x (prompt + new tokens) positions."""
        o, s = self.opened, self.settings
        if s.mode == "beam":
            return decoding.cache_bytes(o.model, s.beam, s.max_new_tokens)
        return decoding.cache_bytes(o.model, 1, len(ids) + s.max_new_tokens)

    def logprobs(self, ids: list[int], tokens: list[int]) -> list[float]:
        """log p(token | everything before it) under the model, for each generated token. The input is
        padded to prompt + max_new_tokens (causal: the padding changes no earlier position), so one
        compiled pass serves every output of a prompt length."""
        filler = [self.opened.pad_id] * (self.settings.max_new_tokens - len(tokens))
        logp = _log_probs(self.opened.model, self.opened.params, jnp.asarray([ids + tokens + filler], jnp.int32))[0]
        return [float(x) for x in np.asarray(logp)[np.arange(len(ids) - 1, len(ids) + len(tokens) - 1), tokens]]


def text_of(opened: OpenedModel, ids: list[int], tokens: list[int]) -> str:
    """The generated text, without eos. A decoder's continuation is cut from the decoded prompt +
    output, so a piece that joins the prompt (a leading space) decodes as it would in context."""
    tok = opened.tokenizer
    body = tokens[:-1] if tokens and tokens[-1] == opened.eos_id else tokens
    if opened.cfg.model.family != "decoder":
        return tok.decode(body)
    prompt_text, full = tok.decode(ids), tok.decode(ids + body)
    return full[len(prompt_text) :] if full.startswith(prompt_text) else tok.decode(body)


def main(argv: list[str] | None = None, stdin=None, stdout=None) -> None:
    args = parser().parse_args(argv)
    check_flags(args)
    stdin = sys.stdin if stdin is None else stdin
    stdout = sys.stdout if stdout is None else stdout
    opened = open_model(args.checkpoint, args.overrides)
    settings = settings_for(args, opened)
    prompts = read_prompts(args, stdin)
    encoded = [encode_prompt(opened, settings, p, i + 1) for i, p in enumerate(prompts)]
    generator = Generator(opened, settings)
    for i, (prompt, ids) in enumerate(zip(prompts, encoded)):
        tokens, scores = generator(ids, i)
        text = text_of(opened, ids, tokens)
        if args.json:
            record: dict[str, Any] = {"prompt": prompt, "text": text, "prompt_ids": ids, "token_ids": tokens}
            record["score" if settings.mode == "beam" else "scores"] = scores
            record["cache_bytes"] = generator.cache_bytes(ids)
            stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
        else:
            stdout.write(text + "\n")
        stdout.flush()


if __name__ == "__main__":
    cli.main(main)
