"""Batched sampling with SAE feature edits and steering, keeping the KV cache.

    out = generate(lm, ["Name three rivers."], chat=True, max_new_tokens=40,
                   temperature=0.8, top_p=0.8, seeds=[7],
                   saes=sae, edits=[FeatureEdit(1234, "set", 6.0, positions="generated")])
    out.texts[0]; out.samples[0].tokens; out.samples[0].stop      # "eos" or "length"

Our own decoding loop over ``model(input_ids, cache, attention_mask,
position_ids, use_cache=True)`` rather than HF ``generate``: it is the same
computation (greedy output matches ``model.generate`` token for token) but the
loop is ours, so sampling is per sample and edits see each row's absolute
positions.

- **Per-sample seeds.** Each sample draws from its own ``torch.Generator``, so
  its tokens depend only on its prompt and seed, never on what else is in the
  batch or on ``batch_size``. Temperature 0 is greedy.
- **Edits under the cache.** The prompt is one forward pass; each later step
  feeds only the new token, so an edit at "generated" positions or from
  position p on touches exactly the new position. Positions are absolute
  within the sample (left padding excluded), so ``use_cache=False`` (full
  recomputation each step, for checking) gives the same tokens.
- **Features.** With ``record_features`` the top active features of every
  spliced SAE are kept per generated token, taken at the position whose
  output sampled that token (the last prompt token for the first one).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from saelab.checks import ABSURD, choice, integer, number
from saelab.data.tokens import chat_prompt, position_ids, tokenize
from saelab.errors import BadValueError
from saelab.interventions.edits import Edit, Frame, PatchEdit
from saelab.interventions.splice import SAEs, splice, unwrap
from saelab.interventions.transcoder_edits import TranscoderEdit, edit_transcoders
from saelab.models.kv_cache import cache_kwargs, returned_cache
from saelab.models.limits import check_positions, lm_max_positions


@dataclass
class SparseFeatures:
    """Top active features of one SAE per generated token (entries with value 0 are inactive)."""

    idx: Tensor  # (T, n) long
    vals: Tensor  # (T, n) float
    positions: Tensor  # (T,) absolute position each row was read at


@dataclass
class Sample:
    """One generated continuation."""

    prompt_tokens: list[int]
    tokens: list[int]  # generated, ending with the end-of-sequence token if it stopped on one
    seed: int
    stop: str  # "eos" or "length"
    logprobs: list[float]  # log p(token) under the (edited) model, before temperature / top-p
    prompt: str | None = None
    text: str | None = None  # generated text, special tokens skipped
    features: dict[str, SparseFeatures] | None = None


@dataclass
class Generation:
    samples: list[Sample]

    @property
    def tokens(self) -> list[list[int]]:
        return [s.tokens for s in self.samples]

    @property
    def texts(self) -> list[str | None]:
        return [s.text for s in self.samples]


@dataclass(frozen=True)
class _Sampling:
    max_new_tokens: int
    temperature: float
    top_p: float
    stop_at_eos: bool
    use_cache: bool
    eos: tuple[int, ...]
    pad: int


def generate(lm: Any, prompts: str | Sequence[str] | Sequence[Sequence[int]], *,
             max_new_tokens: int = 64, temperature: float = 1.0, top_p: float = 1.0,
             seeds: int | Sequence[int] = 0, edits: Iterable[Edit | TranscoderEdit] | None = (),
             saes: SAEs = None,
             keep_error: bool = True, record_features: bool | str | Sequence[str] = False,
             top_features: int = 16, chat: bool = False, stop_at_eos: bool = True,
             batch_size: int = 16, use_cache: bool = True, tokenizer: Any = None,
             eos_token_ids: Sequence[int] | None = None, past_positions: str = "warn",
             transcoders: Mapping[int, Any] | None = None) -> Generation:
    """Sample continuations of `prompts` (texts, or token-id lists) with optional edits.

    seeds: one per prompt, or an int s giving prompt i the seed s + i. `edits` and `saes`
    are as in `splice`; `rows` of an edit (and the first axis of a [B, T, d] PatchEdit
    value) index prompts. record_features: True (all SAEs), a site or sites.
    top_features: how many features to keep per token. use_cache=False recomputes the
    whole sequence each step (slow; for checking). past_positions: "warn" or "error" when a
    prompt, or a prompt and its new tokens, run past the model's max_position_embeddings
    (RoPE models extrapolate, less reliably); an empty prompt is always a BadValueError.
    transcoders: {layer: Transcoder} that the `TranscoderEdit`s among `edits` act through
    (see `saelab.interventions.transcoder_edits`).
    """
    check_sampling(max_new_tokens, temperature, top_p)
    integer("batch_size", batch_size, low=1)
    model, arch = unwrap(lm)
    tokenizer = tokenizer or getattr(lm, "tokenizer", None)
    texts, token_lists = _prepare(prompts, tokenizer, chat)
    choice("past_positions", past_positions, ("warn", "error"))
    _check_prompts(token_lists, max_new_tokens, lm_max_positions(model), getattr(lm, "name", None),
                   past_positions == "error")
    seed_list = ([seeds + i for i in range(len(token_lists))] if isinstance(seeds, int) else list(seeds))
    if len(seed_list) != len(token_lists):
        raise ValueError(f"generate: {len(seed_list)} seeds for {len(token_lists)} prompts; give one "
                         "per prompt or a single int")
    opts = _Sampling(max_new_tokens, temperature, top_p, stop_at_eos, use_cache,
                     *_special_ids(model, tokenizer, eos_token_ids))
    edits = list(edits or ())
    samples: list[Sample] = []
    for start in range(0, len(token_lists), batch_size):
        stop = min(start + batch_size, len(token_lists))
        batch_edits = _edits_for_rows(edits, start, stop)
        samples += _generate_batch(model, arch, token_lists[start:stop], seed_list[start:stop], opts,
                                   batch_edits, saes, keep_error, record_features, top_features,
                                   transcoders)
    for i, sample in enumerate(samples):
        sample.prompt = texts[i] if texts else None
        if tokenizer is not None:
            sample.text = tokenizer.decode(sample.tokens, skip_special_tokens=True)
    return Generation(samples)


# A higher temperature samples near-uniform noise from the vocabulary: past this it is a typo.
MAX_TEMPERATURE = 1e3


def check_sampling(max_new_tokens: int, temperature: float, top_p: float) -> None:
    """BadValueError unless 1 <= max_new_tokens, 0 <= temperature <= 1e3, 0 < top_p <= 1."""
    integer("max_new_tokens", max_new_tokens, low=1, high=ABSURD)
    number("temperature", temperature, low=0, high=MAX_TEMPERATURE)
    number("top_p", top_p, low=0, low_open=True, high=1)


def _check_prompts(token_lists: list[list[int]], max_new_tokens: int, limit: int | None,
                   name: str | None, strict: bool) -> None:
    """An empty prompt is refused; one past the model's positions is refused when `strict`
    (the command line), else warned about, as is a generation that would run past them."""
    model = name or "the model"
    for i, ids in enumerate(token_lists):
        if not ids:  # SmolLM2 adds no BOS: an empty prompt is zero tokens, nothing to condition on
            raise BadValueError(f"prompt {i} is empty: it has no tokens to continue; give some text")
        if strict:
            check_positions(f"prompt {i}", len(ids), limit, model)
    longest = max(len(ids) for ids in token_lists)
    if limit is not None and longest + max_new_tokens > limit:
        warnings.warn(f"a prompt of {longest:,} tokens + max_new_tokens={max_new_tokens} runs "
                      f"past {model}'s {limit:,} positions; tokens past them are extrapolated",
                      stacklevel=3)


def _prepare(prompts: Any, tokenizer: Any, chat: bool) -> tuple[list[str] | None, list[list[int]]]:
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("generate: no prompts given")
    if not isinstance(prompts[0], str):  # token ids
        if chat:
            raise ValueError("generate: chat=True formats text prompts; token-id prompts are used as given")
        return None, [[int(t) for t in p] for p in prompts]
    if tokenizer is None:
        raise ValueError("generate: text prompts need a tokenizer (pass an LM, or tokenizer=)")
    if not chat and "" in prompts:  # BOS alone would be a prompt with nothing to continue
        raise BadValueError(f"prompt {prompts.index('')} is empty: it has no tokens to "
                            "continue; give some text")
    texts = [chat_prompt(tokenizer, p) for p in prompts] if chat else prompts
    # BOS first, as every packed context the SAEs were trained on opens: without it the
    # first word is the attention sink and features fire hundreds of times there.
    ids, mask, _ = tokenize(tokenizer, texts, pad_side="right")
    return texts, [row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)]


def _special_ids(model: Any, tokenizer: Any, eos: Sequence[int] | None) -> tuple[tuple[int, ...], int]:
    config = getattr(model, "generation_config", None)
    if eos is None:
        ids = getattr(config, "eos_token_id", None)
        ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        eos = ids
    candidates = [getattr(config, "pad_token_id", None),
                  getattr(tokenizer, "pad_token_id", None), *eos, 0]
    return tuple(sorted(set(eos))), next(int(c) for c in candidates if c is not None)


def _edits_for_rows(edits: list[Any], start: int, stop: int) -> list[Any]:
    """The edits of prompts start..stop-1, with rows (and per-sample values) renumbered."""
    out = []
    for edit in edits:
        if isinstance(edit, PatchEdit) and edit.value.dim() == 3:
            edit = replace(edit, value=edit.value[start:stop])
        if edit.rows is not None:
            rows = [r - start for r in edit.rows if start <= r < stop]
            if not rows:
                continue
            edit = replace(edit, rows=rows)
        out.append(edit)
    return out


class _Forward:
    """The model's next-token logits, step after step, with or without the KV cache."""

    def __init__(self, model: Any, ids: Tensor, mask: Tensor, use_cache: bool):
        self.model, self.ids, self.mask, self.use_cache = model, ids, mask, use_cache
        self.cache: Any = None
        params = inspect.signature(model.forward).parameters
        self.extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    def __call__(self, token: Tensor | None = None) -> Tensor:
        if token is not None:  # append the token sampled last step
            self.ids = torch.cat([self.ids, token[:, None]], dim=1)
            self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        positions = position_ids(self.mask)  # (B, T): left padding does not count
        if self.use_cache and token is not None:
            out = self.model(input_ids=self.ids[:, -1:], attention_mask=self.mask,
                             position_ids=positions[:, -1:], **cache_kwargs(self.model, self.cache),
                             use_cache=True, **self.extra)
        else:
            out = self.model(input_ids=self.ids, attention_mask=self.mask, position_ids=positions,
                             use_cache=self.use_cache, **self.extra)
        self.cache = returned_cache(out) if self.use_cache else None
        return out.logits[:, -1].float()  # (B, V)


