"""Metrics: one number per example, computed from the logits, that attribution explains.

    LogitDiff(" ", "\\n", position=-1)                 logit(" ") - logit("\\n") at the last token
    LogitDiff([" ", "  "], "\\n", logprob=True)       log P(" " or "  ") - log P("\\n")
    ContinuationLogProb(" Paris")                   log p(" Paris" | prompt), appended to the prompt
    LogitsMetric(lambda logits, batch: ...)         anything else: (B, T, V) -> (B,)
    parse_metric('logit_diff:" ":"\\n"@-1')          the command line's spelling

A token set's logit is the mean of its tokens' logits; its log-probability is
the log of their total probability (logsumexp of log-probs). Tokens are given
as strings and looked up in the tokenizer, so the same metric means the same
thing on SmolLM2, Gemma and GPT-2 whose ids differ. A string that is not one
token is refused unless ``allow_multi=True`` (then its first token is used).

Positions are indices into each example's own tokens (left padding does not
count; negative counts from the end), or a function ``(token ids, tokenizer)
-> index`` called per example, such as `last_item_last_token`.

Command-line grammar (`parse_metric`)::

    SPEC   := KIND ":" SET ":" SET ["@" POS]       KIND: logit_diff | logprob_diff
            | "logprob:" STRING                    log-prob of the continuation STRING
    SET    := STRING ("," STRING)*                 a token set
    STRING := a double-quoted JSON string          escapes: \\n \\t \\" \\\\ \\uXXXX
    POS    := an integer, default -1               index into the example's tokens
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from saelab.errors import SaelabError

Position = int | Callable[[list[int], Any], int]
TokenSet = str | int | Sequence[str | int]


class MetricError(SaelabError):
    """A metric that cannot be evaluated as given (unknown token, bad position, bad spec)."""


@dataclass
class MetricBatch:
    """What a metric sees besides the logits: a left-padded batch of examples."""

    ids: Tensor  # (B, T) token ids, left-padded
    lengths: Tensor  # (B,) real tokens per row
    tokenizer: Any = None

    @property
    def pad(self) -> Tensor:
        return self.ids.shape[1] - self.lengths  # (B,)

    def columns(self, position: Position) -> Tensor:
        """(B,) column of `position` in each row, checked to fall on a real token."""
        width = self.ids.shape[1]
        cols = []
        for row in range(self.ids.shape[0]):
            n, pad = int(self.lengths[row]), width - int(self.lengths[row])
            if callable(position):
                p = int(position(self.ids[row, pad:].tolist(), self.tokenizer))
            else:
                p = int(position)
            if not -n <= p < n:
                raise MetricError(f"metric position {p} is outside example {row} of {n} tokens; "
                                  f"use -{n}..{n - 1} (negative counts from the end).")
            cols.append(pad + p % n)
        return torch.tensor(cols, dtype=torch.long, device=self.ids.device)


def token_ids(tokenizer: Any, tokens: TokenSet, *, allow_multi: bool = False) -> list[int]:
    """Ids of a token set given as strings (or ids), each string exactly one token."""
    items = [tokens] if isinstance(tokens, str | int) else list(tokens)
    if not items:
        raise MetricError("an empty token set; give at least one token string")
    ids = []
    for item in items:
        if isinstance(item, int):
            ids.append(item)
            continue
        if tokenizer is None:
            raise MetricError(f"token {item!r} is a string, so the metric needs a tokenizer "
                              "(pass an LM, or tokenizer=)")
        found = tokenizer.encode(item, add_special_tokens=False)
        if len(found) != 1 and not (allow_multi and found):
            pieces = [tokenizer.decode([t]) for t in found]
            hint = f"; allow_multi=True would take its first token {pieces[0]!r}" if pieces else ""
            raise MetricError(f"{item!r} is {len(found)} tokens {pieces} for this tokenizer, not one"
                              f"{hint}. Give a single token, e.g. one of those pieces.")
        ids.append(found[0])
    return ids


class Metric:
    """Base class: ``metric(logits (B, T, V), batch) -> (B,)``, differentiable in the logits."""

    def check(self, tokenizer: Any) -> None:
        """Raise a MetricError now for anything that would fail later (unknown tokens)."""

    def continuation(self, tokenizer: Any) -> list[int]:
        """Tokens appended to every prompt before the forward pass (none by default)."""
        return []

    def __call__(self, logits: Tensor, batch: MetricBatch) -> Tensor:
        raise NotImplementedError


def _at(logits: Tensor, cols: Tensor) -> Tensor:
    return logits[torch.arange(logits.shape[0], device=logits.device), cols].float()  # (B, V)


@dataclass(frozen=True)
class LogitDiff(Metric):
    """``score(a) - score(b)`` at `position`; score = mean logit, or log P(set) with `logprob`."""

    a: TokenSet
    b: TokenSet
    position: Position = -1
    logprob: bool = False
    allow_multi: bool = False

    def check(self, tokenizer: Any) -> None:
        self._ids(tokenizer)

    def _ids(self, tokenizer: Any) -> tuple[list[int], list[int]]:
        return (token_ids(tokenizer, self.a, allow_multi=self.allow_multi),
                token_ids(tokenizer, self.b, allow_multi=self.allow_multi))

    def __call__(self, logits: Tensor, batch: MetricBatch) -> Tensor:
        a, b = self._ids(batch.tokenizer)
        vocab = logits.shape[-1]
        if max(a + b) >= vocab:
            raise MetricError(f"token id {max(a + b)} is outside the model's vocabulary of {vocab}")
        at = _at(logits, batch.columns(self.position))  # (B, V)
        if self.logprob:
            logp = torch.log_softmax(at, -1)
            return logp[:, a].logsumexp(-1) - logp[:, b].logsumexp(-1)
        return at[:, a].mean(-1) - at[:, b].mean(-1)


@dataclass(frozen=True)
class ContinuationLogProb(Metric):
    """``log p(target | prompt)``: the target's tokens are appended to every prompt."""

    target: str | Sequence[int]

    def continuation(self, tokenizer: Any) -> list[int]:
        if not isinstance(self.target, str):
            return [int(t) for t in self.target]
        if tokenizer is None:
            raise MetricError("a text continuation needs a tokenizer (pass an LM, or tokenizer=)")
        ids = tokenizer.encode(self.target, add_special_tokens=False)
        if not ids:
            raise MetricError(f"the continuation {self.target!r} has no tokens")
        return ids

    def check(self, tokenizer: Any) -> None:
        self.continuation(tokenizer)

    def __call__(self, logits: Tensor, batch: MetricBatch) -> Tensor:
        target = torch.tensor(self.continuation(batch.tokenizer), device=logits.device)  # (C,)
        c = target.numel()
        if int(batch.lengths.min()) <= c:
            raise MetricError(f"the continuation has {c} tokens but an example has only "
                              f"{int(batch.lengths.min())} in all; a prompt must come before it")
        # Logits at column t predict token t+1: the C positions before the last C tokens.
        logp = torch.log_softmax(logits[:, -c - 1:-1].float(), -1)  # (B, C, V)
        return logp.gather(-1, target.expand(logits.shape[0], c)[..., None])[..., 0].sum(-1)


