"""Matryoshka BatchTopK: nested prefixes that reconstruct alone; the SAELens file layout."""

from __future__ import annotations

import pytest
import torch

from saelab.errors import BadValueError
from saelab.sae import load_sae, matryoshka_widths, prefix_sae, save_sae
from saelab.sae.info import format_info, sae_info
from saelab.sae.matryoshka import widths_from_fractions
from saelab.train.config import SAESpec, TrainConfig
from saelab.train.objective import SAEObjective


def hierarchical_data(n: int, d: int = 48, parents: int = 8, children: int = 4, seed: int = 0):
    """Each token has 2 of `parents` general features active, and with each one of its
    `children` specific features (a child never fires without its parent). The directions
    are the same for every seed; `seed` draws the tokens."""
    dirs = torch.randn(parents * (1 + children), d, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    dirs /= dirs.norm(dim=1, keepdim=True)
    par = torch.rand(n, parents, generator=g).argsort(dim=1)[:, :2]  # (n, 2)
    child = parents + par * children + torch.randint(children, (n, 2), generator=g)
    codes = torch.zeros(n, len(dirs))
    codes.scatter_(1, par, 1 + torch.rand(n, 2, generator=g))
    codes.scatter_(1, child, 0.5 + 0.5 * torch.rand(n, 2, generator=g))
    return codes @ dirs


def train(arch: str, x: torch.Tensor, **spec_kw):
    spec = SAESpec("resid_post.0", arch, 64, k=4, **spec_kw)
    cfg = TrainConfig(saes=(spec,), tokens=len(x), batch_size=256, lr=3e-3, seed=0)
    obj = SAEObjective(spec, x.shape[1], cfg, torch.float32, {"site": "resid_post.0"})
    for step in range(cfg.steps):
        obj.train_step(x[step * 256:(step + 1) * 256], cfg.steps)
    return obj.export({})


def fvu(sae, x):
    with torch.no_grad():
        x_hat = sae(x).x_hat
    return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def test_first_group_alone_reconstructs_better_than_a_plain_sae_prefix():
    x, held = hierarchical_data(256 * 300), hierarchical_data(4096, seed=1)
    groups = (0.125, 0.875)  # the first group: 8 latents, one per general feature
    mat = train("matryoshka_batchtopk", x, groups=groups)
    plain = train("batchtopk", x)
    assert matryoshka_widths(mat) == [8, 64]
    first_mat, first_plain = fvu(prefix_sae(mat, 8), held), fvu(prefix_sae(plain, 8), held)
    # the whole SAEs both reconstruct; only the Matryoshka prefix does on its own
    assert fvu(mat, held) < 0.15 and fvu(plain, held) < 0.15
    assert first_mat < 0.5 * first_plain, (first_mat, first_plain)


def test_saved_as_saelens_jumprelu_with_its_levels(tmp_path):
    x = hierarchical_data(256 * 8)
    sae = train("matryoshka_batchtopk", x, groups=(0.25, 0.75))
    assert sae.cfg.architecture == "jumprelu"  # as SAELens saves a trained Matryoshka SAE
    save_sae(sae, tmp_path / "m", "saelens")
    back = load_sae(tmp_path / "m")
    assert back.cfg.metadata["trained_architecture"] == "matryoshka_batchtopk"
    assert matryoshka_widths(back) == [16, 64]
    assert "nested prefixes [16, 64]" in format_info(sae_info(tmp_path / "m"))
    torch.testing.assert_close(back.eval()(x[:64]).x_hat, sae.eval()(x[:64]).x_hat)
    # a prefix of a JumpReLU SAE decodes exactly the first latents of the full SAE
    f = sae.encode(x[:64])
    f[:, 16:] = 0
    torch.testing.assert_close(prefix_sae(sae, 16)(x[:64]).x_hat, sae.decode(f))


def test_group_fractions():
    assert widths_from_fractions(64, (0.125, 0.875)) == [8, 64]
    assert widths_from_fractions(4608)[-1] == 4608
    assert widths_from_fractions(5) == [1, 2, 3, 4, 5]  # every group keeps a latent
    for bad in [(0.5, 0.4), (1.2, -0.2), ()]:
        with pytest.raises(ValueError, match="sum to 1"):
            widths_from_fractions(64, bad)
    with pytest.raises(BadValueError, match="matryoshka_batchtopk"):
        SAESpec("resid_post.0", "batchtopk", 64, k=4, groups=(0.5, 0.5))
    with pytest.raises(BadValueError, match="groups"):
        SAESpec("resid_post.0", "matryoshka_batchtopk", 64, k=4, groups=(0.5, 0.6))
