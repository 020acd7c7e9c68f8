"""Every peer's name for an activation lands on exactly that activation, or is refused.

One table-driven check (issue 12 §1). For each family's tiny random model, the
test captures, with plain forward hooks registered here, the tensor each peer
trains on *by the peer's own definition*:

    TransformerLens hooks    computed from the HF modules as TransformerLens defines them
                             (hook_attn_out/hook_mlp_out after Gemma's post-norms, ln2's
                             hook_normalized = LayerNorm with its weight; RMSNorm before it, ...)
    HF module paths          the module's output (SAELens on HF models, sparsify hookpoints
                             relative to base_model, dictionary_learning submodules)
    Gemma Scope hook points  the module's output or input

It then writes an SAE file in that peer's layout naming that tensor, loads it
with `load_sae`, attaches it with `bind_saes` (the path splice/eval/features take),
captures saelab's tensor at the bound site and requires the two to be equal.
Names no site holds exactly must raise an error that says what they are.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from tiny_models import TINY_FAMILIES, tiny_model

from saelab.errors import SaelabError
from saelab.interventions.splice import bind_saes
from saelab.models.hooks import capture
from saelab.models.sites import describe
from saelab.sae import load_sae

TOL = dict(atol=1e-5, rtol=0)
L = 1  # the layer every name points at (not the first: layer 0 hides off-by-one errors)
D_SAE = 8

# A published model name of each family, as the peers' files carry it.
MODEL_NAME = {
    "llama": "meta-llama/Llama-3.2-1B", "gemma2": "google/gemma-2-2b",
    "gemma3": "google/gemma-3-1b-pt", "gpt2": "gpt2-small",
    "gpt_neox": "EleutherAI/pythia-70m-deduped", "qwen2": "Qwen/Qwen2.5-0.5B",
}  # fmt: skip
# The test's own knowledge of each family's modules (relative to the base model):
# block list, attention module, its output projection, the norm in front of the MLP.
PARTS = {
    "llama": ("layers", "self_attn", "self_attn.o_proj", "post_attention_layernorm"),
    "qwen2": ("layers", "self_attn", "self_attn.o_proj", "post_attention_layernorm"),
    "gemma2": ("layers", "self_attn", "self_attn.o_proj", "pre_feedforward_layernorm"),
    "gemma3": ("layers", "self_attn", "self_attn.o_proj", "pre_feedforward_layernorm"),
    "gpt2": ("h", "attn", "attn.c_proj", "ln_2"),
    "gpt_neox": ("layers", "attention", "attention.dense", "post_attention_layernorm"),
}
GEMMA = ("gemma2", "gemma3")


# ---- what each peer trains on ------------------------------------------------------------------


class Peer:
    """One forward pass of a tiny model with every module's input and output recorded."""

    def __init__(self, family: str):
        self.family = family
        self.model = tiny_model(family)
        self.arch = describe(self.model)
        self.base = self.model.base_model
        self.ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(5))
        self.outs: dict[str, torch.Tensor] = {}
        self.ins: dict[str, torch.Tensor] = {}
        handles = []
        for name, module in self.base.named_modules():
            if name:
                handles.append(module.register_forward_hook(self._out(name)))
                handles.append(module.register_forward_pre_hook(self._in(name), with_kwargs=True))
        with torch.no_grad():
            self.model(input_ids=self.ids)
        for h in handles:
            h.remove()
        self.blocks = PARTS[family][0]

    def _out(self, name):
        def hook(_m, _args, out):
            t = out[0] if isinstance(out, tuple) else out
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self.outs[name] = t.detach()
        return hook

    def _in(self, name):
        def hook(_m, args, kwargs):
            t = args[0] if args else kwargs.get("hidden_states")
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self.ins[name] = t.detach()
        return hook

    @property
    def block(self) -> str:
        return f"{self.blocks}.{L}"

    def block_modules(self) -> list[str]:
        """The block and each of its direct children (relative to the base model)."""
        children = [n for n, _ in self.base.get_submodule(self.block).named_children()]
        return [self.block] + [f"{self.block}.{c}" for c in children]

    def full(self, rel: str) -> str:
        """Path from the causal LM (what SAELens and Gemma Scope name)."""
        return f"{self.arch.base_path}.{rel}" if self.arch.base_path else rel

    # TransformerLens's hooks, as transformer_lens/components/transformer_block.py defines them.
    def transformer_lens(self) -> dict[str, torch.Tensor | None]:
        """TL hook name -> tensor; None where no saelab site holds it (must be refused)."""
        _, attn, oproj, mlp_norm = PARTS[self.family]
        blk = self.base.get_submodule(self.block)
        attn_out, mlp_out = self.outs[f"{self.block}.{attn}"], self.outs[f"{self.block}.mlp"]
        with torch.no_grad():
            if self.family in GEMMA:  # TL's ln1_post / ln2_post come before hook_attn_out / hook_mlp_out
                attn_out = blk.post_attention_layernorm(attn_out)
                mlp_out = blk.post_feedforward_layernorm(mlp_out)
        resid_pre = self.ins[self.block]
        parallel = self.arch.parallel_residual
        mlp_in = resid_pre if parallel else resid_pre + attn_out  # what TL feeds ln2 (hook_mlp_in)
        norm = getattr(blk, mlp_norm)
        if self.family in ("gpt2", "gpt_neox"):  # TL LayerNorm: hook_normalized after w and b
            x = mlp_in - mlp_in.mean(-1, keepdim=True)
            eps = getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-5))
            normalized = x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt() * norm.weight + norm.bias
        else:  # TL RMSNorm: hook_normalized before the weight: no HF module gives that
            normalized = None
        tl = {
            "hook_resid_pre": resid_pre, "hook_resid_post": self.outs[self.block],
            "hook_attn_out": attn_out, "hook_mlp_out": mlp_out,
            "attn.hook_z": self.ins[f"{self.block}.{oproj}"],
            "ln2.hook_normalized": normalized, "hook_mlp_in": mlp_in,
        }  # fmt: skip
        if not parallel:  # TL never fires hook_resid_mid under the parallel residual
            tl["hook_resid_mid"] = resid_pre + attn_out
        return {f"blocks.{L}.{k}": v for k, v in tl.items()}


