"""What a graph explains: the top next tokens, or a metric of `saelab attribute`'s grammar.

Every target is a direction ``D (T, d)`` read at the lm_head's input (after the
final norm, whose scale is frozen), so its value ``sum(D * final)`` is linear in
the sources:

- a token: ``W_U[t] - mean_v W_U[v]`` at the last position, its logit minus the
  mean logit (as circuit-tracer's de-meaned unembedding columns), weighted by
  its probability; the tokens are the most likely ones until their probability
  adds up to `desired_prob` (at most `max_logits`).
- a metric: the gradient of the metric in the lm_head's input on the clean pass
  (its linearisation; for a logit difference without softcapping it is exact:
  the metric minus the lm_head's bias), weight 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from saelab.attribution.metrics import Metric, MetricBatch
from saelab.graphs.frozen import GraphError, _lm_head


@dataclass
class Target:
    """One target node."""

    label: str  # the token's text, or the metric's spec
    vocab_idx: int  # the token id; vocab_size + k for the k-th non-token target (circuit-tracer)
    weight: float  # probability of the token, 1 for a metric
    direction: Tensor  # (T, d) read at the lm_head's input
    pos: int  # position shown in the graph (the last one the direction reads)


def logit_targets(model: nn.Module, tokenizer: Any, logits: Tensor, T: int, *,
                  max_logits: int = 10, desired_prob: float = 0.95) -> list[Target]:
    """The most likely next tokens until `desired_prob` of the probability (at most `max_logits`)."""
    probs = torch.softmax(logits[0, -1].double(), -1)
    top_p, top_i = probs.topk(min(max_logits, probs.numel()))
    cut = int(torch.searchsorted(top_p.cumsum(0), torch.tensor(desired_prob, dtype=top_p.dtype)))
    top_p, top_i = top_p[:cut + 1], top_i[:cut + 1]
    W_U = _lm_head(model).weight.detach()  # (V, d)
    mean = W_U.mean(0)
    out = []
    for p, t in zip(top_p.tolist(), top_i.tolist(), strict=True):
        direction = torch.zeros(T, W_U.shape[1], dtype=W_U.dtype)
        direction[-1] = W_U[t] - mean
        text = tokenizer.decode([t]) if tokenizer is not None else str(t)
        out.append(Target(text, t, p, direction, T - 1))
    return out


def metric_target(model: nn.Module, tokenizer: Any, ids: Tensor, metric: Metric, spec: str,
                  vocab_size: int) -> Target:
    """The metric's linearisation in the lm_head's input of the clean pass, as one target."""
    metric.check(tokenizer)
    head = _lm_head(model)
    grabbed: dict[str, Tensor] = {}

    def leaf(_m, args):
        x = args[0].detach().requires_grad_(True)
        grabbed["x"] = x
        return (x, *args[1:])

    handle = head.register_forward_pre_hook(leaf)
    try:
        with torch.enable_grad():
            logits = model(input_ids=ids, use_cache=False).logits
            batch = MetricBatch(ids, torch.tensor([ids.shape[1]]), tokenizer)
            value = metric(logits, batch)
            (grad,) = torch.autograd.grad(value.sum(), grabbed["x"])
    finally:
        handle.remove()
    direction = grad[0].detach()
    used = direction.abs().sum(-1).nonzero()
    if used.numel() == 0:
        raise GraphError(f"the metric {spec!r} does not depend on the logits of this prompt; "
                         "pick tokens or a position the prompt reaches.")
    return Target(spec, vocab_size, 1.0, direction, int(used.max()))


def target_values(targets: list[Target], final: Tensor) -> Tensor:
    """(n,) each target's value on a pass whose lm_head input is `final` (1, T, d)."""
    return torch.stack([(t.direction.to(final.dtype) * final[0]).sum() for t in targets])