@dataclass(frozen=True)
class LogitsMetric(Metric):
    """Any callable ``fn(logits)`` or ``fn(logits, batch)`` returning one value per example (B,)."""

    fn: Callable[..., Tensor]

    def __call__(self, logits: Tensor, batch: MetricBatch) -> Tensor:
        try:
            n_args = len(inspect.signature(self.fn).parameters)
        except (TypeError, ValueError):  # builtins without a signature
            n_args = 2
        out = self.fn(logits, batch) if n_args >= 2 else self.fn(logits)
        if out.shape != (logits.shape[0],):
            raise MetricError(f"the metric function returned shape {list(out.shape)}; it must "
                              f"return one value per example, shape [{logits.shape[0]}]")
        return out


def as_metric(metric: Metric | str | Callable[..., Tensor], *, allow_multi: bool = False) -> Metric:
    """A Metric from a Metric, a command-line spec (`parse_metric`) or a callable on logits."""
    if isinstance(metric, Metric):
        return metric
    if isinstance(metric, str):
        return parse_metric(metric, allow_multi=allow_multi)
    if callable(metric):
        return LogitsMetric(metric)
    raise TypeError(f"a metric must be a Metric, a spec string or a callable; got {type(metric).__name__}")


# ---------------------------------------------------------------- positions


