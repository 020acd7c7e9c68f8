"""An attribution graph as saelab keeps it: JSON + safetensors, plain (layer, index) ids.

    graph.save("out/")       # out/record.json (everything small) + out/record.safetensors (tensors)
    graph = Graph.load("out/")

Nodes in order: the selected features, the error nodes (``layer * T + pos``),
the tokens, the targets. ``adjacency`` holds the rows of the features and of
the targets (see influence.py) over the columns features, errors, tokens.
``row_value`` is each row's node's clean value (a feature's pre-activation,
``x . W_enc[:, i] + b_enc[i]``; a target's value) and ``row_sum_all`` the sum of
its incoming edges from every source, including the features the cap left out,
so ``row_value - row_sum_all`` is the row's bias (everything no node holds).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from saelab.atomic import atomic_write_text
from saelab.errors import CorruptFileError
from saelab.graphs.features import ActiveFeatures
from saelab.graphs.influence import Layout, Pruned, prune, scores

FORMAT = "saelab-graph-1"
_TENSORS = ("adjacency", "row_value", "row_sum_all", "feat_layer", "feat_pos", "feat_index",
            "feat_act", "tokens")


@dataclass
class Graph:
    prompt: str
    tokens: list[int]
    token_texts: list[str]
    n_layers: int
    features: ActiveFeatures  # the selected features, (layer, pos, index) order
    targets: list[dict[str, Any]]  # label, vocab_idx, weight, pos, value
    adjacency: Tensor  # (n_features + n_targets, n_features + n_layers*T + T)
    row_value: Tensor
    row_sum_all: Tensor
    settings: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    live: dict[str, Any] = field(default_factory=dict, repr=False)
    """Objects of the run that built it (the targets' directions); not saved."""

    @property
    def n_pos(self) -> int:
        return len(self.tokens)

    @property
    def layout(self) -> Layout:
        return Layout(len(self.features), self.n_layers * self.n_pos, self.n_pos, len(self.targets))

    @property
    def weights(self) -> Tensor:
        return torch.tensor([t["weight"] for t in self.targets], dtype=torch.float32)

    def prune(self, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Pruned:
        return prune(self.adjacency, self.layout, self.weights, node_threshold, edge_threshold)

    def scores(self) -> tuple[float, float]:
        """(replacement score, completeness score)."""
        return scores(self.adjacency, self.layout, self.weights)

    def node_label(self, node: int) -> str:
        """A plain id: ``feature L:I@P``, ``error L@P``, ``token P``, ``target K``."""
        lay = self.layout
        if node < lay.n_features:
            f = self.features
            return f"feature {int(f.layer[node])}:{int(f.index[node])}@{int(f.pos[node])}"
        node -= lay.n_features
        if node < lay.n_errors:
            return f"error {node // self.n_pos}@{node % self.n_pos}"
        node -= lay.n_errors
        if node < lay.n_tokens:
            return f"token {node}"
        return f"target {node - lay.n_tokens}"

    # ------------------------------------------------------------------ files
    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        f = self.features
        tensors = {"adjacency": self.adjacency.contiguous(),
                   "row_value": self.row_value.double(), "row_sum_all": self.row_sum_all.double(),
                   "feat_layer": f.layer.long(), "feat_pos": f.pos.long(),
                   "feat_index": f.index.long(), "feat_act": f.act.double(),
                   "tokens": torch.tensor(self.tokens, dtype=torch.long)}
        tmp = folder / "record.safetensors.tmp"
        save_file(tensors, str(tmp))
        tmp.replace(folder / "record.safetensors")
        meta = {"format": FORMAT, "prompt": self.prompt, "tokens": self.tokens,
                "token_texts": self.token_texts, "n_layers": self.n_layers,
                "targets": self.targets, "settings": self.settings, "stats": self.stats,
                "features": [{"layer": int(a), "index": int(b), "pos": int(c), "act": float(d)}
                             for a, b, c, d in zip(f.layer, f.index, f.pos, f.act, strict=True)]}
        atomic_write_text(folder / "record.json", json.dumps(meta, indent=1))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> Graph:
        folder = Path(folder)
        try:
            meta = json.loads((folder / "record.json").read_text())
            t = load_file(str(folder / "record.safetensors"))
        except (OSError, ValueError) as err:
            raise CorruptFileError(f"{folder}: not a readable saelab graph ({err}); write it "
                                   "again with saelab graph --out.") from None
        if meta.get("format") != FORMAT or any(k not in t for k in _TENSORS):
            raise CorruptFileError(f"{folder}: record.json/record.safetensors are not a "
                                   f"{FORMAT} record; write it again with saelab graph --out.")
        feats = ActiveFeatures(t["feat_layer"], t["feat_pos"], t["feat_index"], t["feat_act"])
        return cls(meta["prompt"], meta["tokens"], meta["token_texts"], meta["n_layers"], feats,
                   meta["targets"], t["adjacency"], t["row_value"], t["row_sum_all"],
                   meta.get("settings", {}), meta.get("stats", {}))
