"""Transcoder site pairs: which site a transcoder reads and which it predicts.

``mlp.L`` (globs ok: ``mlp.*``) means the MLP of layer L: input ``mlp_in.L``, target
``mlp_out.L``. Any other pair is written ``INPUT>TARGET`` (``resid_mid.3>mlp_out.3``),
each side a site name `resolve_sites` reads; a glob on the input side pairs every
match with the target of the same layer when the target is given as ``KIND.*``.
"""

from __future__ import annotations

import re

from saelab.errors import SiteError


def resolve_pairs(tokens: list[str], resolve) -> list[tuple[str, str]]:
    """(input, target) canonical site names for each token, in order, without repeats.

    `resolve(text) -> list[str]`: canonical names of a site spec (globs expanded, depth
    order), e.g. ``lambda t: [s.name for s in resolve_sites(lm.arch, t)]``.
    Raises SiteError for a token that is not a pair or whose layers do not match.
    """
    pairs: list[tuple[str, str]] = []
    for token in tokens:
        m = re.fullmatch(r"mlp\.(.+)", token)
        if m:
            src, dst = f"mlp_in.{m.group(1)}", "mlp_out.*"
        elif ">" in token:
            src, _, dst = token.partition(">")
        else:
            raise SiteError(
                f"--kind transcoder takes MLPs (mlp.12, mlp.*) or pairs INPUT>TARGET "
                f"(mlp_in.3>mlp_out.3); got {token!r}, a single site.")
        inputs = resolve(src.strip())
        targets = resolve(dst.strip())
        by_layer = {_layer(t): t for t in targets}
        for site in inputs:
            target = by_layer.get(_layer(site)) if len(targets) > 1 or "*" in dst else targets[0]
            if target is None:
                raise SiteError(f"{token!r}: no target site of layer {_layer(site)} for {site}")
            if target == site:
                raise SiteError(f"{token!r}: a transcoder predicts another site than it reads")
            if (site, target) not in pairs:
                pairs.append((site, target))
    return pairs


def _layer(site: str) -> str:
    return site.rpartition(".")[2]
