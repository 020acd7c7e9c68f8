"""`saelab scope export --neuronpedia OUT DIR`: a scope in Neuronpedia's export layout.

`register_export(scope_app)` adds the command to the `saelab scope` sub-app;
`register(app)` does it for the root app, finding that sub-app or making one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from saelab.console import JsonFlag, console, emit_json, escape, user_errors


def register(app: typer.Typer) -> None:
    """Attach `export` to the root's `scope` sub-app (made here when no stage made one)."""
    for group in app.registered_groups:
        if group.name == "scope" and group.typer_instance is not None:
            register_export(group.typer_instance)
            return
    scope_app = typer.Typer(help="A scope: SAEs at every layer and site of a model.",
                            no_args_is_help=True)
    register_export(scope_app)
    app.add_typer(scope_app, name="scope")


def register_export(scope_app: typer.Typer) -> None:
    @scope_app.command("export")
    @user_errors
    def export_cmd(
        scope_dir: Annotated[Path, typer.Argument(help="The scope folder (from `saelab scope --out`).")],
        neuronpedia: Annotated[Path, typer.Option(
            "--neuronpedia", help="Output folder: Neuronpedia's export layout, one folder per source.")],
        model_id: Annotated[str | None, typer.Option(
            help="Neuronpedia model id (default: the scope's model name as a slug).")] = None,
        release_id: Annotated[str | None, typer.Option(
            help="Neuronpedia release id (default: saelab-<model id>).")] = None,
        creator_name: Annotated[str, typer.Option(help="Creator named in the records.")] = "saelab",
        url: Annotated[str | None, typer.Option(help="URL of the release (paper, weights).")] = None,
        batch_size: Annotated[int, typer.Option(help="Features per gzipped batch file.")] = 128,
        circuit_tracer: Annotated[bool, typer.Option(
            help="Also write circuit-tracer's per-feature JSON files.")] = True,
        overwrite: Annotated[bool, typer.Option(help="Replace a non-empty output folder.")] = False,
        json: JsonFlag = False,
    ) -> None:
        """Export a scope for Neuronpedia (and circuit-tracer's graph viewer)."""
        from saelab.checks import integer
        from saelab.scope.export import ExportConfig, export_neuronpedia

        integer("--batch-size", batch_size, low=1, high=1_000_000)
        config = ExportConfig(creator_name=creator_name, model_id=model_id, release_id=release_id,
                              url=url, batch_size=batch_size, circuit_tracer=circuit_tracer)
        res = export_neuronpedia(scope_dir, neuronpedia, config, overwrite=overwrite)
        summary = {"out": str(res.out), "model_id": res.model_id, "sources": res.sources,
                   "features": res.features, "activations": res.activations,
                   "explanations": res.explanations,
                   "circuit_tracer_files": res.circuit_tracer_files, "skipped": res.skipped}
        if json:
            return emit_json(summary)
        console.print(f"{len(res.sources)} source(s) of model {res.model_id} in "
                      f"{escape(str(res.out))}/{res.model_id}/: {res.features} features, {res.activations} "
                      f"activations, {res.explanations} explanations; "
                      f"{res.circuit_tracer_files} circuit-tracer feature files", highlight=False,
                      soft_wrap=True)
        for sae_id, why in res.skipped.items():
            console.print(f"[yellow]skipped[/] {sae_id}: {escape(why)}", highlight=False, soft_wrap=True)
