"""List study data: parsing, the last item's token and the metric's tokens, on three tokenizers."""

from __future__ import annotations

import copy
import functools

import pytest
from tiny_lm import char_tokenizer
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from saelab.studies.lists_data import (
    TEMPLATES,
    TOPICS,
    StudyInputError,
    distinct_items,
    entropy,
    list_prompts,
    metric_tokens,
    parse_list,
)
from saelab.studies.records import RecordLog

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
GEMMA = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' "
         "else m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
         "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


@functools.cache
def char_chat() -> PreTrainedTokenizerFast:
    """Characters as tokens, ChatML-like template with <eos> closing a turn."""
    tok = copy.deepcopy(char_tokenizer())
    tok.chat_template = CHATML.replace("<|im_start|>", "").replace("<|im_end|>", "<eos>")
    return tok


@functools.cache
def metaspace_chat() -> PreTrainedTokenizerFast:
    """A SentencePiece-style BPE ('▁' for spaces, no prefix space), Gemma-like template."""
    specials = ["<unk>", "<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    tok.decoder = decoders.Metaspace(prepend_scheme="never")
    corpus = ["- Apple\n- Banana\n- Cherry \n", "Provide me with a short list of Fruits.", "user model",
              "Enjoy these names! Here is a long list of Countries and Colors."] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                        initial_alphabet=list("abcdefghijklmnopqrstuvwxyz -\n!")))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<bos>",
                                   eos_token="<eos>", pad_token="<pad>",
                                   additional_special_tokens=["<start_of_turn>", "<end_of_turn>"])
    fast.chat_template = GEMMA
    return fast


def smollm2():
    pytest.importorskip("transformers")
    from saelab.models.load import load_model

    try:
        return load_model("smollm2-135m-instruct", dtype="float32").tokenizer
    except Exception as err:  # the embedded weights are installed by `make test`
        pytest.skip(f"embedded model unavailable: {err}")


TOKENIZERS = {"char": char_chat, "metaspace": metaspace_chat, "smollm2": smollm2}


@pytest.fixture(params=list(TOKENIZERS))
def tok(request):
    return TOKENIZERS[request.param]()


def _crafted(tok, body: str, end: str | None) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids ending with the bullet, generated ids for `body` [+ end token], eot ids)."""
    prompt = list_prompts(tok, ["Fruits"], {"short": TEMPLATES["short"]}, 1)[0].ids
    eot = metric_tokens(tok).end_of_turn
    generated = tok.encode(body, add_special_tokens=False) + ([eot] if end == "eot" else [])
    return prompt, generated, [eot]


def _text(tok, ids) -> str:
    """Token by token (the char tokenizer's decode of a list puts spaces between tokens)."""
    return "".join(tok.decode([t], skip_special_tokens=True) for t in ids)


@pytest.mark.parametrize("body,end,ending", [
    (" Apple\n- Banana\n- Cherry", "eot", "end_of_turn"),
    (" Apple\n- Banana\n- Cherry \n", "eot", "whitespace"),
    (" Apple\n- Banana\n- Cherry\n", "eot", "line_break"),
    (" Apple\n- Banana\n- Cherry\nEnjoy these names!", "eot", "text"),
    (" Apple\n- Banana\n- Cherry", None, "length"),
    (" Apple\n- Banana\n- Cherry\n-", None, "length"),
])
def test_parse_list_items_ending_and_last_token(tok, body, end, ending):
    prompt, generated, eot = _crafted(tok, body, end)
    parsed = parse_list(prompt, generated, tok, eot, stopped=end == "eot")
    assert parsed.items == ["Apple", "Banana", "Cherry"]
    assert parsed.n_items == 3
    assert parsed.ending == ending
    # the last item's last token holds Cherry's final "y", and nothing after it belongs to the item
    ids = prompt + generated
    assert _text(tok, ids[parsed.last_position:parsed.last_position + 1]).rstrip().endswith("y")
    assert _text(tok, ids[:parsed.last_position + 1]).endswith("- Cherry")
    assert not _text(tok, ids[parsed.last_position + 1:]).split("\n")[0].strip()  # nothing of the item left


def test_parse_list_without_items(tok):
    prompt, generated, eot = _crafted(tok, " \n", "eot")
    parsed = parse_list(prompt, generated, tok, eot)
    assert parsed.items == [] and parsed.last_position is None


def test_parse_list_refuses_a_prompt_without_the_bullet(tok):
    prompt, generated, eot = _crafted(tok, " Apple", "eot")
    with pytest.raises(StudyInputError, match="bullet"):
        parse_list(prompt[:-1] + tok.encode("x", add_special_tokens=False), generated, tok, eot)


def test_metric_tokens_found_through_the_tokenizer():
    t = metric_tokens(char_chat())
    assert char_chat().decode([t.whitespace]) == " " and char_chat().decode([t.line_break]) == "\n"
    assert t.end_of_turn == char_chat().convert_tokens_to_ids("<eos>")
    g = metric_tokens(metaspace_chat())
    assert g.end_of_turn == metaspace_chat().convert_tokens_to_ids("<end_of_turn>")  # not <eos>
    assert metaspace_chat().decode([g.line_break]) == "\n"


def test_metric_tokens_smollm2():
    tok = smollm2()
    t = metric_tokens(tok)
    assert tok.convert_ids_to_tokens(t.end_of_turn) == "<|im_end|>"
    assert tok.decode([t.whitespace]) == " " and tok.decode([t.line_break]) == "\n"


def test_list_prompts_cover_every_topic_template_sample():
    tok = char_chat()
    prompts = list_prompts(tok, TOPICS, TEMPLATES, samples=2)
    assert len(prompts) == 23 * 3 * 2 and len(TOPICS) == 23
    assert [p.index for p in prompts] == list(range(len(prompts)))
    assert {(p.template, p.topic, p.sample) for p in prompts} == {
        (t, topic, s) for t in TEMPLATES for topic in TOPICS for s in range(2)}
    first = prompts[0]
    text = _text(tok, first.ids)
    assert text.endswith("assistant\n-") and "short list of City Names" in text


def test_a_base_model_is_refused_clearly():
    with pytest.raises(Exception, match="no chat template"):
        list_prompts(char_tokenizer(), ["Fruits"], TEMPLATES, 1)


def test_distinct_items_counts_a_repeat_once():
    assert distinct_items([]) == 0
    assert distinct_items(["Andes"] * 30) == 1
    assert distinct_items(["Andes", " andes ", "Alps", "ALPS", "Urals"]) == 3


def test_entropy():
    assert entropy([]) == 0
    assert entropy(["a", "a", "A "]) == 0
    assert entropy(["a", "b"]) == pytest.approx(0.6931, abs=1e-4)


def test_record_log_drops_a_partial_last_line(tmp_path):
    path = tmp_path / "log.jsonl"
    log = RecordLog(path, key=("a", "b"))
    log.append([{"a": 1, "b": "x", "v": 1}, {"a": 2, "b": "x", "v": 2}])
    with open(path, "ab") as f:
        f.write(b'{"a": 3, "b": "x", "v"')  # killed mid-write
    again = RecordLog(path, key=("a", "b"))
    assert len(again) == 2 and (2, "x") in again and again.get((1, "x"))["v"] == 1
    again.append([{"a": 3, "b": "x", "v": 3}])
    assert len(RecordLog(path, key=("a", "b"))) == 3