@pytest.fixture(scope="module", params=TINY_FAMILIES)
def peer(request) -> Peer:
    return Peer(request.param)


# ---- files in each peer's layout ----------------------------------------------------------------


def _weights(d_in: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"W_enc": torch.randn(d_in, D_SAE, generator=g), "W_dec": torch.randn(D_SAE, d_in, generator=g),
            "b_enc": torch.zeros(D_SAE), "b_dec": torch.zeros(d_in)}  # fmt: skip


def saelens_file(folder: Path, d_in: int, **metadata) -> Path:
    folder.mkdir(parents=True)
    save_file(_weights(d_in), str(folder / "sae_weights.safetensors"))
    cfg = {"architecture": "standard", "d_in": d_in, "d_sae": D_SAE, "dtype": "float32",
           "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
           "reshape_activations": "none",
           "metadata": {"sae_lens_version": "6.5.0", "hook_head_index": None, **metadata}}  # fmt: skip
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


def sparsify_file(run: Path, hookpoint: str, d_in: int, model: str | None = None, **cfg) -> Path:
    folder = run / hookpoint
    folder.mkdir(parents=True)
    w = _weights(d_in)
    save_file({"encoder.weight": w["W_enc"].T.contiguous(), "encoder.bias": w["b_enc"],
               "W_dec": w["W_dec"], "b_dec": w["b_dec"]}, str(folder / "sae.safetensors"))  # fmt: skip
    (folder / "cfg.json").write_text(json.dumps({
        "activation": "topk", "expansion_factor": 1, "normalize_decoder": True, "num_latents": D_SAE,
        "k": 2, "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": d_in,
        **cfg}))  # fmt: skip
    if model:
        (run / "config.json").write_text(json.dumps({"model": model, "hookpoints": [hookpoint]}))
    return folder


