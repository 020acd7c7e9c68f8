"""`saelab scope`: build a scope (SAEs at every layer and sublayer) into a folder.

`scope_app` is a command group whose callback builds the scope when no subcommand
is given, so that subcommands (`saelab scope export ...`) can be added to it by
other modules: ``from saelab.scope.commands import scope_app``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from saelab.console import JsonFlag, console, emit_json, user_errors

scope_app = typer.Typer(help="A scope: SAEs at every layer and sublayer of a model, evaluated, "
                             "with dashboards, in Gemma Scope's layout.",
                        invoke_without_command=True, no_args_is_help=False)


def resolve_config(model: str, d_model: int, *, preset: str | None, sites: str | None,
                   layers: str | None, widths: str | None, l0: str | None, arch: str | None,
                   tokens: int | None, eval_tokens: int | None, feature_tokens: int | None,
                   batch_size: int | None, corpus: str | None, context: int | None,
                   seed: int | None, kind: str = "sae", skip: bool = False):
    """The ScopeConfig: the preset's settings (if any), then every option given.

    kind "transcoder": one transcoder per layer at the MLP; --sites may only say mlp.
    """
    from saelab.errors import SaelabError
    from saelab.scope.plan import (
        TRANSCODER_SITES,
        ScopeConfig,
        parse_layers,
        parse_list,
        parse_width,
        preset_settings,
    )

    s = preset_settings(preset, d_model)
    if preset is None:
        s["widths"] = (2 * d_model,)
    if sites is not None:
        s["sites"] = parse_list(sites, "sites") or ()
    if kind == "transcoder":
        s["sites"] = s["sites"] if sites is not None else TRANSCODER_SITES
        s["kind"], s["skip"] = kind, skip
    elif kind != "sae" or skip:  # ScopeConfig names the mistake
        s["kind"], s["skip"] = kind, skip
    if layers is not None:
        s["layers"] = parse_layers(layers)
    if widths is not None:
        s["widths"] = tuple(parse_width(w, d_model) for w in parse_list(widths, "widths") or ())
    if l0 is not None:
        try:
            s["l0s"] = tuple(int(v) for v in parse_list(l0, "l0") or ())
        except ValueError:
            raise SaelabError(f"--l0 {l0!r}: give target L0s as integers, e.g. 16,32,64.") from None
    given = {"arch": arch, "tokens": tokens, "eval_tokens": eval_tokens,
             "feature_tokens": feature_tokens, "batch_size": batch_size, "corpus": corpus,
             "context": context, "seed": seed}
    s.update({k: v for k, v in given.items() if v is not None})
    if "tokens" in s and "batch_size" not in s and s["tokens"] < ScopeConfig.batch_size:
        s["batch_size"] = s["tokens"]  # a tiny run: one batch
    try:
        return ScopeConfig(model=model, **s)
    except ValueError as err:
        raise SaelabError(str(err)) from None


@scope_app.callback()
@user_errors
def scope(
    ctx: typer.Context,
    out: Annotated[Path | None, typer.Option(help="Scope folder (Gemma Scope layout, scope.json, report.html).")] = None,
    model: Annotated[str, typer.Option("--model", "-m", help="Embedded name, HF id, folder or .gguf.")] = "smollm2-135m-instruct",
    preset: Annotated[str | None, typer.Option(help="quick (CPU, one width and L0) or full (GPU: 4x and 16x d_model, three L0s, 40M tokens).")] = None,
    sites: Annotated[str | None, typer.Option(help="Site kinds, comma separated (default resid_post,attn_out,mlp_out).")] = None,
    layers: Annotated[str | None, typer.Option(help="all, or layers such as 0,3,5 or 0-4.")] = None,
    widths: Annotated[str | None, typer.Option(help="Latents per SAE, comma separated; 4x = 4 x d_model (default 2x).")] = None,
    l0: Annotated[str | None, typer.Option("--l0", help="Target L0s, comma separated (k of top-k; a target-L0 loss for jumprelu).")] = None,
    arch: Annotated[str | None, typer.Option(help="jumprelu, topk or batchtopk (default batchtopk; full: jumprelu).")] = None,
    tokens: Annotated[int | None, typer.Option(help="Training tokens (every SAE, from the same forwards).")] = None,
    eval_tokens: Annotated[int | None, typer.Option(help="Held-out tokens every SAE is evaluated on.")] = None,
    feature_tokens: Annotated[int | None, typer.Option(help="Tokens the dashboards are collected over (0: none).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Tokens per optimizer step.")] = None,
    corpus: Annotated[str | None, typer.Option(help="Corpus (builtin, a file, hf:NAME).")] = None,
    context: Annotated[int | None, typer.Option(help="Tokens per context.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of initialisation, data order and bootstrap.")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    memory_budget: Annotated[str | None, typer.Option(help="Bytes the SAEs in training may use (e.g. 2GB); more train in successive passes.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the interrupted scope in --out (same settings).")] = False,
    kind: Annotated[str, typer.Option(help="sae, or transcoder: one transcoder per layer reading mlp_in.L and predicting mlp_out.L (--sites mlp).")] = "sae",
    skip: Annotated[bool, typer.Option(help="Transcoders: also learn an affine skip x @ W_skip.T (skip transcoders).")] = False,
    json: JsonFlag = False,
) -> None:
    """Train, evaluate and index SAEs at every layer of the given site kinds.

    Every SAE trains from the same model forwards; every SAE is evaluated in one
    pass (spliced forwards start at the SAE's block); dashboards are collected in
    one pass. The folder holds Gemma Scope's `<kind>/layer_L/width_W/average_l0_N/
    params.npz`, the SAELens folders under native/, scope.json + scope.parquet and
    report.html. With --kind transcoder: one transcoder per layer (mlp_in.L ->
    mlp_out.L), Gemma Scope 2's transcoder files under transcoder/, and a
    circuit-tracer set under circuit_tracer/ (`load_transcoders`, `saelab graph`).
    """
    if ctx.invoked_subcommand is not None:
        return
    from saelab.errors import SaelabError
    from saelab.models.limits import check_positions, config_max_positions
    from saelab.models.load import load_model
    from saelab.scope.run import build_scope, load_fast_model
    from saelab.train.trainer import parse_bytes, resolve_device

    if out is None:
        raise SaelabError("give --out DIR: the folder the scope is written to.")
    budget = parse_bytes(memory_budget) if memory_budget else None
    resolve_device(device)
    if context is not None:
        check_positions("--context", context, config_max_positions(model), model)
    lm = load_model(model, dtype="float32", device=device)
    cfg = resolve_config(model, lm.arch.d_model, preset=preset, sites=sites, layers=layers,
                         widths=widths, l0=l0, arch=arch, tokens=tokens, eval_tokens=eval_tokens,
                         feature_tokens=feature_tokens, batch_size=batch_size, corpus=corpus,
                         context=context, seed=seed, kind=kind, skip=skip)
    from saelab.console import progress

    with progress() as bar:
        tasks: dict[str, int] = {}

        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total, info="")
            bar.update(tasks[stage], completed=done, total=total)

        result = build_scope(cfg, out, device=device, memory_budget=budget, resume=resume,
                             on_progress=update, lm=lm, fast_lm=load_fast_model(cfg, lm, device))
    summary = {"out": str(out), "saes": len(result.scope.entries), "stages": result.stages,
               "already_finished": result.already_finished, "report": str(out / "report.html"),
               "index": str(out / "scope.json")}
    if json:
        return emit_json(summary)
    if result.already_finished:
        console.print(f"the scope in {out} had already finished; nothing was changed.")
    times = ", ".join(f"{k} {v:,.0f} s" for k, v in result.stages.items())
    what = "transcoders" if result.scope.kind == "transcoder" else "SAEs"
    console.print(f"{len(result.scope.entries)} {what} in {out} ({times}); index {out}/scope.json, "
                  f"report {out}/report.html")


def register(app: typer.Typer) -> None:
    """Mount `scope` (a group: building is its default, subcommands may be added)."""
    app.add_typer(scope_app, name="scope")
