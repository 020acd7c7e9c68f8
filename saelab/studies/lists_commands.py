"""`saelab study lists` (and `saelab demo`, its quick preset on the embedded model)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def run_with_progress(cfg, out: Path) -> dict:
    """Run the study with one rich progress bar per stage."""
    from saelab.console import progress
    from saelab.studies.lists import run_lists

    with progress() as bar:

        def stage(name: str, total: int):
            task = bar.add_task(name, total=max(total, 1), info="")
            return lambda done: bar.update(task, completed=min(done, total), info=f"{done:,}/{total:,}")

        return run_lists(cfg, out, stage)


def print_summary(results: dict, out: Path) -> None:
    """The short table the demo ends with: the template contrast, then one row per SAE."""
    from rich.table import Table

    from saelab.console import console, saelab_command

    def num(stat: dict | None, digits: int = 2) -> str:
        if not stat or stat.get("mean") is None:
            return "–"
        ci = stat.get("ci95")
        return f"{stat['mean']:+.{digits}f}" + (f" [{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]" if ci else "")

    data = results["dataset"]
    items = ", ".join(f"{t} {s['mean']:.1f}" for t, s in data["templates"].items() if s["mean"] is not None)
    console.print(f"{data['n']} lists; items per list: {items}; long - short {num(data['contrast'])}")
    console.print(f"metric: {results['metric']['name']} ({results['metric']['reason']})", highlight=False)
    table = Table(title=f"Ablating the top {results['config']['ablate']} attributed pairs")
    table.add_column("SAE", no_wrap=True)  # a site name split over two lines cannot be copied back
    for header in ("Δ items, top-N", "Δ items, random-N", "Δ diversity, top-N", "error share", "effective"):
        table.add_column(header)
    for site, entry in results["saes"].items():
        ab = entry["ablation"]
        table.add_row(site, num(ab["top"]["n_items"]), num(ab["random"]["n_items"]),
                      num(ab["top"]["diversity"]), f"{entry['error_share']['mean']:.2f}",
                      "yes" if entry["verdict"]["effective"] else "no")
    console.print(table)
    times = ", ".join(f"{k} {v:.0f}s" for k, v in results["seconds"].items())
    console.print(f"time: {times}")
    console.print(f"report: {out / 'report.html'}   browse features: {saelab_command()} serve {out}")


def register(study_app: typer.Typer) -> None:
    from saelab.console import user_errors

    @study_app.command("lists")
    @user_errors
    def lists_cmd(
        out: Annotated[Path, typer.Option(help="Run folder; rerunning with the same settings resumes.")],
        model: Annotated[str, typer.Option("--model", "-m", help="An instruct model: embedded name, HF id, folder.")]
            = "smollm2-135m-instruct",
        preset: Annotated[str, typer.Option(help="quick (the demo, minutes) or full (the original's size, hours).")]
            = "full",
        sae: Annotated[list[str] | None, typer.Option(help="SAE folder to use (repeat); default: train them.")] = None,
        sites: Annotated[str | None, typer.Option(help="Sites to train SAEs at, comma separated; default: "
                                                  "the original's relative depths.")] = None,
        topics: Annotated[str | None, typer.Option(help="Topics, comma separated; default the original's 23.")]
            = None,
        samples: Annotated[int | None, typer.Option(help="Lists per topic and template.")] = None,
        metric: Annotated[str | None, typer.Option(help="auto, whitespace or end_of_turn.")] = None,
        ablate: Annotated[int | None, typer.Option(help="Top attributed pairs zeroed per example.")] = None,
        ablate_every_step: Annotated[bool | None, typer.Option(
            "--ablate-every-step/--ablate-prefix-only", help="Also zero them at every generated token.")] = None,
        ablate_templates: Annotated[str | None, typer.Option(help="Templates to ablate, comma separated.")] = None,
        sae_tokens: Annotated[int | None, typer.Option(help="Training tokens per trained SAE.")] = None,
        batch_size: Annotated[int | None, typer.Option(help="Sequences per batch.")] = None,
        seed: Annotated[int | None, typer.Option(help="Base seed of all sampling.")] = None,
        json: Annotated[bool, typer.Option("--json", help="Print results.json on stdout.")] = False,
    ) -> None:
        """When does a list end? Sample lists, attribute, ablate, report (STUDIES.md §1)."""
        from saelab.console import emit_json
        from saelab.studies.lists import ListsConfig

        cfg = ListsConfig.preset_config(
            preset, model=model, saes=tuple(sae) if sae else None,
            sites=tuple(s.strip() for s in sites.split(",")) if sites else None,
            topics=tuple(t.strip() for t in topics.split(",")) if topics else None,
            samples=samples, metric=metric, ablate=ablate, ablate_every_step=ablate_every_step,
            ablate_templates=tuple(t.strip() for t in ablate_templates.split(",")) if ablate_templates else None,
            sae_tokens=sae_tokens, batch_size=batch_size, seed=seed)
        results = run_with_progress(cfg, out)
        if json:
            return emit_json(results)
        print_summary(results, out)
