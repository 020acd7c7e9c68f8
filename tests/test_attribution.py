"""attribute / verify: attributions are checked against interventions on tiny random models."""

import json
import math

import pytest
import torch
from tiny_lm import char_tokenizer, tiny_lm
from tiny_models import tiny_model
from tiny_models import tiny_sae as _sae

from saelab.attribution import (
    Attribution,
    ContinuationLogProb,
    LogitDiff,
    LogitsMetric,
    MetricBatch,
    MetricError,
    aggregate,
    attribute,
    last_item_last_token,
    parse_metric,
    verify,
)
from saelab.attribution.attribute import forward_logits, left_pad
from saelab.interventions.edits import FeatureEdit, SteerEdit
from saelab.interventions.splice import splice
from saelab.models.hooks import patch

FAMILIES = ["llama", "gpt2"]
SITES = ["resid_post.0", "attn_z.1"]
PROMPTS = [[5, 9, 14, 3, 22, 40, 7], [11, 12, 13], [30, 31, 8, 17, 50]]
METRIC = LogitsMetric(lambda logits: logits[:, -1, 3] - logits[:, -1, 7])


def _setup(family, dtype=torch.float32):
    model = tiny_model(family).to(dtype)
    return model, [_sae(model, s, "topk", seed=i).to(dtype) for i, s in enumerate(SITES)]


@torch.no_grad()
def _metric(model, prompt, saes=(), edits=()):
    with splice(model, list(saes), edits=edits):
        return float(METRIC(model(input_ids=torch.tensor([prompt])).logits, None)[0])


@pytest.mark.parametrize("family", FAMILIES)
def test_act_times_grad_matches_finite_differences(family):
    # fp64, one example per batch: HF's fp64 masks turn left padding into nan.
    model, saes = _setup(family, torch.float64)
    attr = attribute(model, saes, PROMPTS, METRIC, batch_size=1)
    eps = 1e-2  # Llama's RMSNorm computes in fp32 even in an fp64 model: not smaller
    for sae in saes:
        s = attr.sites[sae.cfg.site]
        for i in torch.linspace(0, len(s.value) - 1, 5).long().tolist():
            e, p, f = s.index[i].tolist()
            bump = [_metric(model, PROMPTS[e], [sae], [FeatureEdit(f, "add", d, positions=[p])])
                    for d in (eps, -eps)]
            fd = float(s.act[i]) * (bump[0] - bump[1]) / (2 * eps)
            assert fd == pytest.approx(float(s.value[i]), rel=2e-3, abs=1e-6)
        # The error node: moving the site along its own error term.
        e, p = 2, 3
        with torch.no_grad():
            x = _site_acts(model, sae.cfg.site, PROMPTS[e])[0, p]
            err = x - sae(x).x_hat
        bump = [_metric(model, PROMPTS[e], edits=[SteerEdit(sae.cfg.site, err, [p], d)]) for d in (eps, -eps)]
        assert (bump[0] - bump[1]) / (2 * eps) == pytest.approx(float(s.error[e, p]), rel=2e-3, abs=1e-6)


def _site_acts(model, site, prompt):
    from saelab.models.hooks import capture

    with capture(model, site) as acts:
        acts.run(input_ids=torch.tensor([prompt]))
    return acts[site]


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_is_clean_and_attribution_predicts_ablation(family):
    model, saes = _setup(family)
    attr = attribute(model, saes, PROMPTS, METRIC)
    clean = torch.tensor([_metric(model, p) for p in PROMPTS])
    assert torch.allclose(attr.metric, clean, atol=1e-5, rtol=0)  # padded batch vs one by one
    alone = attribute(model, saes, PROMPTS, METRIC, batch_size=1)
    assert torch.equal(alone.metric, clean)  # the zero leaves change nothing, bit for bit
    # First order: zeroing a small feature moves the metric by its attribution, up to O(act^2).
    check = verify(model, saes, attr, METRIC, n_top=4, n_bottom=4, together=4)
    assert check.correlation() > 0.9
    singles = [c for c in check.checks if c.kind != "together"]
    assert {c.kind for c in check.checks} == {"top", "bottom", "together"}
    acts = {(c.example, c.site, c.position, c.feature): None for c in singles}
    for site, s in attr.sites.items():
        for (e, p, f), a in zip(s.index.tolist(), s.act.tolist(), strict=True):
            if (e, site, p, f) in acts:
                acts[e, site, p, f] = a
    small = sorted(singles, key=lambda c: abs(acts[c.example, c.site, c.position, c.feature]))[:4]
    for c in small:
        a = abs(acts[c.example, c.site, c.position, c.feature])
        assert abs(c.measured - c.predicted) <= 0.3 * abs(c.predicted) + 5 * a * a


