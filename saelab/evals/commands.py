"""`saelab eval` and `saelab compare`: plain functions, and `register(app)` to mount them.

    result = run_eval("runs/x/resid_post.12-w4608-k32", tokens=10_000)   # writes eval.json ...
    result = run_compare("sae_a", "sae_b", hungarian=True)

saelab/cli.py mounts it::

    from saelab.evals.commands import register
    register(app)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from saelab.errors import SaelabError

DEFAULT_MODEL = "smollm2-135m-instruct"


def sae_folder(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p if p.is_dir() else p.parent


def run_eval(sae: str | os.PathLike, *, model: str | None = None, out: str | os.PathLike | None = None,
             device: str = "cpu", on_progress: Callable[[int, int], None] | None = None,
             on_sensitivity: Callable[[int, int], None] | None = None,
             on_note: Callable[[str], None] | None = None, **settings: Any) -> dict:
    """Load the SAE and its model in float32, evaluate, write eval.json + report.html.

    model: default the SAE's recorded model, else the embedded default. out: default
    SAE_DIR/eval. settings: EvalConfig fields (tokens, corpus, context, ...). A site or
    model other than the SAE's recorded one is evaluated as asked, with a note in
    result["notes"], also given to `on_note` before the (long) evaluation starts.
    """
    from saelab.evals.run import EvalConfig, evaluate
    from saelab.models.limits import check_positions, config_max_positions
    from saelab.models.load import load_model
    from saelab.sae import load_sae
    from saelab.sae.formats.transcoder_sets import load_any

    try:
        config = EvalConfig(**settings)
    except ValueError as err:
        raise SaelabError(str(err)) from None
    loaded = load_any(Path(sae), dtype="float32")
    if isinstance(loaded, dict):  # one transcoder or a set: evals/transcoders.py
        return _run_transcoder_eval(sae, loaded, config, model=model, out=out, device=device,
                                    on_progress=on_progress)
    sae_obj = loaded.to(device) if loaded is not None else load_sae(sae, dtype="float32").to(device)
    model = model or sae_obj.cfg.model_name or DEFAULT_MODEL
    check_positions("--context", config.context, config_max_positions(model), model)
    notes = mismatch_notes(sae_obj.cfg, config.site, model)
    for note in notes:
        if on_note is not None:
            on_note(note)
    lm = load_model(model, dtype="float32", device=device)
    out = Path(out) if out is not None else sae_folder(sae) / "eval"
    result = evaluate(lm, sae_obj, config, out=out, on_progress=on_progress, sae_path=str(sae),
                      on_sensitivity=on_sensitivity, notes=notes)
    result["out"] = str(out)
    return result


def _run_transcoder_eval(path, tcs: dict, config, *, model: str | None, out, device: str,
                         on_progress) -> dict:
    from saelab.evals.transcoders import evaluate_transcoders
    from saelab.models.limits import check_positions, config_max_positions
    from saelab.models.load import load_model

    if config.site is not None or config.keep_error or config.mean_ablation or config.sensitivity:
        raise SaelabError("--site, --mean-ablation and --sensitivity are for SAEs; a transcoder "
                          "is evaluated at its MLP (mlp_in.L -> mlp_out.L)")
    first = next(iter(tcs.values()))
    model = model or first.cfg.model_name or DEFAULT_MODEL
    check_positions("--context", config.context, config_max_positions(model), model)
    lm = load_model(model, dtype="float32", device=device)
    out = Path(out) if out is not None else sae_folder(path) / "eval"
    result = evaluate_transcoders(lm, {L: tc.to(device) for L, tc in tcs.items()}, config,
                                  out=out, on_progress=on_progress)
    result["out"] = str(out)
    return result


def mismatch_notes(cfg: Any, site: str | None, model: str | None) -> list[str]:
    """Notes for evaluating an SAE at a site or on a model other than the ones it was trained
    at (as `compare` notes SAEs of different sites): its numbers then mean little."""
    notes = []
    for what, asked, recorded in (("site", site, cfg.site), ("model", model, cfg.model_name)):
        if asked and recorded and asked != recorded:
            notes.append(f"the SAE was trained at {what} {recorded}, and is evaluated at {asked}: "
                         "expect a poor reconstruction (FVU near or above 1) that says nothing "
                         f"about the SAE; drop --{what} to use the recorded one.")
    return notes


def run_compare(a: str | os.PathLike, b: str | os.PathLike, *, hungarian: bool = False,
                out: str | os.PathLike | None = None, per_feature: bool = False) -> dict:
    """Compare two SAEs' decoders; with `out`, write compare.json and report.html there."""
    import json

    from saelab.evals.dictionaries import compare
    from saelab.sae import load_sae

    sae_a, sae_b = load_sae(a, dtype="float32"), load_sae(b, dtype="float32")
    result = compare(sae_a, sae_b, hungarian=hungarian).to_json(per_feature=per_feature)
    for key, path, sae in (("a", a, sae_a), ("b", b, sae_b)):
        result[key] = {"path": str(path), "architecture": sae.cfg.architecture,
                       "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae, "site": sae.cfg.site,
                       "model_name": sae.cfg.model_name}
    if out is not None:
        from saelab.atomic import disk_full, write_folder
        from saelab.data.store import atomic_write_text
        from saelab.report.evals import render_compare
        from saelab.report.html import write_page

        def write(tmp: Path) -> None:  # the two files are one result: switched in together
            atomic_write_text(tmp / "compare.json", json.dumps(result, indent=1) + "\n")
            write_page(tmp / "report.html", render_compare(result))

        out = Path(out)
        with disk_full(out, "the previous results there, if any, are unchanged"):
            write_folder(out, ("compare.json", "report.html"), write)
        result["out"] = str(out)
    return result