def gemma_scope_2_file(folder: Path, d_in: int, config: dict | None, **extra: torch.Tensor) -> Path:
    folder.mkdir(parents=True)
    w = {k.lower(): v for k, v in _weights(d_in).items()} | {"threshold": torch.zeros(D_SAE)}
    save_file(w | extra, str(folder / "params.safetensors"))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def gemma_scope_2_config(model: str, hook_in: str, hook_out: str | None = None, **more) -> dict:
    """config.json as Gemma Scope 2 publishes it."""
    return {"hf_hook_point_in": hook_in, "hf_hook_point_out": hook_out or hook_in,
            "width": D_SAE, "model_name": model, "architecture": "jump_relu", "l0": 4,
            "affine_connection": False, "type": "sae", **more}  # fmt: skip


def gemma_scope_1_file(folder: Path, d_in: int) -> Path:
    folder.mkdir(parents=True)
    w = {k: v.numpy() for k, v in _weights(d_in).items()} | {"threshold": np.zeros(D_SAE, np.float32)}
    np.savez(folder / "params.npz", **w)
    return folder


def dictionary_learning_file(folder: Path, d_in: int, trainer: dict) -> Path:
    folder.mkdir(parents=True)
    w = _weights(d_in)
    torch.save({"encoder.weight": w["W_enc"].T.contiguous(), "encoder.bias": w["b_enc"],
                "decoder.weight": w["W_dec"].T.contiguous(), "bias": w["b_dec"]}, folder / "ae.pt")  # fmt: skip
    trainer = {"dict_class": "AutoEncoder", "activation_dim": d_in, "dict_size": D_SAE, **trainer}
    (folder / "config.json").write_text(json.dumps({"trainer": trainer, "buffer": {"ctx_len": 128}}))
    return folder


# ---- the check ----------------------------------------------------------------------------------


def check(peer: Peer, cases: dict[str, tuple[Path, torch.Tensor | None]]) -> dict[str, str]:
    """Load each file, attach it, and compare saelab's tensor with the peer's; returns name -> site.

    A case whose peer tensor is None must be refused at load with a SaelabError.
    """
    bound: dict[str, tuple[str, torch.Tensor]] = {}
    problems = []
    for name, (folder, expected) in cases.items():
        if expected is None:
            with pytest.raises(SaelabError) as err:
                load_sae(folder)
            assert name.split(".")[-1] in str(err.value) or "no saelab site" in str(err.value), err.value
            continue
        sae = load_sae(folder)
        assert sae.cfg.site, f"{name}: loaded with no site"
        (site,) = bind_saes(peer.arch, sae)
        bound[name] = (site, expected)
    sites = sorted({s for s, _ in bound.values()})
    with capture(peer.model, sites, stop_early=False) as acts:
        acts.run(input_ids=peer.ids)
    for name, (site, expected) in bound.items():
        got = acts[site]
        if got.shape != expected.shape or not torch.allclose(got, expected, **TOL):
            diff = (got - expected).abs().max().item() if got.shape == expected.shape else "shape"
            problems.append(f"{name} -> {site}: differs by {diff}")
    assert not problems, f"{peer.family}: " + "; ".join(problems)
    return {name: site for name, (site, _) in bound.items()}


def test_transformer_lens_hook_names(peer: Peer, tmp_path: Path) -> None:
    """SAELens files name TransformerLens hooks; each lands on TL's tensor or is refused."""
    cases = {}
    for i, (hook, tensor) in enumerate(peer.transformer_lens().items()):
        width = tensor.shape[-1] if tensor is not None else peer.arch.d_model
        folder = saelens_file(tmp_path / f"tl{i}", width, hook_name=hook,
                              model_name=MODEL_NAME[peer.family])  # fmt: skip
        cases[hook] = (folder, tensor)
    sites = check(peer, cases)
    assert sites[f"blocks.{L}.hook_resid_post"] == f"resid_post.{L}"
    assert sites[f"blocks.{L}.hook_mlp_out"] == f"mlp_out.{L}"
    assert (f"blocks.{L}.ln2.hook_normalized" in sites) == (peer.family in ("gpt2", "gpt_neox"))
    # hook_mlp_in is the residual stream entering ln2: resid_pre under Pythia's parallel residual.
    assert sites[f"blocks.{L}.hook_mlp_in"] == (
        f"resid_pre.{L}" if peer.arch.parallel_residual else f"resid_mid.{L}")


