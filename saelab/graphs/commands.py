"""`saelab graph`: an attribution graph of a prompt through a set of per-layer transcoders.

    result = run_graph("smollm2-135m-instruct", "runs/tc", "The capital of France is", "out/g")
    result["stats"]          # features, passes, replacement and completeness scores, seconds

Writes into the folder `out`: ``neuronpedia.json`` (circuit-tracer's graph file,
schema version 1, the pruned graph), ``record.json`` + ``record.safetensors``
(saelab's own record of the unpruned graph, see record.py) and with `verify`
``verify.json`` (see verify.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.table import Table

from saelab.atomic import atomic_write_text
from saelab.checks import integer, number
from saelab.console import JsonFlag, ModelOpt, console, emit_json, escape, progress, user_errors

TARGET_HELP = ('logits (the top next tokens up to 0.95 probability, at most 10) or a metric of '
               'saelab attribute\'s grammar, e.g. \'logit_diff:" Paris":" London"\'.')


def check_options(max_features: int, node_threshold: float, edge_threshold: float,
                  verify: int) -> None:
    """Refuse bad numbers (BadValueError, exit 2) before anything is loaded."""
    integer("max_features", max_features, low=1, high=10**7)
    number("node_threshold", node_threshold, low=0.0, high=1.0)
    number("edge_threshold", edge_threshold, low=0.0, high=1.0)
    integer("verify", verify, low=0, high=1000)


def run_graph(model: Any, transcoders: Any, prompt: str, out: str | Path, *,
              target: str = "logits", max_features: int = 7500, node_threshold: float = 0.8,
              edge_threshold: float = 0.98, verify: int = 0, chat: bool = False,
              dtype: str = "float32", batch: int = 256, slug: str | None = None,
              on_progress: Any = None) -> dict[str, Any]:
    """Build, prune and write the graph of `prompt`; return the summary (`stats`, `verify`).

    model: a loaded LM or a name for `load_model`. transcoders: a folder `load_transcoders`
    reads, or a mapping layer -> transcoder. verify: intervene on this many top features.
    """
    from saelab.attribution.metrics import parse_metric
    from saelab.data.tokens import tokenize
    from saelab.graphs.build import build_graph
    from saelab.graphs.frozen import GraphError
    from saelab.graphs.graph_json import edges_kept, neuronpedia_json

    check_options(max_features, node_threshold, edge_threshold, verify)
    metric = None if target == "logits" else parse_metric(target)
    if not prompt.strip():
        raise GraphError("the prompt is empty; give a prompt of at least one token (--prompt TEXT).")
    tset, source = transcoders, None
    if isinstance(transcoders, str | Path):
        from saelab.sae.transcoder import load_transcoders

        source = str(transcoders)
        tset = load_transcoders(transcoders)
    lm = model
    if isinstance(model, str | Path):
        from saelab.models.load import load_model

        lm = load_model(str(model), dtype=dtype)
    name = getattr(lm, "name", None) or "model"
    check = getattr(tset, "check_model", None)
    if check is not None:
        check(n_layers=lm.arch.n_layers, d_model=lm.arch.d_model, model_name=name)
    tset = {layer: tset[layer].to(lm.model.dtype).eval() for layer in tset}
    ids = tokenize(lm, prompt, chat=chat).input_ids
    graph = build_graph(lm.model, lm.tokenizer, ids, tset, metric=metric,
                        metric_spec="" if metric is None else target, max_features=max_features,
                        batch=batch, progress=on_progress)
    graph.prompt = prompt
    graph.settings.update({"model": name, "transcoders": source, "chat": chat,
                           "node_threshold": node_threshold, "edge_threshold": edge_threshold})
    pruned = graph.prune(node_threshold, edge_threshold)
    out = Path(out)
    graph.save(out)
    doc = neuronpedia_json(graph, pruned, slug=slug or out.name, scan=name,
                           node_threshold=node_threshold, edge_threshold=edge_threshold,
                           transcoder_list=[source] if source else [])
    atomic_write_text(out / "neuronpedia.json", json.dumps(doc))
    result: dict[str, Any] = {
        "out": str(out), "stats": graph.stats,
        "targets": [{k: t[k] for k in ("label", "vocab_idx", "weight", "value")} for t in graph.targets],
        "pruned": {"nodes": len(doc["nodes"]), "links": len(doc["links"]),
                   "features": sum(n["feature_type"] == "cross layer transcoder" for n in doc["nodes"]),
                   "edges_kept": edges_kept(pruned)}}
    if verify:
        from saelab.graphs.verify import verify_graph

        check_result = verify_graph(lm.model, ids, tset, graph, pruned, graph.live["targets"], top=verify)
        atomic_write_text(out / "verify.json", json.dumps(check_result, indent=1))
        result["verify"] = check_result
    return result


@user_errors
def graph_cmd(
    prompt: Annotated[str, typer.Option(help="The prompt (the user turn with --chat).")],
    transcoders: Annotated[Path, typer.Option(help="A transcoder set: one per layer (saelab, SAELens or circuit-tracer folders).")],
    out: Annotated[Path, typer.Option(help="Folder for neuronpedia.json, record.json/.safetensors (and verify.json).")],
    model: ModelOpt = "smollm2-135m-instruct",
    target: Annotated[str, typer.Option(help=TARGET_HELP)] = "logits",
    max_features: Annotated[int, typer.Option(help="Feature nodes with rows, chosen by influence.")] = 7500,
    node_threshold: Annotated[float, typer.Option(help="Keep nodes holding this share of the influence.")] = 0.8,
    edge_threshold: Annotated[float, typer.Option(help="Keep edges holding this share of the influence.")] = 0.98,
    verify: Annotated[bool, typer.Option("--verify", help="Ablate and steer the top features in the real and the replacement model.")] = False,
    verify_top: Annotated[int, typer.Option(help="How many top features --verify checks.")] = 10,
    chat: Annotated[bool, typer.Option(help="Wrap the prompt in the model's chat template.")] = False,
    json_out: JsonFlag = False,
) -> None:
    """Attribution graph of a prompt: features, errors and tokens, edges by direct effect."""
    integer("verify_top", verify_top, low=1, high=1000)  # checked before anything loads
    check_options(max_features, node_threshold, edge_threshold, verify_top if verify else 0)
    torch.set_grad_enabled(True)
    bar, task = progress(), None

    def tick(done: int, total: int) -> None:  # the bar appears with the first rows
        nonlocal task
        if task is None:
            bar.start()
            task = bar.add_task("rows", total=total, info="")
        bar.update(task, completed=done, total=total)

    try:
        result = run_graph(model, transcoders, prompt, out, target=target, max_features=max_features,
                           node_threshold=node_threshold, edge_threshold=edge_threshold,
                           verify=verify_top if verify else 0, chat=chat, on_progress=tick)
    finally:
        if task is not None:
            bar.stop()
    if json_out:
        return emit_json(result)
    s = result["stats"]
    console.print(f"graph: {s['selected_features']} of {s['active_features']} active features, "
                  f"{len(result['targets'])} target(s), {s['backward_passes']} backward passes, "
                  f"{s['seconds']:.1f} s; replacement score {s['replacement_score']:.3f}, "
                  f"completeness {s['completeness_score']:.3f}", soft_wrap=True)
    p = result["pruned"]
    console.print(f"pruned: {p['features']} features, {p['nodes']} nodes, {p['links']} links -> "
                  f"{escape(str(Path(result['out']) / 'neuronpedia.json'))}", soft_wrap=True)
    v = result.get("verify")
    if v:
        table = Table("node", "edit", "predicted", "replacement", "real",
                      title="verification: change of the target")
        for r in v["checks"]:
            table.add_row(escape(r["node"]), r["intervention"], f"{r['predicted']:+.4g}",
                          f"{r['replacement']:+.4g}", f"{r['real']:+.4g}")
        console.print(table)

        def fmt(x):
            return "n/a" if x is None else f"{x:.3f}"
        for which in ("replacement", "real"):
            fit = v[f"{which}_fit"]
            console.print(f"{which} model: Spearman {fmt(fit['spearman'])}, slope {fmt(fit['slope'])}; "
                          f"pruned graph's share of the target {fmt(v['pruned_share'][which])}",
                          soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Mount `graph` on the root app."""
    app.command("graph")(graph_cmd)
