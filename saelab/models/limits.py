"""The model's maximum positions, read before and after loading it.

Contexts and prompts longer than a model's position table run silently past it
(RoPE extrapolates, learned tables index out of range) or use memory until the
machine gives up, so every place a context or a prompt enters checks it here.
`config_max_positions` reads config.json only (milliseconds), so a command can
refuse a bad --context before it loads the weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from saelab.errors import BadValueError

# config.json keys that bound the position table, by family (GPT-2 says n_positions).
_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def _from_dict(raw: dict) -> int | None:
    for container in (raw, raw.get("text_config") or {}):
        for key in _KEYS:
            value = container.get(key) if isinstance(container, dict) else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def config_max_positions(model: str | Path | None) -> int | None:
    """Max positions from the model's config.json without loading it; None when unknown
    before loading (an uncached model, a .gguf, an offline Hub id)."""
    if model is None:
        return None
    name = str(model)
    path = Path(name).expanduser()
    config = None
    try:
        from saelab.models.catalog import CATALOG
        from saelab.models.load import model_cache_dir

        if name in CATALOG:
            config = model_cache_dir(name, CATALOG[name].sha256) / "config.json"
        elif path.is_dir():
            config = path / "config.json"
        elif path.suffix != ".gguf" and "/" in name:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(name, "config.json")
            config = Path(found) if isinstance(found, str) else None
        if config is None or not config.is_file():
            return None
        raw = json.loads(config.read_text())
    except (OSError, ValueError):  # unreadable here: load_model will say why
        return None
    return _from_dict(raw) if isinstance(raw, dict) else None


def lm_max_positions(lm: Any) -> int | None:
    """Max positions of a loaded LM (or bare HF model); None if its config has none."""
    config = getattr(getattr(lm, "model", lm), "config", None)
    if config is None:
        return None
    return _from_dict(config.to_dict() if hasattr(config, "to_dict") else vars(config))


def check_positions(where: str, n: int, limit: int | None, model: Any = "the model") -> None:
    """Refuse `n` positions past `limit` (BadValueError, exit 2); no limit known: no check."""
    if limit is not None and n > limit:
        raise BadValueError(f"{where} is {n:,} positions long, but {model} has {limit:,} "
                            f"(max_position_embeddings); use at most {limit:,}.")