@pytest.mark.parametrize("hook, what", [
    (f"blocks.{L}.mlp.hook_post", "MLP's hidden activations"),
    (f"blocks.{L}.attn.hook_q", "queries"),
    ("hook_embed", "token embeddings"),
    (f"blocks.{L}.hook_nonsense", "not a TransformerLens hook"),
])
def test_transformer_lens_names_without_a_site(hook: str, what: str, tmp_path: Path) -> None:
    folder = saelens_file(tmp_path / "sae", 32, hook_name=hook, model_name="gpt2-small")
    with pytest.raises(SaelabError, match=what):
        load_sae(folder)


def test_transformer_lens_family_dependent_names_need_the_family(tmp_path: Path) -> None:
    folder = saelens_file(tmp_path / "a", 32, hook_name=f"blocks.{L}.hook_mlp_in")
    with pytest.raises(SaelabError, match="parallel residual"):
        load_sae(folder)  # no model_name: resid_mid or resid_pre?
    folder = saelens_file(tmp_path / "b", 32, hook_name=f"blocks.{L}.ln2.hook_normalized",
                          model_name="gpt2-small", model_from_pretrained_kwargs={"fold_ln": True})
    with pytest.raises(SaelabError, match="fold_ln"):
        load_sae(folder)


def test_hf_module_paths(peer: Peer, tmp_path: Path) -> None:
    """SAELens on an HF model, sparsify (base-relative, with and without the run's model name)
    and dictionary_learning submodules all train on a module's output."""
    cases = {}
    for i, rel in enumerate(peer.block_modules()):
        out = peer.outs[rel]
        cases[f"saelens {peer.full(rel)}"] = (saelens_file(
            tmp_path / f"sl{i}", out.shape[-1], hook_name=peer.full(rel),
            model_name=MODEL_NAME[peer.family], model_class_name="AutoModelForCausalLM"), out)
        cases[f"sparsify {rel}"] = (sparsify_file(tmp_path / f"sp{i}", rel, out.shape[-1]), out)
        cases[f"sparsify {rel} +model"] = (sparsify_file(
            tmp_path / f"spm{i}", rel, out.shape[-1], model=MODEL_NAME[peer.family]), out)
    sites = check(peer, cases)
    b = peer.block
    assert sites[f"sparsify {b}"] == f"resid_post.{L}"
    if peer.family in GEMMA:  # the case: the MLP module's output is not mlp_out there
        assert sites[f"sparsify {b}.mlp +model"] == f"{peer.full(b)}.mlp:out"
        assert sites[f"sparsify {b}.self_attn +model"] == f"{peer.full(b)}.self_attn:out"
        with capture(peer.model, f"mlp_out.{L}") as acts:
            acts.run(input_ids=peer.ids)
        assert (acts[f"mlp_out.{L}"] - peer.outs[f"{b}.mlp"]).abs().max() > 0.1  # would be wrong
    if peer.family in ("llama", "qwen2", "gpt2"):  # the tap is that module: canonical when known
        assert sites[f"sparsify {b}.mlp +model"] == f"mlp_out.{L}"


