"""The list study's data: prompts, sampled lists, parsing, and the metric's tokens.

    prompts = list_prompts(tok, TOPICS, TEMPLATES, samples=5)     # chat turn + pre-filled "-"
    parsed = parse_list(prompt_ids, generated_ids, tok, eot_ids)  # items, ending, last item's token
    ws, nl, eot = metric_tokens(tok)                              # looked up, never hard-coded

Everything here works on token ids and the tokenizer's own decoding, so it is
the same for byte-level BPE (SmolLM2), SentencePiece-style ("▁") vocabularies
(Gemma) and character tokenizers.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from saelab.data.tokens import chat_prompt
from saelab.errors import SaelabError

TOPICS = ("City Names", "Countries", "Animals", "Types of Trees", "Types of Flowers", "Fruits",
          "Vegetables", "Car Brands", "Sports", "Rivers", "Mountains", "Ocean", "Inventions",
          "Languages", "Capital Cities", "Movies", "Books", "TV Shows", "Famous Scientists",
          "Famous Writers", "Video Games", "Companies", "Colors")

_ASK = "Provide me with a {size}list of {topic}. Just provide the names, no need for any other information."
TEMPLATES = {"short": _ASK.replace("{size}", "short "), "long": _ASK.replace("{size}", "long "),
             "plain": _ASK.replace("{size}", "")}

# How a list ended, read from the tokens right after its last item.
ENDINGS = ("end_of_turn", "whitespace", "line_break", "text", "length")


class StudyInputError(SaelabError):
    """The model or tokenizer cannot run this study as asked."""


@dataclass(frozen=True)
class ListPrompt:
    index: int
    topic: str
    template: str
    sample: int  # 0..samples-1 within (topic, template)
    ids: list[int]  # chat prompt tokens, ending with the pre-filled bullet


def list_prompts(tokenizer: Any, topics: Sequence[str], templates: dict[str, str], samples: int,
                 bullet: str = "-") -> list[ListPrompt]:
    """One prompt per (template, topic, sample), the assistant turn pre-filled with `bullet`.

    The bullet's ids are appended to the encoded chat prompt rather than encoded
    with it, so the turn boundary tokenizes exactly as in the template.
    """
    bullet_ids = tokenizer.encode(bullet, add_special_tokens=False)
    prompts = []
    for template, text in templates.items():
        for topic in topics:
            head = _encode_chat(tokenizer, text.format(topic=topic))
            for s in range(samples):
                prompts.append(ListPrompt(len(prompts), topic, template, s, head + bullet_ids))
    return prompts


def _encode_chat(tokenizer: Any, user: str) -> list[int]:
    text = chat_prompt(tokenizer, user)  # raises a clear error for a tokenizer with no template
    bos = tokenizer.bos_token
    return tokenizer.encode(text, add_special_tokens=not (bos and text.startswith(bos)))


# ---------------------------------------------------------------- parsing


@dataclass
class ParsedList:
    items: list[str]
    ending: str  # one of ENDINGS
    last_position: int | None  # absolute position (prompt + generated) of the last item's last token

    @property
    def n_items(self) -> int:
        return len(self.items)


def parse_list(prompt_ids: Sequence[int], generated: Sequence[int], tokenizer: Any,
               eot_ids: Sequence[int], bullet: str = "-", stopped: bool = True) -> ParsedList:
    """Items, how the list ended, and where its last item ends.

    The assistant text is the prompt's pre-filled bullet plus the generated
    tokens. An item is a line starting with the bullet and holding more than the
    bullet; its last token is the one holding the line's last non-blank
    character. `stopped` is False when sampling hit the length limit.
    """
    bullet_ids = tokenizer.encode(bullet, add_special_tokens=False)
    start = len(prompt_ids) - len(bullet_ids)
    if list(prompt_ids[start:]) != bullet_ids:
        raise StudyInputError(f"the prompt does not end with the bullet {bullet!r}; build prompts "
                              "with list_prompts")
    tail = [*bullet_ids, *generated]
    pieces = [tokenizer.decode([t], skip_special_tokens=True) for t in tail]
    ends, total = [], 0
    for piece in pieces:
        total += len(piece)
        ends.append(total)
    text = "".join(pieces)
    items, last_char, offset = [], None, 0
    for line in text.split("\n"):
        stripped = line.strip()
        if stripped.startswith(bullet) and stripped[len(bullet):].strip():
            items.append(stripped[len(bullet):].strip())
            last_char = offset + len(line.rstrip()) - 1
        offset += len(line) + 1
    if last_char is None:
        return ParsedList([], "length" if not stopped else "text", None)
    last = next(i for i, end in enumerate(ends) if end > last_char)
    ending = _ending(tail[last + 1:], pieces[last + 1:], set(eot_ids), stopped)
    return ParsedList(items, ending, start + last)


def _ending(after: list[int], pieces: list[str], eot: set[int], stopped: bool) -> str:
    """What follows the last item's last token before the turn ends.

    end_of_turn: the end-of-turn token right away; whitespace: a blank first
    (" " or " \n", the original's filler token); line_break: a bare line break
    first; text: a non-list line follows; length: sampling was cut off first.
    """
    if not stopped:
        return "length"  # cut off: whatever follows the last item is unfinished
    blank = None
    for token, piece in zip(after, pieces, strict=True):
        if token in eot:
            break
        if piece == "":
            continue  # another special token
        if piece.strip():
            return "text"
        blank = blank or ("line_break" if piece.startswith("\n") else "whitespace")
    return blank or "end_of_turn"


def _item_key(item: str) -> str:
    """An item as compared for repeats: case and surrounding blanks ignored."""
    return item.strip().lower()


def distinct_items(items: Sequence[str]) -> int:
    """Different items in one list ("Andes" x 30 is 1): what a looping list does not add."""
    return len({_item_key(item) for item in items})


def entropy(items: Sequence[str]) -> float:
    """Shannon entropy (nats) of the item strings of one list: 0 for repeats, log n for distinct."""
    if not items:
        return 0.0
    counts = Counter(_item_key(item) for item in items)
    n = len(items)
    return -sum(c / n * math.log(c / n) for c in counts.values())


# ---------------------------------------------------------------- metric tokens


@dataclass(frozen=True)
class MetricTokens:
    whitespace: int | None  # None: the tokenizer has no single-token " "
    line_break: int
    end_of_turn: int


def metric_tokens(tokenizer: Any) -> MetricTokens:
    """The whitespace, line-break and end-of-turn token ids of this tokenizer.

    The end of turn is read off the chat template (the special token that closes
    an assistant message), so Gemma's <end_of_turn> and ChatML's <|im_end|> are
    found without naming them.
    """
    def single(text: str) -> int | None:
        ids = tokenizer.encode(text, add_special_tokens=False)
        return ids[0] if len(ids) == 1 else None

    line_break = single("\n")
    if line_break is None:
        raise StudyInputError(f"tokenizer {tokenizer.name_or_path!r} has no single line-break token, "
                              "so a list's items cannot be told apart token by token")
    return MetricTokens(single(" "), line_break, end_of_turn_id(tokenizer))


def end_of_turn_id(tokenizer: Any) -> int:
    """The special token that ends an assistant turn in the chat template (else the EOS token)."""
    marker = "QQQ"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": marker}], tokenize=False)
    except Exception:  # no template: the study refuses earlier with a clear message
        text = ""
    rest = text[text.rfind(marker) + len(marker):] if marker in text else ""
    special = set(tokenizer.all_special_ids)
    for token in tokenizer.encode(rest, add_special_tokens=False):
        if token in special:
            return int(token)
    if tokenizer.eos_token_id is None:
        raise StudyInputError(f"tokenizer {tokenizer.name_or_path!r} has neither an end-of-turn "
                              "token in its chat template nor an EOS token")
    return int(tokenizer.eos_token_id)
