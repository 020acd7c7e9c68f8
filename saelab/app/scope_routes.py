"""The browser's routes on a scope folder (`saelab serve DIR` where DIR holds scope.json).

    GET  /api/scope            the scope: header, stages, and one row per SAE (metrics, status,
                               the name of its feature index in /api/saes, or null)
    POST /api/scope/search     {"text", "top"}: for every SAE of the scope, the top features on
                               each token, from one forward of the model (saelab.scope.search)
    POST /api/scope/steer      {"sae", "prompt", "feature", ...}: steering with any feature of
                               any SAE of the scope (the steer fields of /api/saes/NAME/steer)

The feature pages of each SAE are the ordinary ones (/sae/NAME, NAME = the entry's
"features" path), served from the indexes the server found under DIR. An SAE whose
native folder is missing or corrupt (read_scope's status, or a load that fails) is
listed as such, skipped by the search and refused by the steer endpoint; everything
else goes on. SAEs are named by their entry id only, looked up in the index: no URL
or body field becomes a path, and the index's own paths must stay inside DIR.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from saelab.app.request import (
    HttpError,
    bool_field,
    check_keys,
    check_query,
    choice_field,
    int_field,
    number_field,
    text_field,
)
from saelab.scope.layout import ScopeEntry, read_scope

log = logging.getLogger(__name__)
MAX_PROMPT_CHARS = 4000
MAX_TOKENS = 128  # a scope search encodes the prompt with every SAE: keep it short
STEER_FIELDS = ("sae", "prompt", "feature", "mode", "strength", "max_new_tokens", "seed",
                "temperature", "chat")


class ScopeRoutes:
    """The scope of `folder` as the browser serves it; `app` gives the indexes and the live model."""

    def __init__(self, folder: Path, app: Any):
        self.folder = Path(folder)
        self.app = app
        self.scope = read_scope(self.folder)  # SaelabError / CorruptFileError: the server refuses
        self.entries = {e.id: e for e in self.scope.entries}
        self.problems: dict[str, str] = {}  # entry id -> why its SAE cannot be used
        for e in self.scope.entries:
            problem = self._problem(e)
            if problem:
                self.problems[e.id] = problem
                log.warning("scope SAE %s: %s", e.id, problem)
        self._saes: dict[str, Any] = {}
        self._load_lock = threading.Lock()

    # ------------------------------------------------------------------ dispatch
    def api(self, method: str, parts: list[str], query: dict, body) -> Any:
        """Answer /api/scope/<parts>; `body` is a callable reading the JSON body (POST only)."""
        if method == "GET" and not parts:
            check_query(query, (), "GET /api/scope")
            return self.summary()
        if method == "POST" and parts == ["search"]:
            return self.search(body())
        if method == "POST" and parts == ["steer"]:
            return self.steer(body())
        raise HttpError(404, f"no API endpoint {method} /api/scope/{'/'.join(parts)[:200]}")

    # ------------------------------------------------------------------ index
    def summary(self) -> dict:
        s = self.scope
        rows = []
        for e in s.entries:
            index = e.features if e.features in self.app.saes else None
            feature_status = ("none" if e.features is None else "ok" if index else
                              "damaged" if e.features in self.app.damaged else "missing")
            rows.append({"id": e.id, "site": e.site, "site_kind": e.site_kind, "layer": e.layer,
                         "width": e.width, "arch": e.arch, "target_l0": e.target_l0,
                         "average_l0": e.average_l0, "metrics": _finite(e.metrics),
                         "status": "ok" if e.id not in self.problems else
                         ("missing" if e.status == "missing" else "corrupt"),
                         "problem": self.problems.get(e.id), "features": index,
                         "features_status": feature_status})
        return {"model": s.model, "kind": s.kind, "d_model": s.d_model, "n_layers": s.n_layers,
                "stages": _finite(s.stages), "settings": s.settings, "saes": rows}

    def _problem(self, e: ScopeEntry) -> str | None:
        if not _inside(self.folder, e.native):
            return f"its native path {e.native!r} points outside the scope folder"
        if e.status == "missing":
            return f"its SAE folder {self.folder / e.native} is missing"
        if e.status == "corrupt":
            return f"its SAE folder {self.folder / e.native} cannot be read"
        return None

    def sae(self, sae_id: str) -> Any:
        """The loaded SAE of entry `sae_id`; HttpError 404 (unknown id), 503 (missing/corrupt)."""
        if sae_id not in self.entries:
            raise HttpError(404, f"no SAE {sae_id[:120]!r} in this scope")
        with self._load_lock:
            if sae_id in self.problems:
                raise HttpError(503, f"SAE {sae_id} is unavailable: {self.problems[sae_id]}; "
                                     "retrain it with `saelab scope --resume`")
            if sae_id not in self._saes:
                from saelab.errors import SaelabError
                from saelab.sae import load_sae

                try:
                    sae = load_sae(self.folder / self.entries[sae_id].native, dtype="float32")
                except (SaelabError, OSError, ValueError) as err:  # damaged after start-up
                    self.problems[sae_id] = f"its SAE folder cannot be loaded ({err})"
                    log.warning("scope SAE %s: %s", sae_id, self.problems[sae_id])
                    raise HttpError(503, f"SAE {sae_id} is unavailable: "
                                         f"{self.problems[sae_id]}") from None
                self._saes[sae_id] = sae.eval().to(self.app.device)
            return self._saes[sae_id]

    # ------------------------------------------------------------------ live
    def search(self, body: dict) -> dict:
        """Top features per token for every available SAE of the scope, from one forward."""
        check_keys(body, ("text", "top"), "scope search")
        text = text_field(body, "text", MAX_PROMPT_CHARS)
        top = int_field(body, "top", 3, 1, 10)
        saes = {}
        for sae_id in self.entries:
            try:
                saes[sae_id] = self.sae(sae_id)
            except HttpError:
                continue  # listed below as unavailable
        if not saes:
            raise HttpError(409, "every SAE of this scope is missing or corrupt; nothing to search")
        return self.app._call(lambda: self._search(text, top, saes))

    def _search(self, text: str, top: int, saes: dict[str, Any]) -> dict:
        from saelab.scope.search import PromptTooLong, encode_all, prompt_ids, top_features

        live = self.app.live
        with live.lock:
            lm = live.lm(self.scope.model)
            try:
                ids = prompt_ids(lm, text, MAX_TOKENS)
            except PromptTooLong as err:
                raise HttpError(413, str(err)) from None
            hits = top_features(encode_all(lm, saes, ids), top)
        special = set(lm.tokenizer.all_special_ids)
        toks = ids[0].tolist()
        tokens = [{"token": lm.tokenizer.decode([t]), "id": t, "special": t in special} for t in toks]
        rows = []
        for sae_id, per_token in hits.items():
            e = self.entries[sae_id]
            rows.append({"id": sae_id, "site": e.site, "site_kind": e.site_kind, "layer": e.layer,
                         "width": e.width, "average_l0": e.average_l0,
                         "features": e.features if e.features in self.app.saes else None,
                         "tokens": [[{"feature": f, "act": a} for f, a in fs] for fs in per_token]})
        unavailable = [{"id": i, "problem": p} for i, p in self.problems.items()]
        return {"tokens": tokens, "saes": rows, "unavailable": unavailable}

    def steer(self, body: dict) -> dict:
        check_keys(body, STEER_FIELDS, "scope steer")
        sae_id = body.get("sae")
        if not isinstance(sae_id, str):
            raise HttpError(400, 'field "sae" must be the id of an SAE of this scope (a string)')
        sae = self.sae(sae_id)
        feature = int_field(body, "feature", None, 0, 2**62)
        if feature >= sae.cfg.d_sae:
            raise HttpError(404, f"feature {feature} does not exist: {sae_id} has features "
                                 f"0..{sae.cfg.d_sae - 1}")
        args = dict(prompt=text_field(body, "prompt", MAX_PROMPT_CHARS), feature=feature,
                    mode=choice_field(body, "mode", "add", ("add", "clamp")),
                    strength=number_field(body, "strength", 0.25, -1000.0, 1000.0),
                    max_new_tokens=int_field(body, "max_new_tokens", 40, 1, 128),
                    seed=int_field(body, "seed", 0, 0, 2**31 - 1),
                    temperature=number_field(body, "temperature", 0.7, 0.0, 2.0),
                    chat=bool_field(body, "chat", True))
        return self.app._call(lambda: self.app.live.steer_sae(sae, self.scope.model, **args))


def _inside(folder: Path, rel: str) -> bool:
    """Whether the relative path `rel` of the index stays inside `folder` (no .., no absolute)."""
    try:
        return (folder / rel).resolve().is_relative_to(folder.resolve())
    except (OSError, ValueError):
        return False


def _finite(d: dict) -> dict:
    """Numbers that JSON can carry (NaN and inf become null)."""
    import math

    return {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in d.items()}
