"""A tiny random model with a character-level tokenizer, wrapped as an `LM`.

Unit tests of harvesting, training and evaluation need a model and a
tokenizer that fit together and load with no download: characters are the
tokens, so any text (the builtin corpus included) tokenizes without unknowns.
"""

from __future__ import annotations

import functools
import string

from tiny_models import tiny_model
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from saelab.models.load import LM
from saelab.models.sites import describe

SPECIALS = ["<unk>", "<bos>", "<eos>", "<pad>"]
CHARS = sorted(set(string.printable) - set("\x0b\x0c"))
VOCAB = SPECIALS + CHARS  # 4 + 98 = 102 < 128


@functools.cache
def char_tokenizer(bos: bool = True) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A",
                                                           special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<bos>",
                                   eos_token="<eos>", pad_token="<pad>")


def tiny_lm(family: str = "llama", seed: int = 0, **overrides) -> LM:
    model = tiny_model(family, seed=seed, vocab_size=128, **overrides)
    return LM(model=model, tokenizer=char_tokenizer(), arch=describe(model),
              name=f"tiny-{family}", source_hash=f"tiny-{family}-{seed}")