def _skip(text: str) -> int | None:
    if text == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise SaelabError(f"--skip-contexts takes 'auto' or a count >= 0, got {text!r}")
    return value


def register(app: typer.Typer) -> None:
    """Add the `eval` and `compare` commands to the saelab typer app."""
    from rich.table import Table

    from saelab.console import console, emit_json, progress, user_errors

    @app.command("eval")
    @user_errors
    def eval_cmd(
        sae: Annotated[Path, typer.Argument(help="SAE folder (any format saelab reads), or transcoders: one, a folder of them, a circuit-tracer set.")],
        model: Annotated[str | None, typer.Option("--model", "-m", help="Model; default the SAE's recorded model.")] = None,
        tokens: Annotated[int, typer.Option(help="Token positions to evaluate (about 70/s on 2 CPU cores for a 135M model: 3 forwards each).")] = 10_000,
        corpus: Annotated[str, typer.Option(help="builtin, a .txt/.jsonl/.parquet file, hf:NAME")] = "builtin",
        context: Annotated[int, typer.Option(help="Tokens per context.")] = 128,
        batch_size: Annotated[int, typer.Option(help="Contexts per forward pass.")] = 8,
        bootstrap: Annotated[int, typer.Option(help="Bootstrap replicates over contexts (0: no intervals).")] = 1000,
        seed: Annotated[int, typer.Option(help="Bootstrap seed.")] = 0,
        mean_ablation: Annotated[bool, typer.Option(help="Also loss recovered against mean ablation.")] = False,
        downstream: Annotated[bool, typer.Option(help="ΔCE, loss recovered, KL (3 forwards per batch).")] = True,
        site: Annotated[str | None, typer.Option(help="Site; default the SAE's recorded site.")] = None,
        skip_contexts: Annotated[str, typer.Option(help="Contexts to skip first; 'auto' = past the SAE's training text.")] = "auto",
        sensitivity: Annotated[bool, typer.Option("--sensitivity", help="Also the synthetic-activation sensitivity: KS of blow-up steps, synthetic vs real (slow: ~3 s per base on one CPU thread).")] = False,
        sensitivity_n: Annotated[int, typer.Option(help="Bases of --sensitivity.")] = 200,
        out: Annotated[Path | None, typer.Option(help="Output folder; default SAE/eval.")] = None,
        device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
        json: Annotated[bool, typer.Option("--json", help="Machine-readable output on stdout.")] = False,
    ) -> None:
        """Evaluate an SAE: L0, FVU, cosine, shrinkage, dead/dense, ΔCE, loss recovered, KL.

        Given a transcoder (or a folder of per-layer transcoders, or a circuit-tracer
        set): FVU of mlp_out, L0, dead fraction per layer, and ΔCE with each transcoder
        replacing its MLP alone and with all of them at once.
        """
        from saelab.checks import ABSURD, integer

        integer("--sensitivity-n", sensitivity_n, low=2, high=ABSURD)  # checked even when off
        status = console.status("loading the model and the SAE, finding held-out text")
        status.start()
        bar = None
        tasks: dict[str, Any] = {}  # one progress bar per stage: eval, then sensitivity

        def updater(name: str, unit: str) -> Callable[[int, int], None]:
            def update(done: int, total: int) -> None:
                nonlocal bar
                if bar is None:  # rich shows one live display at a time: the status gives way
                    status.stop()
                    bar = progress()
                    bar.start()
                if name not in tasks:
                    tasks[name] = bar.add_task(name, total=total, info="")
                bar.update(tasks[name], completed=done, total=total, info=f"{done:,} {unit}")
            return update

        def warn(note: str) -> None:
            console.print(f"[yellow]warning:[/] {note}", highlight=False)

        try:
            result = run_eval(sae, model=model, out=out, device=device, on_note=warn,
                              on_progress=updater("eval", "tokens"),
                              on_sensitivity=updater("sensitivity", "bases"),
                              tokens=tokens, corpus=corpus, context=context, batch_size=batch_size,
                              bootstrap=bootstrap, seed=seed, mean_ablation=mean_ablation,
                              downstream=downstream, site=site, skip_contexts=_skip(skip_contexts),
                              sensitivity=sensitivity_n if sensitivity else 0)
        finally:
            status.stop()
            if bar is not None:
                bar.stop()
        if json:
            return emit_json(result)
        if result.get("kind") == "transcoders":
            return _print_transcoders(result)
        table = Table("metric", "value", "95% CI", title=f"{result['sae']['architecture']} SAE at "
                      f"{result['sae']['site']}: {result['data']['tokens_evaluated']:,} tokens")
        for key in ("l0", "fvu", "explained_variance", "cosine", "relative_reconstruction_bias",
                    "delta_ce", "loss_recovered", "loss_recovered_mean", "kl_score"):
            if key in result["metrics"]:
                m = result["metrics"][key]
                ci = m["ci95"]
                table.add_row(key, _fmt(m["value"]), f"[{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else "")
        feats = result["features"]
        table.add_row("dead_fraction", _fmt(feats["dead_fraction"]), "")
        table.add_row("dense_fraction", _fmt(feats["dense_fraction"]), "")
        console.print(table)
        if "sensitivity" in result:
            sens = result["sensitivity"]
            console.print(f"sensitivity ({sens['n']} bases, {sens['steps']} steps): KS of blow-up "
                          "steps against real targets (0 = as real, 1 = disjoint)", highlight=False)
            for kind, ks in sens["ks"].items():
                console.print(f"  {kind}: L2 {_fmt(ks['l2'])}, KL {_fmt(ks['kl'])}", highlight=False)
        for note in result["notes"]:
            console.print(f"[yellow]note:[/] {note}", highlight=False)
        console.print(f"wrote {result['out']}/eval.json and report.html")

    @app.command("compare")
    @user_errors
    def compare_cmd(
        sae_a: Annotated[Path, typer.Argument(help="First SAE folder (A).")],
        sae_b: Annotated[Path, typer.Argument(help="Second SAE folder (B).")],
        hungarian: Annotated[bool, typer.Option(help="Also a one-to-one matching (Hungarian).")] = False,
        out: Annotated[Path | None, typer.Option(help="Write compare.json and report.html here.")] = None,
        per_feature: Annotated[bool, typer.Option(help="Per-feature max cosines in the JSON.")] = False,
        json: Annotated[bool, typer.Option("--json", help="Machine-readable output on stdout.")] = False,
    ) -> None:
        """Compare two dictionaries: MCS, per-feature max cosine, optional one-to-one matching."""
        result = run_compare(sae_a, sae_b, hungarian=hungarian, out=out, per_feature=per_feature)
        if json:
            return emit_json(result)
        table = Table("", "value", title=f"A = {sae_a}  B = {sae_b}")
        table.add_row("MCS (A → B)", _fmt(result["mcs"]))
        table.add_row("MCS (B → A)", _fmt(result["mcs_reverse"]))
        for t, v in result["frac_above"].items():
            table.add_row(f"A features with max cos > {t}", _fmt(v))
        if result["matching"]:
            table.add_row("matching: mean cos", _fmt(result["matching"]["mean_cos"]))
        console.print(table)
        for note in result["notes"]:
            console.print(f"[yellow]note:[/] {note}", highlight=False)


def _print_transcoders(result: dict) -> None:
    from rich.table import Table

    from saelab.console import console

    def cell(m: dict | None) -> str:
        if not m:
            return ""
        ci = m.get("ci95")
        return _fmt(m["value"]) + (f" [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else "")

    table = Table("layer", "L0", "FVU of mlp_out", "ΔCE (this MLP replaced)", "dead",
                  title=f"transcoders: {result['data']['tokens_evaluated']:,} tokens")
    for layer, row in result["layers"].items():
        m = row["metrics"]
        table.add_row(layer, _fmt(m["l0"]["value"]), cell(m["fvu"]), cell(m.get("delta_ce")),
                      _fmt(row["dead_fraction"]))
    console.print(table)
    if result.get("ce_clean"):
        console.print(f"CE clean {_fmt(result['ce_clean']['value'])} nats", highlight=False)
    if result.get("all_layers"):
        m = result["all_layers"]["metrics"]
        console.print(f"all {len(result['all_layers']['layers'])} MLPs replaced at once: ΔCE "
                      f"{cell(m['delta_ce'])}, KL {cell(m['kl'])}", highlight=False)
    for note in result["notes"]:
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    console.print(f"wrote {result['out']}/eval.json")


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.4g}"
