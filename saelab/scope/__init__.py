"""A scope: SAEs at every layer and sublayer of a model, in Gemma Scope's layout.

`layout` is the folder's index (scope.json + scope.parquet), shared with the browser.
"""

from saelab.scope.layout import (
    Scope,
    ScopeEntry,
    ScopeError,
    is_scope,
    read_scope,
    scope_id,
    width_label,
    write_scope,
)

__all__ = ["Scope", "ScopeEntry", "ScopeError", "is_scope", "read_scope", "scope_id",
           "width_label", "write_scope"]