@pytest.mark.parametrize("family", FAMILIES)
def test_integrated_gradients_sum_to_ablating_the_site(family):
    model, saes = _setup(family)
    attr = attribute(model, saes, PROMPTS, METRIC, method="ig", ig_steps=12)
    totals = attr.totals()
    for sae in saes:
        effect = [_metric(model, p) - _metric(model, p, [sae], [FeatureEdit(None, "zero")]) for p in PROMPTS]
        assert torch.allclose(totals[sae.cfg.site]["features"], torch.tensor(effect), atol=5e-3, rtol=1e-2)
    # Joint: every site scaled at once sums to removing every site's clean feature output.
    joint = attribute(model, saes, PROMPTS, METRIC, method="ig", ig_steps=12, ig_joint=True)
    total = sum(t["features"] for t in joint.totals().values())
    for e, prompt in enumerate(PROMPTS):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            contrib = {s.cfg.site: s.decode(s.encode(_site_acts(model, s.cfg.site, prompt))) - s.b_dec
                       for s in saes}
            with patch(model, {site: (lambda x, ctx, c=c: x - c) for site, c in contrib.items()}):
                ablated = float(METRIC(model(input_ids=ids).logits, None)[0])
        assert float(total[e]) == pytest.approx(_metric(model, prompt) - ablated, abs=5e-3, rel=1e-2)


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_with_padding_and_several_saes_equal_one_by_one(family):
    model, saes = _setup(family)
    batched = attribute(model, saes, PROMPTS, METRIC, batch_size=3)
    for sae in saes:
        alone = attribute(model, sae, PROMPTS, METRIC, batch_size=1).sites[sae.cfg.site]
        both = batched.sites[sae.cfg.site]
        assert torch.equal(both.index, alone.index)
        assert torch.allclose(both.value, alone.value, atol=1e-5, rtol=1e-4)
        assert torch.allclose(both.error, alone.error, atol=1e-5, rtol=1e-4)
        assert (both.index[:, 1] >= 0).all()  # positions within each example, padding excluded
    lengths = torch.tensor([len(p) for p in PROMPTS])
    assert torch.equal(torch.bincount(batched.sites[SITES[0]].index[:, 0]), 6 * lengths)  # k=6
    # A site's features + error + b_dec . g add up to x . g: nothing is lost.
    ig = attribute(model, saes, PROMPTS, METRIC, method="ig", ig_steps=2, batch_size=2)
    assert torch.allclose(ig.sites[SITES[0]].error, batched.sites[SITES[0]].error, atol=1e-6)


def test_top_pairs_save_load_and_aggregate(tmp_path):
    model, saes = _setup("llama")
    attr = attribute(model, saes, PROMPTS, METRIC)
    top = attr.top(5, example=1)
    assert len(top) == 5 and all(a.value >= b.value for a, b in zip(top, top[1:], strict=False))
    assert all(p.token == PROMPTS[1][p.position] for p in top)
    bottom = attr.top(3, example=1, largest=False, include_error=True)
    assert bottom[0].value == min(min(float(s.value[s.rows_of(1)].min()), float(s.error[1, :3].min()))
                                  for s in attr.sites.values())
    back = Attribution.load(attr.save(tmp_path / "a.safetensors"))
    assert back.tokens == attr.tokens and back.method == "grad"
    for site in SITES:
        for key in ("index", "act", "value", "error"):
            assert torch.equal(getattr(back.sites[site], key), getattr(attr.sites[site], key))
    stats = aggregate(attr, k=3)
    assert sum(s.n_pairs for s in stats) == 3 * len(PROMPTS)
    assert stats[0].n_examples >= stats[-1].n_examples and 0 < stats[0].fraction <= 1