def _left_pad(rows: list[list[int]], pad: int, device: torch.device) -> tuple[Tensor, Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


def next_tokens(logits: Tensor, generators: Sequence[torch.Generator], temperature: float,
                top_p: float) -> Tensor:
    """(B,) next tokens: argmax at temperature 0, else row i sampled with generators[i]."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)  # (B, V)
    if top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (at least the top token).
        outside = sorted_p.cumsum(-1) - sorted_p >= top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p.masked_fill(outside, 0.0))
    return torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)])


@torch.inference_mode()
def _generate_batch(model: Any, arch: Any, prompts: list[list[int]], seeds: list[int],
                    opts: _Sampling, edits: list[Edit], saes: SAEs, keep_error: bool,
                    record: Any, top_n: int, transcoders: Mapping[int, Any] | None = None
                    ) -> list[Sample]:
    device = next(model.parameters()).device
    ids, mask = _left_pad(prompts, opts.pad, device)
    lengths = mask.sum(1)  # (B,)
    frame = Frame(pad=ids.shape[1] - lengths, prompt_len=lengths)
    generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
    batch, steps = len(prompts), opts.max_new_tokens
    new = torch.full((batch, steps), opts.pad, dtype=torch.long, device=device)
    logprobs = torch.zeros(batch, steps)
    n_new = torch.full((batch,), steps, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    eos = torch.tensor(opts.eos, dtype=torch.long, device=device)
    recorded: dict[str, list[tuple[Tensor, Tensor]]] = {}
    tc_edits = [e for e in edits if isinstance(e, TranscoderEdit)]
    edits = [e for e in edits if not isinstance(e, TranscoderEdit)]
    with splice(model, saes, keep_error=keep_error, edits=edits, record=record, frame=frame,
                arch=arch) as sp, edit_transcoders(model, transcoders or {}, tc_edits, frame=frame,
                                                   arch=arch):
        forward = _Forward(model, ids, mask, opts.use_cache)
        logits = forward()
        for t in range(steps):
            for site, feats in sp.feats.items():  # features at the position predicting token t
                vals, idx = feats[:, -1].float().topk(min(top_n, feats.shape[-1]), dim=-1)
                recorded.setdefault(site, []).append((idx, vals))
            token = next_tokens(logits, generators, opts.temperature, opts.top_p)
            token = token.masked_fill(done, opts.pad)
            new[:, t] = token
            logprobs[:, t] = torch.log_softmax(logits, -1).gather(1, token[:, None])[:, 0].cpu()
            if opts.stop_at_eos:
                ended = ~done & torch.isin(token, eos)
                n_new[ended] = t + 1
                done |= ended
            if t + 1 == steps or bool(done.all()):
                break
            logits = forward(token)
    return [_sample(i, prompts[i], seeds[i], new, n_new, done, logprobs, recorded, lengths)
            for i in range(batch)]


def _sample(i: int, prompt: list[int], seed: int, new: Tensor, n_new: Tensor, done: Tensor,
            logprobs: Tensor, recorded: dict, lengths: Tensor) -> Sample:
    n = int(n_new[i])
    features = None
    if recorded:
        features = {}
        for site, steps in recorded.items():
            k = min(n, len(steps))
            features[site] = SparseFeatures(
                torch.stack([idx[i] for idx, _ in steps[:k]]).cpu(),
                torch.stack([vals[i] for _, vals in steps[:k]]).cpu(),
                torch.arange(k) + int(lengths[i]) - 1)
    return Sample(prompt_tokens=prompt, tokens=new[i, :n].tolist(), seed=seed,
                  stop="eos" if bool(done[i]) else "length", logprobs=logprobs[i, :n].tolist(),
                  features=features)
