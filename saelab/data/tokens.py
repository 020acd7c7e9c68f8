"""Tokenize, pack into fixed-length contexts, chat prompts, special-token masks.

Packing layout (the stream every harvest and evaluation reads)::

    doc0 SEP doc1 SEP doc2 ...          SEP = eos (else bos); empty docs vanish
    cut into rows of context - b text tokens, b = 1 if the tokenizer has a BOS
    token, and each row gets [BOS] in front when b = 1

Every context opens with the BOS token whenever the tokenizer has one, even
when it does not add it by itself (SmolLM2, Qwen2): a model's first position
becomes an attention sink whose residual norm dwarfs every other token's
(SmolLM2 resid_post.12: ~24,000 at position 0 against ~150 elsewhere). Put a
text token there and it dominates SAE training and every variance-based
metric; put a special token there and it is masked out (as SAELens'
prepend_bos does).

    ids           (n, context) int64
    special_mask  (n, context) bool     BOS, SEP and any special token in the text

The final partial row is dropped. Context i of the stream is the same for
every `skip`, `rank` and `world_size`; those only choose which contexts you
get, in increasing order (`context_index` maps a row number back to i).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch

from saelab.dims import Bool, Int, Tensor, TokenIds, TokenMask
from saelab.errors import SaelabError

_PROBE = "Hello world"
_DOC_BATCH = 64  # documents per tokenizer call: big enough for the Rust batch path


class TokenBatch(NamedTuple):
    """A batch of packed contexts; unpacks as `ids, special_mask = batch`."""

    ids: TokenIds
    """(batch, pos) int64 token ids."""
    special_mask: TokenMask
    """(batch, pos) True at special tokens (BOS, separators, chat markers)."""


def context_index(row: int, *, skip: int = 0, rank: int = 0, world_size: int = 1) -> int:
    """Global context index of the `row`-th context (counted over all batches) that
    `pack(..., skip=skip, rank=rank, world_size=world_size)` yields."""
    first = skip + (rank - skip) % world_size
    return first + row * world_size


def prepends_bos(tokenizer) -> bool:
    """Whether encoding with add_special_tokens=True puts BOS first (Llama-2, Gemma: yes;
    SmolLM2, GPT-2, Qwen2: no). Probed rather than read from config, which often lies."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special = tokenizer(_PROBE, add_special_tokens=True)["input_ids"]
    without = tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
    return with_special[:1] == [bos] and without[:1] != [bos]


def context_bos_id(tokenizer) -> int | None:
    """The token that opens every packed context: the tokenizer's BOS, if it has one."""
    return tokenizer.bos_token_id


def separator_id(tokenizer) -> int:
    """The token put between documents: eos, else bos."""
    for tok_id in (tokenizer.eos_token_id, tokenizer.bos_token_id):
        if tok_id is not None:
            return int(tok_id)
    raise SaelabError(
        f"tokenizer {tokenizer.name_or_path!r} has neither an eos nor a bos token, so "
        "documents cannot be separated when packing; set tokenizer.eos_token first."
    )


def special_ids(tokenizer) -> list[int]:
    """all_special_ids plus added tokens flagged special (chat markers such as
    <|im_start|> or <start_of_turn> are often only the latter)."""
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special)
    return sorted(ids)


def special_token_mask(ids: Int[Tensor, "*shape"], tokenizer) -> Bool[Tensor, "*shape"]:
    """True where `ids` holds a special token of `tokenizer`."""
    return torch.isin(ids, torch.tensor(special_ids(tokenizer), dtype=ids.dtype))


def count_tokens(docs: Iterable[str], tokenizer) -> int:
    """Text tokens in `docs` (no BOS, no separators)."""
    return sum(len(ids) for ids in _encode_docs(docs, tokenizer))