def test_top_pairs_skip_the_first_and_special_positions():
    model, saes = _setup("llama")
    attr = attribute(model, saes, PROMPTS, METRIC)
    for largest in (True, False):
        everything = attr.top(10_000, example=0, largest=largest)
        kept = [p for p in everything if p.position not in (0, 2)]  # PROMPTS[0][2] is token 14
        got = attr.top(6, example=0, largest=largest, skip_first=1, skip_tokens={14})
        assert [(p.site, p.position, p.feature) for p in got] == \
               [(p.site, p.position, p.feature) for p in kept[:6]]
        assert len(got) == 6 and any(p.position == 0 for p in everything)
    errs = attr.top(50, example=0, include_error=True, skip_first=3)
    assert errs and all(p.position >= 3 for p in errs)


def test_attribute_command_skips_sinks_and_explains_the_shares(tmp_path):
    import typer
    from typer.testing import CliRunner

    from saelab.attribution.commands import register
    from saelab.sae import save_sae

    lm = tiny_lm("llama")
    lm.model.save_pretrained(tmp_path / "model")
    lm.tokenizer.save_pretrained(tmp_path / "model")
    save_sae(_sae(lm.model, "resid_post.0", "topk", d_sae=64, seed=1), tmp_path / "sae")
    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)  # a second command keeps typer's subcommand dispatch
    runner = CliRunner()
    help_text = runner.invoke(app, ["attribute", "--help"], env={"COLUMNS": "200"}).output
    assert 'KIND:"A":"B"@POS' in help_text and "\U0001f170" not in help_text  # not the 🅰 emoji
    args = ["attribute", "--model", str(tmp_path / "model"), "--sae", str(tmp_path / "sae"),
            "--prompt", "the cat sat", "--metric", 'logit_diff:"a":"b"@-1', "--top", "5"]
    out = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert out.exit_code == 0, out.output
    text = " ".join(out.output.split())
    assert "position 0 and special tokens left out" in text
    assert "through error: the same for the SAE's error term" in text

    def top(*extra):
        res = runner.invoke(app, [*args, "--json", *extra])
        return [(r["site"], r["position"], r["feature"])
                for r in json.loads(res.stdout[res.stdout.index("{"):])["top"]]

    every = top("--include-special", "--top", "1000")
    assert any(pos == 0 for _, pos, _ in every)  # position 0 (<bos>) has pairs to leave out
    assert top() == [p for p in every if p[1] >= 1][:5]


def test_metrics_look_tokens_up_and_say_what_is_wrong():
    tok = char_tokenizer()
    assert LogitDiff("a", ["b", "c"])._ids(tok) == ([tok.convert_tokens_to_ids("a")],
                                                   tok.convert_tokens_to_ids(["b", "c"]))
    with pytest.raises(MetricError, match=r"'ab' is 2 tokens.*allow_multi=True would take .*'a'"):
        LogitDiff("ab", "c").check(tok)
    assert LogitDiff("ab", "c", allow_multi=True)._ids(tok)[0] == [tok.convert_tokens_to_ids("a")]
    with pytest.raises(MetricError, match="is 0 tokens"):
        LogitDiff("", "c").check(tok)
    ids, lengths = left_pad([[5, 6, 7], [8, 9]], 0)
    batch = MetricBatch(ids, lengths, tok)
    assert batch.columns(-1).tolist() == [2, 2] and batch.columns(0).tolist() == [0, 1]
    assert batch.columns(lambda toks, _: len(toks) - 2).tolist() == [1, 1]
    with pytest.raises(MetricError, match="outside example 1 of 2 tokens"):
        batch.columns(2)
    with pytest.raises(MetricError, match="one value per example"):
        LogitsMetric(lambda logits: logits.sum())(torch.zeros(2, 3, 5), batch)


