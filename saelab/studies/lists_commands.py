"""`saelab study lists` (and `saelab demo`, its quick preset on the embedded model)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer


def run_with_progress(cfg: Any, out: Path, *, json: bool = False, graph: Any = None) -> dict:
    """Run the study with one progress bar (or, piped, one line) per stage."""
    from saelab.studies.lists import run_lists
    from saelab.studies.stage_lines import study_progress

    with study_progress(json=json) as stage:
        return run_lists(cfg, out, stage, graph=graph)


def _num(stat: dict | None, digits: int = 1) -> str:
    """mean [CI] in `digits` decimals, or a dash."""
    if not stat or stat.get("mean") is None:
        return "–"
    ci = stat.get("ci95")
    return f"{stat['mean']:+.{digits}f}" + (f" [{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]" if ci else "")


def summary_lines(results: dict) -> list[str]:
    """The dataset's and the verdicts' sentences the demo ends with (and the report opens with)."""
    data = results["dataset"]
    distinct = data.get("distinct") or {}
    caps = data.get("caps") or {}
    parts = []
    for t, s in data["templates"].items():
        if s.get("mean") is None:
            continue
        d = (distinct.get(t) or {}).get("mean")
        cap = caps.get(t)
        parts.append(f"{t} {s['mean']:.1f}" + (f" ({d:.1f} distinct)" if d is not None else "")
                     + (f", {cap['cap_hits']}/{cap['lists']} cut at {cap['token_limit']} tokens"
                        if cap else ""))
    lines = [f"{data['n']} lists; items per list: " + "; ".join(parts)]
    contrast = data.get("contrast")
    if contrast:
        line = f"long - short: {_num(contrast)} items, {_num(contrast.get('distinct'))} distinct"
        if contrast.get("censored_pairs"):
            line += (f"; {contrast['censored_pairs']} pairs censored by the token limit, the rest: "
                     f"{_num(contrast.get('uncensored'))} distinct")
        lines.append(line)
    m = results["metric"]
    lines.append(f"metric: {m['name']} ({m['reason']})")
    return lines


def summary_table(results: dict) -> Any:
    """One row per SAE, narrow enough for an 80-column terminal or log."""
    from rich import box
    from rich.table import Table

    cfg = results["config"]
    table = Table(title=f"Ablating the top {cfg['ablate']} attributed pairs (Δ: ablated - control)",
                  box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, collapse_padding=True,
                  title_justify="left")
    table.add_column("SAE", no_wrap=True)  # a site name split over two lines cannot be copied back
    for header in ("Δdistinct top-N", "random-N", "Δitems", "capped", "effective"):
        table.add_column(header, no_wrap=True, justify="right")
    for site, entry in results["saes"].items():
        ab = entry["ablation"]
        caps = ab.get("cap_hits") or {}
        table.add_row(site, _num(ab["top"]["distinct_items"]),
                      _num({"mean": ab["random"]["distinct_items"]["mean"]}),
                      _num({"mean": ab["top"]["n_items"]["mean"]}),
                      "/".join(str(caps.get(c, "–")) for c in ("control", "top", "random")),
                      "yes" if entry["verdict"]["effective"] else "no")
    return table


def graph_lines(g: dict | None) -> list[str]:
    """The graph stage's verdict and per-arm effects (none without --graph)."""
    if not g:
        return []
    arms = "; ".join(f"{arm} {_num(g['arms'][arm]['distinct_items'])}"
                     for arm in ("graph", "attribution", "random"))
    return [f"graphs ({g['n_examples']} lists, top {g['top_n']} transcoder features zeroed): "
            f"Δdistinct items {arms}; Δitems graph − attribution {_num(g['difference']['n_items'])}",
            g["verdict"]["text"]]


def print_summary(results: dict, out: Path) -> None:
    """The short summary the demo ends with: the dataset, then one row per SAE."""
    from saelab.console import console, saelab_command

    for line in summary_lines(results):
        console.print(line, highlight=False, markup=False, soft_wrap=True)  # copyable
    console.print(summary_table(results))
    some = next(iter(results["saes"].values()), None)
    if some:
        n = some["ablation"]["n_examples"]
        console.print(f"Δdistinct top-N: mean [95% CI] over {n} lists; random-N: the same for "
                      "random active pairs; Δitems: all items, repeats included; capped: "
                      f"regenerations cut at {some['ablation'].get('token_limit', '?')} tokens "
                      "(control/top-N/random-N); effective: "
                      f"{some['verdict']['rule']}", highlight=False, markup=False)
    for line in graph_lines(results.get("graph")):
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    times = ", ".join(f"{k} {v:.0f}s" for k, v in results["seconds"].items())
    console.print(f"time: {times}", highlight=False)
    console.print(f"report: {out / 'report.html'}   browse features: {saelab_command()} serve {out}",
                  highlight=False, markup=False, soft_wrap=True)  # a command split over lines fails


