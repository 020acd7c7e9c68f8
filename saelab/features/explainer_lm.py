"""A local Hugging Face causal LM as the explainer of features (for GPU machines).

    explainer = LMExplainer.load("Qwen/Qwen2.5-7B-Instruct", device="cuda")
    text = explainer.explain(record)          # a FeatureRecord of saelab/features/explain.py

The model sees the feature's top examples, the activating token marked <<so>>,
and is asked for a short phrase; the answer's first line, stripped of quotes and
a leading "the feature fires on", is the explanation. Any model `load_model` opens
works (a hub id when the user has it, or a local folder); chat models get their
chat template. Generation is greedy, so the same model gives the same explanation.
"""

from __future__ import annotations

import re
from typing import Any

import torch

MAX_EXAMPLES = 10
PROMPT = ("Below are excerpts of text. In each, one token is marked like <<this>>: a hidden "
          "feature of a language model fires most on it.\n\n{examples}\n\n"
          "In a few words, what does the feature detect? Answer with a short phrase.")
_PREFIX = re.compile(r"^(answer|explanation|the feature (detects|fires on|is))\s*[:\-]?\s*",
                     re.IGNORECASE)


def parse_explanation(generated: str, max_chars: int = 120) -> str:
    """The first non-empty line of `generated`, without quotes or a restated question."""
    for line in generated.splitlines():
        line = _PREFIX.sub("", line.strip(" \"'`*.")).strip(" \"'`*.")
        if line:
            return line[:max_chars]
    return ""


class LMExplainer:
    """Explanations from a causal LM (a saelab LM: `.model` with `generate`, `.tokenizer`)."""

    def __init__(self, lm: Any, *, max_new_tokens: int = 24, name: str | None = None):
        self.lm, self.max_new_tokens = lm, max_new_tokens
        self.name = name or getattr(lm, "name", "lm")

    @classmethod
    def load(cls, name_or_path: str, *, device: str = "cpu", **kw: Any) -> LMExplainer:
        from saelab.models.load import load_model

        return cls(load_model(name_or_path, device=device), name=str(name_or_path), **kw)

    def prompt(self, record: Any) -> str:
        lines = [f"{i + 1}. {left}<<{tok}>>{right}".replace("\n", " ")
                 for i, (left, tok, right) in enumerate(record.top[:MAX_EXAMPLES])]
        text = PROMPT.format(examples="\n".join(lines))
        tok = self.lm.tokenizer
        if getattr(tok, "chat_template", None):
            return tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True)
        return text + "\nAnswer:"

    @torch.no_grad()
    def explain(self, record: Any) -> str:
        """The parsed explanation of one feature ("" when the model gives nothing usable)."""
        tok, model = self.lm.tokenizer, self.lm.model
        enc = tok(self.prompt(record), return_tensors="pt", add_special_tokens=not getattr(
            tok, "chat_template", None)).to(next(model.parameters()).device)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        out = model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False,
                             pad_token_id=pad)
        return parse_explanation(tok.decode(out[0, enc["input_ids"].shape[1]:],
                                            skip_special_tokens=True))
