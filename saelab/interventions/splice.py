"""Run a model with SAEs spliced in at their sites, optionally editing features or sites.

    with splice(lm, sae, record=True) as sp:         # the site comes from sae.cfg.site
        logits = lm.model(input_ids=ids).logits        # == the clean logits: the error term is kept
    sp.feats["resid_post.12"]                          # (B, P, d_sae) of the latest forward

    with splice(lm, {"resid_post.3": sae}, detach_error=True, record_grad=True) as sp:
        metric(lm.model(input_ids=ids).logits).backward()
    sp.feats["resid_post.3"].grad                      # d metric / d feature, per token
    sp.errors["resid_post.3"].grad                     # d metric / d error node

At a spliced site the activation ``x`` becomes::

    f      = encode(x)                  recorded in sp.feats (before any edit)
    f'     = edits(f)                   FeatureEdits, at their positions
    x_out  = decode(f') + (x - decode(f))   with keep_error (the error is from the unedited f)
    x_out  = decode(f')                     without it

so with the error kept an edit changes the site by exactly ``decode(f') - decode(f)``.
Splicing refuses transcoders (they read one site and write another): `replace_mlps`
puts transcoders in place of MLPs instead.
The sum is evaluated as ``x + (decode(f') - decode(f))``, which is bit-exactly x
wherever nothing is edited.
`detach_error` keeps the forward value but stops gradients through the error
term, which is what attribution needs: the gradient then reaches the features
only through the decoder. SteerEdit / PatchEdit at a site act on ``x`` before
the SAE reads it, so recorded features see the steering.

When no gradient can be taken (``torch.no_grad`` / ``inference_mode``, as in
`generate`) and the error is kept, the site is computed as ``x + (f' - f)[:, edited] @
W_dec[edited]``: the same value, but only the edited decoder rows are touched
and unedited tokens stay bit-identical to the clean model. A site with nothing
to edit or record is then left alone entirely.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from saelab.errors import ShapeMismatchError, SiteError
from saelab.interventions.edits import (
    Edit,
    FeatureEdit,
    Frame,
    SiteEdit,
    apply_feature_edits,
    apply_site_edit,
    edit_mask,
    feature_index,
)
from saelab.interventions.mlp_patch import PatchMLPs
from saelab.models.hooks import PatchContext, patch
from saelab.models.sites import Architecture, describe, resolve_sites, site_width

SAEs = Any  # an SAE, a sequence of SAEs (sites from cfg.site) or a mapping {site: SAE}


def unwrap(lm_or_model: Any, arch: Architecture | None = None) -> tuple[nn.Module, Architecture]:
    """(HF model, Architecture) from a saelab LM or a bare HF model."""
    if hasattr(lm_or_model, "arch") and hasattr(lm_or_model, "model"):
        return lm_or_model.model, arch or lm_or_model.arch
    return lm_or_model, arch or describe(lm_or_model)


def one_site(arch: Architecture, name: str, what: str) -> str:
    """The canonical name of the single site `name` denotes (no globs)."""
    sites = resolve_sites(arch, name)
    if len(sites) != 1:
        raise SiteError(f"{what} names {len(sites)} sites ({name!r}); give exactly one site.")
    return sites[0].name


def bind_saes(arch: Architecture, saes: SAEs) -> dict[str, Any]:
    """{canonical site: SAE}, with each SAE's width checked against its site's."""
    if saes is None:
        items: list[tuple[str | None, Any]] = []
    elif isinstance(saes, Mapping):
        items = list(saes.items())
    elif isinstance(saes, nn.Module):
        items = [(None, saes)]
    else:
        items = [(None, sae) for sae in saes]
    from saelab.sae.transcoder import require_sae

    bound: dict[str, Any] = {}
    for key, sae in items:
        require_sae(sae, f"the SAE for {key or sae.cfg.site or 'its site'}")
        name = key if key is not None else sae.cfg.site
        if name is None:
            raise SiteError(f"the SAE ({sae.cfg.architecture}, d_in={sae.cfg.d_in}, "
                            f"d_sae={sae.cfg.d_sae}) has no site in cfg.metadata['site']; "
                            "pass {site: sae}, e.g. {'resid_post.3': sae}.")
        site = one_site(arch, name, "an SAE's site")
        if site in bound:
            raise SiteError(f"two SAEs are spliced at {site}; splice one SAE per site.")
        _check_width(arch, site, sae.cfg.d_in, "SAE expects d_in")
        bound[site] = sae
    return bound


def _check_width(arch: Architecture, site: str, width: int, what: str) -> None:
    try:
        expected = site_width(arch, site)
    except SiteError:  # a raw module whose width is only known at run time
        return
    if width != expected:
        raise ShapeMismatchError(f"{what}={width} but site {site} of this {arch.family} model "
                                 f"has width {expected}; use an SAE/vector trained for this site.")


class Splice:
    """Context manager: SAEs spliced at their sites, with edits; see the module docstring.

    Attributes filled during each forward pass (the latest pass wins):
    `feats[site]` (B, P, d_sae) and, with the error kept and a gradient being
    taken, `errors[site]` (B, P, d_in) - both leaves (or retaining grad) with
    `.grad` after backward when `record_grad`. The error's grad is the gradient
    at the site's output; without `detach_error` the features' grad is 0 (the
    site is x whatever the features are), so attribution wants both flags.
    """

    def __init__(self, lm_or_model: Any, saes: SAEs, *, keep_error: bool = True,
                 detach_error: bool = False, edits: Iterable[Edit] | None = (),
                 record: bool | str | Iterable[str] | None = False, record_grad: bool = False,
                 frame: Frame | None = None, arch: Architecture | None = None):
        self.model, self.arch = unwrap(lm_or_model, arch)
        self.saes = bind_saes(self.arch, saes)
        self.keep_error, self.detach_error, self.record_grad = keep_error, detach_error, record_grad
        self.frame = frame or Frame()
        self.feature_edits: dict[str, list[FeatureEdit]] = {}
        self.site_edits: dict[str, list[SiteEdit]] = {}
        for edit in edits or ():
            self._add_edit(edit)
        self.record = self._record_sites(True if record_grad and not record else record)
        self.feats: dict[str, Tensor] = {}
        self.errors: dict[str, Tensor] = {}
        self._patch: Any = None

    def _add_edit(self, edit: Edit) -> None:
        if isinstance(edit, FeatureEdit):
            if edit.site is None:
                if len(self.saes) != 1:
                    raise SiteError(f"FeatureEdit(features={edit.features!r}) has no site and "
                                    f"{len(self.saes)} SAEs are spliced ({', '.join(self.saes) or 'none'}); "
                                    "set FeatureEdit.site.")
                site = next(iter(self.saes))
            else:
                site = one_site(self.arch, edit.site, "FeatureEdit.site")
            if site not in self.saes:
                raise SiteError(f"FeatureEdit at {site}, but no SAE is spliced there; spliced "
                                f"sites: {', '.join(self.saes) or 'none'}.")
            feature_index(edit, self.saes[site].cfg.d_sae, torch.device("cpu"))  # range check
            self.feature_edits.setdefault(site, []).append(edit)
            return
        site = one_site(self.arch, edit.site, f"{type(edit).__name__}.site")
        width = edit.vector.shape[-1] if hasattr(edit, "vector") else edit.value.shape[-1]
        _check_width(self.arch, site, width, f"{type(edit).__name__} has width")
        self.site_edits.setdefault(site, []).append(edit)

    def _record_sites(self, record: bool | str | Iterable[str]) -> set[str]:
        if record is True:
            return set(self.saes)
        if not record:
            return set()
        names = [record] if isinstance(record, str) else list(record)
        sites = {s.name for name in names for s in resolve_sites(self.arch, name)}
        missing = sites - set(self.saes)
        if missing:
            raise SiteError(f"cannot record features at {', '.join(sorted(missing))}: no SAE is "
                            f"spliced there (spliced: {', '.join(self.saes) or 'none'}).")
        return sites

    def __enter__(self) -> Splice:
        fns = {site: self._site_fn(site) for site in {*self.saes, *self.site_edits}}
        self._patch = patch(self.model, fns, arch=self.arch)
        self._patch.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._patch.__exit__(*exc)

    def _site_fn(self, site: str):
        sae = self.saes.get(site)
        site_edits = self.site_edits.get(site, [])
        feature_edits = self.feature_edits.get(site, [])

        def fn(x: Tensor, ctx: PatchContext) -> Tensor:
            for edit in site_edits:
                x = apply_site_edit(edit, x, edit_mask(edit, ctx, self.frame, x.shape[0]), self.frame, ctx)
            if sae is None:
                return x
            masks = [edit_mask(e, ctx, self.frame, x.shape[0]) for e in feature_edits]
            live = [(e, m) for e, m in zip(feature_edits, masks, strict=True) if bool(m.any())]
            return self._through_sae(site, sae, x, [e for e, _ in live], [m for _, m in live])
        return fn

    def _through_sae(self, site: str, sae: Any, x: Tensor, edits: Sequence[FeatureEdit],
                     masks: Sequence[Tensor]) -> Tensor:
        if torch.is_grad_enabled():
            return self._differentiable(site, sae, x, edits, masks)
        record = site in self.record
        if self.keep_error and not edits and not record:
            return x  # x_hat + (x - x_hat) is x
        feats = sae.encode(x)  # (B, P, F)
        if record:
            self.feats[site] = feats
        if not self.keep_error:
            return sae.decode(apply_feature_edits(feats, edits, masks)[0] if edits else feats)
        if not edits:
            return x
        edited, touched = apply_feature_edits(feats, edits, masks)
        diff = (edited - feats)[..., touched]  # (B, P, k)
        return x + (diff @ sae.W_dec[touched]).to(x.dtype)

    def _differentiable(self, site: str, sae: Any, x: Tensor, edits: Sequence[FeatureEdit],
                        masks: Sequence[Tensor]) -> Tensor:
        feats = sae.encode(x)  # (B, P, F)
        if self.record_grad:
            if feats.requires_grad:
                feats.retain_grad()
            else:  # nothing upstream needs a gradient: make the features a leaf
                feats.requires_grad_(True)
        record = site in self.record
        if record:
            self.feats[site] = feats if self.record_grad else feats.detach()
        x_new = sae.decode(apply_feature_edits(feats, edits, masks)[0] if edits else feats)
        if not self.keep_error:
            return x_new
        x_hat = sae.decode(feats) if edits else x_new
        # x + (x_new - x_hat) rather than x_new + (x - x_hat): the same value and gradient, but
        # exactly x wherever nothing is edited. SmolLM2's residual stream reaches 2e4, where one
        # fp32 rounding step (2e-3) moves the logits by 3e-5.
        if self.detach_error:
            out = x.detach() + (x_new - x_hat.detach()).to(x.dtype)
        else:
            out = x + (x_new - x_hat).to(x.dtype)
        if record:
            error = (x.to(x_hat.dtype) - x_hat).detach()  # (B, P, d_in)
            if self.record_grad:
                # A leaf added as (e - e.detach()) = 0: its grad is d metric / d site output.
                error.requires_grad_(True)
                out = out + (error - error.detach()).to(out.dtype)
            self.errors[site] = error
        return out


def splice(lm_or_model: Any, saes: SAEs, *, keep_error: bool = True, detach_error: bool = False,
           edits: Iterable[Edit] | None = (), record: bool | str | Iterable[str] | None = False,
           record_grad: bool = False, frame: Frame | None = None,
           arch: Architecture | None = None) -> Splice:
    """Context manager running `lm_or_model` with `saes` spliced in (see the module docstring).

    saes: an SAE, a list of SAEs (each at ``sae.cfg.site``) or ``{site: sae}``; may be
    empty when only SteerEdit / PatchEdit are given. record: True (every spliced site),
    a site or a list of sites whose features to keep. record_grad implies record=True
    when record is not given.
    """
    return Splice(lm_or_model, saes, keep_error=keep_error, detach_error=detach_error, edits=edits,
                  record=record, record_grad=record_grad, frame=frame, arch=arch)


class ReplaceMLPs(PatchMLPs):
    """Context manager: each MLP of `transcoders` ({layer: Transcoder}) replaced by its
    transcoder, in the same forward: ``mlp_out.L <- tc(mlp_in.L)`` (decode + skip; the
    input is the transcoder's own site, mlp_in.L as a rule), where the input is this
    forward's own (so with several layers replaced, later transcoders
    read what the earlier ones changed).

    `where` (B, P) bool: replace only there (the other positions keep the real MLP's
    output); None: everywhere. With `keep_error` the real output minus the prediction
    is added back (the model is unchanged: a check). After each forward `feats[layer]`
    (B, P, d_sae) and `outputs[layer]` (B, P, d_model) hold what each transcoder computed
    when `record`.
    """

    def __init__(self, lm_or_model: Any, transcoders: Mapping[int, Any], *,
                 where: Tensor | None = None, keep_error: bool = False, record: bool = False,
                 arch: Architecture | None = None):
        from saelab.sae.transcoder import require_transcoder

        self.model, self.arch = unwrap(lm_or_model, arch)
        self.tcs: dict[int, Any] = {}
        self._in_sites: dict[int, str] = {}  # what each transcoder reads (mlp_in.L as a rule)
        for layer, tc in transcoders.items():
            require_transcoder(tc, f"the transcoder for layer {layer}")
            site_in, site_out = tc.site or f"mlp_in.{layer}", f"mlp_out.{layer}"
            for site, width in ((site_in, tc.cfg.d_in), (site_out, tc.cfg.d_out)):
                _check_width(self.arch, one_site(self.arch, site, "a transcoder's site"), width,
                             f"the transcoder of layer {layer} has width")
            self.tcs[int(layer)] = tc
            self._in_sites[int(layer)] = one_site(self.arch, site_in, "a transcoder's site")
        self.where, self.keep_error, self.record = where, keep_error, record
        self.feats: dict[int, Tensor] = {}
        self.outputs: dict[int, Tensor] = {}
        super().__init__(self.model, self.arch,
                         {layer: (self._in_sites[layer], self._replace(layer)) for layer in self.tcs})

    def _replace(self, layer: int):
        tc = self.tcs[layer]

        def fn(x: Tensor, y: Tensor, ctx: PatchContext) -> Tensor:
            out = tc(x)
            pred = out.output.to(y.dtype)
            if self.record:
                self.feats[layer], self.outputs[layer] = out.feats, pred
            if self.keep_error:
                pred = pred + (y - pred)
            if self.where is None:
                return pred
            return torch.where(self.where.to(y.device)[..., None], pred, y)
        return fn


def replace_mlps(lm_or_model: Any, transcoders: Mapping[int, Any], *, where: Tensor | None = None,
                 keep_error: bool = False, record: bool = False,
                 arch: Architecture | None = None) -> ReplaceMLPs:
    """Context manager running the model with MLPs replaced by transcoders (see `ReplaceMLPs`)."""
    return ReplaceMLPs(lm_or_model, transcoders, where=where, keep_error=keep_error,
                       record=record, arch=arch)