def last_item_last_token(bullet: str = "-") -> Callable[[list[int], Any], int]:
    """Position function: the last token of the last line that starts with `bullet`.

    For the list study: a chat transcript whose assistant turn is a bulleted list.
    Trailing whitespace on the line does not count; special tokens (end of turn)
    have no text. Lines are found in the per-token decoded text.
    """
    def find(ids: list[int], tokenizer: Any) -> int:
        pieces = [tokenizer.decode([t], skip_special_tokens=True) for t in ids]
        ends, total = [], 0
        for piece in pieces:
            total += len(piece)
            ends.append(total)  # text[:ends[i]] is everything up to token i
        text = "".join(pieces)
        start = 0
        last_char = None
        for line in text.split("\n"):
            content = line.rstrip()
            if content.lstrip().startswith(bullet) and len(content.lstrip()) > len(bullet):
                last_char = start + len(content) - 1
            start += len(line) + 1
        if last_char is None:
            raise MetricError(f"no line starting with {bullet!r} followed by text in the example "
                              f"({text[-80:]!r}); is it a bulleted list?")
        return next(i for i, end in enumerate(ends) if end > last_char)
    return find


# ---------------------------------------------------------------- command-line spec


def _strings(text: str, spec: str) -> tuple[list[str], str]:
    """Comma-separated JSON strings at the start of `text`; returns them and the rest."""
    decoder, found, rest = json.JSONDecoder(), [], text
    while True:
        if not rest.startswith('"'):
            raise MetricError(f"metric {spec!r}: expected a double-quoted string at {rest[:20]!r}; "
                              'e.g. logit_diff:" ":"\\n"@-1')
        try:
            value, end = decoder.raw_decode(rest)
        except json.JSONDecodeError as err:
            raise MetricError(f"metric {spec!r}: bad string at {rest[:20]!r} ({err.msg}); strings "
                              'are double-quoted with JSON escapes (\\n, \\t, \\", \\\\)') from None
        found.append(value)
        rest = rest[end:]
        if not rest.startswith(","):
            return found, rest
        rest = rest[1:]


def parse_metric(spec: str, *, allow_multi: bool = False) -> Metric:
    """A Metric from ``KIND:"A":"B"@POS`` or ``logprob:"TEXT"`` (grammar in the module docstring)."""
    kind, colon, rest = spec.strip().partition(":")
    if not colon or kind not in ("logit_diff", "logprob_diff", "logprob"):
        raise MetricError(f"metric {spec!r}: expected KIND:... with KIND logit_diff, logprob_diff "
                          'or logprob, e.g. logit_diff:" ":"\\n"@-1')
    a, rest = _strings(rest, spec)
    if kind == "logprob":
        if len(a) != 1 or rest:
            raise MetricError(f'metric {spec!r}: logprob takes one string, e.g. logprob:" Paris"')
        return ContinuationLogProb(a[0])
    if not rest.startswith(":"):
        raise MetricError(f"metric {spec!r}: expected ':' and a second token set after {a!r}")
    b, rest = _strings(rest[1:], spec)
    position = -1
    if rest:
        if not rest.startswith("@"):
            raise MetricError(f"metric {spec!r}: unexpected {rest!r}; the position goes last, '@-1'")
        try:
            position = int(rest[1:])
        except ValueError:
            raise MetricError(f"metric {spec!r}: position {rest[1:]!r} is not an integer") from None
    return LogitDiff(a, b, position, logprob=kind == "logprob_diff", allow_multi=allow_multi)