def test_gemma_scope_hook_points(peer: Peer, tmp_path: Path) -> None:
    """Gemma Scope 2's hf_hook_point_in: a module's output or input (any family's paths)."""
    _, attn, oproj, _ = PARTS[peer.family]
    points = {f"{peer.full(rel)}.output": peer.outs[rel] for rel in peer.block_modules()}
    points[f"{peer.full(peer.block)}.{oproj}.input"] = peer.ins[f"{peer.block}.{oproj}"]
    points[f"{peer.full(peer.block)}.mlp.input"] = peer.ins[f"{peer.block}.mlp"]
    cases = {}
    for i, (point, tensor) in enumerate(points.items()):
        conf = gemma_scope_2_config(MODEL_NAME[peer.family], point)
        cases[point] = (gemma_scope_2_file(tmp_path / f"gs{i}", tensor.shape[-1], conf), tensor)
    sites = check(peer, cases)
    if peer.family in GEMMA:
        b = peer.full(peer.block)
        assert sites[f"{b}.post_feedforward_layernorm.output"] == f"mlp_out.{L}"
        assert sites[f"{b}.self_attn.o_proj.input"] == f"attn_z.{L}"
        assert sites[f"{b}.post_attention_layernorm.output"] == f"attn_out.{L}"
    if peer.family == "llama":  # the same path is the MLP's input norm there, not attn_out
        assert sites[f"model.layers.{L}.post_attention_layernorm.output"] != f"attn_out.{L}"


def test_gemma_scope_2_folders_without_config(tmp_path: Path) -> None:
    """Without config.json the folder says the hook point, as SAELens reads Gemma Scope 2."""
    peer = Peer("gemma3")
    tl = peer.transformer_lens()
    folders = {  # Gemma Scope 2's attn_out SAEs read o_proj's input: TL's hook_z
        "resid_post_all": tl[f"blocks.{L}.hook_resid_post"],
        "attn_out_all": tl[f"blocks.{L}.attn.hook_z"],
        "mlp_out": tl[f"blocks.{L}.hook_mlp_out"],
    }
    cases = {kind: (gemma_scope_2_file(tmp_path / kind / f"layer_{L}_width_16k_l0_small",
                                       t.shape[-1], None), t) for kind, t in folders.items()}  # fmt: skip
    assert check(peer, cases)["attn_out_all"] == f"attn_z.{L}"


def test_gemma_scope_1_repositories(tmp_path: Path) -> None:
    """Gemma Scope 1's repositories: -res, -mlp and -att, as TransformerLens hooks on Gemma 2."""
    peer = Peer("gemma2")
    tl = peer.transformer_lens()
    repos = {"res": "hook_resid_post", "mlp": "hook_mlp_out", "att": "attn.hook_z"}
    cases = {}
    for what, hook in repos.items():
        t = tl[f"blocks.{L}.{hook}"]
        folder = tmp_path / f"gemma-scope-2b-pt-{what}" / f"layer_{L}" / "width_16k" / "average_l0_5"
        cases[what] = (gemma_scope_1_file(folder, t.shape[-1]), t)
    check(peer, cases)


def test_dictionary_learning_submodules(peer: Peer, tmp_path: Path) -> None:
    """dictionary_learning's labels (config or published folder) with the model they name."""
    _, attn, _, _ = PARTS[peer.family]
    embed = next(n for n, m in peer.base.named_children() if m is peer.model.get_input_embeddings())
    b = peer.block
    tensors = {"resid_out_layer": peer.outs[b], "mlp_out_layer": peer.outs[f"{b}.mlp"],
               "attn_out_layer": peer.outs[f"{b}.{attn}"], "embed": peer.outs[embed]}  # fmt: skip
    lm = MODEL_NAME[peer.family]
    cases = {}
    for label, t in tensors.items():
        name = label if label == "embed" else f"{label}{L}"  # the published layout's folder
        folder = tmp_path / "dictionaries" / "m" / name / "10_32768"
        cases[name] = (dictionary_learning_file(folder, t.shape[-1], {"lm_name": lm, "layer": L}), t)
    folder = tmp_path / "cfg"  # trainer.submodule_name, as SAEBench names it
    cases["submodule_name"] = (dictionary_learning_file(
        folder, peer.arch.d_model, {"lm_name": lm, "layer": L, "submodule_name": f"resid_post_layer_{L}"}),
        peer.outs[b])
    check(peer, cases)