def _split(text: str | None) -> tuple[str, ...] | None:
    return tuple(t.strip() for t in text.split(",")) if text else None


def register(study_app: typer.Typer) -> None:
    from saelab.console import user_errors

    @study_app.command("lists")
    @user_errors
    def lists_cmd(
        out: Annotated[Path, typer.Option(help="Run folder; rerunning with the same settings resumes.")],
        model: Annotated[str, typer.Option("--model", "-m", help="An instruct model: embedded name, HF id, folder.")]
            = "smollm2-135m-instruct",
        preset: Annotated[str, typer.Option(help="quick: what `saelab demo` runs, ~10-20 minutes on a "
                                            "CPU; full: the original's size (5 lists per topic and "
                                            "template, ten SAEs on 1M tokens), several hours on a CPU.")]
            = "quick",
        sae: Annotated[list[str] | None, typer.Option(help="SAE folder to use (repeat); default: train them.")] = None,
        sites: Annotated[str | None, typer.Option(help="Sites to train SAEs at, comma separated; default: "
                                                  "the preset's.")] = None,
        topics: Annotated[str | None, typer.Option(help="Topics, comma separated; default the original's 23.")]
            = None,
        samples: Annotated[int | None, typer.Option(help="Lists per topic and template.")] = None,
        metric: Annotated[str | None, typer.Option(help="auto, whitespace or end_of_turn.")] = None,
        ablate: Annotated[int | None, typer.Option(help="Top attributed pairs zeroed per example.")] = None,
        ablate_every_step: Annotated[bool | None, typer.Option(
            "--ablate-every-step/--ablate-prefix-only", help="Also zero them at every generated token.")] = None,
        ablate_templates: Annotated[str | None, typer.Option(help="Templates to ablate, comma separated.")] = None,
        max_density: Annotated[float | None, typer.Option(
            help="Leave features firing on more than this fraction of the lists' tokens (e.g. 0.1) "
                 "out of the top pairs, the random control and the tables; default: keep all.")] = None,
        long_max_new_tokens: Annotated[int | None, typer.Option(
            help="Token limit of the long template's lists (default 300, 100 in the quick preset; the others get 100).")] = None,
        sae_tokens: Annotated[int | None, typer.Option(help="Training tokens per trained SAE.")] = None,
        batch_size: Annotated[int | None, typer.Option(help="Sequences per batch.")] = None,
        seed: Annotated[int | None, typer.Option(help="Base seed of all sampling.")] = None,
        graph: Annotated[bool, typer.Option(
            "--graph", help="Also build attribution graphs over --transcoders for some ablated lists "
                            "and compare graph-chosen with attribution-chosen features by ablation "
                            "(may be added to a finished run).")] = False,
        transcoders: Annotated[Path | None, typer.Option(
            help="Transcoder set of the model (one per MLP), for --graph.")] = None,
        graph_examples: Annotated[int, typer.Option(help="Lists that get a graph (minutes each on a CPU).")] = 8,
        graph_features: Annotated[int, typer.Option(help="Feature nodes with rows per graph.")] = 500,
        json: Annotated[bool, typer.Option("--json", help="Print results.json on stdout.")] = False,
    ) -> None:
        """When does a list end? Sample lists, attribute, ablate, report. Defaults to the quick
        preset (minutes); --preset full is the original's size and takes hours on a CPU."""
        from saelab.checks import MAX_SAMPLES, integer
        from saelab.console import emit_json
        from saelab.errors import SaelabError
        from saelab.studies.lists_config import ListsConfig

        try:
            cfg = ListsConfig.preset_config(
                preset, model=model, saes=tuple(sae) if sae else None, sites=_split(sites),
                topics=_split(topics), samples=samples, metric=metric, ablate=ablate,
                ablate_every_step=ablate_every_step, ablate_templates=_split(ablate_templates),
                max_density=max_density, long_max_new_tokens=long_max_new_tokens,
                sae_tokens=sae_tokens, batch_size=batch_size, seed=seed)
        except ValueError as err:
            raise SaelabError(str(err)) from None
        integer("graph_examples", graph_examples, low=1, high=MAX_SAMPLES)  # even without --graph
        integer("graph_features", graph_features, low=1, high=10**7)
        gcfg = None
        if transcoders and not graph:
            raise SaelabError("--transcoders is read by the graph stage only; add --graph.")
        if graph:
            from saelab.studies.lists_graph import GraphStudyConfig

            gcfg = GraphStudyConfig(str(transcoders) if transcoders else "", examples=graph_examples,
                                    max_features=graph_features)
        results = run_with_progress(cfg, out, json=json, graph=gcfg)
        if json:
            return emit_json(results)
        print_summary(results, out)