def pack(
    docs: Iterable[str],
    tokenizer,
    context: int,
    *,
    batch_size: int = 32,
    n_tokens: int | None = None,
    skip: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[TokenBatch]:
    """Pack documents (a `Corpus` or any iterable of str) into contexts; see the module doc.

    n_tokens: the stream ends after ceil(n_tokens / context) contexts, counted from
        its start whatever `skip` is, so a resumed run ends where the first would have.
    skip: first global context index to produce. Earlier ones are still tokenized
        (their boundaries depend on it) but never materialized.
    rank, world_size: this worker gets contexts i with i % world_size == rank.
    """
    for name, value, low in (("context", context, 1), ("batch_size", batch_size, 1),
                             ("skip", skip, 0), ("world_size", world_size, 1)):
        if value < low:
            raise ValueError(f"pack: {name}={value}; expected an integer >= {low}.")
    if not 0 <= rank < world_size:
        raise ValueError(f"pack: rank={rank}; expected 0 <= rank < world_size={world_size}.")
    if n_tokens is not None and n_tokens < 1:
        raise ValueError(f"pack: n_tokens={n_tokens}; expected None or a positive count.")
    bos_id = context_bos_id(tokenizer)
    bos = bos_id is not None
    if bos and context < 2:
        raise ValueError(f"pack: context={context}; BOS takes one position, expected >= 2.")
    text_len = context - int(bos)
    end = math.inf if n_tokens is None else math.ceil(n_tokens / context)
    specials = torch.tensor(special_ids(tokenizer), dtype=torch.int64)

    def emit(rows: np.ndarray) -> TokenBatch:
        ids = torch.from_numpy(rows)  # (n, text_len)
        if bos:
            ids = torch.cat([torch.full((len(ids), 1), bos_id), ids], dim=1)
        return TokenBatch(ids, torch.isin(ids, specials))

    pending, n_pending = [], 0
    leftover = np.empty(0, dtype=np.int64)
    start = 0  # global index of the next complete context
    for chunk in _token_stream(docs, tokenizer):
        flat = np.concatenate([leftover, chunk])
        n = len(flat) // text_len
        leftover = flat[n * text_len:]
        index = np.arange(start, start + n)
        keep = (index >= skip) & (index < end) & (index % world_size == rank)
        if keep.any():
            pending.append(flat[: n * text_len].reshape(n, text_len)[keep])
            n_pending += int(keep.sum())
        start += n
        while n_pending >= batch_size:
            rows = np.concatenate(pending)
            yield emit(rows[:batch_size])
            pending, n_pending = [rows[batch_size:]], n_pending - batch_size
        if start >= end:
            break  # don't tokenize the rest of a large corpus
    if n_pending:
        yield emit(np.concatenate(pending))


def _encode_docs(docs: Iterable[str], tokenizer) -> Iterator[list[int]]:
    it = iter(docs)
    while group := list(itertools.islice(it, _DOC_BATCH)):
        # verbose=False: documents longer than model_max_length are expected here,
        # they are cut into contexts, so HF's "sequence too long" warning is noise.
        enc = tokenizer(group, add_special_tokens=False, return_attention_mask=False,
                        verbose=False)
        yield from enc["input_ids"]


def _token_stream(docs: Iterable[str], tokenizer) -> Iterator[np.ndarray]:
    """doc0 SEP doc1 SEP ... as int64 chunks of about _DOC_BATCH documents."""
    sep, first, pieces = [separator_id(tokenizer)], True, []
    for ids in _encode_docs(docs, tokenizer):
        if not ids:
            continue
        if not first:
            pieces.append(sep)
        pieces.append(ids)
        first = False
        if len(pieces) >= 2 * _DOC_BATCH:
            yield np.fromiter(itertools.chain.from_iterable(pieces), dtype=np.int64)
            pieces = []
    if pieces:
        yield np.fromiter(itertools.chain.from_iterable(pieces), dtype=np.int64)


# ---------------------------------------------------------------- prompts


def chat_prompt(
    tokenizer, user: str, *, assistant_prefix: str = "", system: str | None = None
) -> str:
    """The chat-formatted prompt up to the assistant's turn, plus `assistant_prefix`.

    >>> chat_prompt(tok, "Name a colour.", assistant_prefix="Sure! ")
    '<|im_start|>system\\n...<|im_start|>user\\nName a colour.<|im_end|>\\n<|im_start|>assistant\\nSure! '
    """
    if not getattr(tokenizer, "chat_template", None):
        raise SaelabError(
            f"tokenizer {tokenizer.name_or_path!r} has no chat template, so it cannot format "
            "a chat prompt; it is probably a base model. Pass plain text instead, or use an "
            "instruct model such as smollm2-135m-instruct."
        )
    turns = [{"role": "user", "content": user}]
    try:
        system_turn = [] if system is None else [{"role": "system", "content": system}]
        text = tokenizer.apply_chat_template(
            system_turn + turns, tokenize=False, add_generation_prompt=True
        )
    except Exception:  # jinja's TemplateError, raised by templates with no system role
        if system is None:
            raise
        # Gemma 2's template refuses a system turn; its model card folds it into the user turn.
        turns = [{"role": "user", "content": f"{system}\n\n{user}"}]
        text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    return text + assistant_prefix


def pad_id(tokenizer) -> int:
    """pad, else eos, else bos, else 0 (padded positions are masked out anyway)."""
    for tok_id in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id):
        if tok_id is not None:
            return int(tok_id)
    return 0