def test_dictionary_learning_without_a_label_gets_no_site(tmp_path: Path) -> None:
    """trainer.layer alone does not say which submodule: no site is guessed."""
    folder = dictionary_learning_file(tmp_path / "run" / "trainer_0", 32,
                                      {"lm_name": "EleutherAI/pythia-70m-deduped", "layer": 3})
    assert load_sae(folder).cfg.site is None


# ---- files that are not SAEs at one site --------------------------------------------------------


def test_gemma_scope_2_transcoders_load_as_transcoders(tmp_path: Path) -> None:
    """Transcoders load as transcoders (saelab/sae/transcoder.py), never as SAEs: code that
    needs an SAE refuses them, naming what they are. Cross-layer ones are refused."""
    from saelab.sae.transcoder import Transcoder

    hook_in = "model.layers.1.pre_feedforward_layernorm.output"
    hook_out = "model.layers.1.post_feedforward_layernorm.output"
    plain = gemma_scope_2_file(tmp_path / "transcoder" / "layer_1_width_16k_l0_small", 32,
                               gemma_scope_2_config("gemma-3-270m", hook_in, hook_out, type="transcoder"))
    skip = gemma_scope_2_file(
        tmp_path / "transcoder_all" / "layer_1_width_16k_l0_small_affine", 32,
        gemma_scope_2_config("gemma-3-270m", hook_in, hook_out, type="transcoder", affine_connection=True),
        affine_skip_connection=torch.zeros(32, 32))
    # An SAE whose hook points differ but whose type says nothing is still a transcoder.
    odd = gemma_scope_2_file(tmp_path / "odd" / "layer_1", 32,
                             {"hf_hook_point_in": hook_in, "hf_hook_point_out": hook_out})
    for folder in (plain, skip, odd):
        tc = load_sae(folder)
        assert isinstance(tc, Transcoder) and (tc.site, tc.site_out) == ("mlp_in.1", "mlp_out.1")
        with pytest.raises(SaelabError, match="is a transcoder .*not an SAE"):
            load_sae(folder, expect="sae")
        with pytest.raises(SaelabError, match="is a transcoder"):
            bind_saes(describe(tiny_model("gemma3")), {"mlp_in.1": tc})
    bare = gemma_scope_2_file(tmp_path / "clt" / "layer_1_width_16k_l0_small", 32, None)
    with pytest.raises(SaelabError) as err:
        load_sae(bare)
    assert f"transcoder reading {hook_in} and writing {hook_out}" in str(err.value)


def test_gemma_scope_1_transcoders_load_as_transcoders(tmp_path: Path) -> None:
    from saelab.sae.transcoder import Transcoder

    folder = gemma_scope_1_file(
        tmp_path / "gemma-scope-2b-pt-transcoders" / "layer_3" / "width_16k" / "average_l0_54", 32)
    tc = load_sae(folder)
    assert isinstance(tc, Transcoder) and (tc.site, tc.site_out) == ("mlp_in.3", "mlp_out.3")
    with pytest.raises(SaelabError, match="is a transcoder"):
        load_sae(folder, expect="sae")


def test_sparsify_transcoders_load_as_transcoders(tmp_path: Path) -> None:
    from saelab.sae.transcoder import Transcoder

    # The module's output is mlp_out only where the family says so (Gemma adds a post-norm).
    folder = sparsify_file(tmp_path / "run", "layers.2.mlp", 32, transcode=True)
    tc = load_sae(folder)
    assert isinstance(tc, Transcoder) and (tc.site, tc.site_out) == ("mlp_in.2", "layers.2.mlp:out")
    folder = sparsify_file(tmp_path / "llama", "layers.2.mlp", 32, "HuggingFaceTB/SmolLM2-135M",
                           transcode=True)
    tc = load_sae(folder)
    assert (tc.site, tc.site_out) == ("mlp_in.2", "mlp_out.2")
    with pytest.raises(SaelabError, match="is a transcoder"):
        load_sae(folder, expect="sae")


