"""Attribution graphs in the browser: found under the served folder, read, and their view saved.

A graph is a folder `saelab graph --out` wrote (``neuronpedia.json`` beside
``record.json``), up to 3 folders deep. The API:

    GET  /api/graphs                 [{name, prompt, nodes, links}]
    GET  /api/graphs/NAME            the graph JSON, each feature node with ``href`` (its
                                     feature page when an index of its transcoder is served)
                                     and ``top_tokens`` (that index's logit-lens tokens)
    POST /api/graphs/NAME/view       {pinnedIds: [...], supernodes: [[label, id, ...], ...]}
                                     saved into the file's qParams (Neuronpedia's spelling)

No torch here (the browser starts instantly); writes are atomic.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from saelab.app.request import HttpError
from saelab.atomic import atomic_write_text

GRAPH_FILE = "neuronpedia.json"
MAX_PINNED = 2000
MAX_SUPERNODES = 500


def find_graphs(root: Path, max_depth: int = 3) -> dict[str, Path]:
    """name (the folder's path under root, '/'-joined) -> folder holding a graph."""
    found: dict[str, Path] = {}
    base = len(root.parts)
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if len(here.parts) - base >= max_depth:
            dirnames[:] = []
        if GRAPH_FILE in filenames and "record.json" in filenames:
            name = "/".join(here.parts[base:]) or here.name
            found[name] = here
    return dict(sorted(found.items()))


def _read(folder: Path) -> dict:
    try:
        doc = json.loads((folder / GRAPH_FILE).read_text())
    except (OSError, ValueError) as err:
        raise HttpError(503, f"{folder / GRAPH_FILE} could not be read ({err}); write it again "
                        "with saelab graph --out.") from None
    if not isinstance(doc, dict) or not all(k in doc for k in ("metadata", "nodes", "links")):
        raise HttpError(503, f"{folder / GRAPH_FILE} is not a graph file; write it again with "
                        "saelab graph --out.")
    return doc


def graph_list(graphs: dict[str, Path]) -> list[dict]:
    out = []
    for name, folder in graphs.items():
        try:
            doc = _read(folder)
        except HttpError as err:
            out.append({"name": name, "error": str(err)})
            continue
        out.append({"name": name, "prompt": doc["metadata"].get("prompt", ""),
                    "nodes": len(doc["nodes"]), "links": len(doc["links"])})
    return out


def _folder(graphs: dict[str, Path], name: str) -> Path:
    if name not in graphs:
        raise HttpError(404, f"no graph named {name[:80]!r} here; known: {', '.join(graphs)[:400]}")
    return graphs[name]


def _index_by_layer(saes: dict[str, Any]) -> dict[int, tuple[str, Any]]:
    """layer -> (name, index) for the served indexes of transcoders (site mlp_in.L)."""
    out = {}
    for name, index in saes.items():
        site = str((index.meta.get("sae") or {}).get("site") or "")
        kind, _, layer = site.partition(".")
        if kind == "mlp_in" and layer.isdigit():
            out[int(layer)] = (name, index)
    return out


def graph_doc(graphs: dict[str, Path], saes: dict[str, Any], name: str) -> dict:
    doc = _read(_folder(graphs, name))
    by_layer = _index_by_layer(saes)
    for node in doc["nodes"]:
        if node.get("feature_type") != "cross layer transcoder":
            continue
        try:
            layer, index, _pos = (int(x) for x in str(node["node_id"]).split("_"))
        except ValueError:
            continue
        node["feature_index"] = index
        if layer in by_layer:
            sae, fi = by_layer[layer]
            if 0 <= index < fi.d_sae:
                row = fi.feature(index)
                node["href"] = f"/sae/{sae}/feature/{index}"
                node["top_tokens"] = list(row.get("lens_top_tokens") or [])[:5]
                node["label"] = row.get("label")
    return doc


def save_view(graphs: dict[str, Path], name: str, body: dict) -> dict:
    """Store pinned node ids and supernodes (``[label, id, id, ...]``) in the file's qParams."""
    folder = _folder(graphs, name)
    doc = _read(folder)
    ids = {n["node_id"] for n in doc["nodes"]}
    unknown = set(body) - {"pinnedIds", "supernodes"}
    if unknown:
        raise HttpError(400, f"unknown field(s) {sorted(unknown)[:5]}; send pinnedIds and supernodes")
    pinned = body.get("pinnedIds", [])
    supers = body.get("supernodes", [])
    if not isinstance(pinned, list) or len(pinned) > MAX_PINNED or not all(
            isinstance(p, str) and p in ids for p in pinned):
        raise HttpError(400, f"pinnedIds must be a list of at most {MAX_PINNED} node ids of this graph")
    if not isinstance(supers, list) or len(supers) > MAX_SUPERNODES:
        raise HttpError(400, f"supernodes must be a list of at most {MAX_SUPERNODES} groups")
    for group in supers:
        if not (isinstance(group, list) and len(group) >= 2 and all(isinstance(x, str) for x in group)
                and 0 < len(group[0]) <= 200 and all(x in ids for x in group[1:])):
            raise HttpError(400, "each supernode is [label, node id, ...] with a label of 1-200 "
                            "characters and node ids of this graph")
    doc.setdefault("qParams", {})
    doc["qParams"]["pinnedIds"] = pinned
    doc["qParams"]["supernodes"] = supers
    atomic_write_text(folder / GRAPH_FILE, json.dumps(doc))
    return {"saved": True, "pinnedIds": len(pinned), "supernodes": len(supers)}


def graph_api(graphs: dict[str, Path], saes: dict[str, Any], method: str, parts: list[str],
              body: Any) -> Any:
    """Answer /api/graphs/...: parts are the path segments after 'graphs'."""
    if method == "GET" and not parts:
        return graph_list(graphs)
    # Graph names may hold '/': the last segment is 'view' for a POST.
    if method == "GET" and parts:
        return graph_doc(graphs, saes, "/".join(parts))
    if method == "POST" and len(parts) >= 2 and parts[-1] == "view":
        return save_view(graphs, "/".join(parts[:-1]), body())
    raise HttpError(404, f"no API endpoint {method} /api/graphs/{'/'.join(parts)[:200]}")
