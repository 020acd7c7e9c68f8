"""The KV cache's keyword across transformers versions.

transformers 5.24 renamed the forward's ``past_key_values`` to ``cache`` (the old
name warns, and goes in 5.40) and the output field with it; 4.x only knows
``past_key_values``. Everything in saelab that passes or reads a cache goes
through these two functions, so either version works without warnings.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any


@functools.cache
def _cache_keyword(forward_owner: type) -> str:
    parameters = inspect.signature(forward_owner.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """``{keyword: cache}`` for ``model(...)``, with the keyword this model's forward takes."""
    return {_cache_keyword(type(model)): cache}


def returned_cache(output: Any) -> Any:
    """The KV cache a forward returned (None when it returned none)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)