def test_one_head_sae_refused(tmp_path: Path) -> None:
    folder = saelens_file(tmp_path / "head", 8, hook_name="blocks.4.attn.hook_z",
                          hook_head_index=2, model_name="gpt2-small")
    with pytest.raises(SaelabError) as err:
        load_sae(folder)
    msg = str(err.value)
    assert "one attention head's output (head 2 of layer 4" in msg and "cfg.json" in msg
    # SAELens before 6.0 kept it on top as hook_point_head_index.
    old = tmp_path / "old"
    old.mkdir()
    save_file(_weights(8), str(old / "sae_weights.safetensors"))
    (old / "cfg.json").write_text(json.dumps({
        "d_in": 8, "d_sae": D_SAE, "dtype": "float32", "apply_b_dec_to_input": True,
        "activation_fn_str": "relu", "hook_point": "blocks.4.attn.hook_z", "hook_point_head_index": 2,
        "model_name": "gpt2-small"}))  # fmt: skip
    with pytest.raises(SaelabError, match="head 2 of layer 4"):
        load_sae(old)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_transformer_lens_processing(family: str, tmp_path: Path) -> None:
    """SAELens loads TransformerLens models with model_from_pretrained_kwargs: centring the
    writing weights changes the residual stream on LayerNorm models only (TL skips RMSNorm)."""
    peer = Peer(family)
    hook = f"blocks.{L}.hook_resid_post"
    folder = saelens_file(tmp_path / "c", peer.arch.d_model, hook_name=hook,
                          model_name=MODEL_NAME[family],
                          model_from_pretrained_kwargs={"center_writing_weights": True})
    if family == "gpt2":
        centred = peer.outs[peer.block] - peer.outs[peer.block].mean(-1, keepdim=True)
        assert (centred - peer.outs[peer.block]).abs().max() > 1e-3  # TL's tensor is another one
        with pytest.raises(SaelabError, match="center_writing_weights=True"):
            load_sae(folder)
    else:
        check(peer, {hook: (folder, peer.transformer_lens()[hook])})
    z = saelens_file(tmp_path / "z", peer.arch.d_attn_z, hook_name=f"blocks.{L}.attn.hook_z",
                     model_name=MODEL_NAME[family], model_from_pretrained_kwargs={"fold_value_biases": True})
    if family == "gpt2":  # GPT-2 has value biases; Llama has none, so its z is unchanged
        with pytest.raises(SaelabError, match="value biases"):
            load_sae(z)
    else:
        assert load_sae(z).cfg.site == f"attn_z.{L}"


def test_dictionary_learning_batchtopk_or_topk(tmp_path: Path) -> None:
    """AutoEncoderTopK and BatchTopKSAE save the same keys (k, threshold): without config.json
    the file loads as per-token top-k and says so; with it, a BatchTopKSAE keeps its threshold."""
    import warnings

    g = torch.Generator().manual_seed(1)
    sd = {"encoder.weight": torch.randn(64, 16, generator=g), "encoder.bias": torch.zeros(64),
          "decoder.weight": torch.randn(16, 64, generator=g), "b_dec": torch.zeros(16),
          "k": torch.tensor(3, dtype=torch.int), "threshold": torch.tensor(0.25)}  # fmt: skip
    torch.save(sd, tmp_path / "ae.pt")
    with pytest.warns(UserWarning) as record:
        sae = load_sae(tmp_path)
    msg = str(record[0].message)
    assert str(tmp_path / "ae.pt") in msg and "k=3" in msg and "threshold 0.25" in msg
    x = torch.randn(50, 16, generator=g)
    assert (sae(x).feats > 0).sum(-1).float().mean() <= 3  # per-token top-3
    (tmp_path / "config.json").write_text(json.dumps({"trainer": {"dict_class": "BatchTopKSAE"}}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batch = load_sae(tmp_path)
    post = torch.relu((x - sd["b_dec"]) @ sd["encoder.weight"].T + sd["encoder.bias"])
    torch.testing.assert_close(batch(x).feats, post * (post > 0.25))
    assert (batch(x).feats > 0).sum(-1).float().mean() > 3  # the threshold's L0, not k