def test_metric_spec_grammar():
    m = parse_metric('logit_diff:" ":"\\n"@-1')
    assert m == LogitDiff([" "], ["\n"], -1)
    assert parse_metric('logprob_diff:" "," \\"x\\"":"\\u00e9"@3') == LogitDiff(
        [" ", ' "x"'], ["é"], 3, logprob=True)
    assert parse_metric('logit_diff:"a":"b"').position == -1
    assert parse_metric('logprob:" Paris"') == ContinuationLogProb(" Paris")
    for bad, msg in [('diff:"a":"b"', "KIND"), ("logit_diff:a:b", "double-quoted"),
                     ('logit_diff:"a"', "second token set"), ('logit_diff:"a":"b"@x', "not an integer"),
                     ('logit_diff:"a":"b"-1', "position goes last"), ('logit_diff:"a:"b"', "second token"),
                     ('logprob:"a":"b"', "one string")]:
        with pytest.raises(MetricError, match=msg):
            parse_metric(bad)


def test_continuation_logprob_and_list_position():
    lm = tiny_lm("llama")
    tok = lm.tokenizer
    prompt = "Q: colours?\n- red\n- green  \n"
    attr = attribute(lm, _sae(lm.model, "resid_post.1"), [prompt], ContinuationLogProb("- b"))
    ids = tok(prompt)["input_ids"] + tok.encode("- b", add_special_tokens=False)
    assert attr.tokens == [ids]
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(input_ids=torch.tensor([ids])).logits[0], -1)
    manual = sum(float(logp[len(ids) - 4 + j, ids[len(ids) - 3 + j]]) for j in range(3))
    assert float(attr.metric[0]) == pytest.approx(manual, abs=1e-5)
    pos = last_item_last_token()(tok(prompt)["input_ids"], tok)
    assert tok.decode([tok(prompt)["input_ids"][pos]]) == "n"  # "green", trailing blanks skipped
    with pytest.raises(MetricError, match="bulleted list"):
        last_item_last_token("*")(tok(prompt)["input_ids"], tok)
    spec = attribute(lm, _sae(lm.model, "resid_post.1"), [prompt, "- x"], 'logit_diff:" ":"\\n"@-1')
    with torch.no_grad():
        ids, lengths = left_pad(spec.tokens, 0)
        logits = forward_logits(lm.model, ids, lengths)[:, -1]
    space, newline = tok.convert_tokens_to_ids([" ", "\n"])
    assert torch.allclose(spec.metric, logits[:, space] - logits[:, newline], atol=1e-5)


@pytest.mark.slow
def test_embedded_chat_list_attribution_is_verified(embedded_lm, tmp_path):
    from saelab.attribution.commands import run_attribute
    from saelab.sae import save_sae

    lm = embedded_lm
    folders = []
    for i, site in enumerate(["resid_post.6", "resid_post.18"]):
        sae = _sae(lm.model, site, "topk", d_sae=1024, k=16, seed=i)
        folders.append(save_sae(sae, tmp_path / f"sae{i}"))
    prompt = "Give me a short list of fruits. Just the names."
    result = run_attribute(lm, folders, prompt, 'logit_diff:" ":"\\n"@-1', top=10, chat=True,
                           verify_top=5, save=tmp_path / "attr.safetensors")
    rows = result.rows()
    assert len(rows) == 10 and rows[0]["attribution"] >= rows[-1]["attribution"]
    specials = set(lm.tokenizer.all_special_ids) | set(result.skip_tokens)
    assert all(r["position"] > 0 and result.attribution.tokens[0][r["position"]] not in specials
               for r in rows)  # <|im_start|> at position 0 and later ones are left out
    assert result.token_texts[-1] == "\n"  # the chat template ends "<|im_start|>assistant\n"
    assert result.verification.correlation() > 0.5
    assert {r["site"] for r in result.site_rows()} == {"resid_post.6", "resid_post.18"}
    assert not math.isnan(result.to_json()["verification"]["correlation"])
    assert Attribution.load(tmp_path / "attr.safetensors").n_examples == 1
