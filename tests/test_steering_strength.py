"""Steering strength in site norms: the defaults change the text and keep it fluent.

On an SAE trained on the embedded model, the raw units a saved SAE takes made every
old default (`--strength 8`, CLI 4, browser 8) add several whole residual streams.
"""

import math

import pytest
import torch

from saelab.data.corpus import load_corpus
from saelab.data.tokens import pack
from saelab.interventions.commands import run_generate
from saelab.interventions.strength import activation_value, site_norm
from saelab.models.hooks import capture
from saelab.sae import load_sae
from saelab.sae.testing import random_sae

PROMPT = "Tell me about your favourite place."


def test_activation_value_is_strength_in_site_norms():
    sae = random_sae("relu", 16, 8, seed=0)
    with torch.no_grad():
        sae.W_dec[3] *= 5.0
    row = float(sae.W_dec[3].detach().norm())
    assert activation_value(sae, 3, 0.5, 120.0) == pytest.approx(0.5 * 120.0 / row)
    with pytest.raises(ValueError, match="out of range"):
        activation_value(sae, 8, 1.0, 1.0)
    with torch.no_grad():
        sae.W_dec[2].zero_()
    with pytest.raises(ValueError, match="zero decoder row"):
        activation_value(sae, 2, 1.0, 1.0)


def test_generate_refuses_bad_strength_and_empty_prompt():
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError, match="finite"):
            run_generate("never-loaded", PROMPT, strength=bad)
    with pytest.raises(ValueError, match="prompt is empty"):
        run_generate("never-loaded", "  ")
    with pytest.raises(ValueError, match="unit"):
        run_generate("never-loaded", PROMPT, unit="furlongs")


def clean_feature(lm, sae, skip_contexts: int) -> int:
    """The rule: the most frequent feature among those firing on 0.5-5% of held-out tokens
    (frequent enough to have many examples, rare enough not to be dense)."""
    site, fired, n = sae.cfg.site, torch.zeros(sae.cfg.d_sae), 0
    batches = pack(load_corpus("builtin:stdlib"), lm.tokenizer, 128, batch_size=8,
                   n_tokens=(skip_contexts + 8) * 128, skip=skip_contexts)
    for ids, special in batches:
        with torch.inference_mode(), capture(lm.model, site, arch=lm.arch) as cap:
            cap.run(input_ids=ids)
        keep = ~special
        keep[:, 0] = False  # the attention sink
        f = sae.encode(cap[site][keep])
        fired += (f > 0).sum(0).float()
        n += f.shape[0]
    freq = fired / n
    ok = (freq > 0.005) & (freq < 0.05)
    assert ok.any()
    return int(torch.where(ok, freq, -1.0).argmax())


@torch.inference_mode()
def perplexity(lm, samples) -> float:
    """Mean over samples of exp(mean NLL) of the generated tokens under the clean model."""
    out = []
    for s in samples:
        ids = torch.tensor([s.prompt_tokens + s.tokens])
        logp = torch.log_softmax(lm.model(input_ids=ids).logits[0, :-1].float(), -1)
        nll = -logp.gather(1, ids[0, 1:, None])[-len(s.tokens):, 0]
        out.append(math.exp(float(nll.mean())))
    return sum(out) / len(out)


@pytest.mark.slow
def test_site_norm_of_the_embedded_model(embedded_lm, embedded_sae):
    norm = site_norm(embedded_lm, "resid_post.12")
    assert 100 < norm < 200  # ~145; position 0 alone has a norm of ~2e4
    sae = load_sae(embedded_sae)
    # saelab's training folds its input scaling into W_dec: a row has about the site's norm.
    assert float(sae.W_dec.detach().norm(dim=1).mean()) == pytest.approx(norm, rel=0.25)


@pytest.mark.slow
def test_default_steer_shifts_the_text_and_keeps_it_fluent(embedded_lm, embedded_sae):
    lm, sae = embedded_lm, load_sae(embedded_sae, dtype="float32")
    f = clean_feature(lm, sae, skip_contexts=200)  # past the SAE's 157 training contexts
    kw = dict(chat=True, sae=sae, feature=f, n=3, max_new_tokens=24, seed=0)
    default = run_generate(lm, PROMPT, **kw)
    assert default.settings["strength"] == 0.25 and default.settings["unit"] == "norm"
    plain_ppl, steered_ppl = perplexity(lm, default.unedited.samples), perplexity(lm, default.edited.samples)
    changed = sum(a != b for a, b in zip(default.unedited.texts, default.edited.texts, strict=True))
    assert changed >= 2
    # Measured (seeds 0-2, 3 features): unedited ~5, default 8-14, the old raw 8: 25-170.
    assert steered_ppl < 4 * plain_ppl
    old = run_generate(lm, PROMPT, strength=8.0, unit="raw", **kw)
    assert perplexity(lm, old.edited.samples) > steered_ppl


def test_generate_command_refuses_bad_values_before_loading_a_model():
    import typer
    from typer.testing import CliRunner

    from saelab.interventions.commands import register

    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)  # a second command keeps typer's subcommand dispatch
    runner = CliRunner()
    for args, message in ((["--prompt", ""], "prompt is empty"),
                          (["--prompt", "hi", "--strength", "nan"], "finite"),
                          (["--prompt", "hi", "--unit", "inch"], "unit")):
        res = runner.invoke(app, ["generate", "--model", "not-a-model-at-all", *args])
        assert res.exit_code == 2 and message in res.output, res.output
    help_text = " ".join(runner.invoke(app, ["generate", "--help"], env={"COLUMNS": "200"}).output.split())
    assert "in site norms" in help_text and "Default 0.25" in help_text