def encode_prompts(
    tokenizer, texts: Sequence[str], *, pad_side: str = "left"
) -> tuple[TokenIds, Int[Tensor, "batch pos"]]:
    """Encode prompts as one padded batch: (ids, attention_mask), both (batch, pos) int64.

    Special tokens are added as the tokenizer does, except BOS for a text that
    already starts with it (chat templates that write <bos> themselves, as Gemma's
    do, would otherwise get two). The tokenizer is not modified; a missing pad
    token is taken from `pad_id`. Left padding shifts positions: pass
    `position_ids(attention_mask)` to a plain forward (generate() does this itself).
    `tokenize` is the public form, which also puts BOS first as packed contexts do.
    """
    return _pad(tokenizer, _encode_texts(tokenizer, texts, "encode_prompts"), pad_side)


class Tokenized(NamedTuple):
    """Prompts as one padded batch; unpacks as `ids, attention_mask, keep = tokenize(...)`."""

    input_ids: TokenIds
    """(batch, pos) int64 token ids; every row opens with BOS when the tokenizer has one."""
    attention_mask: Int[Tensor, "batch pos"]
    """(batch, pos) int64: 1 at tokens, 0 at padding."""
    keep: TokenMask
    """(batch, pos) bool: True at text tokens, False at padding and special tokens (BOS, chat
    markers): the positions SAE training, metrics and dashboards count."""


def tokenize(
    lm_or_tokenizer, texts: str | Sequence[str], *, chat: bool = False, pad_side: str = "right"
) -> Tokenized:
    """Texts as the model sees them everywhere in saelab: BOS first, specials masked.

    lm_or_tokenizer: an `LM` (from `load_model`) or a Hugging Face tokenizer.
    texts: one text or a list; with `chat`, each becomes the user turn of the chat
        template, up to the assistant's turn (`chat_prompt`).
    pad_side: "right" (default) keeps positions 0.. for a plain forward; with "left",
        pass `position_ids(attention_mask)` too.

    BOS is put first whenever the tokenizer has one, even if it does not add it
    itself (SmolLM2, Qwen2), as every packed context does (see the module doc):
    without it the first word becomes the attention sink, with a residual norm
    ~150x the others, and an SAE fires hundreds of features there. Raises
    ValueError for an empty list, SaelabError for `chat` without a chat template.

    >>> ids, mask, keep = tokenize(lm, ["The river flows"])
    >>> ids[0, 0] == lm.tokenizer.bos_token_id, keep[0, 0]
    (tensor(True), tensor(False))
    """
    tokenizer = getattr(lm_or_tokenizer, "tokenizer", lm_or_tokenizer)
    if isinstance(texts, str):
        texts = [texts]
    if chat:
        texts = [chat_prompt(tokenizer, t) for t in texts]
    rows = _encode_texts(tokenizer, texts, "tokenize")
    bos = context_bos_id(tokenizer)
    if bos is not None:
        rows = [row if row[:1] == [bos] else [bos, *row] for row in rows]
    ids, mask = _pad(tokenizer, rows, pad_side)
    return Tokenized(ids, mask, mask.bool() & ~special_token_mask(ids, tokenizer))


def _encode_texts(tokenizer, texts: Sequence[str], caller: str) -> list[list[int]]:
    """Token ids per text, special tokens added as the tokenizer does (BOS once at most)."""
    if isinstance(texts, str) or not texts:
        raise ValueError(f"{caller}: texts must be a non-empty list of strings.")
    bos_text = tokenizer.bos_token
    encoded: list[list[int]] = [[] for _ in texts]
    for add_special in (True, False):
        where = [i for i, t in enumerate(texts)
                 if add_special != bool(bos_text and t.startswith(bos_text))]
        if where:
            enc = tokenizer([texts[i] for i in where], add_special_tokens=add_special,
                            return_attention_mask=False)["input_ids"]
            for i, ids in zip(where, enc, strict=True):
                encoded[i] = ids
    return encoded


def _pad(tokenizer, rows: list[list[int]], pad_side: str) -> tuple[TokenIds, Int[Tensor, "batch pos"]]:
    if pad_side not in ("left", "right"):
        raise ValueError(f"pad_side={pad_side!r}; expected 'left' or 'right'.")
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id(tokenizer), dtype=torch.int64)
    mask = torch.zeros((len(rows), width), dtype=torch.int64)
    for i, seq in enumerate(rows):
        cols = slice(width - len(seq), width) if pad_side == "left" else slice(0, len(seq))
        ids[i, cols] = torch.tensor(seq, dtype=torch.int64)
        mask[i, cols] = 1
    return ids, mask


def position_ids(attention_mask: Int[Tensor, "batch pos"]) -> Int[Tensor, "batch pos"]:
    """Positions counting only real tokens (0 on left padding), as HF generate() builds them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
